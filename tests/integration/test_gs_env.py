"""GSEnv-PutCubeOnPlate-v0 on CPU: real ManiSkill physics, the splat scene converted from its meshes, the PyTorch
rasterizer, and SAPIEN's own renderer (through lavapipe) as the reference image of the same state."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import gsrl.tasks  # noqa: F401  (registers the tasks)
from gsrl.config import RenderConfig, load_config
from gsrl.env_spec import probe_env_spec
from gsrl.splat.metrics import image_metrics
from gsrl.tasks.gs_env import SplatObserver, reference_camera
from services.env_server.core import EnvBatch

GS_TASK = "GSEnv-PutCubeOnPlate-v0"
SIZE = 64
CUBE_GREEN = np.array([0.15, 0.65, 0.2])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("splat-cache"))


def render_config(cache_dir: str, **overrides: object) -> RenderConfig:
    return RenderConfig(width=SIZE, height=SIZE, cache_dir=cache_dir, **overrides)  # type: ignore[arg-type]


def green_centroid(image: np.ndarray) -> np.ndarray:
    """Pixel (x, y) centroid of the cube: pixels clearly greener than red and blue."""
    rgb = image.astype(np.float32)
    mask = (rgb[..., 1] > rgb[..., 0] + 40) & (rgb[..., 1] > rgb[..., 2] + 40)
    assert mask.sum() >= 3, "no cube pixels found"
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def test_env_batch_streams_uint8_images_and_proprioception(cache_dir: str) -> None:
    with EnvBatch(GS_TASK, 2, obs_mode="rgb", max_episode_steps=3, seed=11, render=render_config(cache_dir)) as envs:
        assert envs.observation_spec["rgb/3rd_view_camera"] == ((SIZE, SIZE, 3), np.dtype(np.uint8))
        assert envs.observation_spec["state"] == ((25,), np.dtype(np.float32))
        obs = envs.reset()
        frames = obs["rgb/3rd_view_camera"]
        assert frames.shape == (2, SIZE, SIZE, 3) and frames.dtype == np.uint8
        assert frames.std() > 10, "a rendered frame should not be flat"
        assert not np.array_equal(frames[0], frames[1]), "different layouts must look different"
        # The proprioception starts with the joint positions the physics reports.
        qpos = envs._envs[0].unwrapped.agent.robot.get_qpos()[0].numpy()
        np.testing.assert_allclose(obs["state"][0, :9], qpos, atol=1e-6)

        ended_seen = False
        for _ in range(3):
            result = envs.step_chunk(np.zeros((2, 1, 7), dtype=np.float32))
            for i in np.nonzero(result.ended)[0]:
                ended_seen = True
                # The final frame is the ended episode's last state; the next one is the new episode's first.
                assert not np.array_equal(
                    result.final_observations["rgb/3rd_view_camera"][i], result.observations["rgb/3rd_view_camera"][i]
                )
        assert ended_seen


def test_splat_render_matches_sapien_render_of_the_same_state(cache_dir: str) -> None:
    """Alignment: the cube lands on the same pixels in SAPIEN's image and the splat image, and the images agree."""
    camera = reference_camera(SIZE, SIZE)
    env = gym.make(
        "PutCubeOnPlate-v0",
        obs_mode="state_dict",
        sim_backend="physx_cpu",
        sensor_configs={"3rd_view_camera": dict(width=SIZE, height=SIZE, intrinsic=camera.K.numpy())},
    )
    try:
        env.reset(seed=5)
        base = env.unwrapped
        sapien_frame = base.get_sensor_images()["3rd_view_camera"]["rgb"][0].cpu().numpy()
        observer = SplatObserver([base], render_config(cache_dir))
        splat_frame = observer.render([observer.snapshot(0)])["rgb/3rd_view_camera"][0]
        unlit = SplatObserver([base], render_config(cache_dir, lighting="none"))
        unlit_frame = unlit.render([unlit.snapshot(0)])["rgb/3rd_view_camera"][0]
    finally:
        env.close()
    offset = np.abs(green_centroid(splat_frame) - green_centroid(sapien_frame))
    assert offset.max() <= 2.0, f"cube centroid differs by {offset} px"
    lit_metrics = image_metrics(splat_frame, sapien_frame)
    assert lit_metrics["psnr"] > 14.0, lit_metrics
    # The simulator's lights bring the splat colours closer to SAPIEN's shaded image.
    assert lit_metrics["psnr"] > image_metrics(unlit_frame, sapien_frame)["psnr"]


