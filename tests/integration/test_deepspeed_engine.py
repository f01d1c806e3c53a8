"""Real DeepSpeed on CPU (gloo, one rank) driving PPOLearnerCore through DeepSpeedEngine.

Each case runs in a fresh subprocess: deepspeed.init_distributed creates a process-global group and
DeepSpeed patches global state, so running it in the pytest process could leak into other tests.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
# The workers import gsrl and the tests' shared builders (tests/_segments.py).
WORKER_PYTHONPATH = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _all_reduce_sum(tensor: object) -> object:
    """The learner core's cross-rank sum, on the workers' process group (as ``LearnerServer`` does it)."""
    import torch.distributed as dist

    dist.all_reduce(tensor)
    return tensor


def _worker(zero_stage: int, bf16: bool) -> dict[str, object]:
    """Runs inside the subprocess: one PPO update on synthetic segments through DeepSpeed."""
    import math

    import deepspeed
    import torch
    import torch.distributed as dist
    from _segments import one_step_segment

    from gsrl.config import AlgoConfig
    from gsrl.policy import build_policy
    from services.learner.core import PPOLearnerCore
    from services.learner.engine import DeepSpeedEngine

    deepspeed.init_distributed(dist_backend="gloo")
    try:
        torch.manual_seed(0)
        spec = {"state": ((4,), "float32")}
        policy = build_policy("gaussian_mlp", spec, action_dim=2, action_chunk=3, hidden_sizes=(32, 32), obs_norm=True)
        algo = AlgoConfig(update_epochs=2, num_minibatches=2)
        engine = DeepSpeedEngine(policy, algo, zero_stage=zero_stage, bf16=bf16)
        assert engine.module is policy
        before = {name: p.detach().float().clone() for name, p in policy.named_parameters()}

        segment = one_step_segment(policy, {"state": torch.randn(16, 4)})
        core = PPOLearnerCore(policy, engine, algo, all_reduce_sum=_all_reduce_sum)
        metrics = core.update([segment])
        changed = [name for name, p in policy.named_parameters() if not torch.equal(p.detach().float(), before[name])]
        return {
            "grad_norm": metrics["actor/grad_norm"],
            "finite": all(math.isfinite(v) for v in metrics.values()),
            "changed": changed,
            "param_dtype": str(policy.log_std.dtype),
            "obs_norm_dtype": str(policy.obs_norm.mean.dtype),
            "grads_cleared": all(p.grad is None or not p.grad.any() for p in policy.parameters()),
        }
    finally:
        dist.destroy_process_group()


def _critic_lr_worker(kind: str, zero_stage: int) -> dict[str, object]:
    """Runs inside the subprocess: an engine with ``algo.critic_lr``, its param groups and one optimizer step."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from gsrl.config import AlgoConfig
    from gsrl.policy import build_policy
    from services.learner.engine import DeepSpeedEngine, param_groups

    actor_lr, critic_lr = 1e-4, 1e-3
    # Clipping off (a huge max norm): Adam's first step then moves each element by ~lr * sign(grad).
    algo = AlgoConfig(lr=actor_lr, critic_lr=critic_lr, max_grad_norm=1e9)

    def refusal(model: torch.nn.Module) -> str:
        try:
            param_groups(model, algo)
        except ValueError as exc:
            return str(exc)
        return ""

    deepspeed.init_distributed(dist_backend="gloo")
    try:
        torch.manual_seed(0)
        errors = []
        if kind == "gaussian_mlp":
            spec = {"state": ((4,), "float32")}
            policy = build_policy("gaussian_mlp", spec, action_dim=2, action_chunk=3, hidden_sizes=(32, 32))
            obs, instructions = {"state": torch.randn(16, 4)}, None
            critic_prefix = "critic."
            # critic_lr with no trainable critic to apply it to must be refused, not silently ignored.
            errors.append(refusal(torch.nn.Linear(2, 2)))  # no critic_parameters() at all
            policy.critic.requires_grad_(False)
            errors.append(refusal(policy))  # a frozen critic
            policy.critic.requires_grad_(True)
        else:
            camera = "rgb/3rd_view_camera"
            spec = {camera: ((32, 32, 3), "uint8"), "state": ((25,), "float32")}
            policy = build_policy("vla", spec, 7, 2, preset="tiny")
            obs = {
                camera: torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8),
                "state": torch.rand(4, 25) * 2 - 1,
            }
            instructions = ["put the cube on the plate"] * 4
            critic_prefix = "model.value_head."
        out = policy.act(obs, instructions)
        names = {id(p): name for name, p in policy.named_parameters()}
        engine = DeepSpeedEngine(policy, algo, zero_stage=zero_stage)
        optimizer = engine.optimizer
        # ZeRO 1/2 keep the original parameters of each group in bit16_groups (param_groups hold flat partitions).
        group_params = getattr(optimizer, "bit16_groups", None) or [g["params"] for g in optimizer.param_groups]
        groups = [
            {"name": g.get("name"), "lr": g["lr"], "params": sorted(names[id(p)] for p in params)}
            for g, params in zip(optimizer.param_groups, group_params, strict=True)
        ]
        before = {name: p.detach().float().clone() for name, p in policy.named_parameters()}
        logprobs, _entropy, values = policy.evaluate_actions(obs, out.action_chunk, instructions, out.extras)
        engine.backward(-logprobs.mean() + values.pow(2).mean())
        engine.step()
        moved = {}
        for group in groups:
            steps = torch.cat(
                [
                    (p.detach().float() - before[n]).abs().flatten()
                    for n, p in policy.named_parameters()
                    if n in group["params"]
                ]
            )
            steps = steps[steps > 0]
            moved[group["name"]] = {
                "count": int(steps.numel()),
                "median": float(steps.median()),
                "q90": float(steps.sort().values[int(0.9 * (steps.numel() - 1))]),
                "max": float(steps.max()),
            }
        return {
            "groups": groups,
            "critic_names": sorted(n for n, p in policy.named_parameters() if n.startswith(critic_prefix)),
            "trainable": sorted(n for n, p in policy.named_parameters() if p.requires_grad),
            "moved": moved,
            "errors": errors,
            "lrs": [actor_lr, critic_lr],
        }
    finally:
        dist.destroy_process_group()


