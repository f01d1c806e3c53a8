"""The VLA that ``gsrl sft`` builds: the run's policy settings, with every part trainable."""

from __future__ import annotations

import torch

from gsrl.cli import PRESETS_DIR
from gsrl.config import load_config
from gsrl.policy import build_policy
from services.learner.sft import sft_policy_kwargs

SPEC = {"rgb/3rd_view_camera": ((32, 32, 3), "uint8"), "state": ((25,), "float32")}


def test_sft_trains_the_whole_vla_although_the_rl_config_freezes_the_vlm() -> None:
    config = load_config(PRESETS_DIR / "gs_vla_ppo.yaml", ["policy.vla_preset=tiny"])
    assert config.policy.train_expert_only  # the RL setting this guards against
    kwargs = sft_policy_kwargs(config.policy)
    assert {k: v for k, v in kwargs.items() if k != "train_expert_only"} == {
        k: v for k, v in config.policy.kwargs().items() if k != "train_expert_only"
    }
    torch.manual_seed(0)
    policy = build_policy("vla", SPEC, 7, config.policy.action_chunk, **kwargs)
    names = [name for name, _ in policy.named_parameters()]
    assert any(name.startswith("model.vision_tower.") for name in names)
    assert [name for name, p in policy.named_parameters() if not p.requires_grad] == []
