"""placement.preset: separate, shared and hybrid render valid objects with the workloads, containers, GPU requests and
policy addresses each layout needs, and the Services, monitors and policies still find every role."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
from _chart import (
    CHART_DIR,
    NAMESPACE,
    ci_values,
    env_of,
    exec_args,
    find,
    gpu_counts,
    pod_specs,
    render,
    run_config_text,
    validate_schema,
)
from kubernetes_validate.utils import latest_version
from test_chart_commands import POD_ENV, load_role_config, role_argv

pytestmark = pytest.mark.integration

PRESETS = ("separate", "shared", "hybrid")
KUBE_VERSIONS = ("1.30.0", latest_version())
CRD_KINDS = {"ServiceMonitor"}
# The workloads (kind, name) each preset renders besides Redis, and the containers of each, in order.
WORKLOADS = {
    "separate": {
        ("Deployment", "env-server"): ["env-server"],
        ("Deployment", "policy-server"): ["policy-server"],
        ("StatefulSet", "learner"): ["learner"],
    },
    "shared": {("StatefulSet", "worker"): ["learner", "policy-server", "env-server"]},
    "hybrid": {("Deployment", "rollout"): ["policy-server", "env-server"], ("StatefulSet", "learner"): ["learner"]},
}
GPU_HEAVY = {
    "envServer": {"gpus": 1},
    "policyServer": {"gpus": 1},
    "learner": {"gpus": 4},
    "run": {"redis": {"max_stream_len": 128}},  # >= 2 x world size 4 x segments_per_update 16
}


def with_preset(preset: str, values: dict[str, Any] | None = None) -> dict[str, Any]:
    return {**(values or {}), "placement": {"preset": preset}}


def gsrl_workloads(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (d["kind"], d["metadata"]["name"].removeprefix("gsrl-")): d
        for d, _spec in pod_specs(docs)
        if d["metadata"]["name"] != "gsrl-redis"
    }


def containers(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in workload["spec"]["template"]["spec"]["containers"]}


def policy_address(ctr: dict[str, Any]) -> str:
    (address,) = [a.split("=", 1)[1] for a in ctr["args"] if a.startswith("env_server.policy_address=")]
    return address


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("variant", ["default", "cpu", "multi-gpu", "observability"])
def test_every_preset_renders_valid_kubernetes(preset: str, variant: str) -> None:
    values = ci_values(variant)
    if preset == "shared":
        values.pop("envServer", None)  # worker pods are torchrun nodes: no env server autoscaler there
    docs = [d for d in render(with_preset(preset, values)) if d["kind"] not in CRD_KINDS]
    for doc in docs:
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{preset}/{variant}: {doc['kind']} {doc['metadata']['name']} on {version}: {exc.message}")
    for workload, spec in pod_specs(docs):
        # The schema does not see it: one pod's containers share a network namespace and a port-name space.
        ports = [p for c in spec["containers"] for p in c.get("ports", [])]
        names = [p["name"] for p in ports]
        numbers = [p["containerPort"] for p in ports]
        assert len(set(names)) == len(names) and len(set(numbers)) == len(numbers), workload["metadata"]["name"]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_lints_clean_and_runs_every_container_locked_down(preset: str) -> None:
    values = with_preset(preset, GPU_HEAVY)
    report = helm.lint(CHART_DIR, values, strict=True, kube_version=f"v{KUBE_VERSIONS[0]}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 = warning, 3 = error
    assert not problems and not report["errors"], problems or report["errors"]
    for workload, spec in pod_specs(render(values)):
        assert spec["securityContext"]["runAsNonRoot"] is True
        for ctr in spec["containers"]:
            where = f"{workload['metadata']['name']}/{ctr['name']}"
            sc = ctr["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == ["ALL"], where
            assert {"/tmp", "/home/gsrl/.cache"} <= {m["mountPath"] for m in ctr["volumeMounts"]} or (
                workload["metadata"]["name"] == "gsrl-redis"
            ), where


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_renders_its_workloads_and_containers(preset: str) -> None:
    workloads = gsrl_workloads(render(with_preset(preset)))
    assert set(workloads) == set(WORKLOADS[preset])
    for key, names in WORKLOADS[preset].items():
        assert list(containers(workloads[key])) == names, key


def test_separate_is_the_default_and_today_s_layout() -> None:
    fixed = {"redis": {"auth": {"password": "fixed"}}}  # else the generated password differs between renders
    assert render(fixed) == render(with_preset("separate", fixed))
    docs = render(with_preset("separate", GPU_HEAVY))
    for name, kind, gpus in (("env-server", "Deployment", 1), ("policy-server", "Deployment", 1)):
        (ctr,) = containers(find(docs, kind, name)).values()
        assert gpu_counts(ctr) == (gpus, gpus)
    (learner,) = containers(find(docs, "StatefulSet", "learner")).values()
    assert gpu_counts(learner) == (4, 4)
    env = containers(find(docs, "Deployment", "env-server"))["env-server"]
    assert policy_address(env).startswith(f"dns:///gsrl-policy-server-headless.{NAMESPACE}.svc.")


def test_shared_runs_every_role_in_one_pod_on_the_learners_gpus() -> None:
    docs = render(with_preset("shared", GPU_HEAVY))
    worker = find(docs, "StatefulSet", "worker")
    ctrs = containers(worker)
    # The pod's GPUs are requested once (a GPU cannot be requested by two containers); the others see them.
    assert gpu_counts(ctrs["learner"]) == (4, 4)
    for name in ("policy-server", "env-server"):
        assert gpu_counts(ctrs[name]) == (None, None), name
        assert env_of(ctrs[name])["NVIDIA_VISIBLE_DEVICES"]["value"] == "all", name
    assert "NVIDIA_VISIBLE_DEVICES" not in env_of(ctrs["learner"]), "the device plugin sets it for the requester"
    # Learner ranks take GPUs 0-3 by LOCAL_RANK; the policy server starts on the last GPU, the env server the next.
    assert env_of(ctrs["policy-server"])["CUDA_VISIBLE_DEVICES"]["value"] == "3,0,1,2"
    assert env_of(ctrs["env-server"])["CUDA_VISIBLE_DEVICES"]["value"] == "2,3,0,1"
    assert "graphics" in env_of(ctrs["env-server"])["NVIDIA_DRIVER_CAPABILITIES"]["value"]
    assert policy_address(ctrs["env-server"]) == "localhost:50051"
    assert "policy_server.device=cuda" in ctrs["policy-server"]["args"]
    learner_args = ctrs["learner"]["args"]
    assert "learner.world_size=4" in learner_args and "--nproc-per-node=4" in learner_args
    assert f"--master-addr=gsrl-worker-0.gsrl-learner-headless.{NAMESPACE}.svc.cluster.local" in learner_args
    assert "learner.broadcast_backend=nccl" in learner_args, "policy server and rank 0 are on different GPUs"
    assert worker["spec"]["serviceName"] == "gsrl-learner-headless"
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 300, "the longest of the roles"
    # One /dev/shm for the pod, mounted by every container (NCCL and CUDA IPC between co-located processes).
    for ctr in ctrs.values():
        assert any(m["mountPath"] == "/dev/shm" for m in ctr["volumeMounts"]), ctr["name"]
    assert "volumeClaimTemplates" in worker["spec"], "the learner's run directory"


def test_shared_on_one_gpu_broadcasts_weights_over_gloo() -> None:
    # Default GPUs (policy 1, learner 1): the pod's one GPU holds learner rank 0 and the policy server, and NCCL
    # will not put two members of a group on one GPU.
    ctrs = containers(find(render(with_preset("shared")), "StatefulSet", "worker"))
    assert gpu_counts(ctrs["learner"]) == (1, 1)
    assert "CUDA_VISIBLE_DEVICES" not in env_of(ctrs["policy-server"])
    assert "learner.broadcast_backend=gloo" in ctrs["learner"]["args"]
    assert env_of(ctrs["env-server"])["NVIDIA_VISIBLE_DEVICES"]["value"] == "void", "envServer.gpus 0: CPU only"


def test_shared_requests_the_gpus_on_the_first_role_that_uses_them() -> None:
    ctrs = containers(
        find(render(with_preset("shared", {"learner": {"gpus": 0}, "envServer": {"gpus": 2}})), "StatefulSet", "worker")
    )
    assert gpu_counts(ctrs["learner"]) == (None, None)
    assert env_of(ctrs["learner"])["NVIDIA_VISIBLE_DEVICES"]["value"] == "void"
    assert gpu_counts(ctrs["policy-server"]) == (2, 2), "the pod gets the most any role asks for"
    assert env_of(ctrs["env-server"])["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
    assert (
        "learner.device=cpu" in ctrs["learner"]["args"] and "learner.broadcast_backend=gloo" in ctrs["learner"]["args"]
    )


def test_hybrid_puts_env_and_policy_servers_in_rollout_pods_and_learners_apart() -> None:
    values = {**GPU_HEAVY, "envServer": {"replicas": 6, "gpus": 1}, "policyServer": {"gpus": 2}}
    docs = render(with_preset("hybrid", values))
    rollout = find(docs, "Deployment", "rollout")
    assert rollout["spec"]["replicas"] == 6, "rollout pods scale like env servers"
    ctrs = containers(rollout)
    assert gpu_counts(ctrs["policy-server"]) == (2, 2)
    assert gpu_counts(ctrs["env-server"]) == (None, None)
    assert env_of(ctrs["env-server"])["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
    assert env_of(ctrs["policy-server"])["CUDA_VISIBLE_DEVICES"]["value"] == "1,0"
    assert env_of(ctrs["env-server"])["CUDA_VISIBLE_DEVICES"]["value"] == "0,1"
    assert policy_address(ctrs["env-server"]) == "localhost:50051"
    assert "GSRL_REDIS_URL" in env_of(ctrs["policy-server"]) and "GSRL_REDIS_URL" not in env_of(ctrs["env-server"])
    learner = find(docs, "StatefulSet", "learner")
    (learner_ctr,) = containers(learner).values()
    assert gpu_counts(learner_ctr) == (4, 4)
    assert "learner.broadcast_backend=nccl" in learner_ctr["args"]
    assert not [d for d in docs if d["metadata"]["name"] == "gsrl-policy-server-headless"], "env servers dial localhost"


@pytest.mark.parametrize("preset", ["shared", "hybrid"])
def test_co_located_env_servers_load_a_config_that_dials_localhost(preset: str, tmp_path: Path) -> None:
    docs = render(with_preset(preset))
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(run_config_text(docs))
    (workload,) = [w for w in gsrl_workloads(docs).values() if "env-server" in containers(w)]
    argv = exec_args(containers(workload)["env-server"], POD_ENV, tmp_path)
    config = load_role_config(role_argv(argv, "env-server"), run_yaml)
    assert config.env_server.policy_address == "localhost:50051"
    assert config.env_server.policy_addresses == ["localhost:50051"]


@pytest.mark.parametrize("preset", PRESETS)
def test_services_monitors_and_network_policies_find_every_role(preset: str) -> None:
    values = ci_values("observability")
    if preset == "shared":
        values.pop("envServer")
    docs = render(with_preset(preset, values))
    pods = [(w["spec"]["template"]["metadata"]["labels"], containers(w)) for w, _ in pod_specs(docs)]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}

    def selected_ports(selector: dict[str, str]) -> set[str]:
        matched = [ctrs for labels, ctrs in pods if selector.items() <= labels.items()]
        assert len(matched) == 1, selector
        return {p["name"] for ctr in matched[0].values() for p in ctr.get("ports", [])}

    for name in ("gsrl-env-server", "gsrl-policy-server", "gsrl-learner-headless"):
        service = services[name]
        ports = selected_ports(service["spec"]["selector"])
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{name}: {port}"
    for monitor in (d for d in docs if d["kind"] == "ServiceMonitor"):
        selector = monitor["spec"]["selector"]["matchLabels"]
        selected = [s for s in services.values() if selector.items() <= s["metadata"]["labels"].items()]
        names = {p["name"] for s in selected for p in s["spec"]["ports"]}
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= names, monitor["metadata"]["name"]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert len(policies) == len(WORKLOADS[preset]) + 1, "one per workload, plus Redis"
    for policy in policies:
        ports = selected_ports(policy["spec"]["podSelector"]["matchLabels"])
        for rule in policy["spec"]["ingress"]:
            assert {p["port"] for p in rule.get("ports", [])} <= ports, policy["metadata"]["name"]


def test_a_bad_preset_is_refused_by_the_schema() -> None:
    for values in ({"placement": {"preset": "colocated"}}, {"placement": {"preset": 1}}, {"placement": {"gpus": 2}}):
        with pytest.raises(helm.HelmValuesError, match=r"/placement"):
            render(values)
    with pytest.raises(helm.HelmValuesError, match=r"at '/placement/preset': value must be one of"):
        validate_schema({"placement": {"preset": "colocated"}})
    with pytest.raises(helm.HelmValuesError, match=r"at '/run/placement/preset': value must be one of"):
        validate_schema({"run": {"placement": {"preset": "colocated"}}})


def test_co_located_roles_on_one_port_are_refused_at_render_time() -> None:
    with pytest.raises(helm.HelmError, match=r"puts learner.metricsPort \+ 0 and envServer.metricsPort in one pod"):
        render(with_preset("shared", {"envServer": {"metricsPort": 9301}}))
    render(with_preset("separate", {"envServer": {"metricsPort": 9301}}))  # apart, the same port is fine


def test_shared_refuses_an_env_server_autoscaler() -> None:
    with pytest.raises(helm.HelmError, match="envServer.autoscaling needs env servers in pods of their own"):
        render(with_preset("shared", {"envServer": {"autoscaling": {"enabled": True}}}))
