"""``gsrl sft``: supervised fine-tuning of the run's VLA on demonstrations (the stage before PPO).

pi_RL starts PPO from an SFT'd pi0.5: flow-matching on a few dozen successful demonstrations gives a policy that
succeeds sometimes, which sparse-reward RL needs to get going. This trains the configured VLA
(``policy.kind=vla``) on a LeRobot dataset (``gsrl collect``) with the flow-matching loss, through the same
DeepSpeed engine the learner uses (ZeRO stage ``learner.zero_stage``; gloo on CPU, bf16 on CUDA), and writes
checkpoints in the VLA's own layout (``model.safetensors`` + ``vla_config.json`` + ``tokenizer.json``) that
``gsrl eval --checkpoint`` and the learner (``policy.checkpoint``) load.

    gsrl sft -c gs_ppo policy.kind=vla --data data/put-cube-demos --out runs/sft [--steps 2000] [--batch-size 32]
        [--augment-shift 8] [--max-seconds 600]

``--data`` takes several datasets (``--data demos-0 demos-1 ...``) and trains on all their frames: ``gsrl collect``
is one process, so demonstrations are recorded fastest by several collectors with different ``--seed`` at once.

Several GPUs (or CPU processes) train data-parallel under torchrun, one rank each:

    torchrun --nproc-per-node 2 -m gsrl.cli sft -c gs_vla_ppo --data demos-0 demos-1 --out runs/sft --batch-size 64

``--batch-size`` stays the samples per optimizer step: each rank takes an equal share of it from its own episodes
(dealt round-robin, ``rank_episodes``; a rank decodes and holds only those), DeepSpeed averages the gradients, and
rank 0 alone logs and writes checkpoints.

``--augment-shift P`` translates every camera image of each training batch by a random (dy, dx) in [-P, P]
(DrQ random shift, ``gsrl.data.augment``): the vision encoder is trained from scratch on a few thousand frames
and overfits without it. 8 px (about 4 %) suits 224 px images; the default 0 keeps training unaugmented.

Output: ``<out>/model.safetensors`` ... (final), ``<out>/checkpoints/step_<N>/`` (periodic),
``<out>/tensorboard/`` (``sft/loss``, ``sft/lr``, ``sft/grad_norm``), ``<out>/sft_log.jsonl`` (one line per step),
``<out>/sft_settings.json`` (the settings, batch size and seed of the run).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from gsrl.config import PolicyConfig
from gsrl.data.augment import random_shift
from gsrl.data.lerobot import ACTION_FEATURE, STATE_FEATURE, ActionChunkDataset, LeRobotDataset
from gsrl.policy.base import ObservationSpec
from gsrl.policy.vla.inputs import default_image_keys

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SFTSettings:
    """Optimizer settings (the fields ``DeepSpeedEngine`` reads), the schedule and the augmentation."""

    lr: float = 1e-4
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    steps: int = 1000
    # Random-shift augmentation of every camera image, in pixels (``gsrl.data.augment.random_shift``); 0 = off.
    augment_shift: int = 0
    # Wall-clock budget of the training loop in seconds (0 = none): training ends at ``steps`` or at this many
    # seconds, whichever comes first, and the cosine decay follows whichever is further along, so a run cut short by
    # the clock still ends at the schedule's low learning rate.
    max_seconds: float = 0.0


def learning_rate(step: int, settings: SFTSettings, elapsed_s: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 10 % of ``lr`` at the last step (openpi's SFT schedule shape).

    With a time budget (``settings.max_seconds``) the decay's progress is the larger of the steps' and the clock's
    (``elapsed_s`` of the budget), so the rate reaches its floor when either runs out.
    """
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    span = max(settings.steps - settings.warmup_steps, 1)
    progress = (step - settings.warmup_steps) / span
    if settings.max_seconds > 0:
        progress = max(progress, elapsed_s / settings.max_seconds)
    progress = min(progress, 1.0)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def sft_policy_kwargs(policy_config: PolicyConfig) -> dict[str, Any]:
    """The VLA's constructor arguments for SFT: the run's, with the whole model trainable.

    ``policy.train_expert_only`` is an RL setting (RLinf freezes SigLIP, projector and LM in PPO; gs_vla_ppo sets
    it). Without pretrained weights SFT is what trains those parts: frozen at their random initialisation, only the
    action expert and value head learn (41M of the ``small`` preset's 229M parameters), the policy cannot find the
    cube in the image, and it learns the demonstrations' average motion (on the tiny preset the loss stalled at 0.34
    and the open-loop error equalled that of predicting zeros; trained whole, 0.12 and a third of it).
    """
    return {**policy_config.kwargs(), "train_expert_only": False}


