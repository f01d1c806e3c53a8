"""Training-time image augmentation for learning from few demonstrations.

``gsrl sft`` trains the VLA's vision encoder from scratch (no pretrained weights offline) on a few thousand
frames of scripted-expert demonstrations. With so few images a from-scratch encoder memorises pixels instead of
learning features, and the policy fails on the slightly different views it meets at evaluation. Random shifts
(DrQ, Kostrikov et al. 2020, "Image Augmentation Is All You Need"; the random crop of Diffusion Policy, Chi et al.
2023) are the standard remedy for small-data visuomotor learning: cheap, label-preserving for small shifts, and
they make the encoder roughly translation-invariant.
"""

from __future__ import annotations

import torch
from torch import Tensor


def random_shift(images: Tensor, pad: int, generator: torch.Generator | None = None) -> Tensor:
    """Translate each image of a batch by its own random (dy, dx), both uniform integers in [-pad, pad].

    DrQ's augmentation: pad each image by ``pad`` pixels with edge replication, then crop back to the original
    size at a random offset, independently per sample. Done here without materialising the padded images: output
    pixel (i, j) of sample b is input pixel (clamp(i + dy_b), clamp(j + dx_b)), which is exactly that crop.

    ``images``: [B, H, W, C] (uint8 camera frames, any dtype works), on any device; returns a new tensor of the
    same shape, dtype and device (``images`` itself when ``pad`` is 0). The offsets are drawn on the CPU from
    ``generator`` (the global RNG if None), so a seeded generator gives the same shifts on every device.
    Use at training time only.
    """
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if images.dim() != 4:
        raise ValueError(f"images must be [B, H, W, C], got shape {tuple(images.shape)}")
    if pad == 0 or images.shape[0] == 0:
        return images
    batch, height, width, _ = images.shape
    offsets = torch.randint(-pad, pad + 1, (batch, 2), generator=generator).to(images.device)
    rows = (torch.arange(height, device=images.device) + offsets[:, :1]).clamp_(0, height - 1)  # [B, H]
    cols = (torch.arange(width, device=images.device) + offsets[:, 1:]).clamp_(0, width - 1)  # [B, W]
    samples = torch.arange(batch, device=images.device)[:, None, None]
    return images[samples, rows[:, :, None], cols[:, None, :]]
