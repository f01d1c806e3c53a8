"""``gsrl check``: real ManiSkill envs, the real policy, a real Redis and a real gRPC health service on loopback."""

from __future__ import annotations

import importlib.util
import json
import socket
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from safetensors.torch import save_file

from gsrl import cli
from gsrl.check import (
    ERROR,
    WARNING,
    CheckResult,
    check_interface,
    check_loggers,
    check_policy_servers,
    check_redis,
    passed,
    run_checks,
    verdict,
)
from gsrl.config import load_config
from gsrl.policy.gaussian_mlp import GaussianMLPPolicy
from gsrl.redis_server import LocalRedis
from gsrl.v1 import rollout_pb2
from services.env_server.core import EnvBatch
from services.env_server.evaluate import build_eval_policy

# ManiSkill 3.0.1 calls np.isnan on a torch action each step (BaseAgent.set_action); NumPy 2 warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")
# Two-step episodes: three chunks cross an auto-reset, so the recorded batch holds a post-reset observation.
OVERRIDES = ["policy.hidden_sizes=[16]", "task.max_episode_steps=2"]
SERVICE = rollout_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.name: r for r in results}


def gs_overrides(cache_dir: Path, size: int) -> list[str]:
    return [
        "task.id=GSEnv-PutCubeOnPlate-v0",
        "task.obs_mode=rgb",
        f"task.render.width={size}",
        f"task.render.height={size}",
        f"task.render.cache_dir={cache_dir}",
        "policy.hidden_sizes=[16]",
    ]


@pytest.fixture(scope="module")
def splat_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("splat-cache")  # the scene is converted once for the module's GSEnv checks


