"""Dataset decode: what ``gsrl sft`` does before its first step, decoding every episode video of its demonstrations.

``LeRobotDataset.preload`` decodes on a pool of threads (up to 16, as ``gsrl sft`` asks); this row times
``decode_video`` (OpenCV's FFmpeg in-process, one decoder thread per video) against the same pool running imageio's
ffmpeg subprocess per video, the way it decoded before. The videos are what ``gsrl collect`` writes: 26 frames of
224x224 (a typical demonstration), H.264 at quality 9.
"""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.common import Row, Sizes, interleaved, rate
from gsrl.data.lerobot import decode_video, decode_video_imageio
from gsrl.video import VideoWriter

SIDE = 224
FRAMES = 26


def _write_episodes(folder: Path, count: int) -> list[Path]:
    """``count`` videos of a square crossing a shaded field: smooth content, as rendered scenes are."""
    ramp = np.linspace(40, 200, SIDE, dtype=np.float32)
    field = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (SIDE, 1)), np.tile(ramp[:, None], (1, SIDE))], -1)
    paths = []
    for e in range(count):
        path = folder / f"episode_{e:06d}.mp4"
        with VideoWriter(path, fps=20, quality=9) as writer:
            for t in range(FRAMES):
                frame = field.astype(np.uint8)
                y, x = 20 + (5 * t + e) % 150, 30 + (3 * t + 7 * e) % 150
                frame[y : y + 40, x : x + 40] = (230, 200, 40)
                writer.append(frame)
        paths.append(path)
    return paths


def run(sizes: Sizes) -> list[Row]:
    workers = min(16, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="gsrl-bench-decode-") as folder:
        paths = _write_episodes(Path(folder), sizes.decode_episodes)

        def pass_with(decode) -> float:  # episodes decoded
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for frames in pool.map(decode, paths):
                    assert frames.shape == (FRAMES, SIDE, SIDE, 3)
            return float(len(paths))

        opencv, imageio = interleaved(
            lambda: rate(lambda: pass_with(lambda p: decode_video(p, SIDE, SIDE)), sizes.min_time_s),
            lambda: rate(lambda: pass_with(decode_video_imageio), sizes.min_time_s),
            sizes.repeats,
        )
    metric = f"decode_video, {sizes.decode_episodes} videos of {FRAMES} x {SIDE}x{SIDE}, {workers} threads"
    baseline = "imageio's ffmpeg subprocess per video"
    return [Row("dataset decode", f"{metric} (vs {baseline})", opencv, imageio, "episodes/s")]
