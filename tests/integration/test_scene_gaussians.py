"""Scene -> per-body Gaussians on the real PutCubeOnPlate-v0 scene (CPU physics): parts, frames, poses, disk."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import sapien
import torch

import gsrl.tasks  # noqa: F401  (registers the task)
from gsrl.splat.gaussians import SH_C0
from gsrl.splat.mesh_to_gaussians import linear_to_srgb
from gsrl.splat.ply import save_ply
from gsrl.splat.scene_gaussians import (
    SceneConversion,
    SceneGaussians,
    SceneManifestError,
    build_scene_gaussians,
    conversion_from_dict,
    entity_visual_meshes,
    load_scene,
    part_world_poses,
    save_scene,
)

ROBOT_LINKS = [f"panda_link{i}" for i in range(8)] + ["panda_hand", "panda_leftfinger", "panda_rightfinger"]
ACTORS = ["table-workspace", "ground", "cube", "plate"]
CUBE_HALF = 0.02


@pytest.fixture(scope="module")
def env() -> Iterator[gym.Env]:
    env = gym.make("PutCubeOnPlate-v0", obs_mode="state", num_envs=1, sim_backend="physx_cpu")
    env.reset(seed=0)
    yield env
    env.close()


@pytest.fixture(scope="module")
def scene(env: gym.Env) -> SceneGaussians:
    return build_scene_gaussians(env)


def render_body(env: gym.Env, name: str) -> sapien.render.RenderBodyComponent:
    base = env.unwrapped
    links = base.agent.robot.links_map
    entity = links[name]._objs[0].entity if name in links else base.scene.actors[name]._objs[0]
    return entity.find_component_by_type(sapien.render.RenderBodyComponent)


def world_means(scene: SceneGaussians, poses: torch.Tensor) -> dict[str, np.ndarray]:
    """Each part's Gaussian centres moved into the world by its pose, [N,3] per part name."""
    out = {}
    for i, part in enumerate(scene.parts):
        rotation, translation = poses[0, i, :3, :3], poses[0, i, :3, 3]
        out[part.name] = (part.gaussians.means @ rotation.T + translation).numpy()
    return out


def test_every_visual_body_is_a_part(scene: SceneGaussians) -> None:
    assert [p.name for p in scene.parts] == ROBOT_LINKS + ACTORS  # links without visuals (tcp, pads) omitted
    kinds = {p.name: p.kind for p in scene.parts}
    assert all(kinds[n] == "link" for n in ROBOT_LINKS) and all(kinds[n] == "actor" for n in ACTORS)
    assert {p.name for p in scene.parts if p.static} == {"table-workspace", "ground"}
    assert all(len(p.gaussians) > 0 and p.gaussians.sh_degree == 0 for p in scene.parts)
    assert 30_000 <= scene.num_gaussians <= 80_000
    robot = sum(len(scene.part(n).gaussians) for n in ROBOT_LINKS)
    assert len(scene.part("table-workspace").gaussians) < robot and len(scene.part("ground").gaussians) < robot


def test_cube_is_a_green_4cm_box_in_its_local_frame(scene: SceneGaussians) -> None:
    cube = scene.part("cube").gaussians
    means = cube.means.numpy()
    assert np.all(np.abs(means) <= CUBE_HALF + 1e-6)
    assert np.all(np.abs(np.abs(means).max(axis=1) - CUBE_HALF) < 1e-6)  # on a face
    rgb = (SH_C0 * cube.sh[:, 0] + 0.5).numpy()
    assert np.allclose(rgb, linear_to_srgb(np.array([0.15, 0.65, 0.2])), atol=1e-4)  # the task's linear base colour
    assert np.all((rgb[:, 1] > rgb[:, 0] + 0.2) & (rgb[:, 1] > rgb[:, 2] + 0.2))


