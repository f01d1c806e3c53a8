"""Row 5: seconds to deliver a new weight version to every policy server, against one plain broadcast.

gsrl: ``WeightPublisher.publish(state_dict, version)`` from this process (learner rank 0) to N
``WeightSubscriber`` processes (``bench._weights_peer``), timed from the call until the last subscriber's
``on_weights`` holds the tensors. The state dict is float32, laid out like a model (a square matrix and three
vectors per layer), published the way the learner does it (default 64 MiB buckets, a Redis snapshot on every
publish). Baseline: one ``broadcast`` of one flat uint8 tensor of the same byte count, from this process to the same
N processes, in a process group of the same size built the same way (gloo on CPU; NCCL in ``--full`` when there is
a GPU for the publisher and one per subscriber), timed until the last receiver holds it. The two alternate and the
medians are reported, with the payload's GB/s of each in the first row's note. A second figure is ``publish()``'s own
wall time, which the learner waits out every update. The Redis snapshot is written in the background (the learner's
setting); after every publish the bench waits for it (untimed) before the next measurement, so it never competes with
a timed transfer, and a third figure reports how long it took on its own thread.

Over NCCL each peer holds two communicators on its GPU (the subscriber's group and the baseline group), and only one
may have work in flight at a time: a NCCL kernel spins until its peers join, and anything that synchronizes the device
(``torch.cuda.synchronize``, ``cudaFree``, some allocations) then waits for it. A peer that posted its next baseline
receive while a publish was under way, and synchronized the device in ``on_weights``, waited on a broadcast that rank
0 only starts after that publish's acknowledgement: the stage hung on 2 x H100. So over NCCL a peer posts each baseline
receive only when the bench says ``go`` (and says it is armed just before); over gloo it posts them ahead, as before.
Every wait on a peer has a timeout and names its phase, and each phase prints a progress line.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

import redis
import torch
import torch.distributed as dist

from bench.common import Row, Sizes
from gsrl.redis_server import LocalRedis
from gsrl.weight_group import _broadcast, _new_process_group, close_process_group
from gsrl.weights import WeightPublisher

REPO = Path(__file__).resolve().parent.parent
STAGE = "weight broadcast"
TIMEOUT_S = 300.0  # group construction waits for peers that are still importing torch on a busy box
STEP_TIMEOUT_S = 120.0  # each measured transfer, acknowledgement and snapshot (1 GiB over NCCL takes well under 1 s)


def say(message: str) -> None:
    """A progress line: a stage that stalls shows where."""
    print(f"bench: weights: {message}", flush=True)


def make_state(mib: int, device: str | torch.device) -> dict[str, torch.Tensor]:
    """About ``mib`` MiB of float32 weights: per layer a square matrix (4 MiB from 16 MiB on) and three vectors."""
    hidden = 1024 if mib >= 16 else 256
    layers = max(1, (mib << 20) // (hidden * hidden * 4))
    state: dict[str, torch.Tensor] = {}
    for i in range(layers):
        state[f"layers.{i}.weight"] = torch.full((hidden, hidden), float(i), device=device)
        for name in ("bias", "norm.weight", "norm.bias"):
            state[f"layers.{i}.{name}"] = torch.full((hidden,), float(i), device=device)
    return state


def state_nbytes(mib: int) -> int:
    return sum(t.numel() * t.element_size() for t in make_state(mib, "meta").values())


def ack_key(prefix: str, kind: str) -> str:
    return f"{prefix}:bench:acks:{kind}"


def ready_key(prefix: str) -> str:
    return f"{prefix}:bench:ready"


def stop_key(prefix: str, peer_id: str) -> str:
    return f"{prefix}:bench:stop:{peer_id}"


def go_key(prefix: str, peer_id: str) -> str:
    return f"{prefix}:bench:go:{peer_id}"


def serialized(backend: str) -> bool:
    """Whether a peer posts each baseline receive only on ``go``: over NCCL, so two communicators never overlap."""
    return backend == "nccl"


def close_group(pg: dist.ProcessGroup, backend: str) -> None:
    """``abort`` for NCCL, ``shutdown`` for gloo, as ``gsrl.weight_group._Group.close`` does and for its reason.

    NCCL's ``shutdown`` finalizes the communicator, which waits on the other ranks; the bench and its peers leave on
    their own schedules (and a peer may already be killed), so a shutdown could hang the stage at its very end.
    """
    error = close_process_group(pg, abort=backend == "nccl")
    if error is not None:
        print(f"bench: weights: closing the baseline group: {error}", file=sys.stderr, flush=True)


def _devices(sizes: Sizes) -> tuple[str, list[str], str]:
    """Backend, devices (publisher first) and why: NCCL needs one GPU per rank, so a 1-GPU host falls back to gloo."""
    subscribers = sizes.weight_subscribers
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if sizes.name == "full" and gpus >= 2:
        subscribers = min(subscribers, gpus - 1)
        return "nccl", [f"cuda:{i}" for i in range(subscribers + 1)], f"NCCL, {subscribers + 1} GPUs"
    why = "gloo on CPU" + (f" ({gpus} GPU: NCCL needs one per rank)" if sizes.name == "full" and gpus else "")
    return "gloo", ["cpu"] * (subscribers + 1), why


class _Peers:
    """The subscriber processes, their acknowledgements in Redis, and their logs for error messages."""

    def __init__(self, client: redis.Redis, prefix: str, procs: list[subprocess.Popen], logs: Path) -> None:
        self.client, self.prefix, self.procs, self.logs = client, prefix, procs, logs

    def wait(self, kind: str, phase: str, timeout_s: float | None = None) -> list[dict]:
        """One acknowledgement (or ready id) from every peer; raises, naming ``phase``, if one died or is silent."""
        timeout_s = STEP_TIMEOUT_S if timeout_s is None else timeout_s
        key = ready_key(self.prefix) if kind == "ready" else ack_key(self.prefix, kind)
        got: list[dict] = []
        deadline = time.monotonic() + timeout_s
        while len(got) < len(self.procs):
            item = self.client.blpop([key], timeout=1)
            if item is not None:
                got.append(json.loads(item[1]) if kind != "ready" else {"id": item[1].decode()})
                continue
            dead = [i for i, p in enumerate(self.procs) if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                heard = {a.get("id") for a in got}
                silent = [i for i in range(len(self.procs)) if f"peer{i}" not in heard]
                index = dead[0] if dead else silent[0]
                code = self.procs[index].returncode
                what = f"exited with code {code}" if dead else f"sent nothing in {timeout_s:.0f} s"
                error = RuntimeError if dead else TimeoutError
                raise error(f"{phase}: weights peer {index} {what} (waiting for its {kind!r}); {self.tail(index)}")
        return got

    def tail(self, index: int) -> str:
        """Print a peer's log tail (for the traceback) and return its last line (for the table)."""
        text = (self.logs / f"{index}.log").read_text(errors="replace")
        print(f"bench: weights: peer {index} log (tail):\n{text[-2000:]}", file=sys.stderr, flush=True)
        lines = [line for line in text.splitlines() if line.strip()]
        return f"its last log line: {lines[-1][:200]}" if lines else "its log is empty"

    def go(self, round_index: int) -> None:
        for i in range(len(self.procs)):
            self.client.rpush(go_key(self.prefix, f"peer{i}"), round_index)

    def stop(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc.poll() is None:
                self.client.rpush(stop_key(self.prefix, f"peer{i}"), 1)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()  # still blocked in a broadcast that will never come: this bench failed midway
                proc.wait()


def run(sizes: Sizes) -> list[Row]:
    backend, devices, why = _devices(sizes)
    if backend == "nccl":
        # A timed-out NCCL collective must raise, not tear the process down (as the learner's entry point sets it).
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
        torch.cuda.set_device(devices[0])  # the publisher's GPU; each peer sets its own
    with (
        tempfile.TemporaryDirectory(prefix="gsrl-bench-weights-") as tmp,
        LocalRedis(Path(tmp) / "redis") as server,
    ):
        client = redis.Redis(port=server.port)
        try:
            return _run(client, server.port, Path(tmp), sizes, backend, devices, why)
        finally:
            client.close()


def _run(
    client: redis.Redis, redis_port: int, tmp: Path, sizes: Sizes, backend: str, devices: list[str], why: str
) -> list[Row]:
    prefix = f"bench{uuid.uuid4().hex[:6]}"
    n = len(devices) - 1
    # At least 5 pairs: on a shared 2-core box single transfers vary by 2x, and a median of 3 moved the ratio a lot.
    pairs = max(sizes.repeats, 5)
    rounds = 1 + pairs  # warm-up + timed, for the baseline group the peers join
    nbytes = state_nbytes(sizes.weights_mib)
    say(f"{sizes.weights_mib} MiB to {n} peer(s) over {why}: devices {devices}, {pairs} timed pairs")
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=TIMEOUT_S))
    publisher = WeightPublisher(
        client,
        key_prefix=prefix,
        bind_host="127.0.0.1",
        advertise_host="127.0.0.1",
        backend=backend,
        device=devices[0],
        timeout_s=STEP_TIMEOUT_S,  # the peers are registered and idle before the first publish
        subscriber_ttl_s=30.0,
        gloo_hostname="127.0.0.1",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = []
    for rank in range(1, n + 1):
        args = [sys.executable, "-m", "bench._weights_peer", "--redis-port", str(redis_port), "--prefix", prefix]
        args += ["--id", f"peer{rank - 1}", "--rank", str(rank), "--world", str(n + 1), "--store-port", str(store.port)]
        args += ["--backend", backend, "--device", devices[rank], "--mib", str(sizes.weights_mib)]
        args += ["--rounds", str(rounds), "--timeout-s", str(TIMEOUT_S)] + (["--on-go"] if serialized(backend) else [])
        with open(tmp / f"{rank - 1}.log", "w") as log:
            procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    peers = _Peers(client, prefix, procs, tmp)
    pg = None
    try:
        # Every peer alive and registered first (a peer that dies while importing is reported here), since the
        # rendezvous below blocks in C++ until all ranks join or TIMEOUT_S passes.
        say(f"starting {n} peer process(es)")
        started = time.monotonic()
        peers.wait("ready", "starting the peers", TIMEOUT_S)
        say(f"peers ready in {time.monotonic() - started:.1f} s; forming the baseline {backend} group")
        pg = _new_process_group(backend, dist.PrefixStore("baseline/", store), 0, n + 1, TIMEOUT_S, "127.0.0.1")
        state = make_state(sizes.weights_mib, devices[0])
        flat = torch.ones(nbytes, dtype=torch.uint8, device=devices[0])

        def publish(version: int, phase: str) -> tuple[float, float, float]:
            start = time.time()
            stats = publisher.publish(state, version)
            blocked = time.time() - start
            if stats.error or stats.num_subscribers != n:
                raise RuntimeError(f"{phase}: publish v{version} reached {stats.num_subscribers}/{n}: {stats.error}")
            acks = peers.wait("gsrl", phase)
            if any(a["version"] != version for a in acks):
                raise RuntimeError(f"{phase}: subscribers acknowledged {[a['version'] for a in acks]}, not v{version}")
            if not publisher.flush_snapshot(STEP_TIMEOUT_S):  # untimed: keep the snapshot out of the next measurement
                raise TimeoutError(f"{phase}: the background snapshot took over {STEP_TIMEOUT_S:.0f} s")
            written = publisher.last_snapshot
            if written is None or written.version != version or written.error:
                raise RuntimeError(f"{phase}: snapshot {written}")
            return max(a["t"] for a in acks) - start, blocked, written.seconds

        def broadcast(round_index: int, phase: str) -> float:
            if serialized(backend):  # the peers post this receive now, not during the publish before it
                peers.go(round_index)
                peers.wait("armed", f"{phase} (arming the peers)")
            start = time.time()
            try:
                _broadcast(pg, flat, STEP_TIMEOUT_S)
            except Exception as exc:
                raise RuntimeError(f"{phase}: the flat broadcast failed: {exc}") from exc
            acks = peers.wait("baseline", phase)
            if any(a["round"] != round_index for a in acks):
                rounds_seen = [a["round"] for a in acks]
                raise RuntimeError(f"{phase}: peers acknowledged rounds {rounds_seen}, not {round_index}")
            return max(a["t"] for a in acks) - start

        # Warm-up: the first publish forms the gsrl group; first use of both pays setup (NCCL: communicator init).
        say("warm-up: publish v1 (forms the gsrl group)")
        publish(1, "warm-up publish v1 (forming the gsrl group)")
        say("warm-up: one flat broadcast (first use of the baseline group)")
        broadcast(0, "warm-up flat broadcast (first use of the baseline group)")
        delivered, blocked, snapshot, baseline = [], [], [], []
        for i, version in enumerate(range(2, 2 + pairs), start=1):
            d, b, w = publish(version, f"pair {i}/{pairs}: publish v{version}")
            delivered.append(d)
            blocked.append(b)
            snapshot.append(w)
            baseline.append(broadcast(i, f"pair {i}/{pairs}: flat broadcast"))
            say(
                f"pair {i}/{pairs}: deliver {d:.3f} s ({nbytes / d / 1e9:.2f} GB/s), publish() {b:.3f} s, "
                f"flat broadcast {baseline[-1]:.3f} s ({nbytes / baseline[-1] / 1e9:.2f} GB/s), snapshot {w:.3f} s"
            )
    finally:
        say("stopping the peers")
        peers.stop()
        publisher.close()
        if pg is not None:
            close_group(pg, backend)
    mib, base, median = sizes.weights_mib, statistics.median(baseline), statistics.median(delivered)
    what = f"{mib} MiB float32 to {n} policy servers"
    return [
        Row(
            STAGE,
            f"deliver {what}, {why} (vs one broadcast of a flat tensor)",
            median,
            base,
            "s",
            goal="<= 1.2",
            note=(
                "until the last subscriber's on_weights holds the tensors; "
                f"{nbytes / median / 1e9:.2f} vs {nbytes / base / 1e9:.2f} GB/s of payload"
            ),
        ),
        Row(
            STAGE,
            f"publish() wall time, {what}, snapshot queued to the background (vs the same broadcast)",
            statistics.median(blocked),
            base,
            "s",
            note="what the learner waits out every update (snapshot_every=1, the learner's setting)",
        ),
        Row(
            STAGE,
            f"Redis snapshot of the same {mib} MiB on the publisher's background thread (vs the same broadcast)",
            statistics.median(snapshot),
            base,
            "s",
            note="not waited for by publish(); a late joiner loads the last one finished",
        ),
    ]
