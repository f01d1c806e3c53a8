"""docker/Dockerfile, parsed (no Docker engine here): CUDA-capable base, generated gRPC code, non-root user, an
entrypoint that selects the role, SAPIEN's PhysX GPU library baked into GPU images only."""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
from pathlib import Path

import pytest
from _chart import REPO

pytestmark = pytest.mark.integration

DOCKER = REPO / "docker"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    result, pending = [], ""
    for raw in (DOCKER / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, rest = line.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def of(keyword: str) -> list[str]:
    return [rest for kw, rest in instructions() if kw == keyword]


def test_base_image_is_a_build_argument_so_a_cuda_base_can_be_chosen() -> None:
    steps = instructions()
    (base,) = of("FROM")
    assert base == "${BASE}"
    first_from = next(i for i, (kw, _) in enumerate(steps) if kw == "FROM")
    assert any(kw == "ARG" and rest.startswith("BASE=") for kw, rest in steps[:first_from])
    text = (DOCKER / "Dockerfile").read_text()
    assert "nvidia/cuda:" in text and "python3.11" in text, "the CUDA recipe is documented and installs Python 3.11"


def test_generated_grpc_code_is_built_from_proto_in_the_image() -> None:
    runs = of("RUN")
    protogen = next(i for i, r in enumerate(runs) if "python -m gsrl.protogen" in r)
    assert "pip install" in runs[protogen] and "gsrl.v1" in runs[protogen], "generated, installed, then imported"
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    assert "gsrl/v1/*_pb2*.py" in ignore, "the host's generated files must not shadow the image's"


def test_runs_as_a_numeric_non_root_user() -> None:
    users = of("USER")
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) > 0


def test_physx_gpu_library_is_fetched_as_the_runtime_user_and_only_for_gpu_images() -> None:
    steps = instructions()
    last_user = max(i for i, (kw, _) in enumerate(steps) if kw == "USER")
    (fetch,) = [i for i, (kw, rest) in enumerate(steps) if kw == "RUN" and "fetch_physx_gpu.py" in rest]
    assert fetch > last_user, "run as the runtime user so the library lands in its HOME"
    assert "CUDA_VERSION" in steps[fetch][1] and "PHYSX_GPU" in steps[fetch][1], "CPU images skip it"
    assert "enable_gpu" in (DOCKER / "fetch_physx_gpu.py").read_text()


def test_entrypoint_is_exec_form_and_every_copied_path_is_in_the_build_context() -> None:
    (entrypoint,) = of("ENTRYPOINT")
    argv = json.loads(entrypoint)
    assert argv[-1] == "/usr/local/bin/gsrl-entrypoint"
    ignore = [p for p in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    for copy in of("COPY"):
        *sources, _dest = copy.split()
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            assert not any(fnmatch.fnmatch(source, p) for p in ignore), f"COPY {source}: excluded by the ignore file"
    assert (DOCKER / ".dockerignore").read_text().splitlines()[2:] == (
        DOCKER / "Dockerfile.dockerignore"
    ).read_text().splitlines()[2:], "the two ignore lists differ"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["env-server", "-c", "/etc/gsrl/run.yaml"], ["gsrl", "env-server", "-c", "/etc/gsrl/run.yaml"]),
        (["policy-server"], ["gsrl", "policy-server"]),
        (["learner", "--run-dir", "/runs/x"], ["gsrl", "learner", "--run-dir", "/runs/x"]),
        (["torchrun", "--nnodes=2"], ["torchrun", "--nnodes=2"]),
        (["gsrl", "--help"], ["gsrl", "--help"]),
    ],
)
def test_entrypoint_runs_a_role_name_as_a_gsrl_command(argv: list[str], expected: list[str], tmp_path: Path) -> None:
    for tool in ("gsrl", "torchrun"):
        recorder = tmp_path / tool
        recorder.write_text(f'#!/bin/sh\nprintf "%s\\n" {tool} "$@"\n')
        recorder.chmod(0o755)
    env = {"PATH": f"{tmp_path}{os.pathsep}/usr/bin:/bin"}
    out = subprocess.run(["sh", str(DOCKER / "entrypoint.sh"), *argv], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == expected
