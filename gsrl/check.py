"""``gsrl check``: does this config's env, policy and services fit together, before a run spends hours on it?

Like RLinf's interface test, it builds the configured task (one env) and policy in-process and drives them through
the same path the services take, with nothing running: observations cross the wire codec as the env server sends
them, ``policy.act`` samples action chunks as the policy server does, the env executes them, and
``policy.evaluate_actions`` recomputes the chunks' log-probabilities as the learner does. With unchanged weights the
PPO ratio of every chunk must be 1: if it is not, ``act`` and ``evaluate_actions`` disagree and PPO would train on a
wrong ratio from the first update. It then asks whether Redis and the policy servers the config names answer.

Each finding is a ``CheckResult``; the functions here return lists of them so tests call them in-process. A failed
``error`` result fails the check; a failed ``warning`` (a service not reachable from here, unless
``--require-services``) is printed and does not. Exit codes: 0 PASS, 1 FAIL, 2 a config error (nothing was built).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import redis
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gsrl import codec
from gsrl.checkpoint_files import resolve_weights
from gsrl.cli import add_config_arguments, add_redis_url_argument, parse_role_arguments
from gsrl.config import Config
from gsrl.env_spec import probe_env_spec
from gsrl.loggers import OPTIONAL_PACKAGES
from gsrl.policy import ObservationSpec, Policy, PolicyOutput, load_model_weights
from gsrl.rl.reward_trap import config_reward_trap_warning
from gsrl.tls import open_channel
from gsrl.v1 import rollout_pb2
from services.env_server.core import EnvBatch
from services.env_server.evaluate import build_eval_policy, policy_observation_spec

log = logging.getLogger(__name__)

ERROR, WARNING, INFO = "error", "warning", "info"
RATIO_TOLERANCE = 1e-4
"""How far from 1 the ratio exp(logprob_learner - logprob_sampled) may be for unchanged weights (float32 noise)."""


@dataclass(frozen=True)
class CheckResult:
    """One finding. ``severity`` says what a failure means: error fails the check, warning does not, info is a
    fact to read (observation shapes, versions) that is always ``ok``."""

    name: str
    ok: bool
    detail: str
    severity: str = ERROR

    @property
    def status(self) -> str:
        if self.severity == INFO:
            return "INFO"
        if self.ok:
            return "OK"
        return "FAIL" if self.severity == ERROR else "WARN"


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------- the machine and the config


def check_runtime(config: Config) -> list[CheckResult]:
    """torch and CUDA as this machine has them; a config that asks for CUDA where there is none is warned about."""
    cuda = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    where = f"CUDA {torch.version.cuda}, {len(gpus)} GPU(s): {', '.join(gpus)}" if cuda else "CUDA not available"
    results = [CheckResult("torch", True, f"torch {torch.__version__}, {where}", INFO)]
    wants_cuda = {
        "policy_server.device": config.policy_server.device.startswith("cuda"),
        "learner.device": config.learner.device.startswith("cuda"),
        "task.render.device": config.task.is_splat_rendered and config.task.render.device.startswith("cuda"),
        "task.render.backend": config.task.is_splat_rendered and config.task.render.backend == "gsplat",
    }
    asked = [key for key, wanted in wants_cuda.items() if wanted]
    if asked and not cuda:
        detail = f"{', '.join(asked)} need CUDA, which this machine lacks: those roles would fail to start here"
        results.append(CheckResult("cuda", False, detail, WARNING))
    return results


def check_loggers(config: Config) -> CheckResult:
    """The learner refuses to start when a logger in ``run.loggers`` has no package; say so before it does."""
    optional = [name for name in config.run.loggers if name in OPTIONAL_PACKAGES]
    missing = [name for name in optional if importlib.util.find_spec(OPTIONAL_PACKAGES[name]) is None]
    if missing:
        fix = "; ".join(f"pip install {OPTIONAL_PACKAGES[name]}" for name in missing)
        return CheckResult("loggers", False, f"run.loggers needs {', '.join(missing)}, not installed: {fix}")
    mode = f" ({config.run.logger_mode})" if optional else ""
    return CheckResult("loggers", True, f"{', '.join(config.run.loggers) or 'none'}{mode}")


# ---------------------------------------------------------------- env and policy, end to end


def check_interface(
    config: Config, steps: int = 4, checkpoint: str | Path | None = None, seed: int | None = None
) -> list[CheckResult]:
    """Build the task (one env) and the policy, load ``checkpoint`` if given, and run ``steps`` chunks end to end.

    Stops at the first failing stage (what follows it needs what failed) and returns what it found so far.
    """
    task = config.task
    seed = config.run.seed if seed is None else seed
    try:
        batch = EnvBatch.for_task(task, 1, seed)
    except Exception as exc:  # any failure to build the env is the finding
        return [CheckResult("env", False, f"cannot build {task.id}: {_error_text(exc)}")]
    with batch:
        results = [
            CheckResult(
                "env",
                True,
                f"{task.id}: obs_mode {task.obs_mode}, reward_mode {task.reward_mode}, max_episode_steps "
                f"{task.max_episode_steps}, {task.sim_freq}/{task.control_freq} Hz sim/control, seed {seed}",
            )
        ]
        results += _describe_env(config, batch)
        policy, found = _build_policy(config, batch, checkpoint)
        results += found
        if policy is not None:
            results += _rollout(config, policy, batch, steps)
    return results


def _describe_env(config: Config, batch: EnvBatch) -> list[CheckResult]:
    """Observation keys, action space and renderer: what the policy will be fed and must produce."""
    results = [
        CheckResult(f"observation/{key}", True, f"shape {tuple(shape)}, dtype {np.dtype(dtype)}", INFO)
        for key, (shape, dtype) in batch.observation_spec.items()
    ]
    # EnvBatch maps the policy's [-1, 1] onto the controller's Box; it keeps the bounds private.
    low, high = getattr(batch, "_action_low", None), getattr(batch, "_action_high", None)
    bounds = "" if low is None else f" -> env bounds {_bounds_text(low, high)}"
    chunk = config.policy.action_chunk
    results.append(
        CheckResult(
            "action space",
            True,
            f"dim {batch.action_dim}, policy actions in [-1, 1]{bounds}, control mode {config.task.control_mode}, "
            f"chunk {chunk} (env steps per policy call)",
            INFO,
        )
    )
    if batch.observer is not None:
        render = config.task.render
        results.append(
            CheckResult(
                "render",
                True,
                f"backend {batch.observer.renderer.backend_name} on {batch.observer.device}, image "
                f"{render.width}x{render.height}, cameras {', '.join(render.cameras)}",
                INFO,
            )
        )
    if batch.instructions and batch.instructions[0]:
        results.append(CheckResult("instruction", True, repr(batch.instructions[0]), INFO))
    return results


def _bounds_text(low: np.ndarray, high: np.ndarray) -> str:
    """``[-1, 1]`` when every dimension shares its bounds (Panda's normalized controllers), else per dimension."""
    if np.all(low == low[0]) and np.all(high == high[0]):
        return f"[{low[0]:g}, {high[0]:g}] per dim"
    return f"low {np.round(low, 3).tolist()} high {np.round(high, 3).tolist()}"


def _build_policy(
    config: Config, batch: EnvBatch, checkpoint: str | Path | None
) -> tuple[Policy | None, list[CheckResult]]:
    """The policy as ``gsrl eval`` builds it, after checking that the served spec is what the env sends."""
    results: list[CheckResult] = []
    # Policy servers and learners build their model from probe_env_spec, env servers send EnvBatch observations:
    # a difference between the two is refused by every policy server at the first observation.
    sent = policy_observation_spec(batch)
    try:
        served = probe_env_spec(config.task)
    except Exception as exc:
        return None, [CheckResult("spec", False, f"probing {config.task.id} as the policy server does: {exc}")]
    if served.observation_spec != sent or served.action_dim != batch.action_dim:
        detail = (
            f"policy servers and learners build for observations {served.observation_spec} and action dim "
            f"{served.action_dim}, env servers send {sent} and take action dim {batch.action_dim}"
        )
        return None, [CheckResult("spec", False, detail)]
    results.append(CheckResult("spec", True, "env servers send what policy servers and learners build for"))
    trap = config_reward_trap_warning(config, served.shaping_ceiling)
    if trap is not None:
        results.append(CheckResult("reward", False, trap, WARNING))

    torch.manual_seed(config.run.seed)
    try:
        policy = build_eval_policy(config, batch)
    except Exception as exc:
        return None, [*results, CheckResult("policy", False, f"cannot build {config.policy}: {_error_text(exc)}")]
    params = sum(p.numel() for p in policy.parameters())
    results.append(CheckResult("policy", True, f"{config.policy.kind}, {params:,} parameters"))
    if checkpoint is None:
        return policy, results
    try:
        weights_file = resolve_weights(checkpoint)
        policy.load_state_dict(load_model_weights(weights_file))
    except FileNotFoundError as exc:
        return None, [*results, CheckResult("checkpoint", False, str(exc))]
    except Exception as exc:  # shape/key mismatch, a corrupt file
        detail = (
            f"{checkpoint} does not fit policy {config.policy} on {config.task.id} "
            f"({config.task.control_mode}, obs {sent}): {_error_text(exc)}"
        )
        return None, [*results, CheckResult("checkpoint", False, detail)]
    return policy, [*results, CheckResult("checkpoint", True, f"loaded {weights_file}")]


def _spec_problem(observations: dict[str, torch.Tensor], spec: ObservationSpec) -> str | None:
    """Why a policy server would refuse ``observations`` (keys, per-row shape, dtype, NaN), or None."""
    if set(observations) != set(spec):
        return f"observation keys {sorted(observations)} differ from the spec's {sorted(spec)}"
    for key, (shape, dtype) in spec.items():
        tensor = observations[key]
        if tuple(tensor.shape[1:]) != tuple(shape) or str(tensor.dtype).removeprefix("torch.") != dtype:
            return f"observation '{key}' is {list(tensor.shape)} {tensor.dtype}, spec [B, *{list(shape)}] {dtype}"
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"observation '{key}' contains NaN or infinite values"
    return None


def _output_problem(out: PolicyOutput, rows: int, chunk: int, action_dim: int) -> str | None:
    """Why a policy server could not use ``act``'s output (shapes the segment assembler relies on), or None."""
    want = {"action_chunk": (rows, chunk, action_dim), "logprobs": (rows,), "values": (rows,)}
    for name, shape in want.items():
        tensor = getattr(out, name)
        if tuple(tensor.shape) != shape:
            return f"act returned {name} of shape {list(tensor.shape)}, expected {list(shape)}"
        if not bool(torch.isfinite(tensor).all()):
            return f"act returned non-finite {name}"
    return None


def _rollout(config: Config, policy: Policy, batch: EnvBatch, steps: int) -> list[CheckResult]:
    """act -> wire -> step_chunk for ``steps`` chunks, then the learner's evaluate_actions and a backward pass."""
    spec = policy_observation_spec(batch)
    recorded: list[tuple[dict[str, torch.Tensor], PolicyOutput]] = []
    env_steps, ended = 0, 0
    policy.eval()  # the policy server samples in eval mode
    try:
        observations = batch.reset()
        for _ in range(steps):
            # What the policy server decodes from the env server's StepReport.
            wire = codec.decode_map_torch(codec.encode_map(observations), "observations/")
            problem = _spec_problem(wire, spec)
            if problem is not None:
                return [CheckResult("observations", False, problem)]
            with torch.no_grad():
                out = policy.act(wire, instructions=batch.instructions)
            problem = _output_problem(out, 1, config.policy.action_chunk, batch.action_dim)
            if problem is not None:
                return [CheckResult("act", False, problem)]
            recorded.append((wire, out))
            actions = codec.to_numpy(codec.encode(out.action_chunk.float()), "action_chunk")
            result = batch.step_chunk(np.ascontiguousarray(actions))
            env_steps += result.steps_executed
            ended += int(result.ended.sum())
            observations = result.observations
    except Exception as exc:  # any failure in the loop is the finding
        return [CheckResult("rollout", False, f"after {len(recorded)} chunk(s): {_error_text(exc)}")]
    results = [
        CheckResult(
            "rollout",
            True,
            f"{steps} chunk(s) through the wire codec: action_chunk [1, {config.policy.action_chunk}, "
            f"{batch.action_dim}], {env_steps} env steps, {ended} episode(s) ended",
        )
    ]
    return results + _learner_path(policy, recorded, batch.instructions)


def _learner_path(
    policy: Policy, recorded: list[tuple[dict[str, torch.Tensor], PolicyOutput]], instructions: list[str]
) -> list[CheckResult]:
    """evaluate_actions on the collected chunks as the learner calls it; ratio 1 and finite gradients."""
    observations = {key: torch.cat([obs[key] for obs, _ in recorded]) for key in recorded[0][0]}
    chunks = torch.cat([out.action_chunk for _, out in recorded]).float()
    old_logprobs = torch.cat([out.logprobs for _, out in recorded]).float()
    old_values = torch.cat([out.values for _, out in recorded]).float()
    extras = {key: torch.cat([out.extras[key] for _, out in recorded]) for key in recorded[0][1].extras}
    policy.train()
    try:
        logprobs, entropy, values = policy.evaluate_actions(
            observations, chunks, instructions=instructions * len(recorded), extras=extras or None
        )
    except Exception as exc:
        return [CheckResult("evaluate_actions", False, _error_text(exc))]
    rows = chunks.shape[0]
    for name, tensor in (("logprobs", logprobs), ("entropy", entropy), ("values", values)):
        if tuple(tensor.shape) != (rows,) or not bool(torch.isfinite(tensor).all()):
            detail = f"{name} is {list(tensor.shape)} (expected [{rows}]) or not finite"
            return [CheckResult("evaluate_actions", False, detail)]
    deviation = float((logprobs.detach() - old_logprobs).exp().sub(1).abs().max())
    value_gap = float((values.detach() - old_values).abs().max())
    if deviation > RATIO_TOLERANCE:
        detail = (
            f"with unchanged weights the PPO ratio should be 1, but max |ratio - 1| = {deviation:.3g} "
            f"(> {RATIO_TOLERANCE:g}) over {rows} chunk(s): act and evaluate_actions disagree on the log-probs"
        )
        return [CheckResult("evaluate_actions", False, detail)]
    results = [
        CheckResult(
            "evaluate_actions",
            True,
            f"ratio 1 within {deviation:.1e} over {rows} chunk(s), values match act within {value_gap:.1e}, "
            f"entropy {float(entropy.detach().mean()):.3f}",
        )
    ]
    # A surrogate of the PPO loss: every trainable parameter it reaches must get a finite gradient.
    loss = -(logprobs - old_logprobs).exp().mean() + values.pow(2).mean() - entropy.mean()
    policy.zero_grad(set_to_none=True)
    loss.backward()
    trainable = [(name, p) for name, p in policy.named_parameters() if p.requires_grad]
    bad = [name for name, p in trainable if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
    reached = sum(p.grad is not None for _, p in trainable)
    policy.zero_grad(set_to_none=True)
    if bad or reached == 0:
        detail = f"non-finite gradients in {bad[:5]}" if bad else "the loss reaches no trainable parameter"
        return [*results, CheckResult("backward", False, detail)]
    return [*results, CheckResult("backward", True, f"finite gradients for {reached}/{len(trainable)} tensors")]


# ---------------------------------------------------------------- services


def check_redis(
    config: Config, redis_url: str | None = None, timeout_s: float = 1.0, require: bool = False
) -> CheckResult:
    """PING the configured Redis (or ``redis_url``); with ``redis.start_local`` there is nothing to ask yet."""
    if redis_url is None and config.redis.start_local:
        return CheckResult("redis", True, "redis.start_local: true: gsrl train starts its own redis-server", INFO)
    url = redis_url or f"redis://{config.redis.host}:{config.redis.port}/{config.redis.db}"
    client = redis.Redis.from_url(
        url, password=config.redis.password or None, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
    )
    kwargs = client.connection_pool.connection_kwargs
    where = f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"  # never the URL: it may hold a password
    try:
        client.ping()
        version = client.info("server").get("redis_version", "?")
        return CheckResult("redis", True, f"{where} answers PING (redis {version})")
    except Exception as exc:
        return CheckResult("redis", False, f"{where} unreachable: {_error_text(exc)}", ERROR if require else WARNING)
    finally:
        client.close()


def check_policy_servers(config: Config, timeout_s: float = 1.0, require: bool = False) -> list[CheckResult]:
    """gRPC health check of each address in ``env_server.policy_address`` (TLS as the config says)."""
    service = rollout_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name
    addresses = config.env_server.policy_addresses
    results = []
    for address in addresses:
        name = "policy server" if len(addresses) == 1 else f"policy server {address}"
        try:
            with open_channel(address, config.tls, config.policy_server.max_message_bytes) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
                )
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            ok = reply.status == health_pb2.HealthCheckResponse.SERVING
            detail = f"{address} health {status}"
        except grpc.RpcError as exc:
            ok, detail = False, f"{address} unreachable: {exc.code().name}: {exc.details()}"
        except Exception as exc:  # a TLS file that cannot be read, a malformed target
            ok, detail = False, f"{address}: {_error_text(exc)}"
        results.append(CheckResult(name, ok, detail, ERROR if require else WARNING))
    return results


# ---------------------------------------------------------------- all of it


def run_checks(
    config: Config,
    *,
    steps: int = 4,
    checkpoint: str | Path | None = None,
    require_services: bool = False,
    redis_url: str | None = None,
    timeout_s: float = 1.0,
    seed: int | None = None,
) -> list[CheckResult]:
    """Every check in the order a run needs them: machine, loggers, env + policy end to end, services."""
    results = check_runtime(config)
    results.append(check_loggers(config))
    results += check_interface(config, steps=steps, checkpoint=checkpoint, seed=seed)
    results.append(check_redis(config, redis_url, timeout_s, require_services))
    results += check_policy_servers(config, timeout_s, require_services)
    return results


def passed(results: Sequence[CheckResult]) -> bool:
    return not any(not r.ok and r.severity == ERROR for r in results)


def verdict(results: Sequence[CheckResult]) -> str:
    """One line: ``PASS`` (with the warnings' names) or ``FAIL: <first failing check>: <its error>``."""
    failures = [r for r in results if not r.ok and r.severity == ERROR]
    if failures:
        more = f" (and {len(failures) - 1} more failure(s))" if len(failures) > 1 else ""
        return f"FAIL: {failures[0].name}: {failures[0].detail}{more}"
    warnings = [r.name for r in results if not r.ok]
    return f"PASS ({len(warnings)} warning(s): {', '.join(warnings)})" if warnings else "PASS"


def format_report(results: Sequence[CheckResult]) -> str:
    width = max((len(r.name) for r in results), default=0)
    return "\n".join(f"[{r.status:>4}] {r.name.ljust(width)}  {r.detail}" for r in results)


def main(argv: Sequence[str] | None = None, prog: str = "gsrl check") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Build the configured env and policy, run a few steps end to end (act, env step, the learner's "
        "evaluate_actions), and check that Redis and the policy servers answer. Exit 0 PASS, 1 FAIL, 2 config error.",
    )
    add_config_arguments(parser)
    add_redis_url_argument(parser)
    parser.add_argument("--steps", type=int, default=4, help="action chunks to run end to end (default 4)")
    parser.add_argument("--checkpoint", metavar="PATH", default=None, help="load model.safetensors (dir or file)")
    parser.add_argument("--seed", type=int, default=None, help="env seed (default run.seed)")
    parser.add_argument(
        "--require-services", action="store_true", help="fail (not warn) when Redis or a policy server is unreachable"
    )
    parser.add_argument("--timeout", type=float, default=1.0, help="seconds to wait for each service (default 1)")
    parser.add_argument("--json", metavar="OUT", default=None, help="also write the findings as JSON")
    args, config = parse_role_arguments(parser, argv, "check")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.timeout <= 0:
        parser.error(f"--timeout must be > 0, got {args.timeout}")

    results = run_checks(
        config,
        steps=args.steps,
        checkpoint=args.checkpoint,
        require_services=args.require_services,
        redis_url=args.redis_url,
        timeout_s=args.timeout,
        seed=args.seed,
    )
    line = verdict(results)
    print(f"{prog}: {args.config or 'defaults'} ({config.task.id}, policy {config.policy.kind})")
    print(format_report(results))
    print(line)
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        effective = config.to_dict()
        if effective["redis"]["password"]:
            effective["redis"]["password"] = "***"  # a report gets shared; the password stays in the config
        report = {
            "passed": passed(results),
            "verdict": line,
            "config": effective,
            "results": [dataclasses.asdict(r) for r in results],
        }
        out.write_text(json.dumps(report, indent=2))
    return 0 if passed(results) else 1


if __name__ == "__main__":
    sys.exit(main())
