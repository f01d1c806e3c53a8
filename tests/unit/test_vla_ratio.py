"""bench.vla_ratio: the learner's recompute of a rollout's log-probs at unchanged weights, per precision set-up."""

from __future__ import annotations

import math

import torch

from bench.vla_ratio import SETUPS, report, run


def test_fp32_recompute_in_other_minibatches_gives_ratio_one() -> None:
    results = run("tiny", torch.device("cpu"), rollout_batch=6, minibatch=4, repeats=1)
    by_setup = {r.setup: r for r in results}
    assert tuple(by_setup) == SETUPS
    fp32 = by_setup["fp32"]
    assert fp32.samples == 6
    assert fp32.max_abs_log_ratio < 1e-4 and fp32.clipped_fraction == 0.0
    # A bf16 learner module rounds the weights, so its log-probs move a little, but stay finite.
    assert math.isfinite(by_setup["bf16 learner"].mean_abs_log_ratio)
    assert by_setup["bf16 learner"].max_abs_log_ratio > 0.0
    assert "fp32" in report(results)
