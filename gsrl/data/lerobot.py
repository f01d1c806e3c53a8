"""Demonstrations in LeRobot's v2.1 dataset layout: a writer, a reader, and the chunked torch Dataset for SFT.

The layout is LeRobot's (``codebase_version`` "v2.1"), the one the reference's SFT data
(``RLinf/GSEnv-PutCubeOnPlate-v0``) uses, so LeRobot's and openpi's tools read what ``gsrl collect`` writes and
``gsrl sft`` can train on LeRobot datasets with the same features::

    meta/info.json              fps, features (dtype/shape/names), path templates, totals
    meta/episodes.jsonl         {"episode_index", "tasks", "length"} per episode
    meta/tasks.jsonl            {"task_index", "task"} per distinct instruction
    meta/episodes_stats.jsonl   {"episode_index", "stats": {feature: {min, max, mean, std, count, q01, q99}}}
    data/chunk-000/episode_000000.parquet    observation.state, action, timestamp, frame_index, episode_index,
                                             index, task_index (one row per frame)
    videos/chunk-000/observation.images.<camera>/episode_000000.mp4   H.264 yuv420p

Written without the ``lerobot`` package (which pins a transformers version this project cannot take): only
pyarrow, imageio-ffmpeg and OpenCV. gsrl's observation keys map onto LeRobot's feature names as ``state`` <->
``observation.state`` and ``rgb/<camera>`` <-> ``observation.images.<camera>``.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

CODEBASE_VERSION = "v2.1"
DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
STATE_FEATURE = "observation.state"
ACTION_FEATURE = "action"
IMAGE_PREFIX = "observation.images."
INDEX_COLUMNS = ("frame_index", "episode_index", "index", "task_index")


def video_key(observation_key: str) -> str:
    """``rgb/3rd_view_camera`` -> ``observation.images.3rd_view_camera``."""
    return IMAGE_PREFIX + observation_key.split("/", 1)[1]


def observation_key(feature: str) -> str:
    """``observation.images.3rd_view_camera`` -> ``rgb/3rd_view_camera``; ``observation.state`` -> ``state``."""
    if feature == STATE_FEATURE:
        return "state"
    return "rgb/" + feature.removeprefix(IMAGE_PREFIX)


@dataclass
class Episode:
    """One demonstration, T frames: the observation at each step and the action taken from it.

    ``states`` [T, S] float32, ``actions`` [T, A] float32 (policy scale, [-1, 1]), ``images`` {``rgb/<camera>``:
    [T, H, W, 3] uint8}, ``task`` the language instruction.
    """

    states: np.ndarray
    actions: np.ndarray
    images: dict[str, np.ndarray]
    task: str

    def __len__(self) -> int:
        return len(self.actions)


def feature_stats(values: np.ndarray, quantiles: bool = True) -> dict[str, list]:
    """Per-dimension min/max/mean/std (and q01/q99) of ``values`` [N, D], as LeRobot's stats json holds them."""
    values = np.asarray(values, dtype=np.float64)
    stats = {
        "min": values.min(0).tolist(),
        "max": values.max(0).tolist(),
        "mean": values.mean(0).tolist(),
        "std": values.std(0).tolist(),
        "count": [len(values)],
    }
    if quantiles:
        stats["q01"] = np.quantile(values, 0.01, axis=0).tolist()
        stats["q99"] = np.quantile(values, 0.99, axis=0).tolist()
    return stats