def _critic_warmup_worker(zero_stage: int, bf16: bool) -> dict[str, object]:
    """Runs inside the subprocess: a critic warm-up update, then a PPO update, through DeepSpeed with critic_lr."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from _segments import one_step_segment

    from gsrl.config import AlgoConfig
    from gsrl.policy import build_policy
    from services.learner.core import PPOLearnerCore
    from services.learner.engine import DeepSpeedEngine

    deepspeed.init_distributed(dist_backend="gloo")
    try:
        torch.manual_seed(0)
        spec = {"state": ((4,), "float32")}
        policy = build_policy("gaussian_mlp", spec, action_dim=2, action_chunk=3, hidden_sizes=(32, 32))
        algo = AlgoConfig(update_epochs=2, num_minibatches=2, lr=1e-3, critic_lr=1e-3, critic_warmup_updates=1)
        engine = DeepSpeedEngine(policy, algo, zero_stage=zero_stage, bf16=bf16)
        core = PPOLearnerCore(policy, engine, algo, all_reduce_sum=_all_reduce_sum)
        segment = one_step_segment(policy, {"state": torch.randn(16, 4)})

        def changed_since(before: dict[str, torch.Tensor]) -> list[str]:
            return sorted(n for n, p in policy.named_parameters() if not torch.equal(p.detach().float(), before[n]))

        before = {name: p.detach().float().clone() for name, p in policy.named_parameters()}
        warm = core.update([segment], critic_only=True)
        after_warmup = changed_since(before)
        lrs = [g["lr"] for g in engine.optimizer.param_groups]
        core.update([segment])
        return {
            "after_warmup": after_warmup,
            "after_ppo": changed_since(before),
            "critic_names": sorted(n for n, _ in policy.named_parameters() if n.startswith("critic.")),
            "lrs_after_warmup": lrs,
            "warmup_kl": warm["actor/approx_kl"],
        }
    finally:
        dist.destroy_process_group()


def _micro_batch_worker(zero_stage: int) -> dict[str, object]:
    """Runs on each of 2 gloo ranks: the same PPO update twice from the same weights, once in one pass per minibatch
    and once in micro-batches of 5 (a remainder of 1); returns the largest weight difference between the two and
    the weights' checksum (the ranks must agree: the deferred reduction still averages them)."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from _segments import one_step_segment

    from gsrl.config import AlgoConfig
    from gsrl.policy import build_policy
    from services.learner.core import PPOLearnerCore
    from services.learner.engine import DeepSpeedEngine

    deepspeed.init_distributed(dist_backend="gloo")
    try:
        rank = dist.get_rank()
        spec = {"state": ((4,), "float32")}
        generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        obs = {"state": torch.randn(16, 4, generator=generator)}
        weights = []
        for micro in (0, 5):
            torch.manual_seed(0)
            policy = build_policy("gaussian_mlp", spec, action_dim=2, action_chunk=3, hidden_sizes=(32, 32))
            algo = AlgoConfig(update_epochs=2, num_minibatches=1, micro_batch_size=micro, lr=1e-2)
            engine = DeepSpeedEngine(policy, algo, zero_stage=zero_stage)
            initial = torch.cat([p.detach().float().flatten() for p in policy.parameters()])
            torch.manual_seed(1 + rank)
            rewards = torch.randn(16, generator=torch.Generator().manual_seed(200 + rank))
            segment = one_step_segment(policy, obs, rewards)
            PPOLearnerCore(policy, engine, algo, generator=torch.Generator().manual_seed(0)).update([segment])
            weights.append(torch.cat([p.detach().float().flatten() for p in policy.parameters()]))
        moved = float((weights[0] - initial).abs().max())
        return {
            "rank": rank,
            "max_difference": float((weights[0] - weights[1]).abs().max()),
            "checksum": float(weights[1].double().sum()),
            "moved": moved,
        }
    finally:
        dist.barrier()  # neither rank tears gloo down while the other still uses it (an intermittent SIGABRT)
        dist.destroy_process_group()


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_micro_batches_on_two_ranks_give_the_whole_minibatchs_update(zero_stage: int) -> None:
    results = _run_two_ranks(["micro", str(zero_stage)])
    for result in results:
        assert result["moved"] > 1e-3  # the update did something
        assert result["max_difference"] < 1e-5, result
    assert results[0]["checksum"] == pytest.approx(results[1]["checksum"], rel=1e-9)  # the ranks stayed in step


