"""``scripts/gpu_vla_campaign.sh`` (issue 5's GPU measurement) as a CPU dry run, so it cannot rot between device
sessions: parallel collectors -> data-parallel SFT under torchrun (2 gloo ranks) -> evals (held-out, and on the
layout pool PPO trains on) beside two PPO variants -> their evals and curves, with the tiny VLA at 32x32.
``NGPU=2`` stands in for the GPU count (no GPU here: every step runs on the CPU); sizes are tiny, so success rates
mean nothing and only the chain and its outputs are checked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = (
    "policy.vla_preset=tiny task.render.width=32 task.render.height=32 task.render.device=cpu "
    "policy_server.device=cpu learner.device=cpu learner.bf16=false policy.bf16_autocast=false "
    "env_server.num_servers=1 env_server.num_envs=2 env_server.pipeline_stages=1 learner.segments_per_update=2 "
    "policy_server.max_batch_size=4 algo.update_epochs=1 learner.checkpoint_every=2 task.max_episode_steps=30 "
    "policy_server.metrics_port=0 env_server.metrics_port=0 learner.metrics_port=0"
)


def _run_campaign(tmp_path: Path, **settings: str) -> tuple[Path, str]:
    """Runs the campaign with ``settings`` over the defaults below; returns its results folder and log."""
    results = tmp_path / "results"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "RESULTS": str(results),
        "REPO_COPY": str(tmp_path / "repo"),
        "NO_DEVICE_ENV": "1",
        "NGPU": "2",
        "GSPLAT_WAIT": "0",
        "COMPILE_PROBE": "0",
        "OVERRIDES": f"{TINY} task.render.cache_dir={tmp_path / 'splat-cache'}",
        "DS_ACCELERATOR": "cpu",
        **settings,
    }
    proc = subprocess.run(
        ["bash", "scripts/gpu_vla_campaign.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    log = (results / "campaign.log").read_text()
    assert proc.returncode == 0 and (results / "DONE").exists(), log + proc.stderr[-3000:]
    return results, log


def test_campaign_dry_run_collects_trains_and_evaluates_both_variants(tmp_path: Path) -> None:
    settings = {
        "COLLECTORS": "2",
        "DEMOS_EACH": "2",
        "SFT_STEPS": "2",
        "SFT_SECONDS": "300",  # a budget the 2 steps never reach: the flag's path, not its cut
        "SFT_BATCH": "4",
        "SFT_SHIFT": "2",
        "EVAL_EPISODES": "2",
        # Each PPO run ends at 10 updates, however slow the machine (a 25 s budget once made 20-26 updates, and on
        # a slower CI box fewer than 10); the time is only a ceiling.
        "RL_SECONDS": "300",
        "POOL": "3",
        "MID_EVERY": "4",  # checkpoints every 2 updates: u4 and u8 along the way, u10 the last
        "RL_A": "algo.gamma=0.97 run.max_updates=10",
        "RL_B": "policy.train_expert_only=false algo.micro_batch_size=128 run.max_updates=10",
    }
    results, log = _run_campaign(tmp_path, **settings)

    for i in range(2):  # one dataset per collector, each from its own seed
        info = json.loads((results / f"demos-{i}" / "meta" / "info.json").read_text())
        assert info["total_episodes"] == 2
    assert "sft on 2 GPU(s) rc=0" in log  # the data-parallel path, not the one-GPU fallback
    assert "(2 rank(s))" in (results / "sft-2gpu.log").read_text()
    assert json.loads((results / "sft" / "sft_settings.json").read_text())["world_size"] == 2
    overrides_b = "policy.train_expert_only=false algo.micro_batch_size=128 run.max_updates=10"
    assert f"PPO A overrides 'algo.gamma=0.97 run.max_updates=10', B overrides '{overrides_b}'" in log
    for name in ("sft", "rl-A", "rl-B"):
        report = json.loads((results / f"eval-{name}.json").read_text())
        assert report["result"]["episodes"] == 2 and report["layouts"] == "held-out"
    for name in ("sft", "rl-A", "rl-B"):  # also on the training layouts: 2 rounded up to whole pools of 3
        report = json.loads((results / f"eval-{name}-pool.json").read_text())
        assert report["result"]["episodes"] == 3 and (report["layouts"], report["layout_pool"]) == ("pool", 3)
    # Checkpoints along the way (every 4th update, on the pool), each marked in the curve at its update.
    for n in (4, 8):
        mid = json.loads((results / f"eval-rl-A-u{n}-pool.json").read_text())
        assert mid["checkpoint"].endswith(f"update_{n:06d}/model.safetensors") and mid["layouts"] == "pool"
    assert not (results / "eval-rl-A-u10-pool.json").exists()  # the last checkpoint has its own evaluations
    assert "curve A rc=0 marks SFT u4 u8 RL " in log, log
    assert (results / "curve-A.png").stat().st_size > 0 and (results / "curve-B.png").stat().st_size > 0
    for name in ("A", "B"):  # each PPO checkpoint against SFT, episode by episode, on all three protocols
        for protocol in ("held-out", "pool", "stochastic"):
            assert re.search(rf"compare SFT -> {name} {protocol}: \d+ paired episodes: .* difference [+-]\d", log), log
    for name in ("sft", "rl-A", "rl-B"):  # sampled actions, on the held-out layouts
        report = json.loads((results / f"eval-{name}-stochastic.json").read_text())
        assert report["deterministic"] is False and report["layouts"] == "held-out", report
    config_b = (results / "rl-B" / "config.yaml").read_text()
    assert "train_expert_only: false" in config_b and "micro_batch_size: 128" in config_b
    config_a = (results / "rl-A" / "config.yaml").read_text()
    assert "gamma: 0.97" in config_a and "layout_pool: 3" in config_a and "layout_pool: 3" in config_b


# The smallest campaign with RL_GPUS=2: one collector, SFT on one rank, no layout pool, no mid-run evaluations.
WHOLE_HOST_PPO = {
    "COLLECTORS": "1",
    "DEMOS_EACH": "2",
    "SFT_GPUS": "1",
    "SFT_STEPS": "2",
    "SFT_BATCH": "4",
    "SFT_SHIFT": "2",
    "EVAL_EPISODES": "2",
    "POOL": "0",
    "MID_EVERY": "0",
    "RL_GPUS": "2",
    "RL_A": "run.max_updates=2",  # one checkpoint (every 2 updates), then the run ends, on a fast box or a slow one
}


def test_campaign_dry_run_with_one_ppo_run_on_both_gpus(tmp_path: Path) -> None:
    """``RL_GPUS=2``: variant A alone, with the 2-GPU config (2 learner ranks, here on gloo), and no variant B."""
    results, log = _run_campaign(
        tmp_path,
        **WHOLE_HOST_PPO,
        RL_END="1",  # long past: PPO gets the 60 s floor
        # no GPU here: the 2-GPU config's NCCL broadcast goes over gloo
        OVERRIDES=f"{TINY} task.render.cache_dir={tmp_path / 'splat-cache'} learner.broadcast_backend=gloo",
    )
    assert "on 2 GPU(s) (gs_vla_ppo_2gpu)" in log and "on GPUs 0-1, no B" in log
    assert "RL_END=1s: PPO runs 60s" in log
    config = (results / "rl-A" / "config.yaml").read_text()
    assert "duration_s: 60.0" in config and "world_size: 2" in config and "target_kl: 0.1" in config
    for rank in (0, 1):  # both ranks trained in step and stopped on their own
        assert re.search(
            rf"rank {rank}: stopped after \d+ updates",
            (results / "rl-A" / "logs" / f"learner-{rank}.log").read_text(),
        )
    assert not (results / "rl-B").exists()
    assert json.loads((results / "eval-rl-A.json").read_text())["result"]["episodes"] == 2
    assert (results / "curve-A.png").stat().st_size > 0


def test_campaign_dry_run_falls_back_to_one_gpu_when_the_whole_host_run_fails(tmp_path: Path) -> None:
    """A 2-GPU PPO run that makes no checkpoint (here: a config that does not exist) leaves the rest of its time to
    variant A on one GPU with the campaign's config, so a device session still ends with a PPO checkpoint."""
    results, log = _run_campaign(
        tmp_path,
        **WHOLE_HOST_PPO,
        RL_SECONDS="150",  # a ceiling: A1 stops at 2 updates; it needs 60 s left after the failed run
        RL_CONFIG_MULTI="no_such_config",
    )
    assert re.search(r"PPO on 2 GPUs made no checkpoint: A1 on GPU 0 with gs_vla_ppo for the \d+s left", log), log
    assert "world_size: 1" in (results / "rl-A1" / "config.yaml").read_text()
    assert json.loads((results / "eval-rl-A1.json").read_text())["result"]["episodes"] == 2
    assert (results / "curve-A1.png").stat().st_size > 0