def image_stats(frames: np.ndarray, max_frames: int = 32) -> dict[str, list]:
    """Per-channel stats of uint8 frames [T, H, W, 3] in [0, 1], shaped [3, 1, 1] as LeRobot stores them; a subset
    of frames is enough for stats nobody normalizes images with but LeRobot's tools expect to find."""
    step = max(1, len(frames) // max_frames)
    pixels = frames[::step].reshape(-1, frames.shape[-1]).astype(np.float64) / 255.0
    stats = feature_stats(pixels, quantiles=False)
    stats = {k: v if k == "count" else [[[c]] for c in v] for k, v in stats.items()}
    stats["count"] = [len(frames)]
    return stats


class LeRobotWriter:
    """Write episodes one at a time into a new LeRobot v2.1 dataset at ``root``; ``close()`` writes meta/info.json.

    Args:
        root: dataset directory (created; must not already hold a dataset).
        fps: frames per second (the task's control rate): LeRobot derives timestamps and video speed from it.
        state_names, action_names: per-dimension names for info.json (None: ``state_0``...).
        robot_type: free text LeRobot shows ("panda").
        chunks_size: episodes per ``chunk-XXX`` directory (LeRobot's default 1000).
        video_quality: imageio's 0..10 H.264 quality; 9 keeps the codec error to a few grey levels.
    """

    def __init__(
        self,
        root: str | Path,
        fps: int,
        state_names: Sequence[str] | None = None,
        action_names: Sequence[str] | None = None,
        robot_type: str = "panda",
        chunks_size: int = 1000,
        video_quality: float = 9.0,
    ) -> None:
        self.root = Path(root)
        if (self.root / "meta" / "info.json").exists():
            raise FileExistsError(f"{self.root} already holds a dataset (meta/info.json); pick a new directory")
        (self.root / "meta").mkdir(parents=True, exist_ok=True)
        self.fps = int(fps)
        self.state_names = list(state_names) if state_names is not None else None
        self.action_names = list(action_names) if action_names is not None else None
        self.robot_type = robot_type
        self.chunks_size = chunks_size
        self.video_quality = video_quality
        self.tasks: dict[str, int] = {}
        self.num_episodes = 0
        self.num_frames = 0
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._all_states: list[np.ndarray] = []
        self._all_actions: list[np.ndarray] = []

    def add_episode(self, episode: Episode) -> int:
        """Write one episode's parquet, videos and meta lines; returns its episode index."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from gsrl.video import VideoWriter

        length = len(episode)
        if length < 1 or len(episode.states) != length:
            raise ValueError(f"episode has {len(episode.states)} states and {length} actions: need T >= 1 of each")
        shapes = {STATE_FEATURE: episode.states.shape[1:], ACTION_FEATURE: episode.actions.shape[1:]}
        shapes.update({video_key(k): v.shape[1:] for k, v in episode.images.items()})
        if self._shapes is None:
            self._shapes = shapes
        elif shapes != self._shapes:
            raise ValueError(f"episode features {shapes} differ from the dataset's {self._shapes}")
        for key, frames in episode.images.items():
            if frames.dtype != np.uint8 or len(frames) != length:
                raise ValueError(f"{key}: need {length} uint8 frames, got {len(frames)} of {frames.dtype}")

        index = self.num_episodes
        chunk = index // self.chunks_size
        new_task = episode.task not in self.tasks
        task_index = self.tasks.setdefault(episode.task, len(self.tasks))
        if new_task:
            self._append_jsonl("tasks.jsonl", {"task_index": task_index, "task": episode.task})
        states = np.asarray(episode.states, dtype=np.float32)
        actions = np.asarray(episode.actions, dtype=np.float32)
        frame_index = np.arange(length, dtype=np.int64)
        table = pa.table(
            {
                STATE_FEATURE: pa.array(list(states), type=pa.list_(pa.float32())),
                ACTION_FEATURE: pa.array(list(actions), type=pa.list_(pa.float32())),
                "timestamp": pa.array((frame_index / self.fps).astype(np.float32)),
                "frame_index": pa.array(frame_index),
                "episode_index": pa.array(np.full(length, index, dtype=np.int64)),
                "index": pa.array(self.num_frames + frame_index),
                "task_index": pa.array(np.full(length, task_index, dtype=np.int64)),
            }
        )
        data_path = self.root / DATA_PATH.format(episode_chunk=chunk, episode_index=index)
        data_path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, data_path)
        stats = {STATE_FEATURE: feature_stats(states), ACTION_FEATURE: feature_stats(actions)}
        for key, frames in episode.images.items():
            name = video_key(key)
            path = self.root / VIDEO_PATH.format(episode_chunk=chunk, video_key=name, episode_index=index)
            with VideoWriter(path, fps=self.fps, quality=self.video_quality) as writer:
                writer.extend(frames)
            stats[name] = image_stats(frames)
        for column in ("timestamp", *INDEX_COLUMNS):
            stats[column] = feature_stats(table.column(column).to_numpy()[:, None], quantiles=False)
        self._append_jsonl("episodes.jsonl", {"episode_index": index, "tasks": [episode.task], "length": length})
        self._append_jsonl("episodes_stats.jsonl", {"episode_index": index, "stats": stats})
        self._all_states.append(states)
        self._all_actions.append(actions)
        self.num_episodes += 1
        self.num_frames += length
        return index

    def close(self) -> Path:
        """Write meta/info.json (and meta/stats.json, the aggregate LeRobot v2.0 kept); returns the root."""
        if self._shapes is None:
            raise ValueError(f"no episode was written to {self.root}: an empty dataset is not a dataset")
        features: dict[str, Any] = {}
        for name, shape in self._shapes.items():
            if name.startswith(IMAGE_PREFIX):
                height, width, channels = shape
                features[name] = {
                    "dtype": "video",
                    "shape": list(shape),
                    "names": ["height", "width", "channels"],
                    "info": {
                        "video.fps": float(self.fps),
                        "video.height": height,
                        "video.width": width,
                        "video.channels": channels,
                        "video.codec": "h264",
                        "video.pix_fmt": "yuv420p",
                        "video.is_depth_map": False,
                        "has_audio": False,
                    },
                }
            else:
                given = self.state_names if name == STATE_FEATURE else self.action_names
                prefix = "state" if name == STATE_FEATURE else "action"
                names = given if given is not None else [f"{prefix}_{i}" for i in range(shape[0])]
                features[name] = {"dtype": "float32", "shape": list(shape), "names": names}
        features["timestamp"] = {"dtype": "float32", "shape": [1], "names": None}
        for column in INDEX_COLUMNS:
            features[column] = {"dtype": "int64", "shape": [1], "names": None}
        num_videos = sum(1 for n in self._shapes if n.startswith(IMAGE_PREFIX))
        info = {
            "codebase_version": CODEBASE_VERSION,
            "robot_type": self.robot_type,
            "total_episodes": self.num_episodes,
            "total_frames": self.num_frames,
            "total_tasks": len(self.tasks),
            "total_videos": self.num_episodes * num_videos,
            "total_chunks": (self.num_episodes - 1) // self.chunks_size + 1,
            "chunks_size": self.chunks_size,
            "fps": self.fps,
            "splits": {"train": f"0:{self.num_episodes}"},
            "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if num_videos else None,
            "features": features,
        }
        (self.root / "meta" / "info.json").write_text(json.dumps(info, indent=4))
        stats = {
            STATE_FEATURE: feature_stats(np.concatenate(self._all_states)),
            ACTION_FEATURE: feature_stats(np.concatenate(self._all_actions)),
        }
        (self.root / "meta" / "stats.json").write_text(json.dumps(stats, indent=4))
        return self.root

    def _append_jsonl(self, name: str, record: dict[str, Any]) -> None:
        with open(self.root / "meta" / name, "a") as f:
            f.write(json.dumps(record) + "\n")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def decode_video(path: str | Path, height: int, width: int) -> np.ndarray:
    """All frames of an mp4 as uint8 [T, height, width, 3] (cropping the writer's even-size padding).

    Decoded in-process by OpenCV's FFmpeg, one decoder thread per video: SFT decodes thousands of episodes at
    once, a thread pool over videos, and imageio's way (an ffmpeg subprocess per video, each frame copied out of a
    pipe under the GIL) reached 24 episodes/s on 32 cores of the GPU host. ``make bench`` ("dataset decode") has
    both. The pixels are the same; a video OpenCV cannot open (a build without FFmpeg) goes through imageio.
    """
    frames = _decode_video_opencv(path)
    if frames is None:
        frames = decode_video_imageio(path)
    return frames[:, :height, :width, :3]


def _decode_video_opencv(path: str | Path) -> np.ndarray | None:
    """Frames as uint8 RGB [T, H, W, 3], or None where OpenCV cannot open the file or reads no frame from it."""
    import cv2

    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
    try:
        if not capture.isOpened():
            return None
        frames = []
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    finally:
        capture.release()
    return np.stack(frames) if frames else None


def decode_video_imageio(path: str | Path) -> np.ndarray:
    """Frames as uint8 RGB [T, H, W, 3] through imageio-ffmpeg (a subprocess): the fallback, and the bench's
    baseline."""
    import imageio.v2 as imageio

    reader = imageio.get_reader(str(path), format="FFMPEG")
    try:
        frames = [np.asarray(frame)[..., :3] for frame in reader]
    finally:
        reader.close()
    if not frames:
        raise ValueError(f"{path} holds no video frames")
    return np.stack(frames)


class LeRobotDataset:
    """Read a LeRobot v2.x dataset from ``root``: metadata, and whole episodes with decoded video frames.

    Decoding an mp4 costs far more than a training step reads, so decoded episodes are kept in an LRU cache of
    ``max_cached_episodes`` (None: all; 50 episodes of 50 frames at 128x128 are about 120 MB).
    """

    def __init__(self, root: str | Path, max_cached_episodes: int | None = None) -> None:
        self.root = Path(root)
        info_path = self.root / "meta" / "info.json"
        if not info_path.is_file():
            raise FileNotFoundError(f"{self.root} is not a LeRobot dataset: no meta/info.json")
        self.info: dict[str, Any] = json.loads(info_path.read_text())
        self.episodes = _read_jsonl(self.root / "meta" / "episodes.jsonl")
        self.tasks = {t["task_index"]: t["task"] for t in _read_jsonl(self.root / "meta" / "tasks.jsonl")}
        features = self.info["features"]
        self.image_features = [name for name, f in features.items() if f["dtype"] in ("video", "image")]
        self.fps = int(self.info["fps"])
        self.max_cached_episodes = max_cached_episodes
        self._cache: OrderedDict[int, Episode] = OrderedDict()

    @property
    def num_episodes(self) -> int:
        return len(self.episodes)

    @property
    def num_frames(self) -> int:
        return sum(int(e["length"]) for e in self.episodes)

    def episode_lengths(self) -> list[int]:
        return [int(e["length"]) for e in self.episodes]

    def observation_shapes(self) -> dict[str, tuple[int, ...]]:
        """gsrl observation keys -> shapes (``state`` [S], ``rgb/<camera>`` [H, W, 3])."""
        features = self.info["features"]
        return {observation_key(n): tuple(features[n]["shape"]) for n in [STATE_FEATURE, *self.image_features]}

    def stats(self) -> dict[str, dict[str, np.ndarray]]:
        """Dataset-wide stats of state and action (min, max, mean, std; q01/q99 if written), merged from the
        per-episode stats: min of mins, max of maxes, count-weighted mean and pooled std."""
        path = self.root / "meta" / "stats.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            return {f: {k: np.asarray(v, dtype=np.float64) for k, v in saved[f].items()} for f in saved}
        per_episode = [r["stats"] for r in _read_jsonl(self.root / "meta" / "episodes_stats.jsonl")]
        merged: dict[str, dict[str, np.ndarray]] = {}
        for feature in (STATE_FEATURE, ACTION_FEATURE):
            parts = [s[feature] for s in per_episode]
            counts = np.array([p["count"][0] for p in parts], dtype=np.float64)[:, None]
            means = np.array([p["mean"] for p in parts])
            mean = (counts * means).sum(0) / counts.sum()
            second = (counts * (np.array([p["std"] for p in parts]) ** 2 + means**2)).sum(0) / counts.sum()
            merged[feature] = {
                "min": np.min([p["min"] for p in parts], axis=0),
                "max": np.max([p["max"] for p in parts], axis=0),
                "mean": mean,
                "std": np.sqrt(np.maximum(second - mean**2, 0.0)),
            }
        return merged

    def episode(self, index: int) -> Episode:
        """Episode ``index`` with its videos decoded (cached)."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        return self._remember(index, self._decode_episode(index))

    def preload(self, workers: int = 8, episodes: Sequence[int] | None = None) -> int:
        """Decode every episode (or those of ``episodes``) not yet cached, ``workers`` at a time; returns how many
        were decoded.

        A first epoch that decodes on demand would keep a GPU waiting on one video at a time; threads decode
        several at once (OpenCV releases the GIL while it decodes). Needs a cache that holds them all
        (``max_cached_episodes`` None or >= the number asked for).
        """
        wanted = list(range(self.num_episodes)) if episodes is None else list(episodes)
        if self.max_cached_episodes is not None and self.max_cached_episodes < len(wanted):
            raise ValueError(
                f"preload needs room for {len(wanted)} episodes; max_cached_episodes is {self.max_cached_episodes}"
            )
        from concurrent.futures import ThreadPoolExecutor

        missing = [i for i in wanted if i not in self._cache]
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for index, episode in zip(missing, pool.map(self._decode_episode, missing), strict=True):
                self._remember(index, episode)
        return len(missing)

    def _remember(self, index: int, episode: Episode) -> Episode:
        self._cache[index] = episode
        if self.max_cached_episodes is not None:
            while len(self._cache) > self.max_cached_episodes:
                self._cache.popitem(last=False)
        return episode

    def _decode_episode(self, index: int) -> Episode:
        """Episode ``index`` read from disk: parquet columns and every video decoded (no cache)."""
        import pyarrow.parquet as pq

        chunk = index // int(self.info["chunks_size"])
        table = pq.read_table(self.root / self.info["data_path"].format(episode_chunk=chunk, episode_index=index))
        states = np.asarray(table.column(STATE_FEATURE).to_pylist(), dtype=np.float32)
        actions = np.asarray(table.column(ACTION_FEATURE).to_pylist(), dtype=np.float32)
        task_index = int(table.column("task_index")[0].as_py())
        images = {}
        for name in self.image_features:
            height, width = self.info["features"][name]["shape"][:2]
            path = self.info["video_path"].format(episode_chunk=chunk, video_key=name, episode_index=index)
            frames = decode_video(self.root / path, height, width)
            if len(frames) < len(actions):
                raise ValueError(f"{path} has {len(frames)} frames, the episode {len(actions)}")
            images[observation_key(name)] = frames[: len(actions)]
        return Episode(states=states, actions=actions, images=images, task=self.tasks[task_index])


class ActionChunkDataset(torch.utils.data.Dataset):
    """Frames of a LeRobot dataset as SFT samples: (observations, action chunk, instruction).

    Sample i is frame t of some episode: ``observations`` {``rgb/<camera>``: uint8 [H, W, 3], ``state``: float32
    [S]} at t, ``action_chunk`` float32 [horizon, A] = actions t .. t+horizon-1, past the episode's end padded by
    repeating its last action (the arm holds still once done, which is what a chunk that outlives its episode
    should teach), and the episode's instruction. The default collate batches them into the policy's inputs.
    """

    def __init__(self, dataset: LeRobotDataset, horizon: int, episodes: Sequence[int] | None = None) -> None:
        """``episodes``: the episodes whose frames are the samples (a data-parallel rank's share); None = all."""
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        self.dataset = dataset
        self.horizon = horizon
        lengths = dataset.episode_lengths()
        chosen = range(len(lengths)) if episodes is None else episodes
        self._index = [(e, t) for e in chosen for t in range(lengths[e])]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, str]:
        episode_index, t = self._index[i]
        episode = self.dataset.episode(episode_index)
        steps = np.minimum(np.arange(t, t + self.horizon), len(episode) - 1)
        observations = {key: torch.from_numpy(frames[t]) for key, frames in episode.images.items()}
        observations["state"] = torch.from_numpy(episode.states[t])
        return observations, torch.from_numpy(episode.actions[steps]), episode.task
