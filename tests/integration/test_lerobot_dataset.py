"""LeRobot v2.1 layout: what the writer puts on disk, and that the reader and the SFT Dataset give it back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from gsrl.data.lerobot import (
    ActionChunkDataset,
    Episode,
    LeRobotDataset,
    LeRobotWriter,
    decode_video,
    decode_video_imageio,
)
from gsrl.video import VideoWriter

pytestmark = pytest.mark.integration

KEY = "rgb/3rd_view_camera"


def _episode(length: int, seed: int) -> Episode:
    rng = np.random.default_rng(seed)
    frames = np.zeros((length, 32, 32, 3), dtype=np.uint8)
    for t in range(length):  # smooth content the codec keeps well: a moving square on a coloured field
        frames[t] = (40 + 10 * t, 80, 120)
        frames[t, 4 + t : 16 + t, 8:20] = (220, 200, 30)
    return Episode(
        states=rng.normal(size=(length, 25)).astype(np.float32),
        actions=rng.uniform(-1, 1, size=(length, 7)).astype(np.float32),
        images={KEY: frames},
        task="pick up the cube and put it on the plate",
    )


@pytest.fixture()
def written(tmp_path: Path) -> tuple[Path, list[Episode]]:
    episodes = [_episode(5, 0), _episode(8, 1)]
    writer = LeRobotWriter(tmp_path / "ds", fps=20)
    for episode in episodes:
        writer.add_episode(episode)
    writer.close()
    return tmp_path / "ds", episodes


def test_layout_and_metadata(written: tuple[Path, list[Episode]]) -> None:
    root, _ = written
    info = json.loads((root / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v2.1"
    assert info["fps"] == 20
    assert (info["total_episodes"], info["total_frames"], info["total_tasks"], info["total_videos"]) == (2, 13, 1, 2)
    assert info["chunks_size"] == 1000 and info["total_chunks"] == 1
    assert info["data_path"] == "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
    assert info["video_path"] == "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
    features = info["features"]
    assert features["observation.state"]["shape"] == [25] and features["observation.state"]["dtype"] == "float32"
    assert features["action"]["shape"] == [7]
    video = features["observation.images.3rd_view_camera"]
    assert video["dtype"] == "video" and video["shape"] == [32, 32, 3]
    assert video["info"]["video.codec"] == "h264" and video["info"]["video.pix_fmt"] == "yuv420p"
    assert (root / "videos/chunk-000/observation.images.3rd_view_camera/episode_000001.mp4").is_file()

    table = pq.read_table(root / "data/chunk-000/episode_000001.parquet")
    assert set(table.column_names) == {
        "observation.state",
        "action",
        "timestamp",
        "frame_index",
        "episode_index",
        "index",
        "task_index",
    }
    assert table.column("index").to_pylist() == list(range(5, 13))  # global index continues over episodes
    assert table.column("frame_index").to_pylist() == list(range(8))
    np.testing.assert_allclose(table.column("timestamp").to_numpy(), np.arange(8) / 20, atol=1e-6)

    episodes = [json.loads(line) for line in (root / "meta" / "episodes.jsonl").read_text().splitlines()]
    assert [e["length"] for e in episodes] == [5, 8]
    tasks = [json.loads(line) for line in (root / "meta" / "tasks.jsonl").read_text().splitlines()]
    assert tasks == [{"task_index": 0, "task": "pick up the cube and put it on the plate"}]
    stats = [json.loads(line) for line in (root / "meta" / "episodes_stats.jsonl").read_text().splitlines()]
    action_stats = stats[1]["stats"]["action"]
    assert {"min", "max", "mean", "std", "count", "q01", "q99"} <= set(action_stats)
    assert len(action_stats["mean"]) == 7 and action_stats["count"] == [8]


def test_reader_round_trip(written: tuple[Path, list[Episode]]) -> None:
    root, originals = written
    dataset = LeRobotDataset(root)
    assert dataset.num_episodes == 2 and dataset.num_frames == 13
    assert dataset.observation_shapes() == {"state": (25,), KEY: (32, 32, 3)}
    for index, original in enumerate(originals):
        episode = dataset.episode(index)
        np.testing.assert_array_equal(episode.states, original.states)
        np.testing.assert_array_equal(episode.actions, original.actions)
        assert episode.task == original.task
        error = np.abs(episode.images[KEY].astype(np.int16) - original.images[KEY].astype(np.int16))
        assert episode.images[KEY].shape == original.images[KEY].shape
        # H.264 yuv420p is lossy (chroma at half resolution smears sharp colour edges), so compare on average,
        # and check every decoded frame is nearest to its own original: no frame dropped, repeated or reordered.
        assert error.mean() < 4.0, error.mean()
        decoded = episode.images[KEY].astype(np.float32)
        distances = np.abs(decoded[:, None] - original.images[KEY][None].astype(np.float32)).mean(axis=(2, 3, 4))
        assert distances.argmin(axis=1).tolist() == list(range(len(original)))
    assert dataset.episode(1) is dataset.episode(1)  # decoded once, then cached
    stats = dataset.stats()["action"]
    everything = np.concatenate([e.actions for e in originals])
    np.testing.assert_allclose(stats["mean"], everything.mean(0), atol=1e-5)
    np.testing.assert_allclose(stats["min"], everything.min(0), atol=1e-6)


def test_preload_decodes_every_episode_once(
    written: tuple[Path, list[Episode]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = written
    on_demand = LeRobotDataset(root)
    preloaded = LeRobotDataset(root)
    assert preloaded.preload(workers=2) == 2
    assert preloaded.preload(workers=2) == 0  # all cached already

    def no_decoding(*args: object) -> None:
        raise AssertionError("decoded again after preload")

    monkeypatch.setattr("gsrl.data.lerobot.decode_video", no_decoding)
    cached = [preloaded.episode(index) for index in range(2)]  # served from the cache: no decode
    monkeypatch.undo()
    for index, episode in enumerate(cached):
        np.testing.assert_array_equal(episode.images[KEY], on_demand.episode(index).images[KEY])
        np.testing.assert_array_equal(episode.actions, on_demand.episode(index).actions)


def _odd_sized_video(path: Path) -> np.ndarray:
    """A 9-frame 15x17 clip (the writer pads it to 16x18) with content that moves, written as collect writes."""
    frames = np.zeros((9, 15, 17, 3), dtype=np.uint8)
    for t in range(len(frames)):
        frames[t] = (30 + 20 * t, 90, 160)
        frames[t, t : t + 6, 2 + t : 8 + t] = (250, 240, 20)
    with VideoWriter(path, fps=20, quality=9) as writer:
        for frame in frames:
            writer.append(frame)
    return frames


def test_opencv_decode_gives_imageio_pixels_cropped_to_the_recorded_size(tmp_path: Path) -> None:
    frames = _odd_sized_video(tmp_path / "clip.mp4")
    decoded = decode_video(tmp_path / "clip.mp4", 15, 17)
    padded = decode_video_imageio(tmp_path / "clip.mp4")  # the subprocess decoder: the file's full 16x18 frames
    assert padded.shape == (9, 16, 18, 3) and decoded.shape == (9, 15, 17, 3) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, padded[:, :15, :17])
    # lossy, but each decoded frame is nearest to its own original, in order
    distances = np.abs(decoded[:, None].astype(np.float32) - frames[None].astype(np.float32)).mean(axis=(2, 3, 4))
    assert distances.argmin(axis=1).tolist() == list(range(len(frames)))


def test_decode_falls_back_to_imageio_where_opencv_cannot_open_the_video(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _odd_sized_video(tmp_path / "clip.mp4")
    expected = decode_video(tmp_path / "clip.mp4", 15, 17)

    class Unopened:  # an OpenCV build without its FFmpeg backend opens no mp4
        def __init__(self, *args: object) -> None:
            pass

        def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
            return False

        def release(self) -> None:
            pass

    monkeypatch.setattr("cv2.VideoCapture", Unopened)
    np.testing.assert_array_equal(decode_video(tmp_path / "clip.mp4", 15, 17), expected)


def test_a_video_without_frames_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(Exception, match="empty.mp4"):
        decode_video(tmp_path / "empty.mp4", 15, 17)


def test_preload_refuses_a_cache_too_small(written: tuple[Path, list[Episode]]) -> None:
    root, _ = written
    with pytest.raises(ValueError, match="room for 2 episodes; max_cached_episodes is 1"):
        LeRobotDataset(root, max_cached_episodes=1).preload()


def test_action_chunk_dataset(written: tuple[Path, list[Episode]]) -> None:
    root, originals = written
    chunks = ActionChunkDataset(LeRobotDataset(root), horizon=4)
    assert len(chunks) == 13
    observations, action_chunk, instruction = chunks[5 + 2]  # episode 1, frame 2
    assert observations[KEY].dtype == torch.uint8 and observations[KEY].shape == (32, 32, 3)
    torch.testing.assert_close(observations["state"], torch.from_numpy(originals[1].states[2]))
    torch.testing.assert_close(action_chunk, torch.from_numpy(originals[1].actions[2:6]))
    assert instruction == originals[1].task
    _, tail, _ = chunks[4]  # last frame of episode 0: padded by repeating its last action
    expected = np.repeat(originals[0].actions[4:5], 4, axis=0)
    torch.testing.assert_close(tail, torch.from_numpy(expected))
    batch = next(iter(torch.utils.data.DataLoader(chunks, batch_size=3)))
    assert batch[0][KEY].shape == (3, 32, 32, 3) and batch[1].shape == (3, 4, 7) and len(batch[2]) == 3


def test_preload_and_chunks_of_a_subset_of_episodes(written: tuple[Path, list[Episode]]) -> None:
    """A data-parallel rank's view: only its episodes are decoded and only their frames are samples."""
    root, episodes = written
    data = LeRobotDataset(root)
    assert data.preload(workers=2, episodes=[1]) == 1
    assert data.preload(workers=2, episodes=[1]) == 0  # cached
    chunks = ActionChunkDataset(data, horizon=4, episodes=[1])
    assert len(chunks) == len(episodes[1].actions)
    observations, actions, _ = chunks[0]
    np.testing.assert_array_equal(observations["state"].numpy(), episodes[1].states[0])
    # episode 0 was never decoded: the chunks of episode 1 did not touch it
    assert data.preload(workers=2) == 1
