"""Episode videos: an H.264 writer, text overlays for ``info_on_video``, and the sim-vs-splat compositing helpers.

Frames everywhere are uint8 RGB arrays [H, W, 3], the layout SAPIEN cameras, the splat renderer (after
``* 255``) and imageio all share. Every helper returns a new array and never edits its input, so one rendered
frame can feed several videos (plain, annotated, blended) without copies at the call site.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import cv2
import numpy as np


class FfmpegUnavailableError(RuntimeError):
    """Raised when no ffmpeg executable can be found, so mp4 writing cannot work at all."""


def _ffmpeg_exe() -> str:
    """Path of the ffmpeg binary imageio will use; raises ``FfmpegUnavailableError`` with a fix if there is none."""
    try:
        import imageio_ffmpeg
    except ImportError as exc:
        raise FfmpegUnavailableError(
            "writing mp4 needs the imageio-ffmpeg package (pip install imageio-ffmpeg), which bundles ffmpeg"
        ) from exc
    try:
        return imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError as exc:
        raise FfmpegUnavailableError(
            f"imageio-ffmpeg found no ffmpeg executable ({exc}); reinstall imageio-ffmpeg for this platform, or "
            "install ffmpeg and point IMAGEIO_FFMPEG_EXE at it"
        ) from exc


def _as_frame(frame: Any) -> np.ndarray:
    """Check and convert one frame to a contiguous uint8 [H, W, 3] array (torch tensors and [H, W] grey accepted)."""
    array = np.asarray(frame.detach().cpu() if hasattr(frame, "detach") else frame)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"a video frame must be [H, W, 3] (or [H, W, 4] / [H, W]), got shape {array.shape}")
    if array.dtype != np.uint8:
        raise ValueError(f"a video frame must be uint8, got {array.dtype}; convert with (x * 255).round() first")
    return np.ascontiguousarray(array[:, :, :3])


def pad_to_even(frame: np.ndarray) -> np.ndarray:
    """Pad a frame with black on the bottom/right to even height and width.

    H.264 in yuv420p stores chroma at half resolution, so both sides must be even. Padding (rather than
    imageio's default resize to a multiple of 16) keeps every pixel of the original where it was.
    """
    frame = _as_frame(frame)
    height, width = frame.shape[:2]
    pad_h, pad_w = height % 2, width % 2
    if not pad_h and not pad_w:
        return frame
    return np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)))


class VideoWriter:
    """Write uint8 RGB frames to an mp4 (H.264, yuv420p, so any browser or player shows it).

    Use as a context manager or call ``close()``. The first frame fixes the size; odd sizes are padded to even
    ones (``pad_to_even``); a later frame of another size is an error rather than a silent resize.

    Args:
        path: output file; parent folders are created.
        fps: frames per second of the video (the env's control rate gives real-time playback).
        quality: imageio's 0..10 quality (10 is best, about crf 0); 8 looks clean at a few MB per minute.
    """

    def __init__(self, path: str | Path, fps: float = 20.0, quality: float = 8.0) -> None:
        self.path = Path(path)
        self.fps = float(fps)
        self.quality = quality
        self.num_frames = 0
        self._size: tuple[int, int] | None = None  # (height, width) after padding
        self._writer: Any = None
        _ffmpeg_exe()  # fail at construction, before an episode is spent, if mp4 cannot be written
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _open(self) -> None:
        import imageio.v2 as imageio

        self._writer = imageio.get_writer(
            self.path,
            format="FFMPEG",
            mode="I",
            fps=self.fps,
            codec="libx264",
            pixelformat="yuv420p",
            quality=self.quality,
            macro_block_size=1,  # sizes are already even; stop imageio from resizing to multiples of 16
            ffmpeg_log_level="error",
        )

    def append(self, frame: Any) -> None:
        """Add one frame, uint8 [H, W, 3]."""
        frame = pad_to_even(frame)
        if self._size is None:
            self._size = frame.shape[:2]
            self._open()
        elif frame.shape[:2] != self._size:
            raise ValueError(
                f"frame {self.num_frames} of {self.path} is {frame.shape[:2]} (after even padding), "
                f"the video is {self._size}"
            )
        self._writer.append_data(frame)
        self.num_frames += 1

    def extend(self, frames: Iterable[Any]) -> None:
        """Add frames from any iterable of uint8 [H, W, 3] (or a [T, H, W, 3] array)."""
        for frame in frames:
            self.append(frame)

    def close(self) -> None:
        """Finish the file. A writer that got no frame writes nothing (an empty mp4 is not a valid file)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def write_video(path: str | Path, frames: Iterable[Any], fps: float = 20.0) -> int:
    """Write all ``frames`` to ``path`` as mp4; returns the number of frames written."""
    with VideoWriter(path, fps=fps) as writer:
        writer.extend(frames)
    return writer.num_frames


def draw_info(
    frame: Any,
    lines: Sequence[str],
    *,
    font_scale: float | None = None,
    color: tuple[int, int, int] = (255, 255, 255),
    outline: tuple[int, int, int] = (0, 0, 0),
    margin: int = 4,
) -> np.ndarray:
    """Draw text lines at the top left of a copy of ``frame`` (uint8 [H, W, 3]); the input is left unchanged.

    Each line is drawn twice, first thick in ``outline`` then thin in ``color``, so it reads on both the bright
    table and the dark background. The font scales with the frame height (0.45 at 480 px) so small training
    renders and large evaluation renders look alike. Lines too long for the frame are clipped, not wrapped.
    """
    out = _as_frame(frame).copy()
    height = out.shape[0]
    scale = font_scale if font_scale is not None else max(0.25, 0.45 * height / 480)
    thickness = max(1, round(scale * 2))
    font = cv2.FONT_HERSHEY_SIMPLEX
    y = margin
    for line in lines:
        (_, text_h), baseline = cv2.getTextSize(line, font, scale, thickness)
        y += text_h
        # cv2 draws on BGR or RGB alike; the colours given are taken as RGB because the frame is RGB.
        cv2.putText(out, line, (margin, y), font, scale, outline, thickness + 2, cv2.LINE_AA)
        cv2.putText(out, line, (margin, y), font, scale, color, thickness, cv2.LINE_AA)
        y += baseline + margin
    return out


def info_lines(
    step: int | None = None,
    reward: float | None = None,
    success: bool | None = None,
    instruction: str | None = None,
    **extra: Any,
) -> list[str]:
    """The usual ``info_on_video`` lines ("step 12", "reward 0.153", ...); ``None`` fields are left out."""
    lines = []
    if step is not None:
        lines.append(f"step {step}")
    if reward is not None:
        lines.append(f"reward {float(reward):.3f}")
    if success is not None:
        lines.append(f"success {bool(success)}")
    for key, value in extra.items():
        lines.append(f"{key} {value:.3f}" if isinstance(value, float) else f"{key} {value}")
    if instruction:
        lines.append(instruction)
    return lines


def side_by_side(*frames: Any, gap: int = 0) -> np.ndarray:
    """Concatenate frames left to right; shorter ones are padded with black at the bottom, ``gap`` px between."""
    if not frames:
        raise ValueError("side_by_side needs at least one frame")
    arrays = [_as_frame(f) for f in frames]
    height = max(a.shape[0] for a in arrays)
    parts: list[np.ndarray] = []
    for i, array in enumerate(arrays):
        if i and gap:
            parts.append(np.zeros((height, gap, 3), np.uint8))
        parts.append(np.pad(array, ((0, height - array.shape[0]), (0, 0), (0, 0))))
    return np.concatenate(parts, axis=1)


def blend(a: Any, b: Any, alpha: float = 0.5) -> np.ndarray:
    """``alpha * a + (1 - alpha) * b``, rounded, for overlaying a splat render on the sim render of one state.

    At 0.5, any misalignment between the two shows as a double image (the check of the reference's
    ``align_sim_gs.py``). Both frames must have the same size: resizing one would hide exactly that error.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    a, b = _as_frame(a), _as_frame(b)
    if a.shape != b.shape:
        raise ValueError(f"blend needs frames of one size, got {a.shape} and {b.shape}")
    mixed = alpha * a.astype(np.float32) + (1.0 - alpha) * b.astype(np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
