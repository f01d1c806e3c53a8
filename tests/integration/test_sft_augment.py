"""``gsrl sft --augment-shift`` end to end on the tiny VLA: a few SFT steps with the real DeepSpeed engine (one gloo
rank on CPU) on a small synthetic LeRobot dataset of the splat task's shapes (32x32 camera, 25-d state, 7-d action),
so the check does not depend on the scripted expert; and a shift too large for the images is refused.

SFT runs in a subprocess, as in test_collect_and_sft.py: DeepSpeed's process-global state must not leak.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
from _sft_run import run_sft, synthetic_dataset

pytestmark = pytest.mark.integration


def _sft(tmp_path: Path, data: Path, out: Path, shift: int) -> subprocess.CompletedProcess[str]:
    overrides = ["task.render.width=32", "task.render.height=32", f"task.render.cache_dir={tmp_path / 'splat-cache'}"]
    options = ["--steps", "2", "--batch-size", "4", "--checkpoint-every", "0", "--seed", "0"]
    return run_sft(data, out, [*overrides, "task.render.device=cpu"], [*options, "--augment-shift", str(shift)], 300)


def test_sft_with_augment_shift(tmp_path: Path) -> None:
    data = synthetic_dataset(tmp_path / "demos")
    out = tmp_path / "sft"
    proc = _sft(tmp_path, data, out, 4)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    settings = json.loads((out / "sft_settings.json").read_text())
    assert settings["augment_shift"] == 4 and settings["steps"] == 2 and settings["batch_size"] == 4
    rows = [json.loads(line) for line in (out / "sft_log.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(row["sft/loss"]) for row in rows)
    assert (out / "model.safetensors").is_file()

    refused = _sft(tmp_path, data, tmp_path / "refused", 16)  # 32 px images: the shift must stay below 16
    assert refused.returncode == 2
    assert "--augment-shift 16 must be below half the image size" in refused.stderr
    assert not (tmp_path / "refused" / "model.safetensors").exists()
