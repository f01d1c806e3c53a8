"""The ``gsrl`` command: one entry point for every role and for the one-machine training run.

gsrl train [-c run.yaml] [section.key=value ...]     everything as local processes
gsrl env-server | policy-server | learner [...]      one role (what a pod runs)
gsrl eval | render [-c run.yaml] [...]                evaluate a checkpoint; record splat-rendered videos
gsrl splat table | render | fit | align [...]         the Real2Sim tools (fit and align splat scenes)
gsrl collect | sft [-c run.yaml] [...]                expert demonstrations (LeRobot dataset); SFT of the VLA
gsrl config [-c run.yaml] [overrides]                 print the effective, validated config
gsrl check [-c run.yaml] [overrides] [--steps N]      build env + policy, run steps end to end, ping services
gsrl curve RUN_DIR --out curve.png [--eval L=J ...]   a run's learning curve, with eval results marked
gsrl compare --base A.json --new B.json             two checkpoints' evals, episode by episode
gsrl export CKPT --out DIR [--dtype bfloat16]       a checkpoint in bfloat16 and/or size-limited shards
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from gsrl.config import Config, ConfigError, load_config

PRESETS_DIR = Path(__file__).resolve().parent.parent / "configs"


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        default=None,
        help="run config YAML (a path, or a preset name from configs/, e.g. 'state_ppo'); defaults apply if omitted",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="dotted overrides applied after the file, e.g. algo.clip_ratio=0.1 env_server.num_envs=8",
    )
    parser.add_argument("--log-level", default=os.environ.get("GSRL_LOG_LEVEL", "INFO"), help="logging level")


def resolve_config_path(name: str | None) -> Path | None:
    """A path as given, or a preset name looked up in configs/ (``state_ppo`` -> configs/state_ppo.yaml)."""
    if name is None:
        return None
    path = Path(name)
    if path.is_file():
        return path
    preset = PRESETS_DIR / f"{name}.yaml"
    if preset.is_file():
        return preset
    known = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
    raise ConfigError("<file>", f"no config file '{name}' and no preset of that name (presets: {known})")


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(resolve_config_path(args.config), args.overrides)


def add_redis_url_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("GSRL_REDIS_URL"),
        help="redis://host:port/db of the trajectory stream (env GSRL_REDIS_URL; default: config redis.host/port)",
    )


def redis_url_of(args: argparse.Namespace, config: Config) -> str:
    return args.redis_url or f"redis://{config.redis.host}:{config.redis.port}/{config.redis.db}"


def parse_role_arguments(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, role: str
) -> tuple[argparse.Namespace, Config]:
    """Parse a role's command line, set up its logging, and load the validated config.

    A config error ends the process with exit code 2 and a message naming the key, before anything starts.
    """
    # Intermixed: overrides may come in more than one run between options (`-c x a.b=1 --episodes 3 c.d=2`), as
    # scripts that prepend common overrides and append per-call ones write them.
    args = parser.parse_intermixed_args(argv)
    setup_logging(args.log_level, role.format(**vars(args)))
    try:
        return args, config_from_args(args)
    except ConfigError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def setup_logging(level: str, role: str) -> None:
    logging.basicConfig(
        level=getattr(logging, str(level).upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s [{role}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _config_command(argv: Sequence[str]) -> int:
    import yaml

    parser = argparse.ArgumentParser(prog="gsrl config", description="Validate a run config and print it in full.")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    print(yaml.safe_dump(config_from_args(args).to_dict(), sort_keys=False), end="")
    return 0


COMMANDS = {
    "train": ("gsrl.launcher", "Run redis, learner, policy server and env servers locally and train."),
    "env-server": ("services.env_server.__main__", "Run one env server (ManiSkill envs streaming to a policy server)."),
    "policy-server": ("services.policy_server.__main__", "Run one policy server (batched inference, segments)."),
    "learner": ("services.learner.__main__", "Run one learner rank (DeepSpeed PPO; RANK/WORLD_SIZE from env)."),
    "eval": ("services.env_server.evaluate", "Evaluate a checkpoint in-process: success rate, return, episode length."),
    "render": (
        "services.env_server.render",
        "Record splat-rendered episode videos; --compare-sim: overlay with SAPIEN.",
    ),
    "splat": ("gsrl.splat.cli", "Real2Sim tools: render posed views, fit a splat scene, align a scan to the sim."),
    "status": ("gsrl.k8s_status", "Show a cluster run's pods per role: readiness, restarts, GPUs, key metrics."),
    "collect": ("gsrl.collect", "Record scripted-expert demonstrations as a LeRobot dataset (SFT data)."),
    "sft": ("services.learner.sft", "Supervised fine-tuning of the VLA on demonstrations (flow matching, DeepSpeed)."),
    "curve": ("gsrl.curves", "Draw a run's learning curve (training success, return, eval points) as a PNG."),
    "compare": ("gsrl.compare", "Compare two checkpoints' eval reports episode by episode (McNemar's test)."),
    "export": ("gsrl.export", "Copy a checkpoint in another precision (bfloat16) and/or as size-limited shards."),
    "check": ("gsrl.check", "Check env, policy, checkpoint and services fit: a few steps end to end, PASS/FAIL."),
    "config": (None, "Validate a run config and print it with every default filled in."),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        width = max(len(c) for c in COMMANDS)
        lines = [f"  {name.ljust(width)}  {text}" for name, (_m, text) in COMMANDS.items()]
        print(
            "usage: gsrl <command> [-c CONFIG] [section.key=value ...]\n\ncommands:\n"
            + "\n".join(lines)
            + "\n\nRun 'gsrl <command> --help' for a command's options."
        )
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"gsrl: unknown command '{command}' (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    try:
        if command == "config":
            return _config_command(rest)
        import importlib

        module = importlib.import_module(COMMANDS[command][0])
        return int(module.main(rest, prog=f"gsrl {command}") or 0)
    except ConfigError as exc:
        print(f"gsrl {command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
