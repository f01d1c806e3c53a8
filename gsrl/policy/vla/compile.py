"""Opt-in ``torch.compile`` of the VLA's hot passes (``VLAPolicy(compile_mode=...)``; eager by default).

Why: the eager forward is bound by per-op launch and dispatch, not by arithmetic. On an H100 the ``small`` preset
(229M parameters) dispatched about 20,000 aten ops per ``act`` and took 69 / 119 / 92 ms at batch 1 / 16 / 64, and
an SFT fwd+bwd step 133 ms at batch 32 (``bench/vla_profile.py``). With ``encode_prefix``, ``predict_velocity`` and
``forward_joint`` compiled (``mode="default"``, ``dynamic=False``) the same cases took 32 / 41 / 41 ms and 58 ms,
2.1-2.9x faster. Only those three functions are compiled: the flow arithmetic around them (random draws, Gaussian
log-densities) stays eager, so a compiled policy draws the same random numbers as an eager one.

Modes (``COMPILE_MODES``): ``default`` fuses kernels; ``reduce-overhead`` also replays them as CUDA graphs (on a CPU
it runs without graphs); ``max-autotune-no-cudagraphs`` autotunes kernels without graphs (long compiles).

Shapes are static (``dynamic=False``), so every new input shape compiles a new graph (about a minute each for
``small``). ``VLAPolicy.act`` and ``value`` therefore pad the batch up to ``batch_bucket`` (powers of two up to the
policy server's ``max_batch_size``, 64 by default; ``pad_rows`` repeats the last row) and slice the outputs back,
which bounds a policy server to a handful of graphs. The training paths are not padded (padding rows would have to
be kept out of losses and gradients): ``evaluate_actions`` and ``flow_matching_loss`` compile once per minibatch
size, so give them constant minibatches (a PPO batch divisible by ``num_minibatches``; an SFT dataset's last, short
batch of an epoch costs one more graph).

CUDA graphs (``reduce-overhead``): the graphs' outputs live in a pool that the next *generation* of replays
overwrites, and without a hint every compiled call that has no backward pending starts a new one. ``act`` encodes
the prefix once and then reads its keys/values in every denoising step, so those reads would meet overwritten
memory. ``CompiledVLA.step_begin`` (``torch.compiler.cudagraph_mark_step_begin``) is called once at the start of
each policy entry point (``act``, ``value``, ``evaluate_actions``, ``flow_matching_loss``): the prefix pass and the
denoising steps of one call share a generation, and nothing a graph wrote escapes the call (the policy's outputs are
computed eagerly from them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
DEFAULT_MAX_BATCH = 64  # PolicyServerConfig.max_batch_size's default
# Graphs per compiled function: act/value buckets (7 up to 64), with and without grad, train and eval minibatches.
RECOMPILE_LIMIT = 64


def check_compile_mode(mode: str) -> str:
    """``mode`` if it is "" (eager) or one of ``COMPILE_MODES``; ValueError naming them otherwise."""
    if mode != "" and mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode={mode!r}; use '' (eager) or one of {COMPILE_MODES}")
    return mode


class CompiledVLA:
    """``torch.compile``d ``encode_prefix`` / ``predict_velocity`` / ``forward_joint`` of one ``VLAModel``.

    Has the same three methods as the model, so the policy calls either. Compilation itself happens lazily, at the
    first call with each new input shape (or grad mode, autocast state, device).
    """

    def __init__(self, model: torch.nn.Module, mode: str) -> None:
        if not check_compile_mode(mode):
            raise ValueError("CompiledVLA needs a compile mode; use the model itself for eager")
        self.mode = mode
        self.cudagraphs = mode == "reduce-overhead"
        # The default limit (8 graphs per function) is within reach of a server's buckets plus training shapes;
        # past it dynamo silently runs the function eagerly.
        dynamo_config: Any = torch._dynamo.config
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
        self.encode_prefix: Callable[..., Any] = _compile(model.encode_prefix, mode)
        self.predict_velocity: Callable[..., Any] = _compile(model.predict_velocity, mode)
        self.forward_joint: Callable[..., Any] = _compile(model.forward_joint, mode)

    def step_begin(self) -> None:
        """Start a new CUDA-graph generation (``reduce-overhead`` only): once per policy call, before its passes."""
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()


def _compile(fn: Callable[..., Any], mode: str) -> Callable[..., Any]:
    return torch.compile(fn, mode=mode, dynamic=False)


def batch_bucket(batch: int, max_batch: int = DEFAULT_MAX_BATCH) -> int:
    """The padded batch for ``batch`` rows: the next power of two, capped at ``max_batch``; above it, the next
    multiple of ``max_batch`` (1, 2, 4, ..., 64, 128, 192, ... for the default 64)."""
    if batch < 1 or max_batch < 1:
        raise ValueError(f"batch={batch} and max_batch={max_batch} must be >= 1")
    if batch <= max_batch:
        return min(1 << (batch - 1).bit_length(), max_batch)
    return -(-batch // max_batch) * max_batch


def pad_rows(x: Tensor, rows: int) -> Tensor:
    """``x`` [B, ...] padded along dim 0 to ``rows`` by repeating its last row, always contiguous: compiled graphs
    guard on strides as well as shapes, so a padded and an unpadded call must hand over the same layout (a bare
    ``x`` of B == rows can be a permuted image batch or a stride-0 flow time)."""
    batch = x.shape[0]
    if rows == batch:
        return x.contiguous()
    if rows < batch or batch == 0:
        raise ValueError(f"cannot pad {batch} rows to {rows}")
    return torch.cat([x, x[-1:].expand(rows - batch, *x.shape[1:])], dim=0).contiguous()
