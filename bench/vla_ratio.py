"""How far the PPO ratio of the VLA strays from 1 at unchanged weights, per precision: ``python -m bench.vla_ratio``.

PPO assumes the learner recomputes the rollout's log-probabilities exactly when the weights have not changed. A flow
policy's log-probability is a Gaussian density of its sampled denoising step, whose std is small (about 0.14 for the
last of 4 Flow-SDE steps at noise level 0.5), so a rounding difference in the velocity of a few 1e-3 moves the
log-density by tenths of a nat: enough for clip 0.2 to cut off a real share of the batch before any learning.
This measures it the way the run does it: the rollout at the policy server's batch (64), the learner's recompute in
its minibatches (16, another batch shape, so other kernels), for three precision set-ups:

- ``bf16 learner``: the server's bf16 autocast over fp32 weights; the learner's module cast to bf16 (DeepSpeed
  ``bf16``), still under autocast;
- ``bf16 autocast``: both bf16 autocast over the same fp32 weights (``learner.bf16=false``);
- ``fp32``: no autocast anywhere (``policy.bf16_autocast=false learner.bf16=false``).

It prints mean and max |log ratio| and the share of samples whose ratio leaves [0.8, 1.2] (clipped by PPO before any
update), and with ``--json`` writes them, so a run can choose its precision from this machine's figures.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass

import torch

from bench.policy_server import Workload
from bench.vla_policy import ACTION_DIM, CHUNK, POLICY_SETTINGS, workload
from bench.vla_probe_cli import add_probe_arguments, probe_device, write_figures
from gsrl.policy.vla.policy import VLAPolicy


@dataclass
class RatioFigures:
    setup: str
    samples: int
    mean_abs_log_ratio: float
    max_abs_log_ratio: float
    clipped_fraction: float  # |ratio - 1| > clip before any update
    value_max_abs_diff: float


SETUPS = ("bf16 learner", "bf16 autocast", "fp32")


def measure(
    policy: VLAPolicy, load: Workload, setup: str, rollout_batch: int, minibatch: int, seeds: range, clip: float
) -> RatioFigures:
    """For each seed, rolls out ``rollout_batch`` random observations at once, then recomputes them ``minibatch``
    rows at a time; the figures cover every sample of every seed."""
    if setup not in SETUPS:
        raise ValueError(f"unknown setup {setup!r}; known: {SETUPS}")
    device = next(policy.parameters()).device
    server = copy.deepcopy(policy).eval()
    server.bf16_autocast = setup != "fp32"
    learner = copy.deepcopy(policy).train()
    learner.bf16_autocast = setup != "fp32"
    if setup == "bf16 learner":
        learner = learner.to(torch.bfloat16)
    instructions = [load.spec.instruction] * rollout_batch
    log_ratios, value_diffs = [], []
    for seed in seeds:
        obs = {k: torch.from_numpy(v).to(device) for k, v in load.observations(rollout_batch, seed).items()}
        out = server.act(obs, instructions)
        with torch.no_grad():
            for start in range(0, rollout_batch, minibatch):
                rows = slice(start, start + minibatch)
                extras = {k: v[rows] for k, v in out.extras.items()}
                logp, _, values = learner.evaluate_actions(
                    {k: v[rows] for k, v in obs.items()}, out.action_chunk[rows], instructions[rows], extras
                )
                log_ratios.append(logp.float() - out.logprobs[rows].float())
                value_diffs.append((values.float() - out.values[rows].float()).abs())
    log_ratio = torch.cat(log_ratios)
    ratio = log_ratio.exp()
    return RatioFigures(
        setup=setup,
        samples=log_ratio.numel(),
        mean_abs_log_ratio=float(log_ratio.abs().mean()),
        max_abs_log_ratio=float(log_ratio.abs().max()),
        clipped_fraction=float(((ratio - 1.0).abs() > clip).float().mean()),
        value_max_abs_diff=float(torch.cat(value_diffs).max()),
    )


def run(preset: str, device: torch.device, rollout_batch: int, minibatch: int, repeats: int) -> list[RatioFigures]:
    torch.manual_seed(0)
    load = workload(preset)
    policy = VLAPolicy(load.spec.observation_spec, ACTION_DIM, CHUNK, preset=preset, **POLICY_SETTINGS).to(device)
    return [measure(policy, load, setup, rollout_batch, minibatch, range(repeats), 0.2) for setup in SETUPS]


def report(results: list[RatioFigures]) -> str:
    lines = [f"{'setup':<14} {'samples':>7} {'mean |log r|':>13} {'max |log r|':>12} {'clipped':>8} {'|dV| max':>9}"]
    for r in results:
        lines.append(
            f"{r.setup:<14} {r.samples:>7} {r.mean_abs_log_ratio:>13.4f} {r.max_abs_log_ratio:>12.4f} "
            f"{r.clipped_fraction:>8.1%} {r.value_max_abs_diff:>9.2e}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.vla_ratio", description=__doc__.splitlines()[0])
    add_probe_arguments(parser)
    parser.add_argument("--rollout-batch", type=int, default=64, help="rows per rollout forward (default 64)")
    parser.add_argument("--minibatch", type=int, default=16, help="rows per learner recompute (default 16)")
    parser.add_argument("--repeats", type=int, default=4, help="rollouts per setup, each new observations")
    args = parser.parse_args(argv)
    if min(args.rollout_batch, args.minibatch, args.repeats) < 1:
        parser.error("--rollout-batch, --minibatch and --repeats must be >= 1")
    device = probe_device(parser.prog, args.device)
    if device is None:
        return 2
    results = run(args.preset, device, args.rollout_batch, args.minibatch, args.repeats)
    print(
        f"VLA {args.preset} on {device}: PPO ratio at unchanged weights (rollout batch {args.rollout_batch}, "
        f"learner minibatch {args.minibatch})"
    )
    print(report(results))
    write_figures(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
