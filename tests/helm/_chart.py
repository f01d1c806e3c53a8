"""Render deploy/helm/gsrl offline with Helm's own engine (helm-python-sdk) and pick objects out of the result."""

from __future__ import annotations

import functools
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "deploy" / "helm" / "gsrl"
CI_DIR = CHART_DIR / "ci"
RELEASE = "gsrl"
NAMESPACE = "rl"

Manifest = dict[str, Any]


def ci_values(name: str) -> dict[str, Any]:
    """A values file from deploy/helm/gsrl/ci/ (``multi-gpu`` -> ci/multi-gpu-values.yaml)."""
    return yaml.safe_load((CI_DIR / f"{name}-values.yaml").read_text()) or {}


CI_NAMES = sorted(p.name.removesuffix("-values.yaml") for p in CI_DIR.glob("*-values.yaml"))


@functools.cache
def _chart() -> helm.Chart:
    return helm.Chart.load(CHART_DIR)


def render_files(values: dict[str, Any]) -> dict[str, str]:
    """Template path -> rendered text, as `helm template gsrl deploy/helm/gsrl -n rl -f values` would give."""
    return _chart().render(values, name=RELEASE, namespace=NAMESPACE)


def render(values: dict[str, Any]) -> list[Manifest]:
    """Every object the chart renders for ``values``."""
    docs = []
    for path, text in render_files(values).items():
        if path.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def validate_schema(values: dict[str, Any]) -> None:
    _chart().validate_schema(values)


def default_values() -> dict[str, Any]:
    return _chart().values


def find(docs: list[Manifest], kind: str, name: str) -> Manifest:
    """The object of ``kind`` named ``<release>-<name>``."""
    full = f"{RELEASE}-{name}"
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == full]
    assert len(matches) == 1, f"expected one {kind} {full}, found {len(matches)}"
    return matches[0]


def kinds(docs: list[Manifest]) -> set[str]:
    return {d["kind"] for d in docs}


def container(workload: Manifest) -> dict[str, Any]:
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return only


def env_of(ctr: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in ctr.get("env", [])}


def run_config_text(docs: list[Manifest]) -> str:
    return find(docs, "ConfigMap", "run")["data"]["run.yaml"]


def expand_k8s(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in args and env values: known names are replaced, anything else kept."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def exec_args(ctr: dict[str, Any], env: dict[str, str], tmp: Path) -> list[str]:
    """The argv the container's process really ends up exec'ing, with `gsrl`/`torchrun` replaced by recorders.

    The args are expanded as the kubelet would, then run through the image's shell (the env server and learner
    wrap their command in `sh -c` to compute a seed or a port), so what the test sees includes the shell's work.
    """
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("gsrl", "torchrun"):
        recorder = bin_dir / tool
        recorder.write_text(f'#!/bin/sh\nprintf "%s\\n" {tool} "$@"\n')
        recorder.chmod(0o755)
    args = [expand_k8s(a, env) for a in ctr.get("command", []) + ctr["args"]]
    run_env = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin", **env}
    out = subprocess.run(args, env=run_env, capture_output=True, text=True, check=True, timeout=10)
    return out.stdout.splitlines()


def gpu_counts(ctr: dict[str, Any], resource: str = "nvidia.com/gpu") -> tuple[Any, Any]:
    res = ctr.get("resources", {})
    return res.get("requests", {}).get(resource), res.get("limits", {}).get(resource)


def pod_specs(docs: list[Manifest]) -> list[tuple[Manifest, dict[str, Any]]]:
    return [(d, d["spec"]["template"]["spec"]) for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
