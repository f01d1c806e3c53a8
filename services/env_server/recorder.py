"""Episode videos from an env server's own rendered frames (``env_server.video_every_episodes``).

The env server already renders every observation the policy reads, so a training video costs no extra
rendering: this module writes env 0's frames of every N-th episode to ``<video_dir>/episode_<k>.mp4``, with the
step, the chunk's reward, success and the instruction drawn on when ``info_on_video`` is set (RLinf's
``video_cfg.info_on_video``). A frame is written per policy decision (after each action chunk), so with chunks of
C actions the video runs at the control rate / C; when the batch films env 0 at every step (``EnvBatch.film_env``,
as ``gsrl eval --videos`` does while it records) the result carries those frames too and the video gets one per
step, each with that step's reward.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from gsrl.video import VideoWriter, draw_info, info_lines
from services.env_server.core import ChunkResult

log = logging.getLogger(__name__)


class EpisodeRecorder:
    """Records env 0 of a batch: every ``every_episodes``-th episode, from its first observation to its last."""

    def __init__(
        self,
        directory: str | Path,
        every_episodes: int,
        image_key: str,
        instruction: str = "",
        info_on_video: bool = True,
        fps: float = 10.0,
        max_videos: int | None = None,
    ) -> None:
        if every_episodes < 1:
            raise ValueError(f"every_episodes must be >= 1, got {every_episodes}")
        self.directory = Path(directory)
        self.every_episodes = every_episodes
        self.image_key = image_key
        self.instruction = instruction
        self.info_on_video = info_on_video
        self.fps = fps
        self.max_videos = max_videos
        self.episode = 0  # episodes of env 0 seen so far (recorded or not)
        self.videos: list[Path] = []
        self._writer: VideoWriter | None = None
        self._step = 0
        self._success = False

    def start(self, observations: dict[str, np.ndarray]) -> None:
        """Begin with the batch's first observations (after ``EnvBatch.reset``)."""
        self._begin_episode(observations)

    @property
    def filming(self) -> bool:
        """Whether an episode of env 0 is being recorded now (so its per-step frames would be used)."""
        return self._writer is not None

    def record(self, result: ChunkResult) -> None:
        """Add env 0's frame(s) of one ``EnvBatch.step_chunk`` result: its per-step frames when the batch filmed
        them, then the frame the chunk ended on."""
        if self._writer is not None:
            ended = bool(result.ended[0])
            between = [] if result.film_frames is None else list(result.film_frames.get(self.image_key, []))
            for k, frame in enumerate(between):
                self._step += 1
                self._append(frame, float(result.step_rewards[0, k]))
            if ended:
                self._step = int(result.episode_length[0])
            else:
                self._step += result.step_rewards.shape[1] - len(between)
            self._success = self._success or (ended and bool(result.episode_success_once[0]))
            frames = result.final_observations if ended else result.observations
            # one frame per chunk: the chunk's reward; per step: the last step's
            reward = float(result.step_rewards[0, len(between)]) if between else float(result.rewards[0])
            self._append(frames[self.image_key][0], reward)
            if ended:
                self._finish()
        if bool(result.ended[0]):
            self.episode += 1
            self._begin_episode(result.observations)

    def close(self) -> None:
        """Finish a video in progress (a partial episode, e.g. at shutdown)."""
        if self._writer is not None:
            self._finish()

    def _begin_episode(self, observations: dict[str, np.ndarray]) -> None:
        if self.episode % self.every_episodes != 0:
            return
        if self.max_videos is not None and len(self.videos) >= self.max_videos:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"episode_{self.episode:05d}.mp4"
        self._writer = VideoWriter(path, fps=self.fps)
        self._step, self._success = 0, False
        self._append(observations[self.image_key][0], None)

    def _append(self, frame: np.ndarray, reward: float | None) -> None:
        assert self._writer is not None
        if self.info_on_video:
            lines = info_lines(step=self._step, reward=reward, success=self._success, instruction=self.instruction)
            frame = draw_info(frame, lines)
        self._writer.append(frame)

    def _finish(self) -> None:
        assert self._writer is not None
        self._writer.close()
        self.videos.append(self._writer.path)
        log.info("wrote episode video %s (%d frames)", self._writer.path, self._writer.num_frames)
        self._writer = None