def state_bounds(datasets: Sequence[LeRobotDataset]) -> tuple[torch.Tensor, torch.Tensor]:
    """The demonstrations' state range: q01/q99 (min/max where a dataset has no quantiles), and over several
    datasets the widest, the smallest low and the largest high, so no dataset's states fall outside it."""
    lows, highs = [], []
    for dataset in datasets:
        stats = dataset.stats()[STATE_FEATURE]
        lows.append(torch.as_tensor(stats.get("q01", stats["min"]), dtype=torch.float32))
        highs.append(torch.as_tensor(stats.get("q99", stats["max"]), dtype=torch.float32))
    return torch.stack(lows).amin(0), torch.stack(highs).amax(0)


def set_state_bounds_from_stats(policy: Any, datasets: Sequence[LeRobotDataset]) -> bool:
    """Give the VLA's state normalizer the demonstrations' q01/q99 (min/max if absent), as pi0.5 normalizes.

    Only when the policy reads exactly the dataset's ``state`` (so the dimensions line up); returns whether it did.
    """
    norm = getattr(policy, "state_norm", None)
    if norm is None or list(getattr(policy, "state_keys", [])) != ["state"]:
        return False
    low, high = state_bounds(datasets)
    if low.shape != norm.low.shape:
        return False
    # A dimension that never moved in the demos (q01 == q99) would map to +-1 at the slightest change: widen it.
    flat = (high - low) < 1e-3
    low, high = torch.where(flat, low - 0.5, low), torch.where(flat, high + 0.5, high)
    norm.set_bounds(low, high)
    return True


def dataset_mismatch(data: LeRobotDataset, observation_spec: ObservationSpec, action_dim: int) -> str | None:
    """How a dataset's observations or actions differ from the task's (None if they match), for the CLI error."""
    shapes = data.observation_shapes()
    mismatched = {k: (s, shapes.get(k)) for k, (s, _dtype) in observation_spec.items() if shapes.get(k) != s}
    if mismatched:
        return f"does not match the task's observations (task, dataset): {mismatched}"
    action_shape = tuple(data.info["features"][ACTION_FEATURE]["shape"])
    if action_shape != (action_dim,):
        return f"has actions of shape {action_shape}, the task's are ({action_dim},)"
    return None


def augment_shift_error(shift: int, observation_spec: ObservationSpec) -> str | None:
    """Why ``--augment-shift shift`` is invalid for these observations (None if it is fine).

    The shift must be >= 0 and below half of every camera image's height and width (beyond that a shifted image
    is mostly replicated border); the camera images are the VLA's (``default_image_keys``).
    """
    if shift < 0:
        return f"--augment-shift must be >= 0, got {shift}"
    for key in default_image_keys(observation_spec):
        height, width, _ = observation_spec[key][0]
        if 2 * shift >= min(height, width):
            return f"--augment-shift {shift} must be below half the image size ({key} is {height}x{width})"
    return None


