"""Policy evaluation on real ManiSkill CPU envs: episode accounting, checkpoint loading and the ``gsrl eval`` CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _cube_moves import move_cube_off_plate, put_cube_on_plate
from safetensors.torch import save_file
from torch import nn

from gsrl.config import load_config
from gsrl.policy import Policy
from services.env_server.core import EnvBatch
from services.env_server.evaluate import build_eval_policy, evaluate_policy, main, policy_observation_spec

TASK = "PutCubeOnPlate-v0"
# ManiSkill 3.0.1 calls np.isnan on a torch action each step (BaseAgent.set_action); NumPy 2 warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")
STEPS = 5  # max_episode_steps: a random policy never succeeds this fast, so every episode runs exactly 5 steps
OVERRIDES = [f"task.max_episode_steps={STEPS}", "policy.hidden_sizes=[16]"]


@pytest.fixture(scope="module")
def batch() -> Iterator[EnvBatch]:
    envs = EnvBatch(TASK, 2, max_episode_steps=STEPS, seed=5)
    yield envs
    envs.close()


def tiny_policy(batch: EnvBatch, seed: int = 0) -> Policy:
    torch.manual_seed(seed)
    return build_eval_policy(load_config(None, OVERRIDES), batch)


def moving_policy(batch: EnvBatch) -> Policy:
    """A tiny policy whose mean action is far from the near-zero output of a fresh init: it drives the arm in +x."""
    policy = tiny_policy(batch, seed=1)
    with torch.no_grad():
        policy.actor[-1].bias.copy_(torch.tensor([1.0, 0.0, -0.5, 0.0, 0.0, 0.0, -1.0]))
    return policy


def test_observation_spec_uses_torch_dtype_names(batch: EnvBatch) -> None:
    assert policy_observation_spec(batch) == {"state": ((53,), "float32")}


@pytest.mark.parametrize("num_episodes", [4, 3])
def test_evaluate_counts_episodes_per_env_quota(batch: EnvBatch, num_episodes: int) -> None:
    policy = tiny_policy(batch).train()
    result = evaluate_policy(policy, batch, num_episodes)
    assert policy.training  # evaluation ran in eval mode and handed the policy back as it came
    assert result.episodes == num_episodes
    assert len(result.episode_returns) == len(result.episode_success_once) == num_episodes
    assert result.episode_lengths == [STEPS] * num_episodes
    assert result.mean_length == STEPS
    assert 0.0 <= result.success_once_rate <= 1.0 and result.success_once_rate == 0.0
    # normalized_dense pays [0, 1] per step; reaching toward the cube pays a little from the first step.
    assert all(0.0 < r <= STEPS for r in result.episode_returns)
    assert result.mean_return == pytest.approx(np.mean(result.episode_returns))
    # Each of the 2 envs runs its own quota (2 + 2, or 2 + 1): stepping stops once the larger quota is met, and the
    # 3-episode run steps env 1 through one episode it does not count.
    assert result.env_steps == 2 * 2 * STEPS
    # Every counted episode is keyed by (env, its number on that env): env i's first quota[i] episodes, each once.
    keys = sorted(zip(result.episode_envs, result.episode_numbers, strict=True))
    assert keys == ([(0, 0), (0, 1), (1, 0), (1, 1)] if num_episodes == 4 else [(0, 0), (0, 1), (1, 0)])


def test_evaluate_rejects_zero_episodes(batch: EnvBatch) -> None:
    with pytest.raises(ValueError, match="num_episodes"):
        evaluate_policy(tiny_policy(batch), batch, 0)


def test_deterministic_evaluation_is_reproducible() -> None:
    config = load_config(None, OVERRIDES)
    results = []
    for _ in range(2):
        with EnvBatch.for_task(config.task, 2, seed=9) as envs:
            results.append(evaluate_policy(moving_policy(envs), envs, 2).episode_returns)
    assert results[0] == results[1]


def test_main_loads_checkpoint_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = load_config(None, OVERRIDES)
    with EnvBatch.for_task(config.task, 2, seed=11) as envs:
        policy = moving_policy(envs)
        expected = evaluate_policy(policy, envs, 2)
    with EnvBatch.for_task(config.task, 2, seed=11) as envs:
        fresh = evaluate_policy(tiny_policy(envs, seed=1), envs, 2)
    checkpoint = tmp_path / "checkpoints" / "update_000001"
    checkpoint.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in policy.state_dict().items()}, str(checkpoint / "model.safetensors"))
    out = tmp_path / "eval" / "result.json"

    args = ["--checkpoint", str(checkpoint), "--episodes", "2", "--num-envs", "2", "--seed", "11", "--json", str(out)]
    assert main([*args, *OVERRIDES]) == 0

    report = json.loads(out.read_text())
    assert report["checkpoint"] == str(checkpoint / "model.safetensors")
    assert report["deterministic"] is True and report["seed"] == 11 and report["num_envs"] == 2
    assert report["device"] == "cpu"  # policy_server.device's default
    assert report["config"]["task"]["max_episode_steps"] == STEPS
    result = report["result"]
    assert result["episodes"] == 2 and result["episode_lengths"] == [STEPS, STEPS]
    # The loaded weights act like the saved policy, not like a fresh init (whose mean actions are near zero).
    assert result["episode_returns"] == pytest.approx(expected.episode_returns, abs=1e-5)
    assert result["episode_returns"] != pytest.approx(fresh.episode_returns, abs=1e-5)
    assert report["layouts"] == "held-out" and report["layout_pool"] == 0
    assert report["ignore_terminations"] is False and result["episode_success_at_end"] == [False, False]
    assert "2 episodes (deterministic, layouts held-out), success_once 0.0%" in capsys.readouterr().out

    # RLinf's evaluation setting: the report says so and gives success at the end with its interval.
    ignored = tmp_path / "eval" / "ignored.json"
    assert main([*args[:-1], str(ignored), "--ignore-terminations", *OVERRIDES]) == 0
    report = json.loads(ignored.read_text())
    assert report["ignore_terminations"] is True
    assert report["result"]["success_at_end_rate"] == 0.0 and report["success_at_end_ci95"][0] == 0.0
    assert report["result"]["episode_returns"] == pytest.approx(expected.episode_returns, abs=1e-5)
    printed = capsys.readouterr().out
    assert "(deterministic, terminations ignored, layouts held-out)" in printed and "success_at_end 0.0%" in printed

    # The file itself works as --checkpoint too.
    file_args = ["--checkpoint", str(checkpoint / "model.safetensors"), "--episodes", "1", "--num-envs", "1"]
    assert main([*file_args, *OVERRIDES]) == 0


class PlaceThenRemoveCube(nn.Module):
    """Holds the arm still with the gripper open; before its first decision it puts env 0's cube on the plate, before
    its second it takes it off again: env 0 succeeds at step 1 only, env 1 never."""

    def __init__(self, batch: EnvBatch) -> None:
        super().__init__()
        self.batch = batch
        self.calls = 0
        self.anchor = nn.Parameter(torch.zeros(1))  # evaluate_policy places observations on the policy's device

    def act(self, observations: dict, instructions: list[str], deterministic: bool) -> SimpleNamespace:
        if self.calls == 0:
            put_cube_on_plate(self.batch, 0)
        elif self.calls == 1:
            move_cube_off_plate(self.batch, 0)
        self.calls += 1
        chunk = torch.zeros(self.batch.num_envs, 1, self.batch.action_dim)
        chunk[..., -1] = 1.0  # gripper open
        return SimpleNamespace(action_chunk=chunk)


@pytest.mark.parametrize("ignore_terminations", [False, True])
def test_success_at_the_end_counts_only_where_terminations_are_ignored(ignore_terminations: bool) -> None:
    """By default env 0's success ends its episode at step 1, so it is a success at the end as well; with RLinf's
    ignore_terminations it runs on to the time limit without the cube on the plate: a success once, not at the end."""
    with EnvBatch(TASK, 2, max_episode_steps=STEPS, seed=3, ignore_terminations=ignore_terminations) as envs:
        result = evaluate_policy(PlaceThenRemoveCube(envs), envs, 2)
    by_env = dict(
        zip(
            result.episode_envs,
            zip(result.episode_success_once, result.episode_success_at_end, strict=True),
            strict=True,
        )
    )
    assert by_env == {0: (True, not ignore_terminations), 1: (False, False)}
    lengths = dict(zip(result.episode_envs, result.episode_lengths, strict=True))
    assert lengths == {0: STEPS if ignore_terminations else 1, 1: STEPS}
    assert result.success_once_rate == 0.5 and result.success_at_end_rate == (0.0 if ignore_terminations else 0.5)


def test_pool_evaluation_scores_the_training_layouts_and_held_out_ignores_the_pool(tmp_path: Path) -> None:
    """With task.layout_pool=3, `--layouts pool` runs the pool's 3 layouts, each once; the default (held-out) runs
    3 new layouts even though the config has a pool, exactly as a config without one does."""
    pooled = [*OVERRIDES, "task.layout_pool=3"]
    config = load_config(None, pooled)
    with EnvBatch.for_task(config.task, 1, seed=0) as envs:
        policy = moving_policy(envs)
    checkpoint = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in policy.state_dict().items()}, str(checkpoint))

    def returns(layouts: str, overrides: list[str]) -> list[float]:
        out = tmp_path / f"{layouts}-{len(overrides)}.json"
        args = ["--checkpoint", str(checkpoint), "--episodes", "3", "--num-envs", "2", "--json", str(out)]
        assert main([*args, "--layouts", layouts, *overrides]) == 0
        report = json.loads(out.read_text())
        assert report["layouts"] == layouts and report["layout_pool"] == (3 if layouts == "pool" else 0)
        return sorted(report["result"]["episode_returns"])

    on_pool, held_out = returns("pool", pooled), returns("held-out", pooled)
    assert held_out == returns("held-out", OVERRIDES)  # the pool changes nothing for held-out layouts
    assert on_pool != held_out
    # Each pool layout once: the same returns as one single-env episode per layout, in any order.
    per_layout = []
    for seed in config.task.layout_seeds() or ():
        with EnvBatch(TASK, 1, max_episode_steps=STEPS, layout_seeds=[seed]) as one:
            per_layout += evaluate_policy(policy, one, 1).episode_returns
    assert on_pool == pytest.approx(sorted(per_layout), abs=1e-5)


def refused(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """``gsrl eval ARGS`` must end as a usage error (exit 2) before evaluating anything; returns its message."""
    with pytest.raises(SystemExit) as exc_info:
        main([*args, *OVERRIDES])
    assert exc_info.value.code == 2
    return capsys.readouterr().err


def unread_checkpoint(tmp_path: Path) -> str:
    """An empty weights file: the arguments are checked before it is read."""
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"")
    return str(checkpoint)


def test_pool_layouts_without_a_pool_are_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = refused(["--checkpoint", unread_checkpoint(tmp_path), "--layouts", "pool"], capsys)
    assert "task.layout_pool" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without CUDA gives")
def test_cuda_device_without_cuda_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = refused(["--checkpoint", unread_checkpoint(tmp_path), "--device", "cuda"], capsys)
    assert "CUDA is not available" in err


@pytest.mark.parametrize("make_path", [lambda d: d / "missing", lambda d: d, lambda d: d / "missing.safetensors"])
def test_missing_checkpoint_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], make_path) -> None:
    path = make_path(tmp_path)  # a missing dir, a dir without model.safetensors, a missing file
    err = refused(["--checkpoint", str(path)], capsys)
    assert "checkpoint not found" in err and str(path) in err


def test_checkpoint_of_another_policy_config_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = load_config(None, [f"task.max_episode_steps={STEPS}", "policy.hidden_sizes=[8]"])
    with EnvBatch.for_task(config.task, 1, seed=0) as envs:
        other = build_eval_policy(config, envs)
    file = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(file))
    assert main(["--checkpoint", str(file), "--episodes", "1", "--num-envs", "1", *OVERRIDES]) == 2
    err = capsys.readouterr().err
    assert str(file) in err and "does not fit policy" in err and "hidden_sizes=(16,)" in err


def test_eval_films_gsenv_episodes_into_the_run_directory(tmp_path: Path) -> None:
    """``gsrl eval --videos`` on a splat task writes episode videos to <run>/videos/eval/<checkpoint>/."""
    overrides = [
        "task.id=GSEnv-PutCubeOnPlate-v0",
        "task.obs_mode=rgb",
        "task.render.width=48",
        "task.render.height=48",
        f"task.render.cache_dir={tmp_path / 'cache'}",
        "task.max_episode_steps=3",
        "policy.hidden_sizes=[16]",
    ]
    config = load_config(None, overrides)
    with EnvBatch.for_task(config.task, 1, seed=0) as envs:
        policy = build_eval_policy(config, envs)
    checkpoint = tmp_path / "run" / "checkpoints" / "update_000001"
    checkpoint.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in policy.state_dict().items()}, checkpoint / "model.safetensors")
    args = ["--checkpoint", str(checkpoint), "--episodes", "2", "--num-envs", "1", "--videos", "1", *overrides]
    assert main(args) == 0
    videos = sorted((tmp_path / "run" / "videos" / "eval" / "update_000001").glob("*.mp4"))
    assert [v.name for v in videos] == ["episode_00000.mp4"]
    # Frame counts are checked by decoding in tests/unit/test_episode_recorder.py; decoding here would fork ffmpeg
    # from a process that has run gRPC servers, which is fragile under load.
    assert videos[0].stat().st_size > 1000


def test_wilson_interval_brackets_the_rate_and_narrows_with_more_episodes() -> None:
    from services.env_server.evaluate import wilson_interval

    low, high = wilson_interval(0, 10)
    assert low == 0.0 and 0.25 < high < 0.35  # 0/10 is not "certainly 0 %"
    low, high = wilson_interval(50, 100)
    assert 0.40 < low < 0.5 < high < 0.60
    wide, narrow = wilson_interval(8, 10), wilson_interval(80, 100)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
