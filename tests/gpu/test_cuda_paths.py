"""GPU paths: the policy served from CUDA, and a DeepSpeed bf16 PPO step on CUDA.

Skipped (with the reason) where CUDA is absent, as in CI; run on the GPU machine with
``pytest tests/gpu``. NCCL between two ranks needs two GPUs and is covered by the multi-GPU issue.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from gsrl.policy import build_policy
from services.policy_server.core import InferenceBatcher, InferenceRequest, PolicyHost

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")

SPEC = {"state": ((46,), "float32")}


def test_policy_host_on_cuda_matches_cpu() -> None:
    torch.manual_seed(0)
    policy = build_policy("gaussian_mlp", SPEC, 7, 2, hidden_sizes=(64, 64))
    cpu_state = {k: v.clone() for k, v in policy.state_dict().items()}
    observations = {"state": torch.randn(32, 46)}
    expected = policy.act(observations, deterministic=True)
    host = PolicyHost(policy, version=1, device="cuda")
    batcher = InferenceBatcher(host, max_batch_size=64, max_wait_s=0.001).start()
    try:
        result = batcher.submit(InferenceRequest(observations, [""] * 32, deterministic=True))
    finally:
        batcher.stop()
    torch.testing.assert_close(result.action_chunk, expected.action_chunk, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(result.values, expected.values, rtol=1e-4, atol=1e-4)
    host.offer_weights({k: torch.zeros_like(v) for k, v in cpu_state.items()}, version=2)
    assert host.swap_if_pending() and host.version == 2
    assert next(host.policy.parameters()).device.type == "cuda"


def test_deepspeed_bf16_ppo_step_on_cuda(tmp_path) -> None:
    script = textwrap.dedent(
        """
        import os, torch, deepspeed
        from gsrl.config import AlgoConfig
        from gsrl.policy import build_policy
        from gsrl.trajectory import Segment
        from services.learner.core import PPOLearnerCore
        from services.learner.engine import DeepSpeedEngine
        deepspeed.init_distributed(dist_backend="nccl")
        torch.manual_seed(0)
        policy = build_policy("gaussian_mlp", {"state": ((46,), "float32")}, 7, 1, hidden_sizes=(64, 64)).cuda()
        engine = DeepSpeedEngine(policy, AlgoConfig(update_epochs=1, num_minibatches=2), zero_stage=2, bf16=True)
        before = [p.detach().float().clone() for p in engine.module.parameters()]
        T = 16
        obs = {"state": torch.randn(T, 46)}
        out = policy.act({"state": obs["state"].cuda().to(torch.bfloat16)})
        no = torch.zeros(T, dtype=torch.bool)
        seg = Segment(observations=obs, action_chunks=out.action_chunk.float().cpu(),
                      logprobs=out.logprobs.float().cpu(), values=out.values.float().cpu(), rewards=torch.randn(T),
                      terminated=no, truncated=no, next_values=torch.zeros(T),
                      policy_versions=torch.zeros(T, dtype=torch.int64))
        stats = PPOLearnerCore(engine.module, engine, AlgoConfig(update_epochs=1, num_minibatches=2)).update([seg])
        after = list(engine.module.parameters())
        assert next(engine.module.parameters()).dtype == torch.bfloat16
        assert any(not torch.equal(b, a.detach().float()) for b, a in zip(before, after)), "no parameter moved"
        assert all(torch.isfinite(torch.tensor(v)) for k, v in stats.items() if k.startswith("actor/")), stats
        print("OK", stats["actor/loss"], stats["actor/grad_norm"])
        """
    )
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29561",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "DS_ACCELERATOR": "cuda",
    }
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr
