"""Redis connections that survive a Redis restart: one way to connect, one way to retry.

Every role talks to Redis through ``connect`` and wraps each operation that must not be lost in
``retry``: a refused or dropped connection (Redis restarting, a pod being rescheduled) is retried
with exponential back-off instead of crashing the role. A wrong or missing password is not a
connection problem to wait out: it is raised at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis

log = logging.getLogger(__name__)
T = TypeVar("T")

# What a Redis restart looks like to a client: the socket is refused, reset or times out, or the server
# answers LOADING while it replays its append-only file.
TRANSIENT = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError)


def connect(url: str, password: str | None = None) -> redis.Redis:
    """A client for ``url``; a password in the URL wins over ``password`` (from ``redis.password``)."""
    return redis.Redis.from_url(
        url,
        password=password or None,
        socket_connect_timeout=5.0,
        socket_keepalive=True,
        health_check_interval=15,
    )


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT) and not isinstance(exc, redis.exceptions.AuthenticationError)


def retry(
    operation: Callable[[], T],
    what: str,
    should_stop: Callable[[], bool] = lambda: False,
    give_up_s: float = float("inf"),
    first_backoff_s: float = 0.1,
    max_backoff_s: float = 2.0,
) -> T:
    """Run ``operation`` until it succeeds; transient Redis errors are retried with back-off.

    Re-raises the last error when ``should_stop()`` turns true or after ``give_up_s`` seconds of failures,
    so a stopping role does not hang on a Redis that never comes back.
    """
    backoff = first_backoff_s
    failing_since: float | None = None
    while True:
        try:
            result = operation()
        except Exception as exc:
            if not is_transient(exc):
                raise
            now = time.monotonic()
            if failing_since is None:
                failing_since = now
                log.warning("redis unavailable during %s (%s); retrying", what, exc)
            if should_stop() or now - failing_since >= give_up_s:
                raise
            time.sleep(backoff)
            backoff = min(backoff * 2, max_backoff_s)
            continue
        if failing_since is not None:
            log.info("redis back after %.1fs (%s)", time.monotonic() - failing_since, what)
        return result


def configure_local(client: redis.Redis, appendfsync: str | None = None, password: str | None = None) -> None:
    """Apply run settings to a redis-server this process started (``gsrl train``, tests).

    ``appendfsync always`` makes an acknowledged XADD survive even a crash of Redis (the default
    ``everysec`` may lose the last second on a crash, never on a clean restart). The password is set last:
    after it, only clients that know it get in.
    """
    if appendfsync:
        client.config_set("appendfsync", appendfsync)
    if password:
        client.config_set("requirepass", password)