@pytest.fixture
def health_server() -> Iterator[tuple[int, health.HealthServicer]]:
    """A gRPC server with only the health service, reporting the policy service as SERVING."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port, servicer
    server.stop(None)


def test_default_state_config_passes_end_to_end() -> None:
    config = load_config(None, OVERRIDES)
    results = run_checks(config, steps=3, timeout_s=0.5)
    found = by_name(results)
    assert passed(results) and verdict(results).startswith("PASS"), verdict(results)
    assert found["observation/state"].detail == "shape (53,), dtype float32"
    assert "dim 7" in found["action space"].detail and "pd_ee_target_delta_pose" in found["action space"].detail
    assert "render" not in found  # a state task has no renderer
    assert "3 env steps, 1 episode(s) ended" in found["rollout"].detail
    assert found["evaluate_actions"].ok and found["evaluate_actions"].detail.startswith("ratio 1 within")
    assert found["backward"].ok
    assert "gsrl train starts its own redis-server" in found["redis"].detail
    assert found["torch"].detail.startswith("torch ")


def test_gsenv_config_reports_the_image_key_and_the_torch_backend(splat_cache: Path) -> None:
    found = by_name(check_interface(load_config(None, gs_overrides(splat_cache, 32)), steps=1))
    assert found["observation/rgb/3rd_view_camera"].detail == "shape (32, 32, 3), dtype uint8"
    assert found["observation/state"].detail == "shape (25,), dtype float32"
    assert found["render"].detail.startswith("backend torch on cpu, image 32x32, cameras 3rd_view_camera")


def test_gsenv_config_passes_through_the_image_encoder(splat_cache: Path) -> None:
    # 48 px: NatureCNN's three convolutions need at least 36 px per side (at 32 the check FAILs on "policy").
    results = check_interface(load_config(None, gs_overrides(splat_cache, 48)), steps=1)
    assert passed(results), verdict(results)
    assert by_name(results)["evaluate_actions"].ok


def test_act_and_evaluate_actions_that_disagree_fail_the_ratio_check(monkeypatch: pytest.MonkeyPatch) -> None:
    evaluate_actions = GaussianMLPPolicy.evaluate_actions

    def off_by_a_little(self, *args, **kwargs):  # e.g. a learner that forgot the tanh correction, or a wrong std
        logprobs, entropy, values = evaluate_actions(self, *args, **kwargs)
        return logprobs + 1e-3, entropy, values

    monkeypatch.setattr(GaussianMLPPolicy, "evaluate_actions", off_by_a_little)
    results = check_interface(load_config(None, OVERRIDES), steps=2)
    line = verdict(results)
    assert line.startswith("FAIL: evaluate_actions: with unchanged weights the PPO ratio should be 1"), line
    assert "max |ratio - 1| = 0.001" in line


def test_checkpoint_that_does_not_fit_fails_naming_the_checkpoint(tmp_path: Path) -> None:
    other = load_config(None, ["policy.hidden_sizes=[8]"])
    with EnvBatch.for_task(other.task, 1, seed=0) as envs:
        weights = build_eval_policy(other, envs).state_dict()
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(bad / "model.safetensors"))

    results = check_interface(load_config(None, OVERRIDES), steps=1, checkpoint=bad)
    line = verdict(results)
    assert not passed(results)
    assert line.startswith(f"FAIL: checkpoint: {bad} does not fit policy"), line
    assert "hidden_sizes=(16,)" in line and "size mismatch" in line
    assert "rollout" not in by_name(results)  # nothing ran on weights that were not loaded

    missing = check_interface(load_config(None, OVERRIDES), steps=1, checkpoint=tmp_path / "nowhere")
    assert verdict(missing).startswith("FAIL: checkpoint: checkpoint not found")


def test_checkpoint_that_fits_is_loaded_and_checked(tmp_path: Path) -> None:
    config = load_config(None, OVERRIDES)
    with EnvBatch.for_task(config.task, 1, seed=0) as envs:
        weights = build_eval_policy(config, envs).state_dict()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / "model.safetensors"))
    results = check_interface(config, steps=2, checkpoint=tmp_path)
    assert passed(results), verdict(results)
    assert by_name(results)["checkpoint"].detail == f"loaded {tmp_path / 'model.safetensors'}"


def test_unreachable_policy_server_warns_and_fails_when_required() -> None:
    address = f"127.0.0.1:{free_port()}"
    config = load_config(None, [f"env_server.policy_address={address}"])
    (warned,) = check_policy_servers(config, timeout_s=0.5)
    assert not warned.ok and warned.severity == WARNING and warned.status == "WARN"
    assert passed([warned]) and verdict([warned]) == "PASS (1 warning(s): policy server)"
    (failed,) = check_policy_servers(config, timeout_s=0.5, require=True)
    assert failed.severity == ERROR and not passed([failed])
    assert verdict([failed]).startswith(f"FAIL: policy server: {address} unreachable: UNAVAILABLE")


def test_reachable_services_are_reported(health_server, redis_server: LocalRedis) -> None:
    port, servicer = health_server
    config = load_config(
        None,
        ["redis.start_local=false", f"redis.port={redis_server.port}", f"env_server.policy_address=127.0.0.1:{port}"],
    )
    found = check_redis(config, timeout_s=1.0, require=True)
    assert found.ok and found.detail.startswith(f"127.0.0.1:{redis_server.port} answers PING (redis ")
    (serving,) = check_policy_servers(config, timeout_s=2.0, require=True)
    assert serving.ok and serving.detail == f"127.0.0.1:{port} health SERVING"

    servicer.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)  # draining: reachable but not serving
    (draining,) = check_policy_servers(config, timeout_s=2.0, require=True)
    assert not draining.ok and draining.detail.endswith("health NOT_SERVING")

    down = load_config(None, ["redis.start_local=false", f"redis.port={free_port()}"])
    unreachable = check_redis(down, timeout_s=0.5, require=True)
    assert not unreachable.ok and unreachable.severity == ERROR and "unreachable" in unreachable.detail


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_logger_without_its_package_fails_the_check() -> None:
    found = check_loggers(load_config(None, ["run.loggers=[tensorboard, wandb]"]))
    assert not found.ok and found.severity == ERROR and "pip install wandb" in found.detail


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", *OVERRIDES, "--steps", "1", "--timeout", "0.5"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("PASS") and "observation/state" in out

    address = f"127.0.0.1:{free_port()}"
    report = tmp_path / "check.json"
    args = [*OVERRIDES, f"env_server.policy_address={address}", "--steps", "1", "--timeout", "0.5"]
    assert cli.main(["check", *args, "--require-services", "--json", str(report)]) == 1
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith(f"FAIL: policy server: {address} unreachable")
    written = json.loads(report.read_text())
    assert written["passed"] is False and written["verdict"] == last
    assert {"name": "policy server", "ok": False}.items() <= written["results"][-1].items()

    with pytest.raises(SystemExit) as exc_info:
        cli.main(["check", "algo.clip_ratoi=0.1"])
    assert exc_info.value.code == 2
    assert "algo.clip_ratio" in capsys.readouterr().err

    assert cli.main(["--help"]) == 0
    assert "check" in capsys.readouterr().out
