"""Plain functions the learner applies to segments before and after an update (no Redis, no torch.distributed)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gsrl.trajectory import Segment


def policy_lag(segment: Segment, learner_version: int) -> int:
    """How many versions behind the learner the oldest action of ``segment`` is."""
    return max(0, learner_version - segment.policy_version)


def split_by_lag(segments: Sequence[Segment], learner_version: int, max_policy_lag: int) -> tuple[list[int], list[int]]:
    """Indices of segments fresh enough to train on, and of those past ``max_policy_lag`` (dropped)."""
    fresh, stale = [], []
    for i, segment in enumerate(segments):
        (fresh if policy_lag(segment, learner_version) <= max_policy_lag else stale).append(i)
    return fresh, stale


@dataclass
class EpisodeTotals:
    """Sums over finished episodes; summed across ranks before becoming means."""

    episodes: float = 0.0
    successes: float = 0.0
    returns: float = 0.0
    lengths: float = 0.0

    @classmethod
    def of(cls, segments: Sequence[Segment]) -> EpisodeTotals:
        totals = cls()
        for segment in segments:
            for ep in segment.episodes:
                totals.episodes += 1
                totals.successes += float(ep.success_once)
                totals.returns += ep.episode_return
                totals.lengths += ep.episode_length
        return totals

    def as_list(self) -> list[float]:
        return [self.episodes, self.successes, self.returns, self.lengths]

    def means(self) -> dict[str, float]:
        """RLinf's env/* names; empty when no episode ended (so nothing misleading gets logged)."""
        if self.episodes == 0:
            return {}
        n = self.episodes
        return {
            "env/success_once": self.successes / n,
            "env/return": self.returns / n,
            "env/episode_len": self.lengths / n,
            "env/num_episodes": n,
        }
