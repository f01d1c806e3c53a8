"""The env server's episode recorder: which episodes it writes, and how many frames each video gets."""

from __future__ import annotations

from pathlib import Path

import imageio.v2 as imageio
import numpy as np

from services.env_server.core import ChunkResult
from services.env_server.recorder import EpisodeRecorder

KEY = "rgb/3rd_view_camera"


def frames(value: int) -> dict[str, np.ndarray]:
    return {KEY: np.full((2, 128, 128, 3), value, dtype=np.uint8)}


def chunk(value: int, ended: bool, length: int = 0) -> ChunkResult:
    flags = np.array([ended, False])
    zeros = np.zeros(2, dtype=np.float32)
    return ChunkResult(
        observations=frames(value),
        rewards=np.array([0.5, 0.0], dtype=np.float32),
        step_rewards=np.zeros((2, 1), dtype=np.float32),
        terminated=flags,
        truncated=np.zeros(2, dtype=bool),
        final_observations=frames(value + 1) if ended else frames(value),
        episode_return=zeros,
        episode_length=np.array([length, 0], dtype=np.int32),
        episode_success_once=flags,
        episode_success_at_end=flags,
        steps_executed=2,
    )


def count_frames(path: Path) -> int:
    with imageio.get_reader(path) as reader:
        return sum(1 for _ in reader)


def test_every_second_episode_of_env_0_is_recorded_whole(tmp_path: Path) -> None:
    recorder = EpisodeRecorder(tmp_path, every_episodes=2, image_key=KEY, instruction="pick up the cube")
    recorder.start(frames(10))
    # episode 0: 3 chunks, the last one ends it; episode 1: 2 chunks (skipped); episode 2: 1 chunk, then shutdown
    for result in [chunk(20, False), chunk(30, False), chunk(40, True, 3), chunk(50, False), chunk(60, True, 2)]:
        recorder.record(result)
    recorder.record(chunk(70, False))
    recorder.close()
    assert [p.name for p in recorder.videos] == ["episode_00000.mp4", "episode_00002.mp4"]
    # first observation + one frame per chunk, the last being the ended episode's final observation
    assert count_frames(recorder.videos[0]) == 4
    assert count_frames(recorder.videos[1]) == 2


def test_info_on_video_draws_only_when_asked(tmp_path: Path) -> None:
    plain = EpisodeRecorder(tmp_path / "plain", 1, KEY, info_on_video=False)
    drawn = EpisodeRecorder(tmp_path / "drawn", 1, KEY, instruction="put it on the plate", info_on_video=True)
    for recorder in (plain, drawn):
        recorder.start(frames(100))
        recorder.record(chunk(100, True, 1))
        recorder.close()
    with imageio.get_reader(plain.videos[0]) as reader:
        plain_first = next(iter(reader))
    with imageio.get_reader(drawn.videos[0]) as reader:
        drawn_first = next(iter(reader))
    difference = np.abs(plain_first.astype(int) - drawn_first.astype(int)).sum(axis=-1)
    assert difference[:16].max() > 50, "the text at the top must show"
    assert difference[-4:].max() < 30, "the bottom rows carry no text"


def test_max_videos_stops_recording(tmp_path: Path) -> None:
    recorder = EpisodeRecorder(tmp_path, every_episodes=1, image_key=KEY, max_videos=1)
    recorder.start(frames(10))
    for result in [chunk(20, True, 1), chunk(30, True, 1), chunk(40, True, 1)]:
        recorder.record(result)
    recorder.close()
    assert [p.name for p in recorder.videos] == ["episode_00000.mp4"]


def test_filmed_chunks_give_one_frame_per_step(tmp_path: Path) -> None:
    recorder = EpisodeRecorder(tmp_path, every_episodes=1, image_key=KEY, max_videos=1)
    recorder.start(frames(10))
    assert recorder.filming

    def filmed(value: int, ended: bool, length: int = 0, executed: int = 4) -> ChunkResult:
        result = chunk(value, ended, length)
        result.step_rewards = np.zeros((2, 4), dtype=np.float32)
        result.film_frames = {KEY: np.full((executed - 1, 128, 128, 3), value - 5, dtype=np.uint8)}
        return result

    # a chunk of 4 steps, then one whose episode ends after 2 of its 4 steps
    recorder.record(filmed(20, False))
    recorder.record(filmed(30, True, length=6, executed=2))
    assert not recorder.filming  # max_videos reached: the batch need not film any more
    assert count_frames(recorder.videos[0]) == 1 + 4 + 2  # the first observation, then one per step
