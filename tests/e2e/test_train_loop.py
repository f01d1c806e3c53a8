"""The whole loop as processes: `gsrl train` with redis, a learner, two policy servers and two env servers.

Asserts what the walking skeleton promises: the policy version advances and reaches the policy
servers, every segment produced is consumed, dropped (and counted) or still in the stream, the
loss is finite, and the run directory holds the config, TensorBoard logs and a checkpoint; that
the launcher spreads the env servers over its policy servers, each of which serves and takes new weights;
and that the first update is a critic warm-up (``algo.critic_warmup_updates=1``), the others PPO updates.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gsrl.curves import read_scalars

ROOT = Path(__file__).resolve().parents[2]
MAX_UPDATES = 4


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("run") / "e2e"
    overrides = [
        "run.name=e2e",
        f"run.max_updates={MAX_UPDATES}",
        "run.duration_s=600",
        "run.log_every_s=5",
        "env_server.num_servers=2",
        "policy_server.num_servers=2",
        "env_server.num_envs=2",
        "task.max_episode_steps=12",
        "policy.hidden_sizes=[32, 32]",
        "policy_server.segment_length=4",
        "learner.segments_per_update=4",
        "redis.max_stream_len=8",
        "algo.update_epochs=2",
        "algo.num_minibatches=2",
        "algo.max_policy_lag=1",
        "algo.critic_lr=1e-3",
        "algo.critic_warmup_updates=1",
        "learner.checkpoint_every=2",
        "learner.metrics_port=0",
        "env_server.metrics_port=0",
        "policy_server.metrics_port=0",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "gsrl.cli", "train", "-c", "state_ppo", "--run-dir", str(run_dir), *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return run_dir, proc


def test_train_runs_to_completion(finished_run) -> None:
    run_dir, proc = finished_run
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((run_dir / "logs").glob("*.log")))
    assert proc.returncode == 0, f"gsrl train failed:\n{proc.stdout}\n{proc.stderr}\n{logs}"
    assert "iter" in proc.stdout and "done:" in proc.stdout


def test_policy_version_advances_and_reaches_policy_servers(finished_run) -> None:
    run_dir, _proc = finished_run
    summary = json.loads((run_dir / "summary.json").read_text())
    learner = summary["learner"]
    assert int(learner["updates"]) == MAX_UPDATES
    assert int(learner["policy_version"]) == MAX_UPDATES
    # with max_policy_lag=1, update 3+ can only be fed by segments acted by a hot-swapped version >= 1
    assert int(learner["newest_segment_policy_version"]) >= 1


def test_every_segment_is_accounted_for(finished_run) -> None:
    run_dir, _proc = finished_run
    summary = json.loads((run_dir / "summary.json").read_text())
    produced = summary["segments_produced"]
    assert produced > 0
    assert produced == summary["segments_consumed"] + summary["segments_dropped"] + summary["segments_in_stream"]
    assert summary["segments_consumed"] >= MAX_UPDATES * 4
    assert summary["env_steps"] > 0


def test_loss_is_finite_and_run_directory_is_complete(finished_run) -> None:
    run_dir, _proc = finished_run
    learner = json.loads((run_dir / "summary.json").read_text())["learner"]
    assert math.isfinite(float(learner["actor/loss"]))
    assert (run_dir / "config.yaml").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    checkpoints = sorted((run_dir / "checkpoints").glob("update_*"))
    assert checkpoints and (checkpoints[-1] / "model.safetensors").is_file()
    assert json.loads((checkpoints[-1] / "meta.json").read_text())["policy_version"] == MAX_UPDATES


def test_env_servers_are_spread_over_the_policy_servers(finished_run) -> None:
    run_dir, _proc = finished_run
    logs = {p.stem: p.read_text() for p in (run_dir / "logs").glob("policy-server-*.log")}
    assert sorted(logs) == ["policy-server-0", "policy-server-1"]
    for i, (name, text) in enumerate(sorted(logs.items())):
        served = set(re.findall(r"env server (env-\d+)\S* connected", text))
        assert served == {f"env-{i}"}, f"{name} served {served}, not env server {i} alone:\n{text[-2000:]}"
        versions = [int(v) for v in re.findall(r"serving policy version (\d+)", text)]
        assert versions and max(versions) >= 1, f"{name} never took the learner's weights:\n{text[-2000:]}"


def test_the_first_update_warms_up_the_critic_alone(finished_run) -> None:
    run_dir, _proc = finished_run
    # (whether the actor stays still is checked where no observation normalizer moves: tests/unit/test_learner_core.py)
    series = read_scalars(run_dir, ["actor/critic_only"])
    assert list(series["actor/critic_only"].values) == [1.0] + [0.0] * (MAX_UPDATES - 1)
