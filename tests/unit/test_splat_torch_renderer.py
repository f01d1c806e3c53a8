"""The pure-PyTorch splat renderer on CPU, against geometry and compositing worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from gsrl.splat.backends.torch_backend import project_gaussians
from gsrl.splat.backends.torch_raster import composite_tiles
from gsrl.splat.camera import intrinsics, look_at
from gsrl.splat.gaussians import SH_C0
from gsrl.splat.renderer import SplatRenderer, StaticLayer, to_uint8
from gsrl.splat.sh import sh_to_rgb
from gsrl.splat.transforms import PartFrames, quat_to_rotmat

W, H, F, CX, CY = 64, 48, 100.0, 32.0, 24.0
IDENTITY_QUAT = [1.0, 0.0, 0.0, 0.0]
C1 = 0.48860251190292


def front_camera() -> tuple[torch.Tensor, torch.Tensor]:
    """One camera at the origin looking down +z (OpenCV): viewmats [1, 4, 4], Ks [1, 3, 3]."""
    return torch.eye(4)[None], intrinsics(F, F, CX, CY)[None]


def centred_camera() -> tuple[torch.Tensor, torch.Tensor]:
    """As ``front_camera`` but with the principal point on pixel (32, 24)'s centre, so the optical axis hits it."""
    return torch.eye(4)[None], intrinsics(F, F, CX + 0.5, CY + 0.5)[None]


def blobs(means: list[list[float]], scale: float | list[float], opacity: float | list[float], rgb: list[list[float]]):
    """Isotropic Gaussians: (means [N,3], quats [N,4], scales [N,3], opacities [N], colors [N,3])."""
    n = len(means)
    scales = torch.tensor(scale if isinstance(scale, list) else [scale] * n)[:, None].expand(n, 3)
    opacities = torch.tensor(opacity if isinstance(opacity, list) else [opacity] * n)
    return torch.tensor(means), torch.tensor([IDENTITY_QUAT] * n), scales, opacities, torch.tensor(rgb)


def random_scene(n: int, seed: int, sh_degree: int | None = 2, envs: int | None = None):
    g = torch.Generator().manual_seed(seed)
    lead = () if envs is None else (envs,)
    means = torch.randn(*lead, n, 3, generator=g) * 0.15
    quats = torch.randn(*lead, n, 4, generator=g)
    scales = torch.rand(n, 3, generator=g) * 0.03 + 0.004
    opacities = torch.rand(n, generator=g) * 0.9 + 0.05
    colors = torch.randn(n, (sh_degree + 1) ** 2, 3, generator=g) * 0.4 if sh_degree is not None else torch.rand(n, 3)
    return means, quats, scales, opacities, colors


