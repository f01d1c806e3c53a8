"""A pool of ``bench._env_worker`` processes that step over one shared window on command.

Both the env-scaling row and the whole-loop baseline need several env processes stepping at the same time (that
is what scaling means, and what env servers do). Starting them costs seconds each (ManiSkill, torch imports), so a
pool is started once and any prefix of it is asked to run for a window, as often as the stage needs.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 180.0  # 4 workers importing ManiSkill on 2 busy cores take a while


class WorkerError(RuntimeError):
    """A worker died or did not answer; the message carries the tail of its stderr."""


class EnvWorkers:
    """``count`` env processes of ``config`` + ``overrides``, each with OMP_NUM_THREADS=1 and its own seed."""

    def __init__(self, count: int, config: str, overrides: tuple[str, ...] = (), policy: bool = False) -> None:
        self._logs = tempfile.TemporaryDirectory(prefix="gsrl-bench-workers-")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self._procs: list[subprocess.Popen[str]] = []
        self._lines: list[queue.Queue[str | None]] = []
        try:
            for index in range(count):
                args = [sys.executable, "-m", "bench._env_worker", "--config", config, "--seed", str(1000 * index)]
                args += ["--policy"] * policy + list(overrides)
                stderr = open(Path(self._logs.name) / f"{index}.log", "w")  # noqa: SIM115 - the child writes it
                proc = subprocess.Popen(
                    args, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True
                )
                stderr.close()
                self._procs.append(proc)
                self._lines.append(self._reader(proc))
            for index in range(count):
                self._answer(index, START_TIMEOUT_S)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _reader(proc: subprocess.Popen[str]) -> queue.Queue[str | None]:
        """A thread per worker turns its stdout into a queue, so every wait can have a timeout."""
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        return lines

    def _answer(self, index: int, timeout_s: float) -> dict:
        try:
            line = self._lines[index].get(timeout=timeout_s)
        except queue.Empty:
            line = None
        if line is None:
            log = (Path(self._logs.name) / f"{index}.log").read_text(errors="replace")[-2000:]
            raise WorkerError(f"env worker {index} gave no answer (exit code {self._procs[index].poll()}):\n{log}")
        return json.loads(line)

    def run(self, count: int, window_s: float) -> list[dict]:
        """Workers 0..count-1 step for ``window_s`` together; their ``{"steps", "seconds"}`` answers."""
        for proc in self._procs[:count]:
            assert proc.stdin is not None
            proc.stdin.write(f"run {window_s}\n")
            proc.stdin.flush()
        return [self._answer(index, window_s + 60.0) for index in range(count)]

    def close(self) -> None:
        """Ask every worker to quit, then kill the ones that do not (only the processes this pool started)."""
        for proc in self._procs:
            try:
                if proc.stdin is not None:
                    proc.stdin.write("quit\n")
                    proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
        for proc in self._procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs = []
        self._logs.cleanup()

    def __enter__(self) -> EnvWorkers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def total_rate(answers: list[dict]) -> float:
    """Steps/s of all workers together: each worker's own rate, summed (their windows coincide)."""
    return sum(a["steps"] / a["seconds"] for a in answers)
