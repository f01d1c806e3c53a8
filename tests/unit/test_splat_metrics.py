"""PSNR / SSIM: known values, agreement with a direct 2-D Gaussian-window SSIM, and gradients for the fit loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import correlate

from gsrl.splat.metrics import as_float_image, image_metrics, psnr, ssim


def reference_ssim(x: np.ndarray, y: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """SSIM with the 2-D window applied directly (scipy), over valid positions, averaged over channels."""
    coords = np.arange(size) - (size - 1) / 2
    window_1d = np.exp(-(coords**2) / (2 * sigma**2))
    window = np.outer(window_1d, window_1d)
    window /= window.sum()
    half = size // 2
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for c in range(x.shape[-1]):
        a, b = x[..., c].astype(np.float64), y[..., c].astype(np.float64)

        def blur(img: np.ndarray) -> np.ndarray:
            return correlate(img, window, mode="constant")[half:-half, half:-half]

        mu_a, mu_b = blur(a), blur(b)
        var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
        ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
        values.append(ssim_map.mean())
    return float(np.mean(values))


def test_psnr_known_value_and_batch_shape() -> None:
    target = torch.full((2, 3, 8, 8, 3), 0.5)
    pred = target + 0.1  # MSE 0.01 -> 20 dB
    torch.testing.assert_close(psnr(pred, target), torch.full((2, 3), 20.0))
    assert psnr(target, target).isinf().all()


def test_ssim_matches_direct_window_and_orders_degradations() -> None:
    rng = np.random.default_rng(0)
    clean = rng.uniform(0, 1, (40, 48, 3))
    noisy = np.clip(clean + rng.normal(0, 0.1, clean.shape), 0, 1)
    noisier = np.clip(clean + rng.normal(0, 0.3, clean.shape), 0, 1)
    value = float(ssim(torch.as_tensor(noisy).float(), torch.as_tensor(clean).float()))
    assert value == pytest.approx(reference_ssim(noisy, clean), abs=1e-4)
    assert float(ssim(torch.as_tensor(clean), torch.as_tensor(clean))) == pytest.approx(1.0)
    assert float(ssim(torch.as_tensor(noisier).float(), torch.as_tensor(clean).float())) < value < 1.0


def test_ssim_is_differentiable_and_handles_tiny_images() -> None:
    target = torch.rand(2, 6, 6, 3)  # smaller than the 11-pixel window
    pred = torch.rand(2, 6, 6, 3, requires_grad=True)
    (1 - ssim(pred, target)).mean().backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_uint8_inputs() -> None:
    a = np.full((4, 4, 3), 255, np.uint8)
    assert as_float_image(a).max() == 1.0
    scores = image_metrics(a, a - 51)  # 0.2 off everywhere -> 10 log10(1 / 0.04) ~ 13.98 dB
    assert scores["psnr"] == pytest.approx(13.979, abs=1e-3)
