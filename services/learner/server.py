"""The learner's edges: DeepSpeed ranks, the Redis consumer group, checkpoints and the weight broadcast.

Every rank reads its own segments (one consumer of the group per rank), drops those past
``max_policy_lag``, and runs the same number of PPO steps so DeepSpeed's gradient all-reduce
lines up. Entries are acknowledged only after the update that used them. Rank 0 publishes the
new weights to the policy servers, writes TensorBoard scalars and the progress record.

A killed rank restarts from its last complete checkpoint with a policy version that never goes back
(policy servers ignore versions they already hold), re-reads the entries it had been delivered but not
acknowledged, and waits out Redis restarts.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

import redis
import torch
import torch.distributed as dist

from gsrl.config import Config
from gsrl.env_spec import probe_env_spec
from gsrl.loggers import MultiLogger, build_loggers
from gsrl.metrics import LearnerMetrics, MetricsServer
from gsrl.policy import build_configured_policy
from gsrl.redis_conn import connect, is_transient, retry
from gsrl.rl.reward_trap import config_reward_trap_warning
from gsrl.stream import SegmentConsumer, StreamEntry, StreamKeys, read_counter
from gsrl.weights import WeightPublisher
from services.learner.checkpoint import resume_latest, save_checkpoint
from services.learner.core import PPOLearnerCore
from services.learner.data import EpisodeTotals, policy_lag, split_by_lag
from services.learner.engine import DeepSpeedEngine

log = logging.getLogger(__name__)


def learner_stats_key(prefix: str) -> str:
    return f"{prefix}:stats:learner"


class Learner:
    """One DeepSpeed rank of the learner. ``run()`` returns when the run's limits are reached or on stop."""

    def __init__(self, config: Config, redis_url: str, run_dir: str | Path, rank: int, world_size: int) -> None:
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.run_dir = Path(run_dir)
        self.stop_event = threading.Event()
        self.client = connect(redis_url, config.redis.password)
        self.keys = StreamKeys(config.redis.key_prefix, config.redis.stream)
        self.metrics = LearnerMetrics()
        lc = config.learner
        use_cuda = lc.device == "cuda" or (lc.device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")

        torch.manual_seed(config.run.seed)  # same init on every rank and on the policy servers
        spec = probe_env_spec(config.task)
        trap = config_reward_trap_warning(config, spec.shaping_ceiling)
        if trap is not None and rank == 0:
            log.warning("%s", trap)
        policy = build_configured_policy(config.policy, spec.observation_spec, spec.action_dim)  # a resume still wins
        self.engine = DeepSpeedEngine(policy.to(self.device), config.algo, zero_stage=lc.zero_stage, bf16=lc.bf16)
        generator = torch.Generator().manual_seed(config.run.seed + rank)
        self.core = PPOLearnerCore(
            self.engine.module,
            self.engine,
            config.algo,
            generator=generator,
            all_reduce_sum=self._all_reduce_sum if world_size > 1 else None,
        )
        self.consumer = SegmentConsumer(
            self.client,
            self.keys,
            config.redis.group,
            f"rank-{rank}",
            claim_idle_ms=int(lc.claim_idle_s * 1000),
            should_stop=self.stop_event.is_set,
        )
        self.updates = 0
        self.version = 0
        # Newest policy version seen in any consumed segment: proves the policy servers swap weights.
        self.newest_segment_version = 0
        meta = resume_latest(self.run_dir, self.engine) if lc.resume else None
        if meta is not None:
            self.updates, self.version = meta.updates, meta.policy_version
        # A rank killed after publishing updates it had not checkpointed yet resumes behind the version the
        # policy servers hold; they ignore versions not newer than theirs, so continue numbering from there.
        published = int(retry(lambda: self.client.get(self.keys.policy_version), "GET policy_version") or 0)
        if published > self.version:
            log.info("policy version continues from the published v%d (checkpoint: v%d)", published, self.version)
            self.version = published
        self.publisher: WeightPublisher | None = None
        # Rank 0 alone writes scalars (TensorBoard, wandb, swanlab as run.loggers says); the others log nowhere.
        self.scalars = build_loggers(config.run, self.run_dir, config.to_dict()) if rank == 0 else MultiLogger()
        if rank == 0:
            self.publisher = WeightPublisher(
                self.client,
                key_prefix=config.redis.key_prefix,
                advertise_host=lc.advertise_host,
                port=lc.broadcast_port,
                backend=lc.broadcast_backend
                if lc.broadcast_backend != "auto"
                else ("nccl" if self.device.type == "cuda" else "gloo"),
                device=self.device,
                timeout_s=lc.broadcast_timeout_s,
                snapshot_interval_s=lc.snapshot_interval_s,
            )

    # ---------------------------------------------------------------- main loop
    def run(self) -> None:
        cfg = self.config
        started = time.monotonic()
        if self.publisher is not None:
            self._publish()  # policy servers serve exactly the weights the learner starts from
        samples_since, window_start = 0, time.monotonic()
        while True:
            limit_hit = (cfg.run.max_updates and self.updates >= cfg.run.max_updates) or (
                cfg.run.duration_s and time.monotonic() - started >= cfg.run.duration_s
            )
            if self._any_rank(bool(limit_hit) or self.stop_event.is_set()):
                break
            entries, dropped = self._collect_batch()
            if self._any_rank(entries is None):  # stopped while waiting: leave the partial batch pending
                break
            update_started = time.monotonic()
            segments = [e.segment for e in entries]
            self.newest_segment_version = max(
                [self.newest_segment_version, *(int(s.policy_versions.max()) for s in segments)]
            )
            stats = self.core.update(segments, critic_only=self.updates < cfg.algo.critic_warmup_updates)
            self.updates += 1
            self.version += 1
            self.consumer.acknowledge([e.entry_id for e in entries])
            update_s = time.monotonic() - update_started
            samples = sum(s.length for s in segments)
            samples_since += samples
            self.metrics.updates.inc()
            self.metrics.update_seconds.observe(update_s)
            self.metrics.segments_consumed.inc(len(entries))
            self.metrics.policy_version.set(self.version)
            self.metrics.loss.set(stats.get("actor/loss", float("nan")))
            totals = self._sum_over_ranks(EpisodeTotals.of(segments).as_list() + [float(samples), float(dropped)])
            if self.publisher is not None:
                broadcast_s = self._publish()
                elapsed = time.monotonic() - window_start
                throughput = {"throughput/samples_per_s": samples_since / elapsed if elapsed > 0 else 0.0}
                samples_since, window_start = 0, time.monotonic()
                self.metrics.samples_per_second.set(throughput["throughput/samples_per_s"])
                episodes = EpisodeTotals(*totals[:4]).means()
                scalars = {
                    **stats,
                    **episodes,
                    **throughput,
                    "time/update_s": update_s,
                    "time/broadcast_s": broadcast_s,
                    "rollout/segments_dropped": totals[5],
                    "rollout/policy_version": float(self.version),
                }
                self.scalars.log(self.updates, scalars)
                self._write_progress(scalars, started)
            if cfg.learner.checkpoint_every and self.updates % cfg.learner.checkpoint_every == 0:
                save_checkpoint(
                    self.run_dir, self.engine, self.updates, self.version, self.rank, cfg.learner.keep_checkpoints
                )
        if self.updates:  # always at the end, so a stopped run can resume where it was
            save_checkpoint(
                self.run_dir, self.engine, self.updates, self.version, self.rank, cfg.learner.keep_checkpoints
            )
        log.info("rank %d: stopped after %d updates (policy version %d)", self.rank, self.updates, self.version)

    def _collect_batch(self) -> tuple[list[StreamEntry] | None, int]:
        """Read until ``segments_per_update`` fresh segments; stale ones are acknowledged as dropped at once."""
        want = self.config.learner.segments_per_update
        batch: list[StreamEntry] = []
        dropped = 0
        wait_started = time.monotonic()
        last_note = wait_started
        while len(batch) < want:
            if self.stop_event.is_set():
                return None, dropped
            entries = self.consumer.read(want - len(batch), self.config.learner.read_block_ms)
            fresh, stale = split_by_lag([e.segment for e in entries], self.version, self.config.algo.max_policy_lag)
            for i in fresh:
                self.metrics.policy_lag.observe(policy_lag(entries[i].segment, self.version))
            if stale:
                self.consumer.acknowledge([], dropped=[entries[i].entry_id for i in stale])
                self.metrics.segments_dropped.labels("policy_lag").inc(len(stale))
                dropped += len(stale)
            batch.extend(entries[i] for i in fresh)
            if not entries and time.monotonic() - last_note > 30:
                log.info("rank %d: waiting for segments (%d/%d)", self.rank, len(batch), want)
                last_note = time.monotonic()
        self.metrics.wait_seconds.observe(time.monotonic() - wait_started)
        return batch, dropped

    # ---------------------------------------------------------------- helpers
    def _any_rank(self, flag: bool) -> bool:
        """True if ``flag`` is True on any rank: all ranks take the same branch, so collectives stay aligned."""
        if self.world_size == 1:
            return flag
        tensor = torch.tensor([1.0 if flag else 0.0], device=self._collective_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item() > 0)

    def _sum_over_ranks(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(tensor)
        return tensor.cpu().tolist()

    def _all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (observation statistics, KL): keeps every rank's copy of the policy identical."""
        device = self._collective_device()
        moved = tensor.to(device)
        dist.all_reduce(moved)
        return moved.to(tensor.device)

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def _publish(self) -> float:
        assert self.publisher is not None
        started = time.monotonic()
        stats = self.publisher.publish(self._serving_state_dict(), self.version)
        elapsed = time.monotonic() - started
        self.metrics.broadcast_seconds.observe(elapsed)
        self._best_effort(lambda: self.client.set(self.keys.policy_version, self.version), "SET policy_version")
        log.debug("published version %d to %d policy servers", self.version, stats.num_subscribers)
        return elapsed

    def _serving_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights as the policy servers hold them (float32): a bf16 learner must not change their layout."""
        return {
            k: v.detach().float() if v.is_floating_point() else v.detach()
            for k, v in self.engine.module.state_dict().items()
        }

    def _write_progress(self, scalars: dict[str, float], started: float) -> None:
        try:
            consumed = read_counter(self.client, self.keys.consumed)
            dropped = read_counter(self.client, self.keys.dropped)
        except redis.RedisError:
            consumed = dropped = -1
        record = {
            "updates": self.updates,
            "policy_version": self.version,
            "elapsed_s": time.monotonic() - started,
            "segments_consumed": consumed,
            "segments_dropped": dropped,
            "newest_segment_policy_version": self.newest_segment_version,
            "updated_unix": time.time(),
        }
        for name in (
            "env/success_once",
            "env/return",
            "env/episode_len",
            "actor/loss",
            "rollout/returns_mean",
            "throughput/samples_per_s",
        ):
            if name in scalars:
                record[name] = scalars[name]
        self._best_effort(
            lambda: self.client.hset(learner_stats_key(self.config.redis.key_prefix), mapping=record), "progress"
        )

    def _best_effort(self, operation, what: str) -> None:
        """Progress and version records: retried for a while, then skipped (the next update writes them again)."""
        try:
            retry(operation, what, self.stop_event.is_set, give_up_s=10.0)
        except redis.RedisError as exc:
            if not is_transient(exc):
                raise
            log.warning("rank %d: %s not written: %s", self.rank, what, exc)

    def close(self) -> None:
        self.scalars.close()
        if self.publisher is not None:
            try:  # the newest weights for policy servers that start later, if the interval skipped them
                self.publisher.snapshot_latest(self._serving_state_dict(), self.version)
            except (redis.RedisError, RuntimeError) as exc:
                log.warning("rank %d: last weight snapshot not written: %s", self.rank, exc)
            self.publisher.close()
        self.client.close()


def serve(config: Config, redis_url: str, run_dir: str | Path, rank: int, world_size: int) -> None:
    """Entry body of one learner rank (DeepSpeed's process group must already be initialized)."""
    learner = Learner(config, redis_url, run_dir, rank, world_size)
    metrics_server = None
    if config.learner.metrics_port:
        metrics_server = MetricsServer(learner.metrics.registry, config.learner.metrics_port + rank).start()
        metrics_server.ready.set()

    def _shutdown(signum: int, _frame: object) -> None:
        log.info("rank %d: signal %d, finishing the current update", rank, signum)
        learner.stop_event.set()

    signal.signal(signal.SIGTERM, _shutdown)
    signal.signal(signal.SIGINT, _shutdown)
    try:
        learner.run()
    finally:
        learner.close()
        if metrics_server:
            metrics_server.stop()
