"""GPU utilization per gsrl role while a run trains: ``python -m bench.gpu_roles --seconds 120 --out usage.json``.

``nvidia-smi pmon`` samples each process's SM and memory-controller use once a second; each process is put in its
role by its command line (``services.env_server`` -> env_server, ...), so a run with several roles per GPU (the
``shared`` placement) still says which role keeps a GPU busy. ``nvidia-smi --query-gpu`` gives each GPU's total and
its memory alongside. Run it beside ``gsrl train`` on the GPU host; the figures go into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

ROLE_MODULES = {
    "services.env_server": "env_server",
    "services.policy_server": "policy_server",
    "services.learner": "learner",
}


def role_of(cmdline: str) -> str:
    """The gsrl role a process runs, from its command line; ``other`` for anything else on the GPU."""
    for module, role in ROLE_MODULES.items():
        if module in cmdline:
            return role
    for command, role in (("env-server", "env_server"), ("policy-server", "policy_server"), ("learner", "learner")):
        if f"gsrl {command}" in cmdline or f"cli {command}" in cmdline:
            return role
    return "other"


def proc_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def parse_pmon(lines: Iterable[str]) -> list[tuple[int, int, float, float]]:
    """``nvidia-smi pmon -s u`` rows -> (gpu, pid, sm %, mem %); idle slots ('-') and headers are dropped."""
    rows = []
    for line in lines:
        parts = line.split()
        if not parts or parts[0].startswith("#") or len(parts) < 5:
            continue
        try:
            gpu, pid = int(parts[0]), int(parts[1])
        except ValueError:
            continue
        sm, mem = parts[3], parts[4]
        if sm == "-" and mem == "-":
            continue
        rows.append((gpu, pid, float(sm) if sm != "-" else 0.0, float(mem) if mem != "-" else 0.0))
    return rows


def summarize(
    samples: list[list[tuple[int, int, float, float]]], roles: Callable[[int], str]
) -> dict[str, dict[str, float]]:
    """Per role: mean over samples of the SM % its processes add up to (on every GPU), its peak, and processes seen."""
    per_role: dict[str, list[float]] = defaultdict(list)
    pids: dict[str, set[int]] = defaultdict(set)
    for sample in samples:
        totals: dict[str, float] = defaultdict(float)
        for _gpu, pid, sm, _mem in sample:
            role = roles(pid)
            totals[role] += sm
            pids[role].add(pid)
        for role in pids:
            per_role[role].append(totals.get(role, 0.0))
    return {
        role: {
            "sm_percent_mean": statistics.fmean(values + [0.0] * (len(samples) - len(values))),
            "sm_percent_max": max(values),
            "processes": len(pids[role]),
        }
        for role, values in sorted(per_role.items())
    }


def gpu_totals() -> list[list[str]]:
    """One reading of every GPU: index, utilization %, memory used and total (MiB)."""
    query = "index,utilization.gpu,memory.used,memory.total"
    cmd = ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"]
    text = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    return [[c.strip() for c in line.split(",")] for line in text.splitlines() if line.count(",") == 3]


def sample(seconds: float, gpus: frozenset[int] | None = None) -> dict[str, object]:
    """Sample for ``seconds``; ``gpus``: only these GPU indices (as nvidia-smi numbers them), e.g. one run's GPUs.

    Each round reads ``pmon`` and ``--query-gpu`` once; a looping ``nvidia-smi -l`` writing into a pipe buffers its
    output, and a run cut short by the deadline lost every reading (seen on the H100 host).
    """
    if shutil.which("nvidia-smi") is None:
        raise FileNotFoundError("nvidia-smi")
    samples: list[list[tuple[int, int, float, float]]] = []
    totals: list[list[str]] = []
    cmdlines: dict[int, str] = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        proc = subprocess.run(["nvidia-smi", "pmon", "-c", "1", "-s", "u"], capture_output=True, text=True, timeout=30)
        rows = [row for row in parse_pmon(proc.stdout.splitlines()) if gpus is None or row[0] in gpus]
        for _gpu, pid, _sm, _mem in rows:
            cmdlines.setdefault(pid, proc_cmdline(pid))
        samples.append(rows)
        totals += [row for row in gpu_totals() if gpus is None or int(row[0]) in gpus]
    per_gpu: dict[str, dict[str, float]] = {}
    for index in sorted({row[0] for row in totals}):
        mine = [row for row in totals if row[0] == index]
        per_gpu[index] = {
            "utilization_percent_mean": statistics.fmean(float(r[1]) for r in mine),
            "memory_used_mib_max": max(float(r[2]) for r in mine),
            "memory_total_mib": float(mine[0][3]),
        }
    return {
        "seconds": seconds,
        "samples": len(samples),
        "roles": summarize(samples, lambda pid: role_of(cmdlines.get(pid, ""))),
        "gpus": per_gpu,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_roles", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to sample (default 60)")
    parser.add_argument("--gpus", default="", help="comma-separated GPU indices to watch (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="write the summary as JSON here too")
    args = parser.parse_args(argv)
    try:
        gpus = frozenset(int(i) for i in args.gpus.split(",") if i.strip()) or None
        summary = sample(args.seconds, gpus)
    except FileNotFoundError:
        print("bench.gpu_roles: nvidia-smi not found: run this on the GPU host", file=sys.stderr)
        return 2
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
