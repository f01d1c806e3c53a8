"""Resuming from a weights-only checkpoint (model.safetensors + meta.json, no DeepSpeed state), as from SFT.

Runs real DeepSpeed (ZeRO-1, gloo, one rank) in a subprocess. Without refreshing ZeRO's fp32 master copy
after loading, the first optimizer step would put the initial weights back; this test fails then.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, deepspeed
    from pathlib import Path
    import pytest
    import torch
    from safetensors.torch import save_file
    from gsrl.config import AlgoConfig
    from gsrl.policy import build_policy
    from gsrl.trajectory import Segment
    from services.learner.checkpoint import load_checkpoint
    from services.learner.core import PPOLearnerCore
    from services.learner.engine import DeepSpeedEngine

    deepspeed.init_distributed(dist_backend="gloo")
    spec = {"state": ((4,), "float32")}
    torch.manual_seed(1)
    trained = build_policy("gaussian_mlp", spec, 2, 1, hidden_sizes=(16,))
    ckpt = Path(sys.argv[1]) / "update_000007"
    ckpt.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(ckpt / "model.safetensors"))
    (ckpt / "meta.json").write_text(json.dumps({"updates": 7, "policy_version": 7, "saved_unix": 0.0}))

    torch.manual_seed(0)
    policy = build_policy("gaussian_mlp", spec, 2, 1, hidden_sizes=(16,))
    algo = AlgoConfig(lr=1e-7, update_epochs=1, num_minibatches=1)
    engine = DeepSpeedEngine(policy, algo, zero_stage=1)
    meta = load_checkpoint(ckpt, engine)
    assert meta.policy_version == 7
    T = 8
    obs = {"state": torch.randn(T, 4)}
    out = policy.act(obs)
    no = torch.zeros(T, dtype=torch.bool)
    seg = Segment(observations=obs, action_chunks=out.action_chunk, logprobs=out.logprobs, values=out.values,
                  rewards=torch.randn(T), terminated=no, truncated=no, next_values=torch.zeros(T),
                  policy_versions=torch.zeros(T, dtype=torch.int64))
    PPOLearnerCore(engine.module, engine, algo).update([seg])
    worst = max((p.detach() - trained.state_dict()[n]).abs().max().item() for n, p in policy.named_parameters())
    print("max deviation from loaded weights after one step:", worst)
    assert worst < 1e-3, worst
    """
)


def test_weights_only_checkpoint_survives_the_first_zero_step(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "DS_ACCELERATOR": "cpu",
        "PYTHONPATH": str(REPO_ROOT),
    }
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_policy_checkpoint_starts_a_policy_from_saved_weights(tmp_path: Path) -> None:
    """``policy.checkpoint``: a policy server or learner starts from a model.safetensors instead of a random init."""
    import pytest
    import torch
    from safetensors.torch import save_file

    from gsrl.policy import build_policy, load_weights_file

    spec = {"state": ((5,), "float32")}
    trained = build_policy("gaussian_mlp", spec, 2, 1, hidden_sizes=(8,))
    (tmp_path / "ckpt").mkdir()
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, tmp_path / "ckpt" / "model.safetensors")
    fresh = build_policy("gaussian_mlp", spec, 2, 1, hidden_sizes=(8,))
    load_weights_file(fresh, str(tmp_path / "ckpt"))
    for key, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)
    other = build_policy("gaussian_mlp", spec, 2, 1, hidden_sizes=(16,))
    with pytest.raises(RuntimeError, match="does not fit this policy"):
        load_weights_file(other, str(tmp_path / "ckpt"))
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: .*missing does not exist"):
        load_weights_file(fresh, str(tmp_path / "missing"))


def test_configured_policy_starts_from_policy_checkpoint(tmp_path: Path) -> None:
    """What policy servers and learners build: ``config.policy`` with ``policy.checkpoint`` loaded."""
    import torch
    from safetensors.torch import save_file

    from gsrl.config import load_config
    from gsrl.policy import build_configured_policy

    spec = {"state": ((5,), "float32")}
    config = load_config(None, ["policy.hidden_sizes=[8]", f"policy.checkpoint={tmp_path}"])
    trained = build_configured_policy(load_config(None, ["policy.hidden_sizes=[8]"]).policy, spec, 2)
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, tmp_path / "model.safetensors")
    loaded = build_configured_policy(config.policy, spec, 2)
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
