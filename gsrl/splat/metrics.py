"""Image quality metrics for splat fitting and sim-vs-splat comparison: PSNR and SSIM in plain PyTorch.

Images are channel-last like every render in gsrl ([..., H, W, 3], float in [0, 1]); ``as_float_image`` converts
uint8 frames. SSIM is differentiable (the fitting loss uses ``1 - ssim``) and follows the 3DGS / gsplat trainer:
an 11x11 Gaussian window with sigma 1.5, constants C1 = (0.01)^2, C2 = (0.03)^2 for a data range of 1, averaged
over the "valid" positions of the window (no padding) and the channels.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def as_float_image(image: Any) -> Tensor:
    """uint8 or float images (numpy or torch, [..., H, W, C]) -> float32 tensor in [0, 1]."""
    tensor = torch.as_tensor(np.asarray(image) if not isinstance(image, Tensor) else image)
    if tensor.dtype == torch.uint8:
        return tensor.float() / 255.0
    return tensor.float()


def psnr(pred: Tensor, target: Tensor, max_val: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB per image: shapes [..., H, W, C] -> [...].

    Identical images give +inf (MSE 0), which is the honest value; callers that average should be aware of it.
    """
    mse = ((pred.float() - target.float()) ** 2).flatten(-3).mean(-1)
    return 10.0 * torch.log10(max_val**2 / mse)


@functools.lru_cache(maxsize=8)
def _gaussian_window_1d(size: int, sigma: float) -> Tensor:
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2.0
    window = torch.exp(-(coords**2) / (2.0 * sigma**2))
    return window / window.sum()


def ssim(pred: Tensor, target: Tensor, window_size: int = 11, sigma: float = 1.5, data_range: float = 1.0) -> Tensor:
    """Structural similarity per image: shapes [..., H, W, C] -> [...], in [-1, 1] (1 for identical images).

    The Gaussian window is applied separably as two 1-D convolutions (a [C, 1, k, 1] then [C, 1, 1, k] depthwise
    kernel), which is exact and ~k/2 times cheaper than the 2-D window on CPU. Images smaller than the window
    (tiny test renders) use a window of the smaller side so the statistic stays defined.
    """
    if pred.shape != target.shape:
        raise ValueError(f"ssim needs images of one shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    batch_shape = pred.shape[:-3]
    height, width, channels = pred.shape[-3:]
    size = min(window_size, height, width)
    window = _gaussian_window_1d(size, sigma).to(device=pred.device, dtype=torch.float32)
    kernel_v = window.view(1, 1, size, 1).expand(channels, 1, size, 1)
    kernel_h = window.view(1, 1, 1, size).expand(channels, 1, 1, size)

    def blur(x: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(x, kernel_v, groups=channels), kernel_h, groups=channels)

    # [..., H, W, C] -> [B, C, H, W]
    x = pred.float().reshape(-1, height, width, channels).permute(0, 3, 1, 2)
    y = target.float().reshape(-1, height, width, channels).permute(0, 3, 1, 2)
    mu_x, mu_y = blur(x), blur(y)
    sigma_xx = blur(x * x) - mu_x**2
    sigma_yy = blur(y * y) - mu_y**2
    sigma_xy = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sigma_xx + sigma_yy + c2))
    return ssim_map.flatten(1).mean(-1).reshape(batch_shape)


def image_metrics(pred: Any, target: Any) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM over a batch of images (uint8 or float, [..., H, W, 3]), as plain floats."""
    pred_t, target_t = as_float_image(pred), as_float_image(target)
    with torch.no_grad():
        return {
            "psnr": float(psnr(pred_t, target_t).mean()),
            "ssim": float(ssim(pred_t, target_t).mean()),
        }
