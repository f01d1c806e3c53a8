"""Demonstrations to SFT checkpoint: ``gsrl collect`` on the splat task at 32x32, then ``gsrl sft`` with the real
DeepSpeed engine (one gloo rank on CPU) on the tiny VLA, and the checkpoint loaded back by the VLA.

SFT runs in a subprocess: ``deepspeed.init_distributed`` creates a process-global group and DeepSpeed patches global
state, which must not leak into other tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _sft_run import REPO_ROOT, run_sft
from safetensors.torch import load_file

from gsrl.collect import main as collect_main
from gsrl.data.lerobot import LeRobotDataset

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
]


def _task_overrides(tmp_path: Path) -> list[str]:
    return [
        "task.render.width=32",
        "task.render.height=32",
        f"task.render.cache_dir={tmp_path / 'splat-cache'}",
        "task.render.device=cpu",
    ]


def test_collect_then_sft(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "demos"
    overrides = _task_overrides(tmp_path)
    rc = collect_main(["-c", "gs_ppo", *overrides, "--episodes", "2", "--num-envs", "2", "--out", str(data)])
    assert rc == 0
    assert "expert success rate" in capsys.readouterr().out

    dataset = LeRobotDataset(data)
    assert dataset.num_episodes == 2
    assert dataset.observation_shapes() == {"state": (25,), "rgb/3rd_view_camera": (32, 32, 3)}
    episode = dataset.episode(0)
    assert 5 < len(episode) <= 50  # kept episodes are successes, which end the episode before the time limit
    assert episode.images["rgb/3rd_view_camera"].std() > 5  # a rendered scene, not a blank frame
    assert np.all(np.abs(episode.actions) <= 1.0) and episode.actions[-1, 6] == 1.0  # released at the end

    out = tmp_path / "sft"
    options = ["--steps", "24", "--batch-size", "16", "--lr", "1e-3", "--warmup-steps", "0"]
    proc = run_sft(data, out, overrides, [*options, "--checkpoint-every", "12", "--seed", "0"], timeout_s=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    log = [json.loads(line) for line in (out / "sft_log.jsonl").read_text().splitlines()]
    losses = [row["sft/loss"] for row in log]
    assert len(losses) == 24 and all(math.isfinite(v) for v in losses)
    assert all(math.isfinite(row["sft/grad_norm"]) for row in log)
    assert np.mean(losses[-6:]) < np.mean(losses[:6]), losses
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "checkpoints" / "step_000012" / "model.safetensors").is_file()

    from gsrl.config import load_config
    from gsrl.env_spec import probe_env_spec
    from gsrl.policy import build_policy

    config = load_config(
        REPO_ROOT / "configs" / "gs_ppo.yaml", [*overrides, "policy.kind=vla", "policy.action_chunk=4"]
    )
    spec = probe_env_spec(config.task)
    policy = build_policy(
        "vla",
        spec.observation_spec,
        spec.action_dim,
        4,
        **{**config.policy.kwargs(), "checkpoint": str(out)},
    )
    saved = load_file(str(out / "model.safetensors"))
    for name, tensor in policy.state_dict().items():
        torch.testing.assert_close(tensor, saved[name], msg=name)
    assert saved["state_norm.low"].dtype == torch.float32
    assert not torch.all(saved["state_norm.low"] == -1.0), "state bounds should come from the dataset's stats"
    observations = {k: torch.from_numpy(v[:2]) for k, v in episode.images.items()}
    observations["state"] = torch.from_numpy(episode.states[:2])
    with torch.no_grad():
        chunk = policy.act(observations, instructions=[episode.task] * 2).action_chunk
    assert chunk.shape == (2, 4, 7) and torch.isfinite(chunk).all()
