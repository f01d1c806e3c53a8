"""Sim-vs-splat alignment videos and metrics: the check of the reference's ``align_sim_gs.py`` (fact sheet 2.7).

Given the SAPIEN render and the splat render of the same states from the same camera, write the splat video, the
sim video and their 50% blend (``layout="three"``, the reference's outputs), or one video with the three side by
side (``layout="side_by_side"``), or both, plus per-frame PSNR / SSIM between the two renders and a summary. A
misaligned splat shows as a double image in the blend and as a PSNR drop on the frames where the robot or an
object moves; a colour or exposure mismatch lowers PSNR uniformly while SSIM stays high.

Frames stream through (any iterables of uint8 [H, W, 3]), so an episode of any length is never held in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from gsrl.splat.metrics import as_float_image, ssim
from gsrl.video import VideoWriter, blend, draw_info, side_by_side

Layout = Literal["three", "side_by_side", "both"]

MAX_PSNR = 100.0
"""PSNR reported for identical frames (MSE 0), so the metrics stay finite numbers in JSON."""


def frame_metrics(sim: np.ndarray, splat: np.ndarray) -> dict[str, float]:
    """PSNR (dB, capped at ``MAX_PSNR``) and SSIM between two uint8 [H, W, 3] frames of one state."""
    a, b = as_float_image(sim), as_float_image(splat)
    with torch.no_grad():
        mse = float(((a - b) ** 2).mean())
        value = MAX_PSNR if mse == 0 else min(MAX_PSNR, 10.0 * float(np.log10(1.0 / mse)))
        return {"psnr": value, "ssim": float(ssim(a, b))}


def write_overlay_videos(
    sim_frames: Iterable[Any],
    splat_frames: Iterable[Any],
    out_dir: str | os.PathLike,
    *,
    fps: float = 20.0,
    layout: Layout = "three",
    alpha: float = 0.5,
    prefix: str = "",
    labels: bool = True,
) -> dict[str, Any]:
    """Write the alignment videos and ``<prefix>overlay_metrics.json`` into ``out_dir``; return the summary.

    Outputs (``prefix`` prepended): ``splat.mp4``, ``sim.mp4``, ``blend.mp4`` for ``layout="three"``;
    ``side_by_side.mp4`` ([sim | splat | blend], labelled when ``labels``) for ``"side_by_side"``; all four for
    ``"both"``. ``alpha`` is the splat's weight in the blend. The two streams must have the same length and
    frame size (a size mismatch is itself an alignment bug, so nothing is resized).

    The summary holds ``num_frames``, ``psnr_mean/min/median``, ``ssim_mean/min``, ``worst_frame`` (lowest
    PSNR), ``per_frame`` [{frame, psnr, ssim}] and ``outputs`` {name: path}.
    """
    if layout not in ("three", "side_by_side", "both"):
        raise ValueError(f"layout must be 'three', 'side_by_side' or 'both', got {layout!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    if layout in ("three", "both"):
        names += ["splat", "sim", "blend"]
    if layout in ("side_by_side", "both"):
        names.append("side_by_side")
    writers = {name: VideoWriter(out / f"{prefix}{name}.mp4", fps=fps) for name in names}
    per_frame: list[dict[str, float]] = []
    try:
        for index, (sim, splat) in enumerate(zip(sim_frames, splat_frames, strict=True)):
            sim, splat = np.asarray(sim), np.asarray(splat)
            if sim.shape != splat.shape:
                raise ValueError(f"frame {index}: sim render is {sim.shape}, splat render is {splat.shape}")
            mixed = blend(splat, sim, alpha)
            per_frame.append({"frame": index} | frame_metrics(sim, splat))
            if "splat" in writers:
                writers["splat"].append(splat)
                writers["sim"].append(sim)
                writers["blend"].append(mixed)
            if "side_by_side" in writers:
                panels = [sim, splat, mixed]
                if labels:
                    titles = ["sim", "splat", f"blend {alpha:.0%} splat"]
                    panels = [draw_info(p, [t]) for p, t in zip(panels, titles, strict=True)]
                writers["side_by_side"].append(side_by_side(*panels, gap=2))
    finally:
        for writer in writers.values():
            writer.close()
    if not per_frame:
        raise ValueError("write_overlay_videos got no frames")

    psnrs = np.array([f["psnr"] for f in per_frame])
    ssims = np.array([f["ssim"] for f in per_frame])
    summary: dict[str, Any] = {
        "num_frames": len(per_frame),
        "psnr_mean": float(psnrs.mean()),
        "psnr_min": float(psnrs.min()),
        "psnr_median": float(np.median(psnrs)),
        "ssim_mean": float(ssims.mean()),
        "ssim_min": float(ssims.min()),
        "worst_frame": int(psnrs.argmin()),
        "per_frame": per_frame,
        "outputs": {name: str(out / f"{prefix}{name}.mp4") for name in names},
    }
    metrics_path = out / f"{prefix}overlay_metrics.json"
    summary["outputs"]["metrics"] = str(metrics_path)
    metrics_path.write_text(json.dumps(summary, indent=2))
    return summary
