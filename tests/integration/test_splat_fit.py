"""Fitting a splat on CPU with the torch rasterizer: a tiny synthetic scene is recovered from 20 posed views."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gsrl.splat.camera import stack_cameras
from gsrl.splat.fit import (
    FitConfig,
    fit_gaussians,
    fit_scene,
    gaussians_from_points,
    random_points_in_box,
    render_views,
)
from gsrl.splat.gaussians import GaussianSet, rgb_to_sh_dc
from gsrl.splat.ply import load_ply
from gsrl.splat.renderer import SplatRenderer, to_uint8
from gsrl.splat.views import ViewDataset, hemisphere_cameras, save_dataset

SIZE = 32


def ground_truth() -> GaussianSet:
    """Eight opaque, anisotropic, differently coloured blobs within 0.6 m of the origin."""
    g = torch.Generator().manual_seed(0)
    colors = torch.tensor(
        [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 0.5, 0], [0.9, 0.9, 0.9]]
    ).float()
    return GaussianSet(
        means=(torch.rand(8, 3, generator=g) * 2 - 1) * 0.6,
        quats=torch.randn(8, 4, generator=g),
        log_scales=torch.log(torch.rand(8, 3, generator=g) * 0.25 + 0.1),
        opacity_logits=torch.full((8,), 3.0),
        sh=rgb_to_sh_dc(colors)[:, None, :],
    )


@pytest.fixture(scope="module")
def dataset() -> ViewDataset:
    """24 views all around the blobs (elevation -30..80 degrees), rendered by the torch backend as ground truth."""
    cameras = hemisphere_cameras(
        [0, 0, 0], 3.0, 24, SIZE, SIZE, fov_y_deg=45, min_elevation_deg=-30, max_elevation_deg=80
    )
    gt = ground_truth()
    viewmats, ks = stack_cameras(cameras)
    out = SplatRenderer(backend="torch", device="cpu").render(
        gt.means,
        gt.unit_quats,
        gt.scales,
        gt.opacities,
        gt.sh,
        viewmats,
        ks,
        SIZE,
        SIZE,
        sh_degree=0,
        render_depth=False,
    )
    return ViewDataset(to_uint8(out.rgb).numpy(), cameras, background=(0.0, 0.0, 0.0))


def test_fit_recovers_held_out_views(dataset: ViewDataset) -> None:
    train, test = dataset.split(test_every=6)  # 20 train, 4 held-out views between them
    init = gaussians_from_points(random_points_in_box(300, [-1, -1, -1], [1, 1, 1]), None, sh_degree=1)
    config = FitConfig.for_iterations(300, sh_degree=1, max_gaussians=3000, eval_every=100)
    result = fit_gaussians(train, init, config, test, device="cpu", backend="torch", progress=False)
    m = result.metrics
    # Random grey-ish blobs everywhere start near 10 dB; the fit must get the held-out views right, not just train.
    assert m["initial_test_psnr"] < 13.0
    assert m["test_psnr"] > 22.0
    assert m["test_psnr"] > m["initial_test_psnr"] + 10.0
    assert m["test_ssim"] > 0.8
    # DefaultStrategy ran on the torch backend's info: Gaussians were cloned / split beyond the initial 300.
    assert m["num_gaussians"] > 300
    assert result.gaussians.sh_degree == 1 and torch.isfinite(result.gaussians.means).all()
    steps = [h["step"] for h in result.history]
    assert steps == [0, 100, 200, 300]
    assert result.history[-1]["test_psnr"] > result.history[1]["test_psnr"] > result.history[0]["test_psnr"]


def test_fit_scene_writes_ply_and_summary(dataset: ViewDataset, tmp_path: Path) -> None:
    save_dataset(dataset, tmp_path / "views")
    summary = fit_scene(
        tmp_path / "views",
        tmp_path / "out" / "scene.ply",
        60,
        init="random",
        num_init_points=200,
        sh_degree=0,
        test_every=6,
        device="cpu",
        backend="torch",
        progress=False,
    )
    assert summary["num_train_views"] == 20 and summary["num_test_views"] == 4 and summary["init"] == "random"
    assert summary["metrics"]["test_psnr"] > summary["metrics"]["initial_test_psnr"]
    fitted = load_ply(tmp_path / "out" / "scene.ply")
    assert len(fitted) == summary["metrics"]["num_gaussians"]
    on_disk = json.loads((tmp_path / "out" / "scene.fit.json").read_text())
    assert on_disk["metrics"]["test_psnr"] == pytest.approx(summary["metrics"]["test_psnr"])
    # The saved splat renders the held-out views as well as the summary says (the PLY round trip loses nothing).
    renders = render_views(fitted, dataset.cameras[::6], device="cpu", backend="torch")
    mse = ((renders.astype(np.float64) - dataset.images[::6]) ** 2).mean(axis=(1, 2, 3)) / 255.0**2
    assert float(np.mean(10 * np.log10(1 / mse))) == pytest.approx(summary["metrics"]["test_psnr"], abs=0.5)
