"""Episode videos: mp4s read back with the frames written; overlays touch only their own pixels."""

from __future__ import annotations

from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest

from gsrl.video import VideoWriter, blend, draw_info, info_lines, pad_to_even, side_by_side, write_video


def gradient_frames(count: int, height: int, width: int) -> list[np.ndarray]:
    """Smooth frames (H.264 compresses them nearly losslessly) whose brightness grows with the frame index."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), np.zeros_like(xx)], -1)
    return [np.clip(base // 2 + 10 * i, 0, 255).astype(np.uint8) for i in range(count)]


def read_all(path: Path) -> list[np.ndarray]:
    with imageio.get_reader(path) as reader:
        return list(reader.iter_data())  # list(reader) asks len(), which is inf for ffmpeg streams


def test_mp4_reads_back_with_frame_count_size_and_content(tmp_path: Path) -> None:
    frames = gradient_frames(12, 48, 64)
    path = tmp_path / "episode.mp4"
    with VideoWriter(path, fps=10) as writer:
        writer.extend(frames)
    back = read_all(path)
    assert len(back) == 12
    assert back[0].shape == (48, 64, 3)
    errors = [np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(back, frames, strict=True)]
    assert max(errors) < 3.0  # lossy, but the same pictures in the same order
    with imageio.get_reader(path) as reader:
        meta = reader.get_meta_data()
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p") and meta["fps"] == 10


def test_odd_sizes_are_padded_not_resized(tmp_path: Path) -> None:
    frames = gradient_frames(3, 31, 45)
    assert write_video(tmp_path / "odd.mp4", frames, fps=5) == 3
    back = read_all(tmp_path / "odd.mp4")
    assert back[0].shape == (32, 46, 3)
    assert np.abs(back[1][:31, :45].astype(int) - frames[1].astype(int)).mean() < 3.0
    assert pad_to_even(frames[0]).shape == (32, 46, 3)


def test_writer_rejects_frames_of_another_size_or_dtype(tmp_path: Path) -> None:
    with VideoWriter(tmp_path / "bad.mp4") as writer:
        writer.append(np.zeros((16, 16, 3), np.uint8))
        with pytest.raises(ValueError, match="is \\(32, 32\\)"):
            writer.append(np.zeros((32, 32, 3), np.uint8))
        with pytest.raises(ValueError, match="uint8"):
            writer.append(np.zeros((16, 16, 3), np.float32))


def test_draw_info_changes_only_the_text_region_of_a_copy() -> None:
    frame = gradient_frames(1, 240, 320)[0]
    original = frame.copy()
    lines = info_lines(step=12, reward=0.153, success=False, instruction="pick up the cube and put it on the plate")
    assert lines == ["step 12", "reward 0.153", "success False", "pick up the cube and put it on the plate"]
    out = draw_info(frame, lines)
    np.testing.assert_array_equal(frame, original)  # the input is untouched
    changed_rows = np.nonzero((out != frame).any(axis=(1, 2)))[0]
    assert len(changed_rows) > 0
    # Four lines at 240 px: text within the top ~40% of the frame, and everything below is identical.
    assert changed_rows.max() < 0.4 * frame.shape[0]
    np.testing.assert_array_equal(out[changed_rows.max() + 1 :], frame[changed_rows.max() + 1 :])
    # Dark outline and light fill both present, so it reads on any background.
    text = out[changed_rows.min() : changed_rows.max() + 1]
    assert (text.max(axis=-1) > 240).any() and (text.max(axis=-1) < 20).any()


def test_side_by_side_and_blend() -> None:
    a = np.full((20, 30, 3), 200, np.uint8)
    b = np.full((10, 10, 3), 100, np.uint8)
    both = side_by_side(a, b, gap=2)
    assert both.shape == (20, 42, 3)
    np.testing.assert_array_equal(both[:, :30], a)
    assert (both[:10, 32:] == 100).all() and (both[10:, 32:] == 0).all() and (both[:, 30:32] == 0).all()
    c = np.full((20, 30, 3), 100, np.uint8)
    assert (blend(a, c) == 150).all()
    assert (blend(a, c, alpha=1.0) == 200).all()
    with pytest.raises(ValueError, match="one size"):
        blend(a, b)
