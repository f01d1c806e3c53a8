"""Where a VLA decision and an SFT step spend their time: ``python -m bench.vla_profile --preset small``.

On an H100 a ``small`` decision took about as long at batch 1 as at batch 64 (docs/benchmarks.md), the mark of a
forward bound by per-op launch and dispatch rather than by arithmetic. This profiles ``act`` at a few batch sizes and
one flow-matching training step with ``torch.profiler`` and prints, per case: wall time, device kernels launched, the
share of wall time the device was busy, and the ops with the most self CPU time, which is what graph capture or
fusion has to remove. ``--json`` keeps the figures. Observations are random, as in ``bench.vla_policy``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

from bench.vla_policy import ACTION_DIM, CHUNK, POLICY_SETTINGS, workload
from bench.vla_probe_cli import add_probe_arguments, probe_device, write_figures
from gsrl.policy.vla.compile import COMPILE_MODES
from gsrl.policy.vla.policy import VLAPolicy


@dataclass
class CaseProfile:
    case: str
    batch: int
    wall_ms: float  # per call, outside the profiler
    kernels_per_call: float  # device kernels launched per call (0 on a CPU run)
    device_busy_fraction: float  # summed kernel time / wall time (CPU run: 0)
    ops_per_call: float  # aten ops dispatched per call
    top_cpu_ops: list[tuple[str, float]]  # (op, self CPU ms per call)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_case(name: str, batch: int, fn: Callable[[], object], device: torch.device, calls: int) -> CaseProfile:
    for _ in range(2):  # warm-up: allocator, autotuning, lazy inits
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    wall_ms = (time.perf_counter() - start) / calls * 1e3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        _sync(device)
    events = prof.key_averages()
    kernels = kernel_us = 0.0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels += 1
            kernel_us += event.device_time
    aten = [e for e in events if e.key.startswith("aten::")]
    top = sorted(aten, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return CaseProfile(
        case=name,
        batch=batch,
        wall_ms=wall_ms,
        kernels_per_call=kernels / calls,
        device_busy_fraction=(kernel_us / 1e3 / calls) / wall_ms if device.type == "cuda" else 0.0,
        ops_per_call=sum(e.count for e in aten) / calls,
        top_cpu_ops=[(e.key, e.self_cpu_time_total / 1e3 / calls) for e in top],
    )


def run(
    preset: str, device: torch.device, batches: list[int], train_batch: int, calls: int, compile_mode: str = ""
) -> list[CaseProfile]:
    torch.manual_seed(0)
    load = workload(preset)
    # compile_mode: the policy's own option (gsrl.policy.vla.compile); act batches are padded to its buckets.
    policy = VLAPolicy(
        load.spec.observation_spec, ACTION_DIM, CHUNK, preset=preset, compile_mode=compile_mode, **POLICY_SETTINGS
    ).to(device)
    results = []
    for batch in batches:
        obs = {k: torch.from_numpy(v).to(device) for k, v in load.observations(batch, batch).items()}
        instructions = [load.spec.instruction] * batch
        policy.eval()

        def act(obs=obs, instructions=instructions) -> object:
            with torch.no_grad():
                return policy.act(obs, instructions)

        results.append(profile_case("act", batch, act, device, calls))
    if train_batch:
        obs = {k: torch.from_numpy(v).to(device) for k, v in load.observations(train_batch, 7).items()}
        actions = torch.rand(train_batch, policy.config.action_horizon, ACTION_DIM, device=device) * 2 - 1
        instructions = [load.spec.instruction] * train_batch
        policy.train()

        def sft_step() -> object:
            loss = policy.flow_matching_loss(obs, actions, instructions)
            loss.backward()
            policy.zero_grad(set_to_none=True)
            return loss

        results.append(profile_case("sft step (fwd+bwd)", train_batch, sft_step, device, calls))
    return results


def report(results: list[CaseProfile]) -> str:
    lines = [f"{'case':<20} {'batch':>5} {'wall ms':>9} {'kernels':>8} {'busy':>6} {'aten ops':>9}"]
    for r in results:
        lines.append(
            f"{r.case:<20} {r.batch:>5} {r.wall_ms:>9.1f} {r.kernels_per_call:>8.0f} "
            f"{r.device_busy_fraction:>6.0%} {r.ops_per_call:>9.0f}"
        )
    for r in results:
        lines.append(f"\n{r.case} at batch {r.batch}: self CPU ms per call, top ops")
        lines += [f"  {ms:8.2f}  {op}" for op, ms in r.top_cpu_ops]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.vla_profile", description=__doc__.splitlines()[0])
    add_probe_arguments(parser)
    parser.add_argument("--batches", default="1,16,64", help="act batch sizes, comma-separated (default 1,16,64)")
    parser.add_argument("--train-batch", type=int, default=32, help="SFT step batch (0: skip; default 32)")
    parser.add_argument("--calls", type=int, default=5, help="timed and profiled calls per case (default 5)")
    parser.add_argument(
        "--compile",
        default="",
        choices=["", *COMPILE_MODES],
        help="VLAPolicy compile_mode: torch.compile the prefix, velocity and joint passes (default: eager)",
    )
    args = parser.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--batches must be integers separated by commas, got {args.batches!r}")
    if not batches or min(batches) < 1 or args.calls < 1 or args.train_batch < 0:
        parser.error("--batches must be >= 1, --calls >= 1 and --train-batch >= 0")
    device = probe_device(parser.prog, args.device)
    if device is None:
        return 2
    results = run(args.preset, device, batches, args.train_batch, args.calls, args.compile)
    print(f"VLA {args.preset} on {device}, {'torch.compile ' + args.compile if args.compile else 'eager'}")
    print(report(results))
    write_figures(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
