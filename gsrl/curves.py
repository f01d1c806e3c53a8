"""``gsrl curve RUN_DIR --out curve.png [--eval LABEL=eval.json ...]``: a run's learning curve as a PNG.

The learner writes its scalars to ``RUN_DIR/tensorboard`` (``gsrl.loggers``); this draws the training success rate
(``env/success_once``, over the episodes that ended since the last update) and the mean episode return against the
learner's update count, and marks ``gsrl eval`` results (their ``--json`` reports) as points with their 95 %
confidence interval, so one picture shows the SFT start, the RL curve and the evaluated checkpoints. A report of a
training checkpoint (``.../update_N``) sits at update N; others sit at the start (the first of several, e.g. SFT)
or at the end. A picture file instead of a TensorBoard link because it goes into the README and docs, where nobody
runs TensorBoard.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class CurveError(ValueError):
    """Input that cannot be drawn: no event files, a report that is not ``gsrl eval --json``, no matplotlib."""


SUCCESS_TAG = "env/success_once"
RETURN_TAG = "env/return"
CHECKPOINT_UPDATE = re.compile(r"update_(\d+)")


@dataclass(frozen=True)
class Series:
    tag: str
    steps: tuple[int, ...]
    values: tuple[float, ...]


@dataclass(frozen=True)
class EvalPoint:
    """One ``gsrl eval --json`` report: success rate and its Wilson 95 % interval over ``episodes``."""

    label: str
    success: float
    low: float
    high: float
    episodes: int
    update: int | None = None
    """The learner update of the evaluated checkpoint (``update_N`` in its path); None for others (e.g. SFT)."""


def read_scalars(run_dir: Path, tags: Sequence[str]) -> dict[str, Series]:
    """The tagged scalars of every event file under ``run_dir/tensorboard`` (or ``run_dir`` itself), by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = run_dir / "tensorboard" if (run_dir / "tensorboard").is_dir() else run_dir
    if not any(log_dir.glob("events.out.tfevents.*")):
        raise CurveError(f"no TensorBoard event files in {log_dir} (run.loggers must include tensorboard)")
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point
    accumulator.Reload()
    available = set(accumulator.Tags()["scalars"])
    series = {}
    for tag in tags:
        if tag in available:
            events = sorted(accumulator.Scalars(tag), key=lambda e: e.step)
            series[tag] = Series(tag, tuple(e.step for e in events), tuple(float(e.value) for e in events))
    return series


def read_eval(label: str, path: Path) -> EvalPoint:
    try:
        report = json.loads(path.read_text())
        result = report["result"]
        low, high = report["success_once_ci95"]
        numbered = CHECKPOINT_UPDATE.search(str(report.get("checkpoint", "")))
        return EvalPoint(
            label,
            float(result["success_once_rate"]),
            float(low),
            float(high),
            int(result["episodes"]),
            int(numbered.group(1)) if numbered else None,
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CurveError(f"{path} is not a `gsrl eval --json` report: {exc}") from exc


def parse_eval_arg(item: str) -> tuple[str, Path]:
    label, sep, path = item.partition("=")
    if not sep or not label or not path:
        raise CurveError(f"expected LABEL=PATH (e.g. SFT=runs/eval-sft.json), got {item!r}")
    return label, Path(path)


def eval_positions(evals: Sequence[EvalPoint], last_step: int) -> list[int]:
    """Each point's x: its checkpoint's update; else the start for the first of several, the end otherwise."""
    return [
        point.update if point.update is not None else (0 if i == 0 and len(evals) > 1 else last_step)
        for i, point in enumerate(evals)
    ]


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over ``window`` points (NaNs skipped), so a noisy per-update rate reads as a trend."""
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1) : i + 1] if v == v]
        out.append(sum(chunk) / len(chunk) if chunk else float("nan"))
    return out


def plot(series: dict[str, Series], evals: Sequence[EvalPoint], out: Path, title: str, window: int = 10) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise CurveError("needs matplotlib: pip install matplotlib") from exc

    panels = [tag for tag in (SUCCESS_TAG, RETURN_TAG) if tag in series]
    if not panels and not evals:
        raise CurveError(f"no {SUCCESS_TAG} or {RETURN_TAG} scalars and no --eval reports to draw")
    fig, axes = plt.subplots(max(1, len(panels)), 1, figsize=(7, 2.8 * max(1, len(panels))), sharex=True)
    axes = list(axes) if len(panels) > 1 else [axes]
    for ax, tag in zip(axes, panels, strict=False):
        s = series[tag]
        scale = 100.0 if tag == SUCCESS_TAG else 1.0
        ax.plot(s.steps, [v * scale for v in s.values], color="0.75", lw=0.8, label="per update")
        ax.plot(s.steps, [v * scale for v in smooth(s.values, window)], color="C0", lw=1.8, label=f"mean of {window}")
        ax.set_ylabel("training success %" if tag == SUCCESS_TAG else "episode return")
        ax.grid(alpha=0.3)
    success_ax = axes[0]
    last_step = max((series[t].steps[-1] for t in panels if series[t].steps), default=0)
    for i, (point, x) in enumerate(zip(evals, eval_positions(evals, last_step), strict=True)):
        err = [[100 * (point.success - point.low)], [100 * (point.high - point.success)]]
        success_ax.errorbar(
            [x], [100 * point.success], yerr=err, fmt="o", color=f"C{i + 1}", capsize=4,
            label=f"{point.label} eval: {100 * point.success:.0f}% ({point.episodes} eps, 95% CI)",
        )  # fmt: skip
    success_ax.legend(loc="upper left", fontsize=8)
    axes[-1].set_xlabel("learner updates")
    axes[0].set_title(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None, prog: str = "gsrl curve") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory of gsrl train (holds tensorboard/)")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument(
        "--eval",
        action="append",
        default=[],
        metavar="LABEL=JSON",
        help="a `gsrl eval --json` report to mark: at its checkpoint's update (update_N), else the first of several "
        "at the start (e.g. SFT=...) and the others at the end",
    )
    parser.add_argument("--title", default=None)
    parser.add_argument("--window", type=int, default=10, help="updates in the smoothed curve (default 10)")
    args = parser.parse_args(argv)
    try:
        evals = [read_eval(label, path) for label, path in map(parse_eval_arg, args.eval)]
        series = read_scalars(args.run_dir, (SUCCESS_TAG, RETURN_TAG))
        out = plot(series, evals, args.out, args.title or args.run_dir.name, max(1, args.window))
    except CurveError as exc:
        print(f"gsrl curve: {exc}", file=sys.stderr)
        return 2
    points = {tag: len(s.steps) for tag, s in series.items()}
    print(f"wrote {out} ({', '.join(f'{t}: {n} points' for t, n in points.items()) or 'evals only'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
