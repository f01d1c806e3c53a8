"""``gsrl splat``: the Real2Sim tools on the command line.

    gsrl splat table OUT_DIR [--preset gpu|cpu-smoke]     render the sim table's views with SAPIEN, fit a splat,
                                                           report held-out PSNR (gsrl.splat.fit_demo)
    gsrl splat render OUT_DIR [--preset ...]               only render those views (a transforms.json dataset)
    gsrl splat fit DATASET_DIR OUT.ply [--iterations N]    fit any posed capture (nerfstudio transforms.json)
    gsrl splat align -c CONFIG --scan SCAN.ply --part table-workspace --out SCENE_DIR [--pairs PAIRS.json]
                                                           put a scan into the sim frame: point pairs and/or ICP
                                                           against the part's sim meshes, then a scene directory
                                                           with that part replaced (task.render.scene_dir=SCENE_DIR)

After ``align``, check the alignment the way ManiSkill-GS's align script does, with the overlay videos of
``gsrl render -c CONFIG task.render.scene_dir=SCENE_DIR --compare-sim`` (splat / sim / 50 % blend and PSNR).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gsrl.cli import add_config_arguments, parse_role_arguments

log = logging.getLogger(__name__)


def load_point_pairs(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``{"splat": [[x, y, z], ...], "sim": [[x, y, z], ...]}``: the same k >= 3 landmarks in both frames."""
    try:
        data = json.loads(path.read_text())
        splat, sim = np.asarray(data["splat"], dtype=np.float64), np.asarray(data["sim"], dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: expected JSON {{'splat': [[x,y,z],...], 'sim': [[x,y,z],...]}} ({exc})") from exc
    if splat.ndim != 2 or splat.shape[1] != 3 or splat.shape != sim.shape or len(splat) < 3:
        raise ValueError(f"{path}: 'splat' and 'sim' must be two lists of the same k >= 3 points [x, y, z]")
    return splat, sim


def align_scan(
    config: Any,
    scan_path: Path,
    part_name: str,
    out_dir: Path,
    pairs: Path | None = None,
    with_scale: bool = False,
    icp: bool = True,
) -> dict[str, Any]:
    """Estimate scan -> sim, write the aligned scene directory and ``alignment.json``; return the summary."""
    from gsrl.env_spec import make_physics_env
    from gsrl.splat.align import Similarity, align_splat_to_scene, apply_similarity, save_similarity, umeyama
    from gsrl.splat.ply import load_ply
    from gsrl.splat.scene_gaussians import SceneGaussians, ScenePart, part_world_poses, save_scene
    from gsrl.tasks.gs_env import load_or_build_scene

    task = config.task
    env = make_physics_env(task)
    try:
        env.reset(seed=config.run.seed)
        base = env.unwrapped
        scene = load_or_build_scene(base, task.render, type(base).__name__)
        names = [p.name for p in scene.parts]
        if part_name not in names:
            raise ValueError(f"no part {part_name!r} in the scene; parts: {names}")
        part = scene.part(part_name)
        scan = load_ply(scan_path)
        init = None
        summary: dict[str, Any] = {"scan": str(scan_path), "part": part_name, "num_gaussians": len(scan)}
        if pairs is not None:
            splat_points, sim_points = load_point_pairs(pairs)
            init = umeyama(splat_points, sim_points, with_scale=with_scale)
            residual = np.linalg.norm(init.apply(splat_points) - sim_points, axis=1)
            summary["pairs_rms_m"] = float(np.sqrt((residual**2).mean()))
        transform = init if init is not None else Similarity(1.0, np.eye(3), np.zeros(3))
        if icp:
            result = align_splat_to_scene(scan, base, init, include=[part_name], with_scale=with_scale)
            transform = result.transform
            summary |= {"icp_rms_m": float(result.rms), "icp_iterations": int(result.iterations)}
        world = apply_similarity(scan, transform)
        # Scene parts live in their body's frame: move the world-frame scan into the part's body frame.
        body = part_world_poses(base, [part])[0, 0].double()
        inverse = torch.linalg.inv(body)
        local = apply_similarity(world, Similarity(1.0, inverse[:3, :3].numpy(), inverse[:3, 3].numpy()))
        parts = [ScenePart(p.name, p.kind, p.static, local) if p.name == part_name else p for p in scene.parts]
        aligned = SceneGaussians(parts, conversion=scene.conversion | {"aligned_scan": str(scan_path)})
        save_scene(out_dir, aligned)
        save_similarity(out_dir / "alignment.json", transform, **summary)
    finally:
        env.close()
    summary |= {
        "scene_dir": str(out_dir),
        "scale": transform.scale,
        "translation": list(map(float, transform.translation)),
    }
    return summary


def _align_main(argv: Sequence[str], prog: str) -> int:
    parser = argparse.ArgumentParser(prog=f"{prog} align", description="Align a splat scan to the sim frame.")
    add_config_arguments(parser)
    parser.add_argument("--scan", required=True, help="the scan, a 3DGS PLY (from `gsrl splat fit`, splatfacto, ...)")
    parser.add_argument("--part", default="table-workspace", help="scene part it replaces (default table-workspace)")
    parser.add_argument("--out", required=True, help="scene directory to write (use as task.render.scene_dir)")
    parser.add_argument("--pairs", help="JSON of landmark pairs {'splat': [...], 'sim': [...]}: the initial guess")
    parser.add_argument(
        "--with-scale", action="store_true", help="also estimate a scale (captures without metric scale)"
    )
    parser.add_argument("--no-icp", action="store_true", help="use the point pairs alone")
    args, config = parse_role_arguments(parser, argv, "splat align")
    if not config.task.is_splat_rendered:
        parser.error(f"task.id {config.task.id!r} is not a Gaussian-splat task (GSEnv-...)")
    scan = Path(args.scan)
    if not scan.is_file():
        parser.error(f"scan not found: {scan}")
    if args.no_icp and not args.pairs:
        parser.error("--no-icp needs --pairs (there is nothing else to align with)")
    try:
        summary = align_scan(
            config,
            scan,
            args.part,
            Path(args.out),
            Path(args.pairs) if args.pairs else None,
            with_scale=args.with_scale,
            icp=not args.no_icp,
        )
    except ValueError as exc:
        print(f"{prog} align: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    print(f"check it: gsrl render -c {args.config or '<config>'} task.render.scene_dir={args.out} --compare-sim")
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "gsrl splat") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "align":
        return _align_main(argv[1:], prog)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    from gsrl.splat.fit_demo import main as fit_main

    fit_main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