def _target_kl_worker(zero_stage: int) -> dict[str, object]:
    """Runs on each of 2 gloo ranks: one PPO update, each rank on its own data, with a target_kl that its epochs
    pass; returns how many minibatch steps it took and its weights' checksum."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from _segments import one_step_segment

    from gsrl.config import AlgoConfig
    from gsrl.policy import build_policy
    from services.learner.core import PPOLearnerCore
    from services.learner.engine import DeepSpeedEngine

    deepspeed.init_distributed(dist_backend="gloo")
    try:
        rank = dist.get_rank()
        torch.manual_seed(0)
        policy = build_policy("gaussian_mlp", {"state": ((4,), "float32")}, action_dim=2, action_chunk=3)
        algo = AlgoConfig(update_epochs=20, num_minibatches=2, lr=1e-2, target_kl=1e-3)
        engine = DeepSpeedEngine(policy, algo, zero_stage=zero_stage)
        obs = {"state": torch.randn(16, 4, generator=torch.Generator().manual_seed(100 + rank))}
        torch.manual_seed(1 + rank)
        rewards = torch.randn(16, generator=torch.Generator().manual_seed(200 + rank)) * (1 + 3 * rank)
        segment = one_step_segment(policy, obs, rewards)

        core = PPOLearnerCore(
            policy, engine, algo, generator=torch.Generator().manual_seed(rank), all_reduce_sum=_all_reduce_sum
        )
        metrics = core.update([segment])
        return {
            "rank": rank,
            "steps": metrics["actor/num_minibatch_steps"],
            "early_stopped": metrics["actor/early_stopped"],
            "checksum": float(torch.cat([p.detach().double().flatten() for p in policy.parameters()]).sum()),
        }
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_target_kl_stops_both_ranks_at_the_same_minibatch(zero_stage: int) -> None:
    """Early stopping on KL with data-parallel learners: the ranks see different data (so different KLs), stop
    together on their mean KL, and end with the same weights. A rank stopping alone would leave the other waiting
    in its next gradient all-reduce: the run would hang, and this test time out."""
    results = _run_two_ranks(["kl", str(zero_stage)])
    steps = {r["steps"] for r in results}
    assert len(steps) == 1 and 1 <= steps.pop() < 40, results  # stopped, and at the same minibatch
    assert all(r["early_stopped"] == 1.0 for r in results), results
    assert results[0]["checksum"] == pytest.approx(results[1]["checksum"], rel=1e-9)


def _run_two_ranks(args: list[str]) -> list[dict[str, object]]:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1"]
    command += [f"--master-port={_free_port()}", __file__, *args]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": WORKER_PYTHONPATH}
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    # The two ranks print at once, so their lines can run together.
    results = [json.loads(found) for found in re.findall(r"RESULT (\{[^{}]*\})", proc.stdout)]
    assert sorted(r["rank"] for r in results) == [0, 1], proc.stdout[-4000:]
    return sorted(results, key=lambda r: r["rank"])


def _run(zero_stage: int, bf16: bool) -> dict[str, object]:
    return _run_worker([str(zero_stage), str(int(bf16))])


def _run_worker(args: list[str]) -> dict[str, object]:
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "DS_ACCELERATOR": "cpu",
        "PYTHONPATH": WORKER_PYTHONPATH,
    }
    proc = subprocess.run(
        [sys.executable, __file__, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    result_lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert result_lines, proc.stdout[-4000:]
    return json.loads(result_lines[-1].removeprefix("RESULT "))


@pytest.mark.parametrize(("zero_stage", "bf16"), [(1, False), (0, False), (2, True)])
def test_ppo_update_through_deepspeed_changes_parameters(zero_stage: int, bf16: bool) -> None:
    result = _run(zero_stage, bf16)
    assert result["finite"]
    assert isinstance(result["grad_norm"], float) and result["grad_norm"] > 0
    # Every parameter takes part in the loss (actor, critic, log_std), so every one must move.
    assert {"log_std", "actor.0.weight", "critic.4.weight"} <= set(result["changed"])
    assert result["param_dtype"] == ("torch.bfloat16" if bf16 else "torch.float32")
    assert result["obs_norm_dtype"] == "torch.float32"
    assert result["grads_cleared"]


@pytest.mark.parametrize(
    ("kind", "zero_stage"), [("gaussian_mlp", 0), ("gaussian_mlp", 1), ("gaussian_mlp", 2), ("vla", 1)]
)
def test_critic_lr_gives_the_value_head_its_own_param_group(kind: str, zero_stage: int) -> None:
    result = _run_worker(["critic_lr", kind, str(zero_stage)])
    actor_lr, critic_lr = result["lrs"]
    groups = {g["name"]: g for g in result["groups"]}
    assert list(groups) == ["actor", "critic"]
    assert groups["actor"]["lr"] == pytest.approx(actor_lr)
    assert groups["critic"]["lr"] == pytest.approx(critic_lr)
    # Exactly the value head is in the critic group; every other trainable parameter is the actor's.
    assert result["critic_names"] and groups["critic"]["params"] == result["critic_names"]
    assert sorted(groups["actor"]["params"] + groups["critic"]["params"]) == result["trainable"]
    # Adam's first step moves an element by lr * |g| / (|g| + eps): its group's lr, less where |g| is near eps (many
    # of the VLA's elements), never more. Both groups at one lr would break the bound of one of them.
    for name, lr in (("actor", actor_lr), ("critic", critic_lr)):
        moved = result["moved"][name]
        assert moved["count"] > 0, name
        assert 0.9 * lr < moved["max"] <= 1.01 * lr, (name, moved)
        assert moved["q90"] > 0.5 * lr, (name, moved)
    if kind == "gaussian_mlp":  # no element's gradient is near eps here
        assert all(0.5 * lr < result["moved"][n]["median"] for n, lr in (("actor", actor_lr), ("critic", critic_lr)))
    if kind == "gaussian_mlp":
        assert len(result["errors"]) == 2 and all("algo.critic_lr" in e for e in result["errors"]), result["errors"]


@pytest.mark.parametrize(("zero_stage", "bf16"), [(1, False), (2, True)])
def test_a_critic_warmup_update_moves_only_the_critic_through_deepspeed(zero_stage: int, bf16: bool) -> None:
    """The actor group's lr goes to 0 on DeepSpeed's optimizer too (ZeRO wraps the client optimizer's groups)."""
    result = _run_worker(["warmup", str(zero_stage), str(int(bf16))])
    assert result["after_warmup"] and set(result["after_warmup"]) <= set(result["critic_names"]), result
    assert result["lrs_after_warmup"] == [pytest.approx(1e-3), pytest.approx(1e-3)], "the actor's lr is restored"
    assert abs(result["warmup_kl"]) < 1e-3
    assert set(result["after_ppo"]) - set(result["critic_names"]), "the PPO update after it moves the actor"


if __name__ == "__main__":
    if sys.argv[1] == "warmup":
        result = _critic_warmup_worker(int(sys.argv[2]), bool(int(sys.argv[3])))
    elif sys.argv[1] == "critic_lr":
        result = _critic_lr_worker(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "micro":
        result = _micro_batch_worker(int(sys.argv[2]))
    elif sys.argv[1] == "kl":
        result = _target_kl_worker(int(sys.argv[2]))
    else:
        result = _worker(int(sys.argv[1]), bool(int(sys.argv[2])))
    print("RESULT " + json.dumps(result), flush=True)
    sys.stderr.flush()
    # Exit without the interpreter's teardown: with its process group already destroyed, a rank of the two-rank
    # workers once aborted there in CI ("terminate called without an active exception", exit -6) after printing
    # a correct result.
    os._exit(0)
