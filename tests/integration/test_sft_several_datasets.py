"""``gsrl sft --data A B``: one SFT over several demonstration datasets (several collectors recorded in parallel).

SFT runs in a subprocess with the real DeepSpeed engine (one gloo rank on CPU), as in test_sft_augment.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _sft_run import run_sft, synthetic_dataset
from safetensors.torch import load_file

from gsrl.data.lerobot import LeRobotDataset
from services.learner.sft import state_bounds

pytestmark = pytest.mark.integration

OVERRIDES = ["task.render.width=32", "task.render.height=32", "task.render.device=cpu"]
OPTIONS = ["--steps", "2", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "0", "--seed", "0"]


def test_sft_trains_on_every_dataset_and_normalizes_over_all(tmp_path: Path) -> None:
    narrow = synthetic_dataset(tmp_path / "demos-0", seed=0, state_scale=1.0)
    wide = synthetic_dataset(tmp_path / "demos-1", seed=1, state_scale=5.0)
    out = tmp_path / "sft"
    overrides = [*OVERRIDES, f"task.render.cache_dir={tmp_path / 'splat-cache'}"]
    proc = run_sft([narrow, wide], out, overrides, OPTIONS, 300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Both datasets' frames are in the training set (2 episodes of 6 + 8 frames each).
    assert "SFT on 4 episodes / 28 frames (2 dataset(s))" in proc.stderr + proc.stdout

    # The state normalizer spans both datasets: the wide one's range, not the first dataset's.
    weights = load_file(str(out / "model.safetensors"))
    low, high = state_bounds([LeRobotDataset(narrow), LeRobotDataset(wide)])
    narrow_low, narrow_high = state_bounds([LeRobotDataset(narrow)])
    assert torch.all(low <= narrow_low) and torch.all(high >= narrow_high)
    assert torch.any(low < narrow_low) and torch.any(high > narrow_high)
    assert torch.allclose(weights["state_norm.low"], low) and torch.allclose(weights["state_norm.high"], high)


def test_sft_names_the_dataset_that_does_not_match_the_task(tmp_path: Path) -> None:
    good = synthetic_dataset(tmp_path / "demos-0")
    small = synthetic_dataset(tmp_path / "demos-16px", size=16)
    overrides = [*OVERRIDES, f"task.render.cache_dir={tmp_path / 'splat-cache'}"]
    proc = run_sft([good, small], tmp_path / "sft", overrides, OPTIONS, 300)
    assert proc.returncode == 2
    assert f"dataset {small} does not match the task's observations" in proc.stderr
    assert not (tmp_path / "sft" / "model.safetensors").exists()
