"""``gsrl compare --base SFT.json --new RL.json``: does one checkpoint succeed more often than another, on the same
layouts?

Two ``gsrl eval --json`` reports made with the same seed, env count, episode count and layout protocol ran the same
episodes (layout and image randomization): ``gsrl eval`` keys each one by (env, its number on that env). Pairing
them by that key, rather than treating the two success rates as independent samples, counts the episodes only one
checkpoint solved. McNemar's exact test on those discordant episodes is the test for "the new checkpoint succeeds
more often" that uses this pairing; it is much tighter than the two intervals' overlap when both checkpoints solve
the same easy layouts. Several report pairs (``--base a b --new c d``: a with c, b with d) pool their episodes, e.g.
the default eval seed plus ``run.seed=1``.

``--metric success_at_end`` pairs the episodes' success at their last step instead, for reports made with
``gsrl eval --ignore-terminations`` (RLinf's evaluation setting; without it the two metrics are the same).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# What must match for two reports to have run the same episodes.
PROTOCOL_KEYS = ("task", "seed", "num_envs", "layouts", "layout_pool", "deterministic", "ignore_terminations")
# The value of a key that reports written before it existed did not have.
PROTOCOL_DEFAULTS = {"ignore_terminations": False}
METRICS = ("success_once", "success_at_end")


class CompareError(ValueError):
    """Reports that cannot be paired: not ``gsrl eval --json``, other episodes, or made before episodes had keys."""


@dataclass(frozen=True)
class PairedComparison:
    episodes: int
    base_successes: int
    new_successes: int
    new_only: int
    """Episodes the new checkpoint solved and the base did not."""
    base_only: int

    @property
    def difference(self) -> float:
        """New success rate minus base success rate."""
        return (self.new_successes - self.base_successes) / self.episodes

    def difference_ci95(self) -> tuple[float, float]:
        """Wald interval of the paired difference (its variance uses the discordant counts, not the two rates)."""
        n, b, c = self.episodes, self.new_only, self.base_only
        se = math.sqrt(max(b + c - (b - c) ** 2 / n, 0.0)) / n
        return self.difference - 1.96 * se, self.difference + 1.96 * se

    def mcnemar_p(self) -> float:
        """Two-sided exact McNemar p-value: the discordant episodes as a binomial(b + c, 1/2) draw."""
        return binomial_two_sided_p(self.new_only, self.new_only + self.base_only)


def binomial_two_sided_p(k: int, n: int) -> float:
    """P(a Binomial(n, 1/2) is at least as far from n/2 as k); 1 when n is 0."""
    if n == 0:
        return 1.0
    tail = min(k, n - k)
    p = sum(math.comb(n, i) for i in range(tail + 1)) / 2**n
    return min(1.0, 2 * p)


def load_report(path: Path) -> dict:
    """A ``gsrl eval --json`` report, checked for what pairing needs."""
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise CompareError(f"{path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise CompareError(f"{path}: not JSON ({exc})") from None
    if not isinstance(report, dict) or not isinstance(report.get("result"), dict):
        raise CompareError(f"{path}: not a gsrl eval --json report (no 'result')")
    result = report["result"]
    if "episode_envs" not in result or "episode_numbers" not in result:
        raise CompareError(
            f"{path}: its episodes carry no (env, number) keys (a report from before gsrl eval wrote them); "
            "evaluate the checkpoint again"
        )
    return report


def _episode_successes(report: dict, path: Path, metric: str) -> dict[tuple[int, int], bool]:
    result = report["result"]
    field = f"episode_{metric}"
    if field not in result:
        raise CompareError(f"{path}: no per-episode successes (result.{field})")
    try:
        keys = list(zip(result["episode_envs"], result["episode_numbers"], strict=True))
        successes = dict(zip(keys, (bool(s) for s in result[field]), strict=True))
    except ValueError:
        raise CompareError(f"{path}: its per-episode lists (envs, numbers, {metric}) differ in length") from None
    if len(successes) != len(keys):
        raise CompareError(f"{path}: an (env, number) key repeats")
    return successes


def compare_pair(base_path: Path, new_path: Path, metric: str = "success_once") -> tuple[list[bool], list[bool]]:
    """The two reports' successes, episode by episode in one order; CompareError if they ran other episodes."""
    base, new = load_report(base_path), load_report(new_path)
    for key in PROTOCOL_KEYS:
        base_value, new_value = (r.get(key, PROTOCOL_DEFAULTS.get(key)) for r in (base, new))
        if base_value != new_value:
            raise CompareError(f"{base_path} and {new_path} ran other episodes: {key} {base_value!r} vs {new_value!r}")
    base_success = _episode_successes(base, base_path, metric)
    new_success = _episode_successes(new, new_path, metric)
    if base_success.keys() != new_success.keys():
        raise CompareError(
            f"{base_path} ({len(base_success)} episodes) and {new_path} ({len(new_success)}) ran other episodes"
        )
    order = sorted(base_success)
    return [base_success[k] for k in order], [new_success[k] for k in order]


def compare(base_paths: Sequence[Path], new_paths: Sequence[Path], metric: str = "success_once") -> PairedComparison:
    """The reports paired as ``base_paths[i]`` with ``new_paths[i]``, their episodes pooled; ``metric`` one of
    ``METRICS``."""
    if metric not in METRICS:
        raise CompareError(f"unknown metric {metric!r}: one of {', '.join(METRICS)}")
    if len(base_paths) != len(new_paths) or not base_paths:
        raise CompareError(f"--base and --new need as many reports each, got {len(base_paths)} and {len(new_paths)}")
    base: list[bool] = []
    new: list[bool] = []
    for base_path, new_path in zip(base_paths, new_paths, strict=True):
        b, n = compare_pair(base_path, new_path, metric)
        base += b
        new += n
    return PairedComparison(
        episodes=len(base),
        base_successes=sum(base),
        new_successes=sum(new),
        new_only=sum(1 for b, n in zip(base, new, strict=True) if n and not b),
        base_only=sum(1 for b, n in zip(base, new, strict=True) if b and not n),
    )


def main(argv: Sequence[str] | None = None, prog: str = "gsrl compare") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Compare two checkpoints' gsrl eval reports episode by episode (same seed, envs and episodes).",
    )
    parser.add_argument("--base", nargs="+", type=Path, required=True, help="eval --json reports of the baseline")
    parser.add_argument("--new", nargs="+", type=Path, required=True, help="the other checkpoint's, in the same order")
    parser.add_argument(
        "--metric",
        choices=METRICS,
        default="success_once",
        help="what counts as a solved episode: a success at any step (default), or at the last one (reports of "
        "gsrl eval --ignore-terminations)",
    )
    args = parser.parse_args(argv)
    try:
        result = compare(args.base, args.new, args.metric)
    except CompareError as exc:
        parser.error(str(exc))
    low, high = result.difference_ci95()
    n = result.episodes
    metric = "" if args.metric == "success_once" else f" ({args.metric})"  # the default line reads as it always has
    print(
        f"{n} paired episodes{metric}: base {result.base_successes}/{n} = {100 * result.base_successes / n:.1f}% -> "
        f"new {result.new_successes}/{n} = {100 * result.new_successes / n:.1f}%, "
        f"difference {100 * result.difference:+.1f} points (95% CI {100 * low:+.1f} to {100 * high:+.1f}); "
        f"solved by new only {result.new_only}, by base only {result.base_only}; "
        f"McNemar exact p = {result.mcnemar_p():.2g}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
