"""``python -m bench [--smoke | --full] [--out DIR] [--only STAGE ...]``: one table, also in bench.json and bench.md."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import platform
import time
import traceback
from pathlib import Path

from bench.common import SIZES, Row, Sizes, skipped_row

# In the order of the list (docs/benchmarks.md): env server (physics, then Gaussian-splat rendered), whole
# loop, policy server, transport (Redis, then the tensor codec), weight broadcast, env scaling.
STAGES = (
    "env_server",
    "gs_render",
    "pipeline",
    "whole_loop",
    "policy_server",
    "vla_policy",
    "transport",
    "codec",
    "weights",
    "env_scaling",
    "dataset_decode",
)
TITLES = {
    "env_server": "env server",
    "gs_render": "env server",
    "pipeline": "pipelined env stages",
    "whole_loop": "whole loop",
    "policy_server": "policy server",
    "vla_policy": "VLA policy server",
    "transport": "trajectory transport",
    "codec": "tensor codec",
    "weights": "weight broadcast",
    "env_scaling": "env scaling",
    "dataset_decode": "dataset decode",
}


def run_stage(name: str, sizes: Sizes) -> list[Row]:
    """A stage that fails becomes a skipped row naming the error, so one broken stage does not hide the others."""
    try:
        stage = importlib.import_module(f"bench.{name}")
        return stage.run(sizes)
    except Exception as exc:  # noqa: BLE001 - reported in the table, with the traceback on stderr
        traceback.print_exc()
        return [skipped_row(TITLES[name], f"{type(exc).__name__}: {exc}")]


def _fmt(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if value == 0 or 0.01 <= abs(value) < 1e6:
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{value:.2e}"


def table(rows: list[Row]) -> str:
    """A markdown table: readable in a terminal and in bench.md alike."""
    header = ["stage", "metric", "gsrl", "baseline", "ratio", "goal", "met", "unit", "note"]
    lines = []
    for r in rows:
        met = {True: "yes", False: "no", None: ""}[r.goal_met]
        if r.skipped:
            lines.append([r.stage, f"skipped: {r.skipped}", "", "", "", r.goal, "", r.unit, r.note])
        else:
            lines.append(
                [r.stage, r.metric, _fmt(r.gsrl), _fmt(r.baseline), _fmt(r.ratio), r.goal, met, r.unit, r.note]
            )
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines, strict=False)]

    def fmt_line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([fmt_line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt_line, lines)])


def machine() -> dict[str, object]:
    """What ran it, for the docs' tables: a figure means little without the CPU model and the GPU."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except Exception:  # noqa: BLE001 - a broken CUDA install must not stop the table
        pass
    return {"host": platform.node(), "cpus": os.cpu_count(), "cpu_model": cpu, "gpu": gpu}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="seconds-long run for CI (figures are not meaningful)")
    mode.add_argument("--full", action="store_true", help="bigger sizes and longer timings, for a GPU machine")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="where bench.json and bench.md go")
    parser.add_argument("--only", nargs="+", choices=STAGES, help="run only these stages")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    sizes = SIZES["smoke" if args.smoke else "full" if args.full else "default"]

    started = time.time()
    rows: list[Row] = []
    for name in args.only or STAGES:
        print(f"bench: {TITLES[name]} ...", flush=True)
        rows += run_stage(name, sizes)
    text = table(rows)
    print(text)

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "mode": sizes.name,
        "started_unix": started,
        "seconds": time.time() - started,
        **machine(),
        "python": platform.python_version(),
    }
    (args.out / "bench.json").write_text(json.dumps({**meta, "rows": [r.to_json() for r in rows]}, indent=2) + "\n")
    (args.out / "bench.md").write_text(
        f"# gsrl bench ({sizes.name}, {meta['seconds']:.0f} s)\n\n"
        f"{meta['cpus']} x {meta['cpu_model']}, GPU: {meta['gpu'] or 'none'}.\n\n"
        "ratio = gsrl / baseline, both measured in this run (medians of interleaved repeats).\n\n" + text + "\n"
    )
    print(f"bench: wrote {args.out / 'bench.json'} and {args.out / 'bench.md'} in {meta['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