def test_world_points_lie_on_the_simulated_bodies(env: gym.Env, scene: SceneGaussians) -> None:
    """Local Gaussians moved by part_world_poses fill each body's visual bounding box as SAPIEN computes it."""
    poses = part_world_poses(env, scene)
    assert poses.shape == (1, len(scene.parts), 4, 4) and poses.dtype == torch.float32
    for name, points in world_means(scene, poses).items():
        low, high = render_body(env, name).compute_global_aabb_tight()
        assert np.all(points >= low - 1e-4) and np.all(points <= high + 1e-4), name
        if name != "ground":  # the ground is cropped; everything else spans its whole box
            assert np.all(points.max(axis=0) - points.min(axis=0) >= 0.95 * (high - low) - 1e-4), name
    cube_p = env.unwrapped.cube.pose.p[0].numpy()
    cube_points = world_means(scene, poses)["cube"]
    assert np.all(np.abs(cube_points - cube_p) <= CUBE_HALF + 1e-5)


def test_link_poses_follow_the_robot_joints(env: gym.Env, scene: SceneGaussians) -> None:
    robot = env.unwrapped.agent.robot
    before = part_world_poses(env, scene)
    qpos = robot.get_qpos().clone()
    try:
        robot.set_qpos(qpos + torch.tensor([0.4, -0.3, 0.2, 0.3, -0.5, 0.4, 0.6, -0.02, -0.02]))
        after = part_world_poses(env, scene)
        hand = world_means(scene, after)["panda_hand"]
        low, high = render_body(env, "panda_hand").compute_global_aabb_tight()
        assert np.all(hand >= low - 1e-4) and np.all(hand <= high + 1e-4)
    finally:
        robot.set_qpos(qpos)
    index = {p.name: i for i, p in enumerate(scene.parts)}
    assert not torch.allclose(before[0, index["panda_hand"]], after[0, index["panda_hand"]], atol=1e-3)
    assert torch.equal(before[0, index["panda_link0"]], after[0, index["panda_link0"]])  # the base stays put
    assert torch.equal(before[0, index["table-workspace"]], after[0, index["table-workspace"]])


def test_ground_is_cropped_at_its_own_density(env: gym.Env, scene: SceneGaussians) -> None:
    x0, x1, y0, y1 = scene.conversion["resolved_crop_box"]
    ground = world_means(scene, part_world_poses(env, scene))["ground"]
    assert np.all((ground[:, 0] >= x0 - 1e-6) & (ground[:, 0] <= x1 + 1e-6))
    assert np.all((ground[:, 1] >= y0 - 1e-6) & (ground[:, 1] <= y1 + 1e-6))
    assert np.isclose(len(ground), SceneConversion().large_density * (x1 - x0) * (y1 - y0), rtol=0.01)
    table_points = world_means(scene, part_world_poses(env, scene))["table-workspace"]
    assert x0 < table_points[:, 0].min() and table_points[:, 0].max() < x1  # the crop surrounds the table


def test_explicit_crop_box_and_determinism(env: gym.Env, scene: SceneGaussians) -> None:
    again = build_scene_gaussians(env)
    for a, b in zip(scene.parts, again.parts, strict=True):
        assert torch.equal(a.gaussians.means, b.gaussians.means) and torch.equal(a.gaussians.sh, b.gaussians.sh)
    small = build_scene_gaussians(env, SceneConversion(crop_box=(-1.0, 0.0, -0.5, 0.5), large_density=500))
    assert len(small.part("ground").gaussians) == 500  # 1 m^2 at 500 per m^2


