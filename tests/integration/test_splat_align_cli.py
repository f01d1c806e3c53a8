"""``gsrl splat align`` end to end: a "scan" of the table (the converted table moved by a known similarity, as a
capture in its own frame would be) is put back into the sim frame from four landmark pairs plus ICP, and the
written scene directory renders like the original scene."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import gsrl.tasks  # noqa: F401
from gsrl.cli import main
from gsrl.config import RenderConfig
from gsrl.splat.align import Similarity, apply_similarity, load_similarity
from gsrl.splat.ply import save_ply
from gsrl.splat.scene_gaussians import part_world_poses
from gsrl.splat.transforms import axis_angle_to_rotmat
from gsrl.tasks.gs_env import SplatObserver, load_or_build_scene

PART = "table-workspace"


def test_align_recovers_a_moved_scan_and_writes_a_usable_scene(tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    render = RenderConfig(width=48, height=48, cache_dir=cache)
    env = gym.make("PutCubeOnPlate-v0", obs_mode="state_dict", sim_backend="physx_cpu")
    try:
        env.reset(seed=0)
        base = env.unwrapped
        scene = load_or_build_scene(base, render, type(base).__name__)
        part = scene.part(PART)
        world = apply_similarity(
            part.gaussians, Similarity.from_matrix(part_world_poses(base, [part])[0, 0].double().numpy())
        )
        # The "capture frame": turned by 4 degrees about a tilted axis and shifted by 6 cm.
        rotation = axis_angle_to_rotmat(torch.tensor([0.02, -0.03, 0.06], dtype=torch.float64)).numpy()
        truth = Similarity(1.0, rotation, np.array([0.06, -0.04, 0.03]))
        scan = apply_similarity(world, truth.inverse())
        scan_path = tmp_path / "scan.ply"
        save_ply(scan_path, scan)
        # Four table corners as landmarks, picked with 5 mm of error in the scan.
        corners = world.means.numpy()[
            [
                world.means[:, 0].argmin(),
                world.means[:, 0].argmax(),
                world.means[:, 1].argmin(),
                world.means[:, 1].argmax(),
            ]
        ]
        noisy = truth.inverse().apply(corners) + np.random.default_rng(0).normal(0, 0.005, corners.shape)
        pairs = tmp_path / "pairs.json"
        pairs.write_text(json.dumps({"splat": noisy.tolist(), "sim": corners.tolist()}))

        out = tmp_path / "aligned"
        args = ["splat", "align", "--scan", str(scan_path), "task.id=GSEnv-PutCubeOnPlate-v0", "task.obs_mode=rgb"]
        args += [f"task.render.cache_dir={cache}", "--pairs", str(pairs), "--out", str(out)]
        assert main(args) == 0

        found = load_similarity(out / "alignment.json")
        angle = np.degrees(np.arccos(np.clip((np.trace(found.rotation.T @ rotation) - 1) / 2, -1, 1)))
        assert angle < 0.5 and np.abs(found.translation - truth.translation).max() < 0.01

        original = SplatObserver([base], render)
        aligned = SplatObserver(
            [base], RenderConfig(width=48, height=48, cache_dir=cache, scene_dir=str(out), lighting="sim")
        )
        a = original.render_float([original.snapshot(0)])
        b = aligned.render_float([aligned.snapshot(0)])
    finally:
        env.close()
    mse = float(((a - b) ** 2).mean())
    assert 10 * np.log10(1 / mse) > 25, f"aligned scene renders differently: PSNR {10 * np.log10(1 / mse):.1f} dB"


def test_align_refuses_an_unknown_part(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scan = tmp_path / "scan.ply"
    save_ply(scan, apply_similarity(_tiny_set(), Similarity()))
    args = ["splat", "align", "--scan", str(scan), "task.id=GSEnv-PutCubeOnPlate-v0", "task.obs_mode=rgb"]
    args += [f"task.render.cache_dir={tmp_path / 'cache'}", "--part", "no-such-body", "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert "no part 'no-such-body'" in capsys.readouterr().err


def _tiny_set():  # noqa: ANN202 - test helper
    from gsrl.splat.gaussians import GaussianSet

    n = 8
    return GaussianSet(
        torch.rand(n, 3),
        torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1),
        torch.full((n, 3), -4.0),
        torch.zeros(n),
        torch.zeros(n, 1, 3),
    )
