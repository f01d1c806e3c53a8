"""``gsrl sft`` data-parallel under torchrun: 2 gloo ranks on CPU with the real DeepSpeed engine (ZeRO-1).

Each rank trains on its half of every batch; DeepSpeed averages the gradients; rank 0 alone writes the step log,
TensorBoard and checkpoints, so a 2-rank run leaves exactly what a 1-rank run leaves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _sft_run import REPO_ROOT, synthetic_dataset
from safetensors.torch import load_file

from gsrl.redis_server import free_port

pytestmark = pytest.mark.integration

OVERRIDES = [
    "task.render.width=32",
    "task.render.height=32",
    "task.render.device=cpu",
    "policy.kind=vla",
    "policy.action_chunk=4",
    "learner.zero_stage=1",
]


def _torchrun_sft(data: Path, out: Path, ranks: int, options: list[str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}"]
    command += ["--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "gsrl.cli", "sft", "-c", "gs_ppo"]
    command += [*OVERRIDES, f"task.render.cache_dir={out.parent / 'splat-cache'}"]
    command += ["--data", str(data), "--out", str(out), *options]
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=420)


def test_two_ranks_train_one_model_and_rank_zero_writes_it(tmp_path: Path) -> None:
    data = synthetic_dataset(tmp_path / "demos")
    out = tmp_path / "sft"
    options = ["--steps", "3", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "0", "--seed", "0"]
    proc = _torchrun_sft(data, out, 2, [*options, "--checkpoint-every", "2"])
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "3 steps of 4 (2 rank(s))" in output
    assert output.count("sft: 3 steps, final loss") == 1  # the summary comes from rank 0 only
    # Each rank decoded only its own episode of the two (round-robin shares), not the whole dataset.
    assert "rank 0: decoded 1 of 2 episodes" in output and "rank 1: decoded 1 of 2 episodes" in output

    settings = json.loads((out / "sft_settings.json").read_text())
    assert settings["world_size"] == 2 and settings["batch_size"] == 4
    steps = [json.loads(line)["step"] for line in (out / "sft_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # one writer: no line twice
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1

    # The model trained: the step-2 checkpoint and the final one differ, and both load as float32 tensors.
    middle = load_file(str(out / "checkpoints" / "step_000002" / "model.safetensors"))
    final = load_file(str(out / "model.safetensors"))
    assert middle.keys() == final.keys()
    assert any(not torch.equal(middle[k], final[k]) for k in final if final[k].is_floating_point())


def test_a_batch_that_does_not_split_evenly_is_refused(tmp_path: Path) -> None:
    data = synthetic_dataset(tmp_path / "demos")
    proc = _torchrun_sft(data, tmp_path / "sft", 2, ["--steps", "1", "--batch-size", "5"])
    assert proc.returncode != 0
    assert "--batch-size 5 must be divisible by the number of ranks (2)" in proc.stderr
    assert not (tmp_path / "sft" / "model.safetensors").exists()


def test_a_time_budget_stops_both_ranks_at_the_same_step(tmp_path: Path) -> None:
    """Ranks whose clocks disagree by a step would hang in the next all-reduce; the budget is read as the ranks'
    largest elapsed time, so both stop together, and rank 0 still writes the final checkpoint."""
    data = synthetic_dataset(tmp_path / "demos")
    out = tmp_path / "sft"
    options = ["--steps", "100000", "--batch-size", "4", "--max-seconds", "8", "--warmup-steps", "0", "--seed", "0"]
    proc = _torchrun_sft(data, out, 2, options)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "time budget of 8 s reached after" in output
    steps = [json.loads(line)["step"] for line in (out / "sft_log.jsonl").read_text().splitlines()]
    assert 0 < len(steps) < 100000 and steps == list(range(1, len(steps) + 1))
    assert f"sft: {len(steps)} steps, final loss" in output
    assert (out / "model.safetensors").exists()
    # The decay followed the clock, not the 100,000 steps: from the peak (1e-4) to near the floor (1e-5).
    rates = [json.loads(line)["sft/lr"] for line in (out / "sft_log.jsonl").read_text().splitlines()]
    assert rates[0] == pytest.approx(1e-4, rel=0.05) and rates[-1] < 2e-5
