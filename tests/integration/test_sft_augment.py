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

import numpy as np
import pytest
from _sft_run import run_sft

from gsrl.data.lerobot import Episode, LeRobotWriter

pytestmark = pytest.mark.integration


def _dataset(root: Path) -> Path:
    writer = LeRobotWriter(root, fps=20)
    rng = np.random.default_rng(0)
    for length in (6, 8):
        frames = np.zeros((length, 32, 32, 3), dtype=np.uint8)
        for t in range(length):  # a moving square on a coloured field
            frames[t] = (40 + 10 * t, 80, 120)
            frames[t, 4 + t : 16 + t, 8:20] = (220, 200, 30)
        writer.add_episode(
            Episode(
                states=rng.normal(size=(length, 25)).astype(np.float32),
                actions=rng.uniform(-1, 1, size=(length, 7)).astype(np.float32),
                images={"rgb/3rd_view_camera": frames},
                task="pick up the cube and put it on the plate",
            )
        )
    writer.close()
    return root


def _sft(tmp_path: Path, data: Path, out: Path, shift: int) -> subprocess.CompletedProcess[str]:
    overrides = ["task.render.width=32", "task.render.height=32", f"task.render.cache_dir={tmp_path / 'splat-cache'}"]
    options = ["--steps", "2", "--batch-size", "4", "--checkpoint-every", "0", "--seed", "0"]
    return run_sft(data, out, [*overrides, "task.render.device=cpu"], [*options, "--augment-shift", str(shift)], 300)


def test_sft_with_augment_shift(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "demos")
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
