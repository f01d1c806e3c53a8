"""Real DeepSpeed on CPU (gloo, one rank) driving PPOLearnerCore through DeepSpeedEngine.

Each case runs in a fresh subprocess: deepspeed.init_distributed creates a process-global group and
DeepSpeed patches global state, so running it in the pytest process could leak into other tests.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(zero_stage: int, bf16: bool) -> dict[str, object]:
    """Runs inside the subprocess: one PPO update on synthetic segments through DeepSpeed."""
    import math

    import deepspeed
    import torch
    import torch.distributed as dist

    from gsrl.config import AlgoConfig
    from gsrl.policy import build_policy
    from gsrl.trajectory import Segment
    from services.learner.core import PPOLearnerCore
    from services.learner.engine import DeepSpeedEngine

    deepspeed.init_distributed(dist_backend="gloo")
    try:
        torch.manual_seed(0)
        spec = {"state": ((4,), "float32")}
        policy = build_policy("gaussian_mlp", spec, action_dim=2, action_chunk=3, hidden_sizes=(32, 32), obs_norm=True)
        algo = AlgoConfig(update_epochs=2, num_minibatches=2)
        engine = DeepSpeedEngine(policy, algo, zero_stage=zero_stage, bf16=bf16)
        assert engine.module is policy
        before = {name: p.detach().float().clone() for name, p in policy.named_parameters()}

        def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(tensor)
            return tensor

        obs = {"state": torch.randn(16, 4)}
        out = policy.act(obs)
        segment = Segment(
            observations=obs,
            action_chunks=out.action_chunk,
            logprobs=out.logprobs,
            values=out.values,
            rewards=(out.action_chunk[:, 0, 0] > 0).float(),
            terminated=torch.ones(16, dtype=torch.bool),
            truncated=torch.zeros(16, dtype=torch.bool),
            next_values=torch.zeros(16),
            policy_versions=torch.zeros(16, dtype=torch.int64),
        )
        core = PPOLearnerCore(policy, engine, algo, all_reduce_sum=all_reduce_sum)
        metrics = core.update([segment])
        changed = [name for name, p in policy.named_parameters() if not torch.equal(p.detach().float(), before[name])]
        return {
            "grad_norm": metrics["actor/grad_norm"],
            "finite": all(math.isfinite(v) for v in metrics.values()),
            "changed": changed,
            "param_dtype": str(policy.log_std.dtype),
            "obs_norm_dtype": str(policy.obs_norm.mean.dtype),
            "grads_cleared": all(p.grad is None or not p.grad.any() for p in policy.parameters()),
        }
    finally:
        dist.destroy_process_group()


def _run(zero_stage: int, bf16: bool) -> dict[str, object]:
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "DS_ACCELERATOR": "cpu",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, __file__, str(zero_stage), str(int(bf16))],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    result_lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert result_lines, proc.stdout[-4000:]
    return json.loads(result_lines[-1].removeprefix("RESULT "))


@pytest.mark.parametrize(("zero_stage", "bf16"), [(1, False), (0, False), (2, True)])
def test_ppo_update_through_deepspeed_changes_parameters(zero_stage: int, bf16: bool) -> None:
    result = _run(zero_stage, bf16)
    assert result["finite"]
    assert isinstance(result["grad_norm"], float) and result["grad_norm"] > 0
    # Every parameter takes part in the loss (actor, critic, log_std), so every one must move.
    assert {"log_std", "actor.0.weight", "critic.4.weight"} <= set(result["changed"])
    assert result["param_dtype"] == ("torch.bfloat16" if bf16 else "torch.float32")
    assert result["obs_norm_dtype"] == "torch.float32"
    assert result["grads_cleared"]


if __name__ == "__main__":
    print("RESULT " + json.dumps(_worker(int(sys.argv[1]), bool(int(sys.argv[2])))), flush=True)
