"""Parity of the two splat backends: gsplat's CUDA kernels and the pure-PyTorch rasterizer (run on the GPU too).

Skipped (with the reason) where CUDA is absent; run on a GPU machine with ``pytest tests/gpu``. gsplat builds its
kernels on first use there (a few minutes with nvcc).
"""

from __future__ import annotations

import math

import pytest
import torch

from gsrl.splat.camera import intrinsics, look_at
from gsrl.splat.renderer import RenderOutput, SplatRenderer, StaticLayer
from gsrl.splat.transforms import PartFrames, place_parts, quat_to_rotmat

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for gsplat's kernels")

W, H = 96, 72
SH_DEGREE = 3


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1]."""
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def scene(n: int, seed: int, envs: int | None, device: str = "cuda"):
    """Random Gaussians around the origin with SH degree 3: means/quats [E, N, ...], shared scales/opacities/sh."""
    g = torch.Generator().manual_seed(seed)
    lead = () if envs is None else (envs,)
    means = torch.randn(*lead, n, 3, generator=g) * 0.2
    quats = torch.randn(*lead, n, 4, generator=g)
    scales = torch.exp(torch.randn(n, 3, generator=g) * 0.5 - 4.5)  # ~1 cm, anisotropic
    opacities = torch.rand(n, generator=g) * 0.95 + 0.03
    sh = torch.randn(n, (SH_DEGREE + 1) ** 2, 3, generator=g) * 0.3
    return tuple(t.to(device) for t in (means, quats, scales, opacities, sh))


def cameras(envs: int, count: int, seed: int, device: str = "cuda") -> tuple[torch.Tensor, torch.Tensor]:
    """viewmats [E, C, 4, 4] on a sphere looking at the origin, Ks [E, C, 3, 3] with varied focal lengths."""
    g = torch.Generator().manual_seed(seed)
    eyes = torch.nn.functional.normalize(torch.randn(envs, count, 3, generator=g), dim=-1) * 0.9
    eyes[..., 2] = eyes[..., 2].abs() + 0.2
    viewmats = torch.stack([torch.stack([look_at(eye, torch.zeros(3)) for eye in row]) for row in eyes])
    focal = 60.0 + 40.0 * torch.rand(envs, count, generator=g)
    Ks = torch.stack([torch.stack([intrinsics(float(f), float(f) * 1.02, 47.3, 35.8) for f in row]) for row in focal])
    return viewmats.to(device), Ks.to(device)


@pytest.fixture(scope="module")
def renderers() -> tuple[SplatRenderer, SplatRenderer]:
    pytest.importorskip("gsplat", reason="gsplat is not installed")
    return SplatRenderer(backend="gsplat", device="cuda"), SplatRenderer(backend="torch", device="cuda")


def assert_close_renders(a: RenderOutput, b: RenderOutput, min_psnr: float = 40.0) -> None:
    assert psnr(a.rgb, b.rgb) >= min_psnr, f"rgb PSNR {psnr(a.rgb, b.rgb):.1f} dB"
    assert psnr(a.alpha, b.alpha) >= min_psnr, f"alpha PSNR {psnr(a.alpha, b.alpha):.1f} dB"
    opaque = (a.alpha > 0.5) & (b.alpha > 0.5)
    depth_error = ((a.depth - b.depth).abs() / a.depth.clamp_min(1e-3))[opaque]
    assert float(depth_error.median()) < 1e-3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_backends_agree_on_random_scenes(renderers: tuple[SplatRenderer, SplatRenderer], seed: int) -> None:
    means, quats, scales, opacities, sh = scene(3000, seed, envs=3)
    viewmats, Ks = cameras(3, 4, seed + 100)
    outs = [r.render(means, quats, scales, opacities, sh, viewmats, Ks, W, H, sh_degree=SH_DEGREE) for r in renderers]
    assert outs[0].rgb.shape == (3, 4, H, W, 3)
    assert float(outs[0].alpha.mean()) > 0.1  # the scene is in view
    assert_close_renders(*outs)
    assert torch.equal(outs[0].info["radii"], outs[1].info["radii"].to(outs[0].info["radii"].dtype))


def test_gsplat_backend_equals_gsplat_rasterization(renderers: tuple[SplatRenderer, SplatRenderer]) -> None:
    from gsplat import rasterization

    means, quats, scales, opacities, sh = scene(2000, 3, envs=2)
    viewmats, Ks = cameras(2, 3, 103)
    ours = renderers[0].render(means, quats, scales, opacities, sh, viewmats, Ks, W, H, sh_degree=SH_DEGREE)
    colors, alphas, _ = rasterization(
        means, quats, scales.expand(2, -1, -1), opacities.expand(2, -1), sh.expand(2, -1, -1, -1), viewmats, Ks, W, H,
        sh_degree=SH_DEGREE, packed=False, rasterize_mode="classic", render_mode="RGB+ED", near_plane=0.01,
    )  # fmt: skip
    torch.testing.assert_close(ours.rgb, colors[..., :3].clamp(0, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.alpha, alphas, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.depth, colors[..., 3:], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", [0, 1])
def test_static_cache_equals_full_render(renderers: tuple[SplatRenderer, SplatRenderer], backend: int) -> None:
    renderer = renderers[backend]
    dynamic = scene(1500, 4, envs=2)
    table = scene(2500, 5, envs=None)
    viewmats, Ks = cameras(2, 2, 104)
    static = StaticLayer(*table, sh_degree=SH_DEGREE)
    split = renderer.render(*dynamic, viewmats, Ks, W, H, sh_degree=SH_DEGREE, static=static)
    cached = renderer.render(*dynamic, viewmats, Ks, W, H, sh_degree=SH_DEGREE, static=static)
    merged = (
        torch.cat([dynamic[0], table[0].expand(2, -1, -1)], dim=1),
        torch.cat([dynamic[1], table[1].expand(2, -1, -1)], dim=1),
        *(torch.cat([d, t]) for d, t in zip(dynamic[2:], table[2:], strict=True)),
    )
    full = renderer.render(*merged, viewmats, Ks, W, H, sh_degree=SH_DEGREE)
    for out in (split, cached):
        torch.testing.assert_close(out.rgb, full.rgb, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.alpha, full.alpha, atol=1e-5, rtol=0)


def test_backends_agree_with_placed_parts_and_sh_frames(renderers: tuple[SplatRenderer, SplatRenderer]) -> None:
    means, quats, scales, opacities, sh = scene(2000, 6, envs=None)
    g = torch.Generator().manual_seed(7)
    part_index = torch.randint(0, 5, (2000,), generator=g).cuda()
    poses = torch.eye(4).repeat(3, 5, 1, 1)
    poses[..., :3, :3] = quat_to_rotmat(torch.randn(3, 5, 4, generator=g))
    poses[..., :3, 3] = torch.randn(3, 5, 3, generator=g) * 0.05
    poses = poses.cuda()
    world_means, world_quats = place_parts(means, quats, part_index, poses)
    frames = PartFrames.from_poses(part_index, poses)
    viewmats, Ks = cameras(3, 2, 105)
    outs = [
        r.render(
            world_means, world_quats, scales, opacities, sh, viewmats, Ks, W, H, sh_degree=SH_DEGREE, sh_frames=frames
        )
        for r in renderers
    ]
    assert_close_renders(*outs)


def test_gradients_agree(renderers: tuple[SplatRenderer, SplatRenderer]) -> None:
    base = scene(1500, 8, envs=None)
    viewmats, Ks = cameras(1, 3, 106)
    viewmats, Ks = viewmats[0], Ks[0]
    target = torch.rand(3, H, W, 3, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    grads = []
    for renderer in renderers:
        leaves = [t.clone().requires_grad_() for t in base]
        out = renderer.render(*leaves, viewmats, Ks, W, H, sh_degree=SH_DEGREE, render_depth=False)
        ((out.rgb - target) ** 2).mean().backward()
        grads.append([leaf.grad.flatten() for leaf in leaves])
    for name, a, b in zip(("means", "quats", "scales", "opacities", "sh"), *grads, strict=True):
        cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
        assert cosine > 0.99, f"{name}: gradient cosine similarity {cosine:.4f}"
