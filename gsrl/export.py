"""``gsrl export CHECKPOINT --out DIR [--dtype bfloat16] [--max-shard-mib N]``: a copy of a checkpoint in another
precision and/or as size-limited shards.

What it is for: serving or moving a trained policy. The learner and ``gsrl sft`` write float32 (``small`` VLA:
0.92 GB); a bfloat16 copy is half that, which is what the policy server computes in on a GPU anyway, and shards
of a fixed size pass through transfer tools and stores that cap the size of one file. The copy loads wherever the
original did (``policy.checkpoint``, ``gsrl eval --checkpoint``, ``gsrl train`` from a checkpoint): every role
reads either layout (``gsrl.checkpoint_files``). The checkpoint's other top-level files (the VLA's config and
tokenizer, SFT's settings) are copied beside the weights; folders (TensorBoard logs, DeepSpeed state) are not.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from gsrl.checkpoint_files import is_weights_file, load_weights, resolve_weights, save_sharded

DTYPES = {"keep": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_checkpoint(source: str | Path, out: str | Path, dtype: str = "keep", max_shard_mib: float = 0) -> list[Path]:
    """Write ``source``'s weights to ``out`` with floating tensors cast to ``dtype`` (integer and bool tensors stay
    as they are), in shards of at most ``max_shard_mib`` MiB (0: one file), plus its other top-level files.
    Returns the weight files written."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if max_shard_mib < 0:
        raise ValueError(f"max_shard_mib must be >= 0 (0 = one file), got {max_shard_mib}")
    weights = resolve_weights(source)
    target = DTYPES[dtype]
    state = {
        key: tensor.to(target) if target is not None and tensor.is_floating_point() else tensor
        for key, tensor in load_weights(weights).items()
    }
    limit = (
        int(max_shard_mib * 2**20) if max_shard_mib > 0 else sum(t.numel() * t.element_size() for t in state.values())
    )
    written = save_sharded(state, out, max(1, limit))
    source_dir = weights.parent
    for extra in sorted(source_dir.iterdir()):
        if extra.is_file() and not is_weights_file(extra.name):
            shutil.copy2(extra, Path(out) / extra.name)
    return written


def main(argv: Sequence[str] | None = None, prog: str = "gsrl export") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Copy a checkpoint in another precision and/or as size-limited safetensors shards.",
    )
    parser.add_argument("checkpoint", help="checkpoint directory (model.safetensors or shards) or the weights file")
    parser.add_argument("--out", required=True, help="new directory for the copy (must hold no weights yet)")
    parser.add_argument("--dtype", default="keep", choices=sorted(DTYPES), help="floating tensors' dtype in the copy")
    parser.add_argument(
        "--max-shard-mib", type=float, default=0.0, help="largest shard in MiB (0: one model.safetensors)"
    )
    args = parser.parse_args(argv)
    try:
        written = export_checkpoint(args.checkpoint, args.out, args.dtype, args.max_shard_mib)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        parser.error(str(exc))
    size = sum(p.stat().st_size for p in written)
    print(f"{prog}: wrote {len(written)} file(s), {size / 2**20:.1f} MiB, to {args.out}", file=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