def augment_images(
    observations: dict[str, torch.Tensor], keys: Sequence[str] | None, shift: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """``observations`` with ``random_shift`` applied to each image: the entries ``keys`` (the policy's
    ``image_keys``), or every uint8 [B, H, W, 3] tensor when None. The other entries are passed through."""
    if shift <= 0:
        return observations
    if keys is None:
        keys = [k for k, v in observations.items() if v.dtype == torch.uint8 and v.dim() == 4 and v.shape[-1] == 3]
    return {k: random_shift(v, shift, generator) if k in keys else v for k, v in observations.items()}


def rank_episodes(episode_counts: Sequence[int], rank: int, world_size: int) -> list[list[int]]:
    """The episodes rank ``rank`` trains on, per dataset: every ``world_size``-th of all datasets' episodes taken in
    order (dataset 0's, then dataset 1's, ...), from position ``rank``.

    Episodes rather than frames, so each rank decodes and keeps in memory only its own videos: with every rank
    holding every episode, two ranks on one host decoded 1,600 episodes twice (128 s before the first step) and
    held two copies. Every step's gradient is still the mean over all ranks' samples, so the optimizer sees the
    whole dataset as before; the ranks' shares differ by at most one episode.
    """
    shares: list[list[int]] = []
    start = 0
    for count in episode_counts:
        first = (rank - start) % world_size
        shares.append(list(range(first, count, world_size)))
        start += count
    return shares


def _batches(dataset: torch.utils.data.Dataset, batch_size: int, seed: int) -> Iterator[Any]:
    """Shuffled batches of ``dataset`` forever (a new permutation each epoch), so the step count, not epochs, ends
    training. With several ranks ``dataset`` is this rank's episodes (``rank_episodes``) and ``batch_size`` its
    share of the step.

    Every batch has ``batch_size`` samples: an epoch's short last batch is dropped (a new permutation puts those
    samples in the next epoch). A short batch is a new shape, and the compiled VLA recompiled for it: on 2 H200s
    each rank's first epoch end stalled SFT for 1.5-3.5 minutes, a third of its 480 s budget, while the other rank
    waited in its all-reduce. A dataset smaller than one batch is one (smaller, fixed-size) batch each step."""
    generator = torch.Generator().manual_seed(seed)
    drop_last = len(dataset) >= batch_size
    while True:
        order = torch.randperm(len(dataset), generator=generator).tolist()
        subset = torch.utils.data.Subset(dataset, order)
        yield from torch.utils.data.DataLoader(subset, batch_size=batch_size, drop_last=drop_last)


def _distributed() -> tuple[int, int]:
    """(rank, world size) of the initialized process group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _mean_over_ranks(value: torch.Tensor, world_size: int) -> float:
    """The ranks' mean of a scalar (each rank's loss is over its own share of the batch)."""
    if world_size == 1:
        return float(value)
    import torch.distributed as dist

    total = value.detach().float().clone()
    dist.all_reduce(total)
    return float(total) / world_size


def _max_over_ranks(value: float, world_size: int) -> float:
    """The ranks' largest value of a scalar: every rank then takes the same clock-driven decisions (learning rate,
    when to stop); ranks that stopped at different steps would hang each other's next all-reduce."""
    if world_size == 1:
        return value
    import torch.distributed as dist

    # NCCL reduces only device tensors; gloo takes CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    largest = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    return float(largest)


def save_policy_checkpoint(policy: Any, directory: Path, zero_stage: int) -> Path:
    """The VLA's own checkpoint layout; weights gathered under ZeRO-3 and stored as float32 whatever the training
    precision, so every loader (eval, learner, policy server) reads the same thing. Every rank calls it (ZeRO-3's
    gather needs them all); rank 0 writes."""
    import contextlib

    from safetensors.torch import load_file, save_file

    gather: Any = contextlib.nullcontext()
    if zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(policy.parameters()), modifier_rank=None)
    rank, _ = _distributed()
    with gather:
        if rank == 0:
            policy.save_checkpoint(directory)
    if rank != 0:
        return directory
    weights = directory / "model.safetensors"
    tensors = load_file(str(weights))
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in tensors.values()):
        save_file({k: t.float() if t.is_floating_point() else t for k, t in tensors.items()}, str(weights))
    return directory


