"""What the VLA probes (``bench.vla_profile``, ``bench.vla_ratio``) share on their command line: the preset, the
device and a JSON copy of the figures."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch


def add_probe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="small", help="VLA preset (tiny, small, pi05); default small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")


def probe_device(prog: str, name: str) -> torch.device | None:
    """``--device`` as a torch device; None (after saying why on stderr) when it asks for CUDA and there is none."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"{prog}: --device cuda but CUDA is not available", file=sys.stderr)
        return None
    return device


def write_figures(path: Path | None, results: list[Any]) -> None:
    """The dataclass rows as a JSON list, when ``--json`` was given."""
    if path is not None:
        path.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
