"""Real2Sim demo and command line: fit the static table of ``PutCubeOnPlate-v0`` from SAPIEN renders, or any
``transforms.json`` folder, and report held-out PSNR.

    python -m gsrl.splat.fit_demo table runs/table-fit --preset gpu         # the real demo, on a CUDA machine
    python -m gsrl.splat.fit_demo table runs/table-smoke --preset cpu-smoke # minutes on 2 CPU cores
    python -m gsrl.splat.fit_demo render runs/table-fit --preset gpu        # only render the views (e.g. on CPU)
    python -m gsrl.splat.fit_demo fit DATASET_DIR OUT.ply --iterations 7000 # a capture from ns-process-data

The table demo renders views of the table alone (robot, objects and the infinite ground hidden, SAPIEN's grey
background kept) on an equal-area hemisphere rig around it, with depth, so the fit starts from back-projected
depth points as a COLMAP cloud would give for a real capture. Every 8th view is held out. Outputs in OUT_DIR:
``views/`` (the dataset), ``table.ply``, ``table.fit.json`` (summary) and ``heldout.png`` (rows: held-out
image | splat render | 50% blend).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gsrl.splat.fit import fit_scene, render_views
from gsrl.splat.views import ViewDataset, hemisphere_cameras, load_dataset, render_task_views, save_dataset

TABLE_TARGET = (-0.135, 0.0, -0.46)
"""Centre of the bounding box of ManiSkill's TableSceneBuilder table (top at z = 0, legs to z = -0.92), metres."""


@dataclass(frozen=True)
class DemoPreset:
    """Size of a table demo run: views (count, square size in pixels) and fit (steps, init points, SH, cap)."""

    num_views: int
    size: int
    iterations: int
    num_init_points: int
    sh_degree: int
    max_gaussians: int | None


PRESETS = {
    # 200 views at 256 px and simple_trainer's 7k steps: about 2 min of fitting on one H100 (gsplat backend).
    "gpu": DemoPreset(
        num_views=200, size=256, iterations=7_000, num_init_points=100_000, sh_degree=3, max_gaussians=None
    ),
    # Sized for the CPU torch backend on 2 cores: about a minute including SAPIEN rendering.
    "cpu-smoke": DemoPreset(
        num_views=64, size=64, iterations=600, num_init_points=4_000, sh_degree=1, max_gaussians=20_000
    ),
}


def render_table_views(out_dir: str | Path, preset: DemoPreset, radius: float = 2.6) -> ViewDataset:
    """Render (or reuse, if ``out_dir/views/transforms.json`` exists) the demo's views of the static table."""
    folder = Path(out_dir) / "views"
    if (folder / "transforms.json").exists():
        return load_dataset(folder)
    cameras = hemisphere_cameras(
        TABLE_TARGET, radius, preset.num_views, preset.size, preset.size, fov_y_deg=55.0, min_elevation_deg=15.0
    )
    dataset = render_task_views(cameras, static_only=True, hide=("ground",), depth=True)
    save_dataset(dataset, folder)
    return dataset


def held_out_montage(
    summary: dict[str, Any], dataset: ViewDataset, test_every: int = 8, max_rows: int = 6
) -> np.ndarray:
    """uint8 image: one row per held-out view, [captured | splat render | 50% blend]."""
    from gsrl.splat.ply import load_ply
    from gsrl.video import blend, side_by_side

    _, test = dataset.split(test_every)
    test = test.subset(range(min(len(test), max_rows)))
    renders = render_views(load_ply(summary["out_ply"]), test.cameras, background=dataset.background or (0.0, 0.0, 0.0))
    rows = [
        side_by_side(image, render, blend(image, render), gap=2)
        for image, render in zip(test.images, renders, strict=True)
    ]
    return np.concatenate(rows, axis=0)


def table_scene_demo(
    out_dir: str | Path, preset: str = "gpu", device: str | None = None, progress: bool = True, **fit_options: Any
) -> dict[str, Any]:
    """Render the table's views, fit them, write the outputs listed in the module docstring; return the summary
    (``summary["metrics"]["test_psnr"]`` is the held-out PSNR in dB)."""
    import cv2

    sizes = PRESETS[preset]
    iterations = fit_options.pop("iterations", sizes.iterations)
    out_dir = Path(out_dir)
    dataset = render_table_views(out_dir, sizes)
    options = {
        "init": "depth",
        "num_init_points": sizes.num_init_points,
        "sh_degree": sizes.sh_degree,
        "max_gaussians": sizes.max_gaussians,
    } | fit_options
    summary = fit_scene(
        out_dir / "views", out_dir / "table.ply", iterations, device=device, progress=progress, **options
    )
    montage = held_out_montage(summary, dataset)
    cv2.imwrite(str(out_dir / "heldout.png"), cv2.cvtColor(montage, cv2.COLOR_RGB2BGR))
    return summary


def _print_summary(summary: dict[str, Any]) -> None:
    m = summary["metrics"]
    keys = ["initial_test_psnr", "test_psnr", "test_ssim", "train_psnr", "num_gaussians", "seconds", "steps_per_second"]
    print(json.dumps({k: m[k] for k in keys if k in m} | {"out_ply": summary["out_ply"]}, indent=2))


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m gsrl.splat.fit_demo`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m gsrl.splat.fit_demo", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    table = commands.add_parser("table", help="render the static table with SAPIEN and fit it")
    render = commands.add_parser("render", help="only render the table demo's views (to fit elsewhere)")
    for sub in (table, render):
        sub.add_argument("out_dir")
        sub.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    table.add_argument("--iterations", type=int, help="override the preset's number of steps")
    fit = commands.add_parser("fit", help="fit a transforms.json folder")
    fit.add_argument("dataset_dir")
    fit.add_argument("out_ply")
    fit.add_argument("--iterations", type=int, default=7_000)
    fit.add_argument("--init", default="auto", help="auto | depth | random | path/to/init.ply")
    fit.add_argument("--num-init-points", type=int, default=100_000)
    fit.add_argument("--sh-degree", type=int, default=3)
    fit.add_argument("--test-every", type=int, default=8)
    fit.add_argument("--downscale", type=int, default=1)
    fit.add_argument("--max-gaussians", type=int)
    for sub in (table, fit):
        sub.add_argument("--device", help="cuda | cpu (default: cuda when available)")
        sub.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    if args.command == "render":
        dataset = render_table_views(args.out_dir, PRESETS[args.preset])
        print(f"{len(dataset)} views of {dataset.width}x{dataset.height} in {Path(args.out_dir) / 'views'}")
    elif args.command == "table":
        extra = {} if args.iterations is None else {"iterations": args.iterations}
        summary = table_scene_demo(args.out_dir, args.preset, args.device, not args.no_progress, **extra)
        _print_summary(summary)
    else:
        summary = fit_scene(
            args.dataset_dir,
            args.out_ply,
            args.iterations,
            init=args.init,
            num_init_points=args.num_init_points,
            sh_degree=args.sh_degree,
            test_every=args.test_every,
            downscale=args.downscale,
            max_gaussians=args.max_gaussians,
            device=args.device,
            progress=not args.no_progress,
        )
        _print_summary(summary)


if __name__ == "__main__":
    main()
