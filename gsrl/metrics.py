"""Prometheus metrics and TensorBoard scalars, named in one place.

Prometheus names follow ``gsrl_<role>_<what>_<unit>`` with bounded labels (no env ids). Each role
builds its metrics on its own registry so several roles can live in one test process. TensorBoard
scalars use RLinf's names (actor/loss, env/success_once, ...) so runs can be compared; ``gsrl.loggers``
sends them to TensorBoard and, when ``run.loggers`` asks, to wandb or swanlab.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LAG_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 16, 32)


class EnvServerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.steps = Counter("gsrl_env_steps", "Env steps executed (all envs)", registry=r)
        self.episodes = Counter("gsrl_env_episodes", "Episodes finished", ["outcome"], registry=r)
        self.chunk_seconds = Histogram(
            "gsrl_env_chunk_step_seconds",
            "Time to execute one action chunk on all envs",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.roundtrip_seconds = Histogram(
            "gsrl_env_policy_roundtrip_seconds",
            "From sending observations to receiving actions",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.episode_return = Gauge("gsrl_env_episode_return", "Return of the last finished episode", registry=r)
        self.success_rate = Gauge(
            "gsrl_env_success_ratio", "success_once over the last 100 finished episodes", registry=r
        )
        self.reconnects = Counter("gsrl_env_reconnects", "Rollout streams re-opened after a failure", registry=r)
        self.policy_version = Gauge("gsrl_env_policy_version", "Policy version of the last actions", registry=r)


class PolicyServerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("gsrl_policy_requests", "Observation batches received", ["rpc"], registry=r)
        self.invalid_requests = Counter(
            "gsrl_policy_invalid_requests", "Requests refused with INVALID_ARGUMENT", ["rpc"], registry=r
        )
        self.batch_size = Histogram(
            "gsrl_policy_inference_batch_size", "Observations per inference batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.inference_seconds = Histogram(
            "gsrl_policy_inference_seconds", "Policy forward time per batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_seconds = Histogram(
            "gsrl_policy_queue_seconds", "Time a request waited for its batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.segments = Counter("gsrl_policy_segments", "Trajectory segments appended to Redis", registry=r)
        self.transitions = Counter("gsrl_policy_transitions", "Chunk-level transitions recorded", registry=r)
        self.stream_length = Gauge("gsrl_policy_stream_length", "Unacknowledged segments in the stream", registry=r)
        self.backpressure_seconds = Counter(
            "gsrl_policy_backpressure_seconds", "Time spent waiting for room in the stream", registry=r
        )
        self.policy_version = Gauge("gsrl_policy_version", "Version of the weights being served", registry=r)
        self.weight_swaps = Counter("gsrl_policy_weight_swaps", "Weights hot-swapped", registry=r)
        self.streams = Gauge("gsrl_policy_connected_streams", "Open Rollout streams", registry=r)


class LearnerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.updates = Counter("gsrl_learner_updates", "PPO updates done", registry=r)
        self.update_seconds = Histogram(
            "gsrl_learner_update_seconds", "Time of one PPO update", buckets=LATENCY_BUCKETS, registry=r
        )
        self.wait_seconds = Histogram(
            "gsrl_learner_batch_wait_seconds",
            "Time waiting for a full batch of segments",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.broadcast_seconds = Histogram(
            "gsrl_learner_broadcast_seconds", "Time to publish new weights", buckets=LATENCY_BUCKETS, registry=r
        )
        self.policy_version = Gauge("gsrl_learner_policy_version", "Version of the latest weights", registry=r)
        self.policy_lag = Histogram(
            "gsrl_learner_policy_lag_versions",
            "Versions between a segment's policy and the learner",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.segments_consumed = Counter("gsrl_learner_segments_consumed", "Segments used in updates", registry=r)
        self.segments_dropped = Counter("gsrl_learner_segments_dropped", "Segments dropped", ["reason"], registry=r)
        self.samples_per_second = Gauge(
            "gsrl_learner_samples_per_second", "Transitions consumed per second of wall time", registry=r
        )
        self.loss = Gauge("gsrl_learner_loss", "Total PPO loss of the last update", registry=r)


class _Handler(BaseHTTPRequestHandler):
    registry: CollectorRegistry
    ready: threading.Event

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.startswith("/metrics"):
            body, status, ctype = generate_latest(self.registry), 200, CONTENT_TYPE_LATEST
        elif self.path.startswith("/healthz"):
            ok = self.ready.is_set()
            body, status, ctype = (b"ok\n" if ok else b"starting\n"), (200 if ok else 503), "text/plain"
        else:
            body, status, ctype = b"not found\n", 404, "text/plain"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (signature of the base class)
        return


class MetricsServer:
    """Serves ``/metrics`` (Prometheus) and ``/healthz`` (200 once ``ready`` is set) on one port."""

    def __init__(self, registry: CollectorRegistry, port: int, host: str = "0.0.0.0") -> None:
        self.ready = threading.Event()
        handler = type("Handler", (_Handler,), {"registry": registry, "ready": self.ready})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> MetricsServer:
        self.thread.start()
        log.info("metrics on http://%s:%d/metrics", self.httpd.server_address[0], self.port)
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class ScalarLog:
    """TensorBoard scalars under RLinf's names; a no-op when no log dir is given (non-zero ranks).

    Kept for callers of this older API; it writes through ``gsrl.loggers.TensorBoardLogger``. The learner uses
    ``gsrl.loggers.build_loggers``, where ``run.loggers`` adds wandb or swanlab next to TensorBoard.
    """

    def __init__(self, log_dir: str | Path | None) -> None:
        from gsrl.loggers import TensorBoardLogger

        self.logger = TensorBoardLogger(log_dir) if log_dir is not None else None

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        if self.logger is not None:
            self.logger.log(step, scalars)

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