def train(
    policy: Any,
    engine: Any,
    dataset: torch.utils.data.Dataset,
    settings: SFTSettings,
    batch_size: int,
    out: Path,
    zero_stage: int,
    checkpoint_every: int = 0,
    seed: int = 0,
) -> list[float]:
    """Run ``settings.steps`` flow-matching steps (fewer when ``settings.max_seconds`` runs out first); log,
    checkpoint, and return the per-step losses.

    ``batch_size`` samples per step in all: with several ranks each takes ``batch_size / world size`` of them and
    the logged loss is the ranks' mean; rank 0 alone writes logs and checkpoints.
    """
    from gsrl.loggers import TensorBoardLogger

    try:
        from tqdm import tqdm
    except ImportError:  # log lines with rate and ETA instead
        tqdm = None
    rank, world_size = _distributed()
    if batch_size % world_size:
        raise ValueError(f"batch size {batch_size} is not divisible by the {world_size} ranks")
    lead = rank == 0
    batches = _batches(dataset, batch_size // world_size, seed + rank)
    # Its own stream (not the shuffling generator's), so turning augmentation on does not change the batches.
    augment_generator = torch.Generator().manual_seed(seed + 1_000_003 + rank)
    image_keys = getattr(policy, "image_keys", None)
    tensorboard = step_log = bar = None
    if lead:
        out.mkdir(parents=True, exist_ok=True)
        record = {**asdict(settings), "batch_size": batch_size, "world_size": world_size, "seed": seed}
        (out / "sft_settings.json").write_text(json.dumps(record, indent=2) + "\n")
        tensorboard = TensorBoardLogger(out / "tensorboard")
        step_log = open(out / "sft_log.jsonl", "a")  # noqa: SIM115  (closed in the finally below)
        if tqdm is not None:
            bar = tqdm(total=settings.steps, desc="sft", unit="step", dynamic_ncols=True)
    losses: list[float] = []
    started = last_log = time.perf_counter()
    try:
        for step in range(settings.steps):
            elapsed = _max_over_ranks(time.perf_counter() - started, world_size) if settings.max_seconds else 0.0
            if settings.max_seconds and elapsed >= settings.max_seconds:
                if lead:
                    log.info(
                        "time budget of %.0f s reached after %d of %d steps", settings.max_seconds, step, settings.steps
                    )
                break
            lr = learning_rate(step, settings, elapsed)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            observations, action_chunks, instructions = next(batches)
            observations = augment_images(observations, image_keys, settings.augment_shift, augment_generator)
            loss = policy.flow_matching_loss(observations, action_chunks, list(instructions))
            engine.backward(loss)
            grad_norm = engine.step()
            value = _mean_over_ranks(loss.detach(), world_size)
            losses.append(value)
            if checkpoint_every > 0 and (step + 1) % checkpoint_every == 0 and step + 1 < settings.steps:
                save_policy_checkpoint(policy, out / "checkpoints" / f"step_{step + 1:06d}", zero_stage)
            if not lead:
                continue
            scalars = {"sft/loss": value, "sft/lr": lr, "sft/grad_norm": grad_norm}
            tensorboard.log(step + 1, scalars)
            step_log.write(json.dumps({"step": step + 1, **scalars}) + "\n")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
            now = time.perf_counter()
            if bar is None and (now - last_log > 10.0 or step + 1 == settings.steps):
                last_log = now
                rate = (step + 1) / (now - started)
                eta = (settings.steps - step - 1) / rate
                if settings.max_seconds:
                    eta = min(eta, settings.max_seconds - (now - started))
                log.info(
                    "step %d/%d loss %.4f lr %.2e grad_norm %.3f, %.2f steps/s, ETA %.0f s",
                    step + 1,
                    settings.steps,
                    value,
                    lr,
                    grad_norm,
                    rate,
                    eta,
                )
    finally:
        for closable in (bar, tensorboard, step_log):
            if closable is not None:
                closable.close()
    save_policy_checkpoint(policy, out, zero_stage)
    return losses


def main(argv: Sequence[str] | None = None, prog: str = "gsrl sft") -> int:
    from gsrl.cli import add_config_arguments, parse_role_arguments

    parser = argparse.ArgumentParser(
        prog=prog, description="Fine-tune the run's VLA on a LeRobot dataset with the flow-matching loss (DeepSpeed)."
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="DIR",
        help="LeRobot dataset(s) (gsrl collect --out); several train on all their frames",
    )
    parser.add_argument("--out", required=True, metavar="CKPT_DIR", help="checkpoint and log directory")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per step (default 32)")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=0.0,
        metavar="S",
        help="wall-clock budget of the training loop (compilation included): stop at --steps or after S seconds, "
        "whichever comes first, the cosine decay following whichever is further along (default 0 = no budget)",
    )
    parser.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up (default 5%% of --steps)")
    parser.add_argument("--checkpoint-every", type=int, default=500, help="periodic checkpoints (0 = final only)")
    parser.add_argument("--seed", type=int, default=None, help="shuffling and init seed (default run.seed)")
    parser.add_argument(
        "--augment-shift",
        type=int,
        default=0,
        metavar="PIXELS",
        help="random-shift augmentation (DrQ) of every camera image by up to PIXELS in each direction, "
        "below half the image size (default 0 = off; 8 suits 224 px images)",
    )
    args, config = parse_role_arguments(parser, argv, "sft")
    if config.policy.kind != "vla":
        parser.error(f"gsrl sft trains the VLA: set policy.kind=vla (config has {config.policy.kind!r})")
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be >= 1")
    if args.max_seconds < 0:
        parser.error(f"--max-seconds must be >= 0, got {args.max_seconds}")
    if args.augment_shift < 0:
        parser.error(f"--augment-shift must be >= 0, got {args.augment_shift}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % world_size:
        parser.error(f"--batch-size {args.batch_size} must be divisible by the number of ranks ({world_size})")
    seed = config.run.seed if args.seed is None else args.seed

    # One rank unless launched under torchrun/deepspeed (which set these); the entry point owns the environment.
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(config.learner.master_port))
    use_cuda = config.learner.device == "cuda" or (config.learner.device == "auto" and torch.cuda.is_available())
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    else:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    backend = config.learner.backend if config.learner.backend != "auto" else ("nccl" if use_cuda else "gloo")

    import deepspeed
    import torch.distributed as dist

    from gsrl.env_spec import probe_env_spec
    from gsrl.policy import build_policy
    from services.learner.engine import DeepSpeedEngine

    datasets = [LeRobotDataset(path) for path in args.data]
    spec = probe_env_spec(config.task)
    for path, data in zip(args.data, datasets, strict=True):
        problem = dataset_mismatch(data, spec.observation_spec, spec.action_dim)
        if problem is not None:
            parser.error(f"dataset {path} {problem}")
    shift_error = augment_shift_error(args.augment_shift, spec.observation_spec)
    if shift_error is not None:
        parser.error(shift_error)
    # This rank's episodes (all of them with one rank), decoded before training and in parallel: on demand, the
    # first epoch waits on one ffmpeg at a time.
    rank = int(os.environ.get("RANK", "0"))
    total_episodes = sum(data.num_episodes for data in datasets)
    if total_episodes < world_size:
        parser.error(f"{total_episodes} episode(s) cannot be shared among {world_size} ranks: record more")
    shares = rank_episodes([data.num_episodes for data in datasets], rank, world_size)
    decode_started = time.perf_counter()
    workers = min(16, os.cpu_count() or 1)
    decoded = sum(data.preload(workers, episodes) for data, episodes in zip(datasets, shares, strict=True))
    log.info(
        "rank %d: decoded %d of %d episodes in %.1f s (%d threads)",
        rank,
        decoded,
        total_episodes,
        time.perf_counter() - decode_started,
        workers,
    )

    torch.manual_seed(seed)
    deepspeed.init_distributed(dist_backend=backend)
    try:
        if config.policy.train_expert_only:
            log.info("policy.train_expert_only is for RL: SFT trains the whole VLA (vision tower and LM included)")
        kwargs = sft_policy_kwargs(config.policy)
        policy = build_policy("vla", spec.observation_spec, spec.action_dim, config.policy.action_chunk, **kwargs)
        if set_state_bounds_from_stats(policy, datasets):
            log.info("state normalizer bounds set from the dataset's q01/q99")
        horizon = int(policy.config.action_horizon)
        chunks = torch.utils.data.ConcatDataset(
            [
                ActionChunkDataset(data, horizon, episodes)
                for data, episodes in zip(datasets, shares, strict=True)
                if episodes  # a small dataset can have none of this rank's
            ]
        )
        warmup = args.warmup_steps if args.warmup_steps is not None else args.steps // 20
        settings = SFTSettings(
            lr=args.lr,
            max_grad_norm=config.algo.max_grad_norm,
            warmup_steps=warmup,
            steps=args.steps,
            augment_shift=args.augment_shift,
            max_seconds=args.max_seconds,
        )
        engine = DeepSpeedEngine(policy, settings, zero_stage=config.learner.zero_stage, bf16=use_cuda)
        policy = engine.module
        policy.train()
        if world_size > 1:
            # Same initial weights on every rank (seeded alike above); from here each rank draws its own flow-matching
            # noise and times, or the ranks' halves of a batch would share them.
            torch.manual_seed(seed + 7919 * dist.get_rank())
        log.info(
            "SFT on %d episodes / %d frames (%d dataset(s)), horizon %d, %d steps of %d (%d rank(s)), augment "
            "shift %d px, time budget %s",
            sum(data.num_episodes for data in datasets),
            sum(data.num_frames for data in datasets),
            len(datasets),
            horizon,
            args.steps,
            args.batch_size,
            world_size,
            args.augment_shift,
            f"{args.max_seconds:.0f} s" if args.max_seconds else "none",
        )
        out = Path(args.out)
        losses = train(
            policy,
            engine,
            chunks,
            settings,
            args.batch_size,
            out,
            config.learner.zero_stage,
            checkpoint_every=args.checkpoint_every,
            seed=seed,
        )
        rank = dist.get_rank()
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return 0
    tail = losses[-min(len(losses), 20) :]
    print(f"sft: {len(losses)} steps, final loss {sum(tail) / len(tail):.4f} (mean of last {len(tail)}); wrote {out}")
    return 0
