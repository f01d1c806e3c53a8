"""Fit a ``GaussianSet`` to a posed image dataset (Real2Sim): the recipe of gsplat's ``simple_trainer``, small.

Per step: render a batch of training views with ``SplatRenderer`` (gsplat's CUDA kernels on a GPU, the
differentiable PyTorch backend on CPU), loss = 0.8 * L1 + 0.2 * (1 - SSIM), Adam with one optimizer per parameter
at simple_trainer's learning rates (means 1.6e-4 x scene scale, decaying 100x over the run; log scales 5e-3;
quats 1e-3; opacity logits 5e-2; SH DC 2.5e-3; higher SH 2.5e-3 / 20), densification by
``gsplat.strategy.DefaultStrategy`` (clone / split on large image-space gradients, prune transparent Gaussians),
and the SH degree raised by one every ``sh_degree_interval`` steps. Held-out views are scored with PSNR and SSIM
(``gsrl.splat.metrics``) before and after fitting.

Entry points: ``fit_gaussians`` (datasets and an initial splat in memory), ``fit_scene`` (a ``transforms.json``
folder in, a 3DGS PLY and a summary out), and ``python -m gsrl.splat.fit_demo`` (CLI and the table demo).

gsplat 1.5.3's ``DefaultStrategy`` never resets opacities (``step % reset_every == 0 & step > 0`` parses as a
chained comparison that is always false); ``reset_every`` here only gates the 3D-size pruning, as it does there.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree
from torch import Tensor

from gsrl.splat.camera import PinholeCamera, stack_cameras
from gsrl.splat.gaussians import GaussianSet, num_sh_bases, rgb_to_sh_dc
from gsrl.splat.metrics import psnr, ssim
from gsrl.splat.renderer import SplatRenderer, to_uint8
from gsrl.splat.views import ViewDataset, load_dataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitConfig:
    """Hyper-parameters of ``fit_gaussians``; defaults are gsplat ``simple_trainer``'s for a 7k-step run.

    Densification steps (``refine_*``) are absolute step numbers, so short fits must set them (``for_iterations``
    scales simple_trainer's 500 / 15000 / 100 schedule of a 30k run to any length).
    """

    iterations: int = 7_000
    batch_size: int = 1
    sh_degree: int = 3
    sh_degree_interval: int = 1_000
    ssim_lambda: float = 0.2
    means_lr: float = 1.6e-4
    """Multiplied by the scene scale (metres): a step moves a Gaussian by a fixed fraction of the scene."""
    means_lr_final_ratio: float = 0.01
    scales_lr: float = 5e-3
    quats_lr: float = 1e-3
    opacities_lr: float = 5e-2
    sh0_lr: float = 2.5e-3
    shN_lr: float = 2.5e-3 / 20
    init_opacity: float = 0.1
    init_scale: float = 1.0
    """Initial scale = this x the mean distance to the 3 nearest initial points (isotropic)."""
    densify: bool = True
    refine_start_iter: int = 500
    refine_stop_iter: int = 15_000
    refine_every: int = 100
    reset_every: int = 3_000
    grow_grad2d: float = 0.0002
    prune_opa: float = 0.005
    max_gaussians: int | None = None
    """Freeze densification and pruning once there are this many Gaussians (one refine step can overshoot it);
    bounds memory and CPU time."""
    background: tuple[float, float, float] | None = None
    """Colour under the splat; None takes the dataset's (known for sim renders), else black."""
    eval_every: int = 0
    """Also score the held-out views every this many steps (0: only before and after)."""
    seed: int = 0

    @staticmethod
    def for_iterations(iterations: int, **overrides: Any) -> FitConfig:
        """simple_trainer's 30k-step schedule compressed to ``iterations`` steps: refine from 1/60 of the run to
        its middle, SH degree up every 1/30 of it. Refinement stays every 10..100 steps: its gradient statistics
        are averages over the views seen since the last refinement, so they need more than a handful of views."""
        base = {
            "iterations": iterations,
            "refine_start_iter": max(10, iterations // 60),
            "refine_stop_iter": iterations // 2,
            "refine_every": min(100, max(10, iterations // 100)),
            "reset_every": max(1, iterations // 10),
            "sh_degree_interval": max(1, iterations // 30),
        }
        return FitConfig(**(base | overrides))


@dataclass
class FitResult:
    """``gaussians`` fitted (CPU); ``metrics`` the final numbers: ``test_psnr`` / ``test_ssim`` on the held-out
    views and ``initial_test_*`` before fitting, ``train_*`` on (up to 8 of) the training views, Gaussian counts,
    seconds and steps per second; ``history`` one dict per evaluation (step, test PSNR/SSIM, count, train loss)."""

    gaussians: GaussianSet
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- init


def scene_scale(dataset: ViewDataset) -> float:
    """1.1 x the largest camera distance from the cameras' mean (simple_trainer's ``scene_scale``), metres."""
    centres = dataset.camera_centers()
    return 1.1 * float(np.linalg.norm(centres - centres.mean(0), axis=1).max())


def gaussians_from_points(
    points: np.ndarray,
    colors: np.ndarray | None,
    sh_degree: int,
    init_opacity: float = 0.1,
    init_scale: float = 1.0,
    seed: int = 0,
) -> GaussianSet:
    """Isotropic Gaussians at ``points`` [N, 3] with ``colors`` [N, 3] in [0, 1] (random if None).

    Scale = ``init_scale`` x mean distance to the 3 nearest neighbours, so the initial splat covers the cloud
    without large overlaps; random orientations and ``init_opacity`` everywhere, higher SH bands zero.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    n = len(points)
    if n < 4:
        raise ValueError(f"need at least 4 initial points, got {n}")
    distances, _ = cKDTree(points).query(points, k=4)
    mean_distance = np.sqrt((distances[:, 1:] ** 2).mean(1)).clip(min=1e-7)
    generator = torch.Generator().manual_seed(seed)
    rgb = torch.rand(n, 3, generator=generator) if colors is None else torch.as_tensor(np.asarray(colors)).float()
    sh = torch.zeros(n, num_sh_bases(sh_degree), 3)
    sh[:, 0] = rgb_to_sh_dc(rgb)
    return GaussianSet(
        means=torch.as_tensor(points, dtype=torch.float32),
        quats=torch.rand(n, 4, generator=generator),
        log_scales=torch.log(torch.as_tensor(mean_distance * init_scale, dtype=torch.float32))[:, None].repeat(1, 3),
        opacity_logits=torch.full((n,), math.log(init_opacity / (1 - init_opacity))),
        sh=sh,
    )


def random_points_in_box(num_points: int, box_min: Any, box_max: Any, seed: int = 0) -> np.ndarray:
    """``num_points`` uniform points [num_points, 3] in the axis-aligned box [box_min, box_max] (metres)."""
    rng = np.random.default_rng(seed)
    return rng.uniform(np.asarray(box_min, dtype=np.float64), np.asarray(box_max, dtype=np.float64), (num_points, 3))


def points_from_depth(dataset: ViewDataset, max_points: int = 100_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Back-project every pixel with depth > 0 to world points [M, 3] with their colours [M, 3] in [0, 1].

    For sim renders this plays the part COLMAP's sparse cloud plays for real captures: points on the true
    surfaces, so fitting starts close and densification has less to do. A random subset of ``max_points``.
    """
    if dataset.depths is None:
        raise ValueError("points_from_depth needs a dataset with depth images")
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0 : dataset.height, 0 : dataset.width]
    pixels = np.stack([cols + 0.5, rows + 0.5, np.ones_like(cols)], -1).reshape(-1, 3).astype(np.float64)
    all_points, all_colors = [], []
    for image, depth, camera in zip(dataset.images, dataset.depths, dataset.cameras, strict=True):
        valid = depth.reshape(-1) > 0
        rays = pixels[valid] @ np.linalg.inv(camera.K.double().numpy()).T  # camera frame, z = 1
        cam_points = rays * depth.reshape(-1)[valid, None]
        c2w = camera.camera_to_world.double().numpy()
        all_points.append(cam_points @ c2w[:3, :3].T + c2w[:3, 3])
        all_colors.append(image.reshape(-1, 3)[valid] / 255.0)
    points, colors = np.concatenate(all_points), np.concatenate(all_colors)
    if len(points) > max_points:
        keep = rng.choice(len(points), max_points, replace=False)
        points, colors = points[keep], colors[keep]
    return points, colors


# ---------------------------------------------------------------------------------------------------- training


def _params_and_optimizers(
    init: GaussianSet, config: FitConfig, scale: float, device: torch.device
) -> tuple[torch.nn.ParameterDict, dict[str, torch.optim.Optimizer]]:
    """The parameter dict and one Adam per parameter, named as ``DefaultStrategy`` expects."""
    init = init.with_sh_degree(config.sh_degree).to(device=device, dtype=torch.float32)
    tensors = {
        "means": init.means,
        "scales": init.log_scales,
        "quats": init.quats,
        "opacities": init.opacity_logits,
        "sh0": init.sh[:, :1],
        "shN": init.sh[:, 1:],
    }
    lrs = {
        "means": config.means_lr * scale,
        "scales": config.scales_lr,
        "quats": config.quats_lr,
        "opacities": config.opacities_lr,
        "sh0": config.sh0_lr,
        "shN": config.shN_lr,
    }
    if config.sh_degree == 0:
        del tensors["shN"]
    params = torch.nn.ParameterDict(
        {k: torch.nn.Parameter(v.detach().clone().contiguous()) for k, v in tensors.items()}
    )
    # simple_trainer's batch-size rule: lr x sqrt(B), eps / sqrt(B), betas raised to the B-th power (approximately)
    bs = config.batch_size
    optimizers = {
        name: torch.optim.Adam(
            [{"params": param, "lr": lrs[name] * math.sqrt(bs), "name": name}],
            eps=1e-15 / math.sqrt(bs),
            betas=(1 - bs * (1 - 0.9), 1 - bs * (1 - 0.999)),
        )
        for name, param in params.items()
    }
    return params, optimizers


def _gaussians_of(params: torch.nn.ParameterDict, detach: bool = False) -> GaussianSet:
    """The parameters as a ``GaussianSet`` (a graph-connected view for rendering, or a detached snapshot)."""
    sh = params["sh0"] if "shN" not in params else torch.cat([params["sh0"], params["shN"]], dim=1)
    tensors = [params["means"], params["quats"], params["scales"], params["opacities"], sh]
    return GaussianSet(*(t.detach().clone() if detach else t for t in tensors))


def _render(
    renderer: SplatRenderer, gaussians: GaussianSet, viewmats: Tensor, ks: Tensor, size: tuple[int, int], degree: int
) -> tuple[Tensor, dict[str, Any]]:
    """Images [C, H, W, 3] of ``gaussians`` from C cameras, and the renderer's info (for the strategy)."""
    out = renderer.render(
        gaussians.means,
        F.normalize(gaussians.quats, dim=-1),
        gaussians.scales,
        gaussians.opacities,
        gaussians.sh,
        viewmats,
        ks,
        size[0],
        size[1],
        sh_degree=degree,
        render_depth=False,
    )
    return out.rgb, out.info


@torch.no_grad()
def evaluate_views(
    renderer: SplatRenderer, gaussians: GaussianSet, dataset: ViewDataset, sh_degree: int | None = None
) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM of ``gaussians`` rendered from ``dataset``'s cameras against its images, one view
    at a time (bounded memory for any number of views)."""
    gaussians = gaussians.to(renderer.device)
    degree = gaussians.sh_degree if sh_degree is None else sh_degree
    scores: dict[str, list[float]] = {"psnr": [], "ssim": []}
    for image, camera in zip(dataset.images, dataset.cameras, strict=True):
        viewmats, ks = stack_cameras([camera])
        rgb, _ = _render(renderer, gaussians, viewmats, ks, (dataset.width, dataset.height), degree)
        target = torch.as_tensor(image, device=renderer.device).float()[None] / 255.0
        scores["psnr"].append(float(psnr(rgb, target)))
        scores["ssim"].append(float(ssim(rgb, target)))
    return {k: float(np.mean(v)) for k, v in scores.items()}


@torch.no_grad()
def render_views(
    gaussians: GaussianSet,
    cameras: list[PinholeCamera],
    background: tuple[float, float, float] = (0.0, 0.0, 0.0),
    device: torch.device | str | None = None,
    backend: str = "auto",
) -> np.ndarray:
    """uint8 [N, H, W, 3] renders of ``gaussians`` (all its SH bands) from ``cameras``, one at a time."""
    renderer = SplatRenderer(backend=backend, device=device, background=background)  # type: ignore[arg-type]
    gaussians = gaussians.to(renderer.device)
    frames = []
    for camera in cameras:
        viewmats, ks = stack_cameras([camera])
        rgb, _ = _render(renderer, gaussians, viewmats, ks, (camera.width, camera.height), gaussians.sh_degree)
        frames.append(to_uint8(rgb[0]).cpu().numpy())
    return np.stack(frames)


def _epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless shuffled batches of view indices, every view once per epoch (simple_trainer's loader)."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


class _Progress:
    """A tqdm bar on a terminal when tqdm is installed, else (log files, no tqdm) an INFO log line every ``every``
    steps with the rate and ETA, which stays readable in a pod's log where a redrawn bar is not."""

    def __init__(self, total: int, enabled: bool, every: int = 100) -> None:
        self.total, self.enabled, self.every = total, enabled, every
        self.start = time.perf_counter()
        self.bar: Any = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc="fit", unit="step", dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def update(self, step: int, postfix: dict[str, str]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(postfix, refresh=False)
        elif step % self.every == 0 or step == self.total:
            rate = step / max(time.perf_counter() - self.start, 1e-9)
            eta = (self.total - step) / max(rate, 1e-9)
            items = " ".join(f"{k}={v}" for k, v in postfix.items())
            log.info("fit %d/%d  %.1f step/s  eta %.0fs  %s", step, self.total, rate, eta, items)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def fit_gaussians(
    train: ViewDataset,
    init: GaussianSet,
    config: FitConfig = FitConfig(),
    test: ViewDataset | None = None,
    *,
    device: torch.device | str | None = None,
    backend: str = "auto",
    progress: bool = True,
    callback: Callable[[int, GaussianSet], None] | None = None,
) -> FitResult:
    """Optimize ``init`` so its renders from ``train``'s cameras match its images; score ``test`` if given.

    ``device`` defaults to CUDA when available; ``backend`` is ``SplatRenderer``'s ("auto": gsplat on CUDA, the
    torch rasterizer on CPU). Randomness (view order, split positions) is seeded by ``config.seed`` without
    touching the caller's global RNG state. ``callback(step, gaussians)`` is called at each evaluation.
    """
    from gsplat.strategy import DefaultStrategy

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    background = config.background or train.background or (0.0, 0.0, 0.0)
    renderer = SplatRenderer(backend=backend, device=dev, background=tuple(background))  # type: ignore[arg-type]
    scale = scene_scale(train)
    size = (train.width, train.height)
    targets = torch.as_tensor(train.images, device=dev).float() / 255.0  # [N, H, W, 3]
    viewmats_all, ks_all = (t.to(dev) for t in stack_cameras(train.cameras))

    fork_devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(config.seed)
        params, optimizers = _params_and_optimizers(init, config, scale, dev)
        means_decay = torch.optim.lr_scheduler.ExponentialLR(
            optimizers["means"], gamma=config.means_lr_final_ratio ** (1.0 / max(config.iterations, 1))
        )
        strategy = DefaultStrategy(
            prune_opa=config.prune_opa,
            grow_grad2d=config.grow_grad2d,
            refine_start_iter=config.refine_start_iter,
            refine_stop_iter=config.refine_stop_iter if config.densify else 0,
            reset_every=config.reset_every,
            refine_every=config.refine_every,
        )
        strategy.check_sanity(params, optimizers)
        state = strategy.initialize_state(scene_scale=scale)

        history: list[dict[str, float]] = []
        initial = evaluate_views(renderer, _gaussians_of(params, detach=True), test) if test is not None else {}
        if initial:
            history.append(
                {"step": 0, "num_gaussians": len(params["means"])} | {f"test_{k}": v for k, v in initial.items()}
            )
        batches = _epoch_batches(
            len(train), min(config.batch_size, len(train)), torch.Generator().manual_seed(config.seed)
        )
        bar = _Progress(config.iterations, progress, every=max(1, config.iterations // 20))
        start = time.perf_counter()
        loss_value = float("nan")
        for step in range(config.iterations):
            degree = min(step // config.sh_degree_interval, config.sh_degree)
            index = next(batches).to(dev)
            rgb, info = _render(renderer, _gaussians_of(params), viewmats_all[index], ks_all[index], size, degree)
            strategy.step_pre_backward(params, optimizers, state, step, info)
            target = targets[index]
            l1 = (rgb - target).abs().mean()
            loss = (1 - config.ssim_lambda) * l1 + config.ssim_lambda * (1 - ssim(rgb, target).mean())
            loss.backward()
            for optimizer in optimizers.values():
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            means_decay.step()
            # Densify after the update, as simple_trainer does; frozen once the Gaussian budget is reached.
            if config.max_gaussians is None or len(params["means"]) < config.max_gaussians:
                strategy.step_post_backward(params, optimizers, state, step, info, packed=False)
            loss_value = float(loss.detach())
            done = step + 1
            if test is not None and config.eval_every and done % config.eval_every == 0 and done < config.iterations:
                scores = evaluate_views(renderer, _gaussians_of(params, detach=True), test, degree)
                history.append(
                    {"step": done, "num_gaussians": len(params["means"]), "train_loss": loss_value}
                    | {f"test_{k}": v for k, v in scores.items()}
                )
                if callback is not None:
                    callback(done, _gaussians_of(params, detach=True))
            bar.update(done, {"loss": f"{loss_value:.4f}", "n": str(len(params["means"])), "sh": str(degree)})
        bar.close()
        seconds = time.perf_counter() - start

    fitted = _gaussians_of(params, detach=True)
    metrics: dict[str, float] = {
        "iterations": config.iterations,
        "seconds": seconds,
        "steps_per_second": config.iterations / max(seconds, 1e-9),
        "num_gaussians": len(fitted),
        "num_initial_gaussians": len(init),
        "train_loss": loss_value,
        "scene_scale": scale,
    }
    metrics |= {
        f"train_{k}": v for k, v in evaluate_views(renderer, fitted, train.subset(range(min(len(train), 8)))).items()
    }
    if test is not None:
        final = evaluate_views(renderer, fitted, test)
        metrics |= {f"initial_test_{k}": v for k, v in initial.items()} | {f"test_{k}": v for k, v in final.items()}
        history.append(
            {"step": config.iterations, "num_gaussians": len(fitted), "train_loss": loss_value}
            | {f"test_{k}": v for k, v in final.items()}
        )
        if callback is not None:
            callback(config.iterations, fitted)
    return FitResult(gaussians=fitted.to("cpu"), metrics=metrics, history=history)


# ---------------------------------------------------------------------------------------------------- CLI-facing


def initial_gaussians(
    dataset: ViewDataset, init: str = "auto", num_points: int = 100_000, sh_degree: int = 3, seed: int = 0
) -> tuple[GaussianSet, str]:
    """The starting splat for ``dataset`` and what it was: "depth" (back-projected depth pixels with their
    colours; sim renders), "random" (uniform in the box the cameras surround: their centres' mean +- the scene
    scale, simple_trainer's random init) or a path to a 3DGS PLY (e.g. ``mesh_to_gaussians`` output).
    "auto" takes depth when the dataset has it, else random."""
    if init == "auto":
        init = "depth" if dataset.depths is not None else "random"
    if init == "depth":
        points, colors = points_from_depth(dataset, max_points=num_points, seed=seed)
        return gaussians_from_points(points, colors, sh_degree, seed=seed), "depth"
    if init == "random":
        centre, half = dataset.camera_centers().mean(0), scene_scale(dataset)
        points = random_points_in_box(num_points, centre - half, centre + half, seed=seed)
        return gaussians_from_points(points, None, sh_degree, seed=seed), "random"
    from gsrl.splat.ply import load_ply

    return load_ply(init).with_sh_degree(sh_degree), str(init)


def fit_scene(
    dataset_dir: str | Path,
    out_ply: str | Path,
    iterations: int = 7_000,
    *,
    init: str = "auto",
    num_init_points: int = 100_000,
    sh_degree: int = 3,
    test_every: int = 8,
    downscale: int = 1,
    max_gaussians: int | None = None,
    device: str | None = None,
    backend: str = "auto",
    seed: int = 0,
    progress: bool = True,
    **config_overrides: Any,
) -> dict[str, Any]:
    """Fit a splat to a ``transforms.json`` folder, write it as a 3DGS PLY and return a JSON-able summary.

    Every ``test_every``-th view is held out (0 holds none out) and scored before and after fitting; the
    summary (also written beside the PLY as ``<name>.fit.json``) holds the dataset sizes, the init, the final
    metrics (held-out PSNR dB / SSIM, Gaussian count, time) and the evaluation history. ``config_overrides``
    are ``FitConfig`` fields (e.g. ``eval_every=500``, ``grow_grad2d=0.0005``).
    """
    from gsrl.splat.ply import save_ply

    dataset = load_dataset(dataset_dir, downscale=downscale)
    train, test = dataset.split(test_every) if test_every else (dataset, None)
    start_gaussians, init_kind = initial_gaussians(train, init, num_init_points, sh_degree, seed)
    config = FitConfig.for_iterations(
        iterations, sh_degree=sh_degree, max_gaussians=max_gaussians, seed=seed, **config_overrides
    )
    result = fit_gaussians(train, start_gaussians, config, test, device=device, backend=backend, progress=progress)
    out_ply = Path(out_ply)
    out_ply.parent.mkdir(parents=True, exist_ok=True)
    save_ply(out_ply, result.gaussians)
    summary = {
        "dataset": str(dataset_dir),
        "out_ply": str(out_ply),
        "num_train_views": len(train),
        "num_test_views": 0 if test is None else len(test),
        "image_size": [dataset.width, dataset.height],
        "init": init_kind,
        "device": str(device or ("cuda" if torch.cuda.is_available() else "cpu")),
        "config": asdict(config),
        "metrics": result.metrics,
        "history": result.history,
    }
    out_ply.with_suffix(".fit.json").write_text(json.dumps(summary, indent=2))
    return summary
