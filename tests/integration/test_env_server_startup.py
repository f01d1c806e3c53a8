"""Env server start-up on a CPU-placed process: never silent, and no Vulkan driver needed for a state task.

On a GPU host ``gsrl train`` starts env servers of state tasks with ``CUDA_VISIBLE_DEVICES=""`` and, since they
died with signal 11 in SAPIEN's device probing there and left an empty log, with no Vulkan driver
(``gsrl.placement.without_vulkan_drivers``) and ``PYTHONFAULTHANDLER=1``. Each check runs in a fresh interpreter:
the loader's driver lists count only before a process first opens Vulkan, and these tests' own process may have.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from gsrl.placement import without_vulkan_drivers

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=env if env is not None else dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _cpu_placed_on_a_gpu_host() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
    return without_vulkan_drivers({**env, "CUDA_VISIBLE_DEVICES": ""})


def test_importing_the_env_server_loads_no_simulator() -> None:
    out = _python(
        """
        import sys
        import services.env_server.__main__
        print(sorted(m for m in ("mani_skill", "sapien", "torch", "grpc") if m in sys.modules))
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_env_server_logs_and_enables_faulthandler_before_importing_maniskill() -> None:
    """A crash while ManiSkill or SAPIEN loads (here: an import that fails) comes after a log line saying so."""
    out = _python(
        """
        import faulthandler, importlib.abc, sys

        class Refuse(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("sapien", "mani_skill"):
                    print(f"IMPORT {name} faulthandler={faulthandler.is_enabled()}", file=sys.stderr, flush=True)
                    raise ImportError(f"refused {name}")
                return None

        sys.meta_path.insert(0, Refuse())
        from services.env_server.__main__ import main
        main(["-c", "state_ppo", "env_server.num_envs=1"])
        """,
        env=_cpu_placed_on_a_gpu_host(),
    )
    assert out.returncode != 0 and "ImportError: refused" in out.stderr, out.stderr
    before = out.stderr[: out.stderr.index("IMPORT ")]
    assert "task PutCubeOnPlate-v0, 1 envs; devices: CUDA_VISIBLE_DEVICES=''" in before
    assert "VK_DRIVER_FILES='/dev/null/" in before
    assert "importing torch, ManiSkill and SAPIEN" in before
    assert "faulthandler=True" in out.stderr


def test_sapien_device_probe_survives_no_vulkan_driver() -> None:
    """What ManiSkill asks SAPIEN for every CPU-physics env (``sapien.Device("cpu")``) probes Vulkan's devices; with
    the driver lists pointing at nothing it finds none and goes on."""
    out = _python(
        """
        import sapien
        print(sapien.Device("cpu"))
        try:
            sapien.Device("cuda")
        except RuntimeError as exc:
            print("cuda:", exc)
        """,
        env=_cpu_placed_on_a_gpu_host(),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "cpu"
    assert 'failed to find device "cuda"' in out.stdout


def test_state_env_batch_runs_without_any_vulkan_driver() -> None:
    """The env server of a state task on the CPU of a GPU host: builds, resets and steps with no Vulkan driver."""
    out = _python(
        """
        import numpy as np
        from services.env_server.core import EnvBatch

        batch = EnvBatch("PutCubeOnPlate-v0", 2, max_episode_steps=4, seed=0)
        batch.reset()
        result = batch.step_chunk(np.zeros((2, 3, batch.action_dim), dtype=np.float32))
        print("steps", result.steps_executed)
        batch.close()
        """,
        env=_cpu_placed_on_a_gpu_host(),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "steps 6"