def test_primitive_shapes_get_their_true_size() -> None:
    """Spheres, capsules, cylinders, boxes and planes come out at their real surface area (SAPIEN stores unit
    primitives), placed by the shape's local pose."""
    sapien_scene = sapien.Scene()
    builder = sapien_scene.create_actor_builder()
    pose = sapien.Pose([0.1, 0.2, 0.3], [0.9238795, 0.3826834, 0, 0])
    material = sapien.render.RenderMaterial(base_color=[0.5, 0.5, 0.5, 1])
    builder.add_sphere_visual(pose, radius=0.05, material=material)
    builder.add_capsule_visual(pose, radius=0.03, half_length=0.1, material=material)
    builder.add_cylinder_visual(pose, radius=0.04, half_length=0.07, material=material)
    builder.add_box_visual(pose, half_size=[0.01, 0.02, 0.03], material=material)
    builder.add_plane_visual(pose, scale=[1, 0.2, 0.3], material=material)
    meshes = entity_visual_meshes(builder.build_kinematic("primitives"))
    areas = [mesh.face_areas().sum() for mesh in meshes]
    expected = [
        4 * np.pi * 0.05**2,
        2 * np.pi * 0.03 * 0.2 + 4 * np.pi * 0.03**2,
        2 * np.pi * 0.04 * 0.14 + 2 * np.pi * 0.04**2,
        2 * (0.02 * 0.04 + 0.02 * 0.06 + 0.04 * 0.06),
        0.4 * 0.6,
    ]
    assert np.allclose(areas, expected, rtol=0.02)
    centres = np.array([(m.vertices.min(axis=0) + m.vertices.max(axis=0)) / 2 for m in meshes])
    assert np.allclose(centres, [0.1, 0.2, 0.3], atol=1e-3)
    assert np.allclose(meshes[0].base_color, linear_to_srgb(np.array([0.5] * 3)))


def test_save_load_round_trip(tmp_path: Path, scene: SceneGaussians) -> None:
    save_scene(tmp_path / "scene", scene)
    loaded = load_scene(tmp_path / "scene")
    assert [(p.name, p.kind, p.static) for p in loaded.parts] == [(p.name, p.kind, p.static) for p in scene.parts]
    for a, b in zip(scene.parts, loaded.parts, strict=True):
        for field in ("means", "quats", "log_scales", "opacity_logits", "sh"):
            assert torch.equal(getattr(a.gaussians, field), getattr(b.gaussians, field))
    assert conversion_from_dict(loaded.conversion) == SceneConversion()


def test_a_part_can_be_swapped_for_a_scan(tmp_path: Path, scene: SceneGaussians) -> None:
    save_scene(tmp_path, scene)
    manifest = json.loads((tmp_path / "scene.json").read_text())
    table = next(e for e in manifest["parts"] if e["name"] == "table-workspace")
    scan = scene.part("cube").gaussians.with_sh_degree(3)  # any splat, e.g. a real scan in the table's frame
    save_ply(tmp_path / table["file"], scan)
    loaded = load_scene(tmp_path)
    assert torch.equal(loaded.part("table-workspace").gaussians.sh, scan.sh)
    assert loaded.part("table-workspace").gaussians.sh_degree == 3


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(version=99), "unsupported 'version' 99"),
        (lambda m: m.update(format="other"), "'format' must be"),
        (lambda m: m["parts"][0].update(kind="robot"), r"parts\[0\].kind must be 'link' or 'actor'"),
        (lambda m: m["parts"][1].pop("static"), r"parts\[1\].static must be a bool"),
        (lambda m: m["parts"][2].update(file="../outside.ply"), "points outside the scene directory"),
        (lambda m: m["parts"][2].update(file="absent.ply"), "does not exist"),
        (lambda m: m["parts"].append(dict(m["parts"][0])), "duplicate parts"),
    ],
)
def test_manifest_errors_name_the_problem(tmp_path: Path, scene: SceneGaussians, edit: object, message: str) -> None:
    small = SceneGaussians(scene.parts[-3:], scene.conversion)
    save_scene(tmp_path, small)
    manifest = json.loads((tmp_path / "scene.json").read_text())
    edit(manifest)
    (tmp_path / "scene.json").write_text(json.dumps(manifest))
    with pytest.raises(SceneManifestError, match=message) as info:
        load_scene(tmp_path)
    assert "scene.json" in str(info.value)


def test_missing_or_broken_manifest(tmp_path: Path) -> None:
    with pytest.raises(SceneManifestError, match="cannot read"):
        load_scene(tmp_path)
    (tmp_path / "scene.json").write_text("{not json")
    with pytest.raises(SceneManifestError, match="not valid JSON"):
        load_scene(tmp_path)
