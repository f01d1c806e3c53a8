"""Start and stop a private ``redis-server`` process (own port, own data dir).

Used by ``gsrl train`` (the one-machine run) and by the test fixtures, so both exercise a real
Redis rather than a fake. On a cluster Redis is its own pod and this module is not used.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis


def free_port() -> int:
    """A TCP port that was free a moment ago on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_block(count: int, attempts: int = 100) -> int:
    """The first of ``count`` consecutive TCP ports that were all free a moment ago (on every interface).

    For processes that derive ports from one base (env server ``i`` serves metrics on ``metrics_port + i``):
    separate ``free_port()`` calls can return neighbours, so a base from one of them may run into another.
    """
    for _ in range(attempts):
        base = free_port()
        held: list[socket.socket] = []
        try:
            for offset in range(count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(sock)
                sock.bind(("0.0.0.0", base + offset))
            return base
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports found in {attempts} attempts")


class LocalRedis:
    """A redis-server child process bound to 127.0.0.1 with its data under ``data_dir``.

    Append-only persistence is on, so a restart of the same data dir keeps accepted segments.
    """

    def __init__(self, data_dir: Path, port: int = 0, executable: str = "redis-server") -> None:
        self.data_dir = Path(data_dir).resolve()  # redis-server chdirs into it: relative paths would break
        self.port = port or free_port()
        self.executable = shutil.which(executable) or executable
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> LocalRedis:
        if shutil.which(self.executable) is None:
            raise RuntimeError(
                f"'{self.executable}' not found: install it (apt-get install redis-server) or run scripts/bootstrap.sh"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            self.executable,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--save",
            "",
            "--protected-mode",
            "yes",
            "--logfile",
            str(self.data_dir / "redis.log"),
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"redis-server exited with code {self.process.returncode}: {err.strip()}")
            try:
                client.ping()
                return self
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout_s:.0f}s")

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
