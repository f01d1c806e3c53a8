"""What each rendered pod would run is a valid gsrl invocation: the run ConfigMap plus the role's command line load
through gsrl.config, and the shell steps (env seed, learner metrics port) compute what they should."""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path

import pytest
import yaml
from _chart import CHART_DIR, CI_NAMES, REPO, ci_values, container, exec_args, find, render, run_config_text

from gsrl import config as gsrl_config
from gsrl.cli import add_config_arguments, add_redis_url_argument

pytestmark = pytest.mark.integration

POD_ENV = {"POD_NAME": "gsrl-env-server-5d9c7-abcde", "POD_IP": "10.1.2.3", "POD_NAMESPACE": "rl", "RUN_SEED": "0"}


def role_argv(argv: list[str], role: str) -> list[str]:
    """The arguments after ``gsrl <role>`` or after ``torchrun ... -m services.learner``."""
    if argv[0] == "gsrl":
        assert argv[1] == role
        return argv[2:]
    assert argv[0] == "torchrun" and role == "learner"
    return argv[argv.index("services.learner") + 1 :]


def load_role_config(argv: list[str], run_yaml: Path) -> gsrl_config.Config:
    """Parse a role's arguments as its __main__ does and load the config it would run with."""
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    add_redis_url_argument(parser)
    parser.add_argument("--index", type=int, default=0)
    args = parser.parse_args(argv)
    assert args.config == "/etc/gsrl/run.yaml", "every role reads the mounted ConfigMap"
    return gsrl_config.load_config(run_yaml, args.overrides)


@pytest.mark.parametrize("name", CI_NAMES)
def test_run_configmap_is_a_valid_gsrl_config(name: str) -> None:
    data = yaml.safe_load(run_config_text(render(ci_values(name))))
    config = gsrl_config.from_dict(data)
    assert config.task.id == "PutCubeOnPlate-v0"


def test_chart_run_defaults_match_the_state_ppo_preset() -> None:
    chart_run = yaml.safe_load((CHART_DIR / "values.yaml").read_text())["run"]
    preset = yaml.safe_load((REPO / "configs" / "state_ppo.yaml").read_text())
    assert chart_run == preset


@pytest.mark.parametrize("name", CI_NAMES)
def test_each_role_command_loads_with_the_topology_the_chart_computed(name: str, tmp_path: Path) -> None:
    values = ci_values(name)
    docs = render(values)
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(run_config_text(docs))

    env_argv = exec_args(container(find(docs, "Deployment", "env-server")), POD_ENV, tmp_path)
    env_cfg = load_role_config(role_argv(env_argv, "env-server"), run_yaml)
    assert env_cfg.env_server.policy_address.startswith("dns:///gsrl-policy-server-headless.rl.svc.")
    assert env_cfg.env_server.metrics_port == 9201

    policy_argv = exec_args(container(find(docs, "Deployment", "policy-server")), POD_ENV, tmp_path)
    policy_cfg = load_role_config(role_argv(policy_argv, "policy-server"), run_yaml)
    assert (policy_cfg.policy_server.host, policy_cfg.policy_server.port) == ("0.0.0.0", 50051)
    assert policy_cfg.policy_server.device == ("cuda" if values.get("policyServer", {}).get("gpus", 1) else "cpu")

    learner = values.get("learner", {})
    replicas, nproc = learner.get("replicas", 1), max(1, learner.get("gpus", 1))
    for pod_index in range(replicas):
        argv = exec_args(
            container(find(docs, "StatefulSet", "learner")), {**POD_ENV, "POD_INDEX": str(pod_index)}, tmp_path
        )
        assert f"--node-rank={pod_index}" in argv
        cfg = load_role_config(role_argv(argv, "learner"), run_yaml)
        assert cfg.learner.world_size == replicas * nproc
        assert cfg.learner.advertise_host == "10.1.2.3"
        # The learner listens on metrics_port + global rank; the chart's shifted base makes that metricsPort +
        # local rank on every pod, which is what the probes and Service ports use.
        for local_rank in range(nproc):
            assert cfg.learner.metrics_port + pod_index * nproc + local_rank == 9301 + local_rank


def test_env_pods_get_distinct_seeds_from_their_pod_names(tmp_path: Path) -> None:
    ctr = container(find(render({}), "Deployment", "env-server"))

    def seed_of(pod_name: str) -> int:
        argv = exec_args(ctr, {**POD_ENV, "POD_NAME": pod_name}, tmp_path)
        (seed,) = [a.split("=", 1)[1] for a in argv if a.startswith("run.seed=")]
        return int(seed)

    assert seed_of("gsrl-env-server-5d9c7-aaaaa") == seed_of("gsrl-env-server-5d9c7-aaaaa")
    assert seed_of("gsrl-env-server-5d9c7-aaaaa") != seed_of("gsrl-env-server-5d9c7-bbbbb")
    fixed = container(find(render({"envServer": {"seedFromPodName": False}}), "Deployment", "env-server"))
    assert not [a for a in fixed["args"] if "run.seed" in a]


def _schema_type(annotation: object) -> str | list[str]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # float | None -> ["number", "null"]
        return [_schema_type(a) for a in typing.get_args(annotation)]
    if annotation is type(None):
        return "null"
    if typing.get_origin(annotation) is tuple:
        return "array"
    if dataclasses.is_dataclass(annotation):
        return "object"
    return {int: "integer", float: "number", str: "string", bool: "boolean"}[annotation]


def _assert_schema_mirrors(section_schema: dict, cls: type, where: str) -> None:
    hints = typing.get_type_hints(cls)
    assert set(section_schema["properties"]) == set(hints), where
    for key, annotation in hints.items():
        assert section_schema["properties"][key]["type"] == _schema_type(annotation), f"{where}.{key}"
        if dataclasses.is_dataclass(annotation):
            _assert_schema_mirrors(section_schema["properties"][key], annotation, f"{where}.{key}")


def test_run_schema_mirrors_gsrl_config_sections_and_keys() -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())["properties"]["run"]
    hints = typing.get_type_hints(gsrl_config.Config)
    assert set(schema["properties"]) == {f.name for f in dataclasses.fields(gsrl_config.Config)}
    for section, section_schema in schema["properties"].items():
        _assert_schema_mirrors(section_schema, hints[section], f"run.{section}")
