"""``scripts/vla_sft_rl.sh`` end to end with the tiny VLA on the CPU: demonstrations -> SFT -> eval -> PPO from the SFT
checkpoint (real redis-server, policy server, env server and DeepSpeed learner processes) -> eval -> learning curve.

The GPU run of the same script (the ``small`` preset) is in docs/benchmarks.md; here sizes are tiny, so success
rates mean nothing and only the chain and its outputs are checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
TINY = (
    "policy.vla_preset=tiny task.render.width=32 task.render.height=32 env_server.num_servers=1 env_server.num_envs=2 "
    "env_server.pipeline_stages=1 policy_server.device=cpu learner.bf16=false learner.segments_per_update=2 "
    "policy_server.max_batch_size=4 algo.update_epochs=1 learner.checkpoint_every=5 task.max_episode_steps=30"
)


def test_vla_pipeline_script_runs_every_step_and_writes_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "vla"
    # Per-step override files (the GPU campaign decides them while the pipeline runs): read when the step starts.
    # PPO ends at its first checkpoint (update 5) however slow the machine; RL_SECONDS is only a ceiling.
    (tmp_path / "rl_overrides").write_text("algo.gamma=0.97\nalgo.gae_lambda=0.9\nrun.max_updates=5\n")
    (tmp_path / "sft_overrides").write_text("")
    env = {
        **os.environ,
        "OUT": str(out),
        "GSRL": f"{sys.executable} -m gsrl.cli",
        "DEMOS": "2",
        "COLLECT_ENVS": "2",
        "SFT_STEPS": "2",
        "SFT_BATCH": "4",
        "EVAL_EPISODES": "2",
        "EVAL_ENVS": "2",
        "RL_SECONDS": "240",
        "OVERRIDES": TINY,
        "SFT_OVERRIDES_FILE": str(tmp_path / "sft_overrides"),
        "RL_OVERRIDES_FILE": str(tmp_path / "rl_overrides"),
    }
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "vla_sft_rl.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [line.split("\t")[0] for line in (out / "timings.tsv").read_text().splitlines()[1:]]
    assert steps == ["collect", "sft", "eval-sft", "rl", "eval-rl", "curve"]
    for name in ("eval-sft", "eval-rl"):
        report = json.loads((out / f"{name}.json").read_text())
        assert report["result"]["episodes"] == 2 and len(report["success_once_ci95"]) == 2
    rl_checkpoint = json.loads((out / "eval-rl.json").read_text())["checkpoint"]
    assert "/rl/checkpoints/update_" in rl_checkpoint  # evaluated what PPO trained, not the SFT weights
    assert (out / "sft" / "model.safetensors").is_file()
    rl_algo = yaml.safe_load((out / "rl" / "config.yaml").read_text())["algo"]
    assert (rl_algo["gamma"], rl_algo["gae_lambda"]) == (0.97, 0.9)
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert list((out / "rl" / "videos" / "eval").rglob("*.mp4"))