def test_image_randomization_is_seeded_and_changes_the_image(cache_dir: str) -> None:
    env = gym.make("PutCubeOnPlate-v0", obs_mode="state_dict", sim_backend="physx_cpu")
    try:
        env.reset(seed=2)
        base = env.unwrapped
        plain = SplatObserver([base], render_config(cache_dir))
        jitter = SplatObserver(
            [base], render_config(cache_dir, brightness=0.3, camera_translation_std=0.02, camera_rotation_std_deg=2.0)
        )
        reference = plain.render([plain.snapshot(0)])["rgb/3rd_view_camera"][0]
        jitter.new_episode(0, seed=123)
        first = jitter.render([jitter.snapshot(0)])["rgb/3rd_view_camera"][0]
        jitter.new_episode(0, seed=123)
        again = jitter.render([jitter.snapshot(0)])["rgb/3rd_view_camera"][0]
        jitter.new_episode(0, seed=124)
        other = jitter.render([jitter.snapshot(0)])["rgb/3rd_view_camera"][0]
    finally:
        env.close()
    np.testing.assert_array_equal(first, again)
    assert np.abs(first.astype(int) - reference).mean() > 2
    assert np.abs(other.astype(int) - first).mean() > 2


def test_brightness_gain_scales_the_gaussians_light(cache_dir: str) -> None:
    env = gym.make("PutCubeOnPlate-v0", obs_mode="state_dict", sim_backend="physx_cpu")
    try:
        env.reset(seed=4)
        observer = SplatObserver([env.unwrapped], render_config(cache_dir, background=(0.0, 0.0, 0.0)))
        snapshot = observer.snapshot(0)
        base = observer.render_float([snapshot])
        darker = observer.render_float([type(snapshot)(snapshot.poses, snapshot.viewmats, snapshot.gain * 0.5)])
    finally:
        env.close()
    # Over a black background the image is the Gaussians' light alone: half the gain, half the image.
    torch.testing.assert_close(darker, base * 0.5, atol=1e-5, rtol=1e-5)


def test_wrist_camera_follows_the_hand(cache_dir: str) -> None:
    env = gym.make("PutCubeOnPlate-v0", obs_mode="state_dict", sim_backend="physx_cpu")
    try:
        env.reset(seed=1)
        base = env.unwrapped
        observer = SplatObserver([base], render_config(cache_dir, cameras=("3rd_view_camera", "wrist_camera")))
        before = observer.render([observer.snapshot(0)])
        qpos = base.agent.robot.get_qpos().clone()
        qpos[0, 0] += 0.4  # turn the arm about its base joint
        base.agent.robot.set_qpos(qpos)
        after = observer.render([observer.snapshot(0)])
    finally:
        env.close()
    assert set(before) == {"rgb/3rd_view_camera", "rgb/wrist_camera"}
    assert before["rgb/wrist_camera"].std() > 5
    assert np.abs(after["rgb/wrist_camera"].astype(int) - before["rgb/wrist_camera"]).mean() > 5


def test_gym_make_gives_the_wrapped_env_and_probe_agrees(cache_dir: str) -> None:
    env = gym.make(GS_TASK, render=render_config(cache_dir), control_mode="pd_ee_delta_pose")
    try:
        obs, _ = env.reset(seed=0)
        assert obs["rgb"]["3rd_view_camera"].shape == (1, SIZE, SIZE, 3)
        assert obs["rgb"]["3rd_view_camera"].dtype == torch.uint8
        assert obs["state"].shape == (1, 25)
        obs, *_ = env.step(env.action_space.sample())
        assert env.render().shape == (SIZE, SIZE, 3)
    finally:
        env.close()
    config = load_config(None, [f"task.id={GS_TASK}", "task.obs_mode=rgb", f"task.render.width={SIZE}"])
    spec = probe_env_spec(config.task)
    assert spec.observation_spec["rgb/3rd_view_camera"] == ((128, SIZE, 3), "uint8")
    assert spec.observation_spec["state"] == ((25,), "float32")