def orbit_cameras(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    eyes = torch.nn.functional.normalize(torch.randn(count, 3, generator=g), dim=-1) * 0.9
    eyes[:, 2] = eyes[:, 2].abs() + 0.2
    viewmats = torch.stack([look_at(eye, torch.zeros(3)) for eye in eyes])
    return viewmats, intrinsics(70.0, 72.0, 31.0, 25.0).expand(count, 3, 3)


def centre_pixel(image: torch.Tensor, u: float, v: float) -> torch.Tensor:
    return image[..., int(v), int(u), :]


@pytest.fixture
def renderer() -> SplatRenderer:
    return SplatRenderer(backend="torch", device="cpu")


def test_auto_backend_is_torch_on_cpu_and_gsplat_needs_cuda() -> None:
    assert SplatRenderer(device="cpu").backend_name == "torch"
    with pytest.raises(ValueError, match="CUDA"):
        SplatRenderer(backend="gsplat", device="cpu")


def test_single_gaussian_lands_on_the_pixel_K_predicts(renderer: SplatRenderer) -> None:
    z, u0, v0 = 2.0, 40.5, 20.5  # a pixel centre off the optical axis
    mean = [(u0 - CX) * z / F, (v0 - CY) * z / F, z]
    out = renderer.render(*blobs([mean], 0.04, 0.7, [[1.0, 1.0, 1.0]]), *front_camera(), W, H)
    alpha = out.alpha[0, :, :, 0]
    assert alpha.argmax() == int(v0) * W + int(u0)
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    assert float((alpha * xs).sum() / alpha.sum()) == pytest.approx(u0, abs=1e-3)
    assert float((alpha * ys).sum() / alpha.sum()) == pytest.approx(v0, abs=1e-3)
    torch.testing.assert_close(out.info["means2d"][0, 0], torch.tensor([u0, v0]))


def test_single_gaussian_footprint_is_f_s_over_z_plus_blur_and_peak_alpha_is_opacity(renderer: SplatRenderer) -> None:
    z, s, opacity = 2.0, 0.04, 0.7
    out = renderer.render(*blobs([[0.0, 0.0, z]], s, opacity, [[1.0, 1.0, 1.0]]), *centred_camera(), W, H)
    alpha = out.alpha[0, :, :, 0]
    row, col = int(CY), int(CX)
    assert float(alpha[row, col]) == pytest.approx(opacity, abs=1e-6)
    # On the optical axis the footprint is isotropic with variance (f s / z)^2 + eps2d (the 0.3 px^2 blur).
    variance = (F * s / z) ** 2 + 0.3
    for k in (1, 2, 3, 4):
        expected = math.exp(-(k**2) / (2 * variance))
        assert float(alpha[row, col + k] / alpha[row, col]) == pytest.approx(expected, rel=1e-4)
        assert float(alpha[row - k, col] / alpha[row, col]) == pytest.approx(expected, rel=1e-4)
    extent = min(3.33, math.sqrt(2 * math.log(opacity * 255)))
    assert out.info["radii"][0, 0].tolist() == [math.ceil(extent * math.sqrt(variance))] * 2
    assert float(out.depth[0, row, col, 0]) == pytest.approx(z, rel=1e-5)


def test_nothing_behind_the_camera_or_off_image(renderer: SplatRenderer) -> None:
    out = renderer.render(
        *blobs([[0.0, 0.0, -1.0], [5.0, 0.0, 1.0]], 0.05, 0.9, [[1, 1, 1], [1, 1, 1]]), *front_camera(), W, H
    )
    assert out.info["radii"].eq(0).all()
    assert out.alpha.max() == 0


def test_background_shows_where_nothing_is() -> None:
    renderer = SplatRenderer(backend="torch", device="cpu", background=(0.2, 0.4, 0.6))
    out = renderer.render(*blobs([[0.0, 0.0, 2.0]], 0.02, 0.9, [[1.0, 0.0, 0.0]]), *front_camera(), W, H)
    torch.testing.assert_close(out.rgb[0, 0, 0], torch.tensor([0.2, 0.4, 0.6]))
    assert float(out.alpha[0, 0, 0]) == 0.0 and float(out.depth[0, 0, 0]) == 0.0
    image = torch.rand(H, W, 3)
    out = renderer.render(
        *blobs([[0.0, 0.0, 2.0]], 0.02, 0.9, [[1.0, 0.0, 0.0]]), *front_camera(), W, H, background=image
    )
    torch.testing.assert_close(out.rgb[0, 0, 0], image[0, 0])


@pytest.mark.parametrize("red_first", [True, False])
def test_red_in_front_of_blue_shows_red(renderer: SplatRenderer, red_first: bool) -> None:
    red = ([0.0, 0.0, 1.0], 0.05, [1.0, 0.0, 0.0])
    blue = ([0.0, 0.0, 2.0], 0.1, [0.0, 0.0, 1.0])
    first, second = (red, blue) if red_first else (blue, red)
    scene = blobs([first[0], second[0]], [first[1], second[1]], 0.95, [first[2], second[2]])
    out = renderer.render(*scene, *front_camera(), W, H)
    pixel = centre_pixel(out.rgb[0], CX, CY)
    # Pixel (32, 24) is 0.5 px off both centres: each alpha is 0.95 * exp(-0.25 / variance).
    a_red = 0.95 * math.exp(-0.25 / ((F * 0.05 / 1.0) ** 2 + 0.3))
    a_blue = 0.95 * math.exp(-0.25 / ((F * 0.1 / 2.0) ** 2 + 0.3))
    torch.testing.assert_close(pixel, torch.tensor([a_red, 0.0, (1 - a_red) * a_blue]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("static_colour", ["red", "blue"])
def test_depth_order_holds_between_static_and_dynamic_gaussians(renderer: SplatRenderer, static_colour: str) -> None:
    red = blobs([[0.0, 0.0, 1.0]], 0.05, 0.95, [[1.0, 0.0, 0.0]])
    blue = blobs([[0.0, 0.0, 2.0]], 0.1, 0.95, [[0.0, 0.0, 1.0]])
    static_set, dynamic_set = (red, blue) if static_colour == "red" else (blue, red)
    static = StaticLayer(*static_set, sh_degree=None)
    mixed = renderer.render(*dynamic_set, *front_camera(), W, H, static=static)
    both = [torch.cat([a, b]) for a, b in zip(red, blue, strict=True)]
    reference = renderer.render(*both, *front_camera(), W, H)
    torch.testing.assert_close(mixed.rgb, reference.rgb, atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed.depth, reference.depth, atol=1e-5, rtol=0)
    pixel = centre_pixel(mixed.rgb[0], CX, CY)
    assert pixel[0] > 0.9 and pixel[2] < 0.06


def test_sh_degree_zero_colour_is_c0_times_dc_plus_half(renderer: SplatRenderer) -> None:
    dc = torch.tensor([[0.8, -0.4, -3.0]])  # the last channel clamps at 0
    means, quats, scales, opacities, _ = blobs([[0.0, 0.0, 2.0]], 0.1, 0.9, [[0, 0, 0]])
    out = renderer.render(means, quats, scales, opacities, dc[:, None, :], *centred_camera(), W, H, sh_degree=0)
    pixel = centre_pixel(out.rgb[0], CX, CY)  # the Gaussian's own pixel: alpha = 0.9
    torch.testing.assert_close(pixel / 0.9, torch.clamp_min(SH_C0 * dc[0] + 0.5, 0.0), atol=1e-6, rtol=0)


def sh_degree_one_colour(coeffs: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    x, y, z = torch.nn.functional.normalize(direction, dim=0)
    return torch.clamp_min(0.5 + SH_C0 * coeffs[0] + C1 * (-y * coeffs[1] + z * coeffs[2] - x * coeffs[3]), 0.0)


def test_degree_one_sh_changes_colour_with_view_direction_as_the_formula_says(renderer: SplatRenderer) -> None:
    position = torch.tensor([0.1, -0.05, 0.02])
    coeffs = torch.tensor([[0.1, 0.0, -0.2], [0.6, -0.3, 0.0], [0.0, 0.5, 0.2], [-0.5, 0.1, 0.4]])
    eyes = [torch.tensor([1.0, 0.2, 0.4]), torch.tensor([-0.3, 0.9, 0.6])]
    viewmats = torch.stack([look_at(eye, position) for eye in eyes])
    Ks = intrinsics(F, F, CX + 0.5, CY + 0.5).expand(2, 3, 3)  # the Gaussian lands on pixel (32, 24)'s centre
    means, quats, scales, opacities, _ = blobs([position.tolist()], 0.05, 0.9, [[0, 0, 0]])
    out = renderer.render(means, quats, scales, opacities, coeffs[None], viewmats, Ks, W, H, sh_degree=1)
    colours = out.rgb[:, int(CY), int(CX)] / 0.9
    for camera, eye in enumerate(eyes):
        torch.testing.assert_close(colours[camera], sh_degree_one_colour(coeffs, position - eye), atol=1e-5, rtol=0)
    assert (colours[0] - colours[1]).abs().max() > 0.1


def test_sh_frames_evaluate_colour_in_the_part_frame(renderer: SplatRenderer) -> None:
    position = torch.tensor([0.0, 0.0, 0.0])
    coeffs = torch.tensor([[0.0, 0.0, 0.0], [0.6, -0.3, 0.0], [0.0, 0.5, 0.2], [-0.5, 0.1, 0.4]])
    eye = torch.tensor([0.8, 0.3, 0.5])
    viewmats = look_at(eye, position)[None, None]
    Ks = intrinsics(F, F, CX + 0.5, CY + 0.5)[None, None]
    rotation = quat_to_rotmat(torch.tensor([0.8, 0.2, -0.4, 0.3]))
    pose = torch.eye(4)
    pose[:3, :3] = rotation
    frames = PartFrames.from_poses(torch.tensor([0]), pose[None, None])
    means, quats, scales, opacities, _ = blobs([position.tolist()], 0.05, 0.9, [[0, 0, 0]])
    out = renderer.render(
        means[None], quats[None], scales, opacities, coeffs[None], viewmats, Ks, W, H, sh_degree=1, sh_frames=frames
    )
    expected = sh_degree_one_colour(coeffs, rotation.T @ (position - eye))
    torch.testing.assert_close(out.rgb[0, 0, int(CY), int(CX)] / 0.9, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_sh_evaluation_matches_gsplat_reference_implementation(degree: int) -> None:
    torch_impl = pytest.importorskip("gsplat.cuda._torch_impl", reason="gsplat is not installed")
    directions = torch.randn(500, 3, dtype=torch.float64)
    coeffs = torch.randn(500, 16, 3, dtype=torch.float64)
    expected = torch.clamp_min(torch_impl._spherical_harmonics(degree, directions, coeffs) + 0.5, 0.0)
    torch.testing.assert_close(sh_to_rgb(degree, directions, coeffs), expected)


def test_a_batch_of_envs_and_cameras_equals_rendering_each_alone(renderer: SplatRenderer) -> None:
    envs, cameras = 2, 3
    means, quats, scales, opacities, colors = random_scene(300, seed=1, envs=envs)
    per_env = [orbit_cameras(cameras, seed) for seed in (10, 11)]
    viewmats = torch.stack([v for v, _ in per_env])  # [E, C, 4, 4]
    Ks = torch.stack([k for _, k in per_env])  # [E, C, 3, 3]
    static = StaticLayer(*random_scene(200, seed=2), sh_degree=2)
    batch = renderer.render(means, quats, scales, opacities, colors, viewmats, Ks, W, H, sh_degree=2, static=static)
    assert batch.rgb.shape == (envs, cameras, H, W, 3) and batch.depth.shape == (envs, cameras, H, W, 1)
    for e in range(envs):
        for c in range(cameras):
            alone = renderer.render(
                means[e], quats[e], scales, opacities, colors, viewmats[e, c][None], Ks[e, c][None], W, H, sh_degree=2,
                static=StaticLayer(*random_scene(200, seed=2), sh_degree=2),
            )  # fmt: skip
            assert alone.rgb.shape == (1, H, W, 3)
            torch.testing.assert_close(batch.rgb[e, c], alone.rgb[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(batch.alpha[e, c], alone.alpha[0], atol=1e-5, rtol=0)
    assert batch.alpha.mean() > 0.05  # the scene is actually in view


def test_memory_bounds_do_not_change_the_image(renderer: SplatRenderer) -> None:
    scene = random_scene(300, seed=17, envs=3)
    viewmats, Ks = orbit_cameras(2, seed=18)
    bounded = SplatRenderer(backend="torch", device="cpu", chunk_elements=2048, max_visible=100)  # 1 image per pass
    reference, small = (r.render(*scene, viewmats, Ks, W, H, sh_degree=2) for r in (renderer, bounded))
    assert small.info["chunk_steps"] > reference.info["chunk_steps"]
    torch.testing.assert_close(small.rgb, reference.rgb, atol=1e-6, rtol=0)
    torch.testing.assert_close(small.depth, reference.depth, atol=1e-5, rtol=0)


def test_static_cache_is_reused_until_the_cameras_change(renderer: SplatRenderer) -> None:
    static = StaticLayer(*random_scene(200, seed=3, sh_degree=1), sh_degree=1)
    viewmats, Ks = orbit_cameras(2, seed=4)
    first = renderer.project_static(static, viewmats, Ks, W, H)
    assert renderer.project_static(static, viewmats.clone(), Ks.clone(), W, H) is first
    assert renderer.project_static(static, viewmats, Ks, W + 2, H) is not first
    moved = viewmats.clone()
    moved[0, 0, 3] += 0.01
    again = renderer.project_static(static, moved, Ks, W, H)
    assert again is not first
    assert again.depths.shape[-1] <= len(static)  # compacted to what some camera sees
    static.invalidate()
    assert renderer.project_static(static, moved, Ks, W, H) is not again


def test_static_plus_dynamic_equals_one_full_render(renderer: SplatRenderer) -> None:
    dynamic = random_scene(250, seed=5, sh_degree=3, envs=2)
    table = random_scene(400, seed=6, sh_degree=3)
    viewmats, Ks = orbit_cameras(2, seed=7)
    static = StaticLayer(*table, sh_degree=3)
    split = renderer.render(*dynamic, viewmats, Ks, W, H, sh_degree=3, static=static)
    split_again = renderer.render(*dynamic, viewmats, Ks, W, H, sh_degree=3, static=static)  # from the cache
    merged = [
        torch.cat([dynamic[0], table[0].expand(2, -1, -1)], dim=1),
        torch.cat([dynamic[1], table[1].expand(2, -1, -1)], dim=1),
        *(torch.cat([d, t]) for d, t in zip(dynamic[2:], table[2:], strict=True)),
    ]
    full = renderer.render(*merged, viewmats, Ks, W, H, sh_degree=3)
    for out in (split, split_again):
        torch.testing.assert_close(out.rgb, full.rgb, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.depth, full.depth, atol=1e-4, rtol=0)
    only_static = renderer.render(*(t[:0] for t in table), viewmats, Ks, W, H, sh_degree=3, static=static)
    table_alone = renderer.render(*table, viewmats, Ks, W, H, sh_degree=3)
    torch.testing.assert_close(only_static.rgb, table_alone.rgb, atol=1e-5, rtol=0)


def sequential_composite(means2d, conics, colors, opacities, depths, radii, width, height, tile_size=16):
    """gsplat's per-pixel loop, literally: depth order, 16-px tile binning, 1/255 cut, 0.999 clamp, exclusive stop."""
    n_images, _, channels = colors.shape
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    out, alphas = torch.zeros(n_images, height, width, channels), torch.zeros(n_images, height, width, 1)
    for i in range(n_images):
        trans, done = torch.ones(height, width), torch.zeros(height, width, dtype=torch.bool)
        visible = (radii[i] > 0).all(-1).nonzero().squeeze(1)
        for g in visible[torch.argsort(depths[i, visible], stable=True)].tolist():
            (mx, my), (a, b, c), (rx, ry) = means2d[i, g].tolist(), conics[i, g].tolist(), radii[i, g].tolist()
            x0, x1 = math.floor((mx - rx) / tile_size) * tile_size, math.ceil((mx + rx) / tile_size) * tile_size
            y0, y1 = math.floor((my - ry) / tile_size) * tile_size, math.ceil((my + ry) / tile_size) * tile_size
            binned = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
            dx, dy = mx - xs, my - ys
            alpha = torch.clamp_max(
                opacities[i, g] * torch.exp(-(0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy)), 0.999
            )
            use = binned & ~done & (alpha >= 1 / 255)
            stop = use & (trans * (1 - alpha) <= 1e-4)
            done |= stop
            use &= ~stop
            out[i] += torch.where(use[..., None], (alpha * trans)[..., None] * colors[i, g], 0.0)
            trans = torch.where(use, trans * (1 - alpha), trans)
        alphas[i, ..., 0] = 1 - trans
    return out, alphas


@pytest.mark.parametrize(("tile_size", "chunk_elements"), [(16, 1 << 22), (8, 1 << 22), (8, 4096), (4, 1024)])
def test_tile_compositing_matches_the_sequential_definition(tile_size: int, chunk_elements: int) -> None:
    g = torch.Generator().manual_seed(8)
    n = 120  # a crowd of nearly opaque Gaussians, so pixels saturate and stop early
    means = torch.randn(n, 3, generator=g) * torch.tensor([0.1, 0.1, 0.02]) + torch.tensor([0.0, 0.0, 1.5])
    quats, scales = torch.randn(n, 4, generator=g), torch.rand(n, 3, generator=g) * 0.05 + 0.01
    opacities = torch.where(torch.arange(n) % 3 == 0, 0.999, torch.rand(n, generator=g) * 0.5 + 0.5)
    colors = torch.rand(1, n, 4, generator=g)
    viewmats, Ks = front_camera()
    projected = project_gaussians(means, quats, scales, opacities, viewmats, Ks, W - 3, H - 5)
    means2d, conics, depths, radii, opac = projected
    expected = sequential_composite(means2d, conics, colors, opac, depths, radii, W - 3, H - 5)
    got = composite_tiles(
        means2d, conics, colors, opac, depths, radii, W - 3, H - 5, tile_size=tile_size, chunk_elements=chunk_elements
    )
    assert expected[1].max() > 0.999  # early termination is exercised
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=0)


def test_gradients_flow_to_every_parameter(renderer: SplatRenderer) -> None:
    means, quats, scales, opacities, colors = (t.clone().requires_grad_() for t in random_scene(150, seed=9))
    viewmats, Ks = orbit_cameras(2, seed=12)
    out = renderer.render(means, quats, scales, opacities, colors, viewmats, Ks, W, H, sh_degree=2)
    target = torch.rand_like(out.rgb)
    ((out.rgb - target) ** 2).mean().backward()
    for name, tensor in {
        "means": means,
        "quats": quats,
        "scales": scales,
        "opacities": opacities,
        "sh": colors,
    }.items():
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all(), name
        assert tensor.grad.abs().sum() > 0, name
    means2d = out.info["means2d"]
    assert means2d.shape == (2, 150, 2) and means2d.grad is not None and means2d.grad.abs().sum() > 0


def test_gradients_match_finite_differences() -> None:
    renderer = SplatRenderer(backend="torch", device="cpu", chunk_elements=512, min_chunk=2, max_chunk=4)
    means, quats, scales, opacities, colors = (t.double() for t in random_scene(8, seed=13, sh_degree=1))
    scales = scales + 0.03
    viewmats, Ks = orbit_cameras(1, seed=14)
    viewmats, Ks = viewmats.double(), Ks.double() * torch.tensor([0.3, 0.3, 1.0]).double()[:, None]

    def render(m: torch.Tensor, q: torch.Tensor, s: torch.Tensor, o: torch.Tensor, c: torch.Tensor):
        out = renderer.render(m, q, s, o, c, viewmats, Ks, 20, 16, sh_degree=1)
        return out.rgb, out.alpha, out.depth

    inputs = tuple(t.clone().requires_grad_() for t in (means, quats, scales, opacities, colors))
    assert torch.autograd.gradcheck(render, inputs, eps=1e-6, atol=1e-5, rtol=1e-3)


def test_default_strategy_densifies_from_the_torch_backend(renderer: SplatRenderer) -> None:
    strategy_module = pytest.importorskip("gsplat.strategy", reason="gsplat is not installed")
    means, quats, scales, opacities, colors = random_scene(200, seed=15, sh_degree=1)
    params = torch.nn.ParameterDict(
        {
            "means": means,
            "quats": quats,
            "scales": scales.log(),
            "opacities": torch.logit(opacities),
            "sh0": colors[:, :1],
            "shN": colors[:, 1:],
        }
    )
    optimizers = {k: torch.optim.Adam([p], lr=1e-3) for k, p in params.items()}
    strategy = strategy_module.DefaultStrategy(refine_start_iter=0, refine_every=2, grow_grad2d=1e-9, verbose=False)
    strategy.check_sanity(params, optimizers)
    state = strategy.initialize_state()
    viewmats, Ks = orbit_cameras(2, seed=16)
    for step in range(3):
        sh = torch.cat([params["sh0"], params["shN"]], dim=1)
        out = renderer.render(
            params["means"], params["quats"], params["scales"].exp(), torch.sigmoid(params["opacities"]), sh,
            viewmats, Ks, W, H, sh_degree=1, render_depth=False,
        )  # fmt: skip
        strategy.step_pre_backward(params, optimizers, state, step, out.info)
        out.rgb.mean().backward()
        strategy.step_post_backward(params, optimizers, state, step, out.info, packed=False)
        for optimizer in optimizers.values():
            optimizer.step()
            optimizer.zero_grad()
    assert len(params["means"]) > 200  # grown by duplicate/split


def test_bad_shapes_name_the_argument(renderer: SplatRenderer) -> None:
    means, quats, scales, opacities, colors = random_scene(10, seed=19)
    viewmats, Ks = orbit_cameras(1, seed=20)
    with pytest.raises(ValueError, match="quats"):
        renderer.render(means, quats[:, :3], scales, opacities, colors, viewmats, Ks, W, H, sh_degree=2)
    with pytest.raises(ValueError, match="sh_degree=3"):
        renderer.render(means, quats, scales, opacities, colors, viewmats, Ks, W, H, sh_degree=3)
    with pytest.raises(ValueError, match="intrinsics"):
        renderer.render(means, quats, scales, opacities, colors, viewmats, Ks.expand(2, 3, 3), W, H, sh_degree=2)


def test_to_uint8_rounds_and_clamps() -> None:
    values = torch.tensor([-0.1, 0.0, 0.49 / 255, 0.51 / 255, 0.5, 1.0, 1.3])
    assert to_uint8(values).tolist() == [0, 0, 0, 1, 128, 255, 255]
