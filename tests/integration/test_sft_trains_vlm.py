"""``gsrl sft`` trains the whole VLA even when the run config freezes the VLM for RL (``policy.train_expert_only``,
which gs_vla_ppo sets): from scratch, a frozen random vision tower left SFT unable to see the cube.

SFT runs in a subprocess with the real DeepSpeed engine (one gloo rank on CPU), as in test_sft_augment.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _sft_run import run_sft, synthetic_dataset
from safetensors.torch import load_file

pytestmark = pytest.mark.integration


def test_sft_trains_the_vision_tower_and_lm_despite_train_expert_only(tmp_path: Path) -> None:
    data = synthetic_dataset(tmp_path / "demos")
    out = tmp_path / "sft"
    overrides = [
        "task.render.width=32",
        "task.render.height=32",
        f"task.render.cache_dir={tmp_path / 'splat-cache'}",
        "task.render.device=cpu",
        "policy.train_expert_only=true",
    ]
    options = ["--steps", "2", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "0", "--seed", "0"]
    proc = run_sft(data, out, overrides, [*options, "--checkpoint-every", "1"], 300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The checkpoint after step 1 and the final one (step 2): every part of the model took the second step.
    first = load_file(str(out / "checkpoints" / "step_000001" / "model.safetensors"))
    last = load_file(str(out / "model.safetensors"))
    for prefix in (
        "model.vision_tower.",
        "model.multi_modal_projector.",
        "model.language_model.",
        "model.action_expert.",
    ):
        names = [k for k in last if k.startswith(prefix) and last[k].is_floating_point()]
        assert names, prefix
        assert any(not torch.equal(first[k], last[k]) for k in names), f"{prefix}* did not change in SFT step 2"
