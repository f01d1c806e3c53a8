"""``python -m bench.plot BENCH_JSON OUT_PNG``: every row of a bench run as one bar, gsrl relative to its baseline.

One axis for figures of every unit: the bar is how gsrl compares with the baseline measured beside it, oriented
so that right is better (the ratio for rates, its inverse for times), on a log scale with 1 = as good as the
baseline. A goal becomes a tick on its bar; green bars meet theirs, red ones do not, grey ones have none.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

LOWER_IS_BETTER = {"s", "ms"}  # units of time: a smaller gsrl figure is the better one


def relative(row: dict) -> float:
    """gsrl against the baseline with right = better: the ratio for rates, 1 / ratio for times."""
    ratio = float(row["ratio"])
    return 1.0 / ratio if row["unit"] in LOWER_IS_BETTER else ratio


def goal_position(row: dict) -> float | None:
    """Where the row's goal sits on the same axis (">= 0.8" -> 0.8; "<= 1.2" on a time -> 1 / 1.2)."""
    parts = (row.get("goal") or "").split()
    if len(parts) != 2:
        return None
    bound = float(parts[1])
    return 1.0 / bound if row["unit"] in LOWER_IS_BETTER else bound


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__)
    parser.add_argument("bench_json", type=Path)
    parser.add_argument("out_png", type=Path)
    args = parser.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # only this script needs it; the bench itself does not
        raise SystemExit(f"python -m bench.plot needs matplotlib ({exc}): pip install matplotlib") from exc

    report = json.loads(args.bench_json.read_text())
    rows = [r for r in report["rows"] if not r["skipped"] and r["ratio"]]
    labels = ["\n".join(textwrap.wrap(f"{r['stage']}: {r['metric']}", 70)) for r in rows]
    values = [relative(r) for r in rows]
    colors = ["tab:grey" if r.get("goal_met") is None else "tab:green" if r["goal_met"] else "tab:red" for r in rows]

    fig, ax = plt.subplots(figsize=(12, 0.55 * len(rows) + 1.6))
    positions = list(range(len(rows)))[::-1]
    ax.barh(positions, values, color=colors, height=0.6)
    for y, row in zip(positions, rows, strict=True):
        goal = goal_position(row)
        if goal is not None:
            ax.plot([goal, goal], [y - 0.4, y + 0.4], color="black", linewidth=2)
    ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xscale("log")
    ax.set_yticks(positions, labels, fontsize=7)
    ax.set_xlabel("gsrl relative to its same-run baseline (right = better; 1 = as good; black tick = goal)")
    machine = f"{report.get('cpus')} x {report.get('cpu_model')}" + (f", {report['gpu']}" if report.get("gpu") else "")
    ax.set_title(f"gsrl bench, {report['mode']} mode: {machine}", fontsize=10)
    fig.tight_layout()
    args.out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out_png, dpi=110)
    print(f"bench.plot: wrote {args.out_png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