def test_campaign_relay_sft_on_one_machine_then_ppo_from_its_bfloat16_shards(tmp_path: Path) -> None:
    """A device machine goes back after 30 minutes: the first runs collect and SFT and exports the checkpoint as
    bfloat16 shards (``STOP_AFTER_SFT=1 SFT_EXPORT_MIB``), which travel in pieces; the next one starts from them
    (``SFT_DIR``) with no collect and no SFT, and evaluates SFT and PPO on the same episodes."""
    first, log = _run_campaign(
        tmp_path / "machine-1", **{**WHOLE_HOST_PPO, "RL_GPUS": "1"}, STOP_AFTER_SFT="1", SFT_EXPORT_MIB="1"
    )
    assert "STOP_AFTER_SFT=1: no evaluations, no PPO" in log and re.search(r"export rc=0 .* wrote \d+ file", log)
    assert not (first / "rl-A").exists() and not (first / "eval-sft.json").exists()
    shards = sorted((first / "sft-export").glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and all(p.stat().st_size <= 1.05 * 2**20 for p in shards)
    carried = tmp_path / "carried"  # what the next machine receives: the shards, their index, config, tokenizer
    shutil.copytree(first / "sft-export", carried)

    second, log = _run_campaign(
        tmp_path / "machine-2",
        SFT_DIR=str(carried),
        NGPU="1",
        EVAL_EPISODES="2",
        POOL="0",
        MID_EVERY="0",
        EVAL_STOCHASTIC="0",
        RL_SECONDS="150",  # a ceiling: PPO stops at its first checkpoint
        RL_A="run.max_updates=2",
    )
    assert f"SFT_DIR={carried}: no collect, no SFT" in log
    assert not list(second.glob("demos-*")) and not (second / "sft").exists()
    assert "checkpoint: " + str(carried) in (second / "rl-A" / "config.yaml").read_text()
    sft_report = json.loads((second / "eval-sft.json").read_text())
    assert sft_report["checkpoint"].endswith("model.safetensors.index.json")
    assert json.loads((second / "eval-rl-A.json").read_text())["result"]["episodes"] == 2
    assert re.search(r"compare SFT -> A held-out: 2 paired episodes", log), log
