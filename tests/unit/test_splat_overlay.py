"""Sim-vs-splat alignment outputs: videos with every frame, per-frame metrics that find the misaligned frames."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest

from gsrl.splat.overlay import MAX_PSNR, write_overlay_videos


def episode(num_frames: int = 10, size: int = 48) -> list[np.ndarray]:
    """A bright square moving right over a smooth background."""
    yy, xx = np.mgrid[0:size, 0:size]
    frames = []
    for t in range(num_frames):
        frame = np.stack([xx * 4, yy * 4, np.full_like(xx, 60)], -1).astype(np.uint8)
        frame[16:32, 4 + 2 * t : 20 + 2 * t] = (250, 250, 40)
        frames.append(frame)
    return frames


def frame_count(path: str) -> int:
    with imageio.get_reader(path) as reader:
        return sum(1 for _ in reader.iter_data())


def test_three_videos_and_metrics_flag_the_misaligned_frames(tmp_path: Path) -> None:
    sim = episode()
    splat = [f.copy() for f in sim]
    splat[6] = np.roll(sim[6], 5, axis=1)  # the splat lags the sim by 5 px on one frame
    summary = write_overlay_videos(sim, splat, tmp_path, fps=10)
    assert summary["num_frames"] == 10
    assert summary["worst_frame"] == 6
    assert summary["per_frame"][0]["psnr"] == MAX_PSNR and summary["per_frame"][0]["ssim"] == pytest.approx(1.0)
    assert summary["per_frame"][6]["psnr"] < 25 and summary["per_frame"][6]["ssim"] < 0.95
    for name in ("splat", "sim", "blend"):
        assert frame_count(summary["outputs"][name]) == 10
    with imageio.get_reader(summary["outputs"]["blend"]) as reader:
        blended = list(reader.iter_data())[6].astype(int)
    expected = (sim[6].astype(int) + splat[6]) / 2  # the 50% blend shows the double image
    assert np.abs(blended - expected).mean() < 4
    on_disk = json.loads(Path(summary["outputs"]["metrics"]).read_text())
    assert on_disk["worst_frame"] == 6 and len(on_disk["per_frame"]) == 10


def test_side_by_side_layout(tmp_path: Path) -> None:
    sim = episode(4)
    summary = write_overlay_videos(sim, sim, tmp_path, layout="side_by_side", prefix="ep0_")
    assert set(summary["outputs"]) == {"side_by_side", "metrics"}
    assert summary["outputs"]["side_by_side"].endswith("ep0_side_by_side.mp4")
    with imageio.get_reader(summary["outputs"]["side_by_side"]) as reader:
        first = next(iter(reader.iter_data()))
    assert first.shape == (48, 3 * 48 + 2 * 2, 3)


def test_mismatched_streams_are_errors(tmp_path: Path) -> None:
    sim = episode(3)
    with pytest.raises(ValueError, match="frame 0"):
        write_overlay_videos(sim, [f[:, :40] for f in sim], tmp_path / "a")
    with pytest.raises(ValueError):  # zip(strict=True): one stream shorter than the other
        write_overlay_videos(sim, sim[:2], tmp_path / "b")
