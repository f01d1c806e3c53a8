"""DrQ random-shift augmentation (``gsrl.data.augment``) and its ``gsrl sft --augment-shift`` plumbing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gsrl.data.augment import random_shift
from services.learner.sft import augment_images, augment_shift_error
from services.learner.sft import main as sft_main


def _unique_pixels(batch: int, height: int, width: int) -> torch.Tensor:
    """uint8 [B, H, W, 3] whose (row, col) is readable back from channels 0 and 1 (channel 2: the sample)."""
    rows = torch.arange(height, dtype=torch.uint8)[:, None].expand(height, width)
    cols = torch.arange(width, dtype=torch.uint8)[None, :].expand(height, width)
    images = torch.empty(batch, height, width, 3, dtype=torch.uint8)
    images[..., 0] = rows
    images[..., 1] = cols
    images[..., 2] = torch.arange(batch, dtype=torch.uint8)[:, None, None]
    return images


def _offset(shifted: torch.Tensor) -> tuple[int, int]:
    """(dy, dx) of one shifted sample of ``_unique_pixels``, read at its centre pixel."""
    height, width = shifted.shape[:2]
    row, col = shifted[height // 2, width // 2, :2].tolist()
    return row - height // 2, col - width // 2


def test_keeps_shape_dtype_and_pad_zero_is_the_identity() -> None:
    images = torch.randint(0, 256, (5, 20, 24, 3), dtype=torch.uint8)
    out = random_shift(images, 3, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert random_shift(images, 0) is images
    assert random_shift(images[:0], 3).shape == (0, 20, 24, 3)
    with pytest.raises(ValueError, match="pad"):
        random_shift(images, -1)


def test_each_sample_is_its_image_translated_with_replicated_edges() -> None:
    pad, height, width = 4, 24, 28
    images = _unique_pixels(32, height, width)
    out = random_shift(images, pad, torch.Generator().manual_seed(1))
    offsets = []
    for b in range(len(images)):
        dy, dx = _offset(out[b])
        assert -pad <= dy <= pad and -pad <= dx <= pad
        offsets.append((dy, dx))
        # Output (i, j) is input (clamp(i + dy), clamp(j + dx)): the interior a translation, the border replicated.
        rows = (torch.arange(height) + dy).clamp(0, height - 1)
        cols = (torch.arange(width) + dx).clamp(0, width - 1)
        torch.testing.assert_close(out[b], images[b][rows][:, cols], rtol=0, atol=0)
        interior = out[b, pad : height - pad, pad : width - pad]
        original = images[b, pad + dy : height - pad + dy, pad + dx : width - pad + dx]
        assert torch.equal(interior, original)
    assert len(set(offsets)) > 16  # 81 possible offsets, 32 samples: independent per sample
    assert len({dy for dy, _ in offsets}) > 4 and len({dx for _, dx in offsets}) > 4  # both axes shifted


def test_seeded_generator_is_deterministic() -> None:
    images = torch.randint(0, 256, (8, 16, 16, 3), dtype=torch.uint8)
    first = random_shift(images, 2, torch.Generator().manual_seed(7))
    again = random_shift(images, 2, torch.Generator().manual_seed(7))
    other = random_shift(images, 2, torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_augment_images_shifts_only_the_image_keys() -> None:
    observations = {"rgb/cam": _unique_pixels(16, 12, 12), "state": torch.randn(16, 5)}
    generator = torch.Generator().manual_seed(0)
    assert augment_images(observations, ["rgb/cam"], 0, generator) is observations
    for keys in (["rgb/cam"], None):  # the policy's image_keys, or every uint8 [B, H, W, 3]
        out = augment_images(observations, keys, 2, generator)
        assert out["state"] is observations["state"]
        assert not torch.equal(out["rgb/cam"], observations["rgb/cam"])
    assert torch.equal(augment_images(observations, [], 2, generator)["rgb/cam"], observations["rgb/cam"])


def test_augment_shift_error() -> None:
    shapes = {"state": ((25,), "float32"), "rgb/3rd_view_camera": ((32, 40, 3), "uint8")}
    assert augment_shift_error(0, shapes) is None
    assert augment_shift_error(15, shapes) is None
    assert "below half" in str(augment_shift_error(16, shapes))
    assert ">= 0" in str(augment_shift_error(-1, shapes))


def test_sft_cli_rejects_a_negative_shift(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["-c", "gs_ppo", "policy.kind=vla", "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exc:
        sft_main([*argv, "--augment-shift", "-1"])
    assert exc.value.code == 2
    assert "--augment-shift must be >= 0" in capsys.readouterr().err
