"""The chart renders what each deployment shape needs: GPUs, world size, Redis, probes, security, monitoring."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import pytest
from _chart import (
    CHART_DIR,
    CI_NAMES,
    NAMESPACE,
    ci_values,
    container,
    env_of,
    find,
    gpu_counts,
    kinds,
    pod_specs,
    render,
)
from helm_python import HelmError

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("name", CI_NAMES)
def test_every_pod_runs_non_root_with_a_read_only_root_and_no_capabilities(name: str) -> None:
    for workload, spec in pod_specs(render(ci_values(name))):
        where = f"{name}: {workload['kind']} {workload['metadata']['name']}"
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["automountServiceAccountToken"] is False, where
        ctr = container(workload)
        sc = ctr["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, where
        assert sc["capabilities"]["drop"] == ["ALL"], where
        volumes = {v["name"]: v for v in spec["volumes"]}
        tmp = [m for m in ctr["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{where}: /tmp must be a writable emptyDir"
        assert spec["terminationGracePeriodSeconds"] > 0, where


@pytest.mark.parametrize("name", CI_NAMES)
def test_gpus_are_requested_and_limited_alike(name: str) -> None:
    values = ci_values(name)
    docs = render(values)
    for workload, role in (
        (find(docs, "Deployment", "env-server"), "envServer"),
        (find(docs, "Deployment", "policy-server"), "policyServer"),
        (find(docs, "StatefulSet", "learner"), "learner"),
    ):
        gpus = values.get(role, {}).get("gpus", {"envServer": 0, "policyServer": 1, "learner": 1}[role])
        requests, limits = gpu_counts(container(workload))
        if gpus:
            assert requests == limits == gpus, f"{name}/{role}"
        else:
            assert requests is None and limits is None, f"{name}/{role}"
            assert env_of(container(workload))["NVIDIA_VISIBLE_DEVICES"]["value"] == "void"


def test_defaults_render_the_three_roles_and_a_bundled_redis() -> None:
    docs = render({})
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "Secret", "PodDisruptionBudget"} <= kinds(docs)
    assert not {"ServiceMonitor", "NetworkPolicy", "HorizontalPodAutoscaler"} & kinds(docs), "opt-in objects"
    assert find(docs, "Deployment", "env-server")["spec"]["replicas"] == 2
    learner = container(find(docs, "StatefulSet", "learner"))
    assert "learner.world_size=1" in learner["args"]
    assert "learner.broadcast_backend=nccl" in learner["args"], "policy servers and learners both hold a GPU"


def test_cpu_only_values_request_no_gpu_and_run_every_role_on_cpu() -> None:
    docs = render(ci_values("cpu"))
    for workload, _spec in pod_specs(docs):
        assert gpu_counts(container(workload)) == (None, None), workload["metadata"]["name"]
    policy = container(find(docs, "Deployment", "policy-server"))["args"]
    learner = container(find(docs, "StatefulSet", "learner"))["args"]
    assert "policy_server.device=cpu" in policy
    assert "learner.device=cpu" in learner and "learner.broadcast_backend=gloo" in learner
    assert "--nproc-per-node=1" in learner


def test_eight_env_pods_and_two_learner_pods_of_four_gpus_make_world_size_eight() -> None:
    docs = render(ci_values("multi-gpu"))
    env = find(docs, "Deployment", "env-server")
    assert env["spec"]["replicas"] == 8
    assert gpu_counts(container(env)) == (1, 1)
    env_vars = env_of(container(env))
    assert "graphics" in env_vars["NVIDIA_DRIVER_CAPABILITIES"]["value"], "SAPIEN renders through Vulkan"

    learner = find(docs, "StatefulSet", "learner")
    ctr = container(learner)
    assert learner["spec"]["replicas"] == 2
    assert gpu_counts(ctr) == (4, 4)
    assert "learner.world_size=8" in ctr["args"]
    assert {"--nnodes=2", "--nproc-per-node=4", "--node-rank=$(POD_INDEX)", "--master-port=29500"} <= set(ctr["args"])
    assert "learner.advertise_host=$(POD_IP)" in ctr["args"]
    grace = learner["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert 0 < int(env_of(ctr)["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]["value"]) < grace, "ranks checkpoint before SIGKILL"
    pod_index = env_of(ctr)["POD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert pod_index == "metadata.labels['apps.kubernetes.io/pod-index']"
    assert [p["containerPort"] for p in ctr["ports"] if p["name"].startswith("metrics-")] == [9301, 9302, 9303, 9304]
    # One shared ReadWriteMany claim instead of a claim per pod.
    assert "volumeClaimTemplates" not in learner["spec"]
    volumes = {v["name"]: v for v in learner["spec"]["template"]["spec"]["volumes"]}
    assert volumes["run-dir"]["persistentVolumeClaim"]["claimName"] == "gsrl-runs"


def test_learners_rendezvous_through_a_headless_service_that_publishes_unready_pods() -> None:
    docs = render(ci_values("multi-gpu"))
    learner = find(docs, "StatefulSet", "learner")
    assert learner["spec"]["podManagementPolicy"] == "Parallel", "OrderedReady would deadlock the rendezvous"
    service = find(docs, "Service", "learner-headless")
    assert learner["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    master = next(a for a in container(learner)["args"] if a.startswith("--master-addr="))
    assert master == f"--master-addr=gsrl-learner-0.gsrl-learner-headless.{NAMESPACE}.svc.cluster.local"
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports["rendezvous"] == 29500 and ports["broadcast"] == 29600
    assert "learner.broadcast_port=29600" in container(learner)["args"]


def test_env_servers_dial_the_policy_servers_headless_service() -> None:
    docs = render({})
    args = container(find(docs, "Deployment", "env-server"))["args"]
    (address,) = [a.split("=", 1)[1] for a in args if a.startswith("env_server.policy_address=")]
    target = urlsplit(address)
    assert target.scheme == "dns" and target.path.startswith("/")
    host, port = target.path.lstrip("/").rsplit(":", 1)
    service = find(docs, "Service", "policy-server-headless")
    assert host == f"{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    assert service["spec"]["clusterIP"] == "None"
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"grpc": int(port)}
    policy = find(docs, "Deployment", "policy-server")
    assert service["spec"]["selector"].items() <= policy["spec"]["template"]["metadata"]["labels"].items()


def test_probes_use_grpc_health_on_the_policy_server_and_healthz_elsewhere() -> None:
    docs = render({})
    policy = container(find(docs, "Deployment", "policy-server"))
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert policy[probe]["grpc"] == {"port": 50051}
    assert "policy_server.host=0.0.0.0" in policy["args"], "a server bound to 127.0.0.1 is unreachable in a pod"
    http_roles = ((find(docs, "Deployment", "env-server"), 9201), (find(docs, "StatefulSet", "learner"), 9301))
    for workload, port in http_roles:
        ctr = container(workload)
        named = {p["name"]: p["containerPort"] for p in ctr["ports"]}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert ctr[probe]["httpGet"]["path"] == "/healthz"
            assert named[ctr[probe]["httpGet"]["port"]] == port


def test_bundled_redis_keeps_an_append_only_file_behind_a_password_from_a_secret() -> None:
    docs = render({})
    redis = find(docs, "StatefulSet", "redis")
    ctr = container(redis)
    assert ctr["image"] == "redis:7"
    args = ctr["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--appendfsync") + 1] == "everysec"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    secret = find(docs, "Secret", "redis")
    key = env_of(ctr)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert key["name"] == secret["metadata"]["name"] and key["key"] in secret["data"]
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"

    for workload in (find(docs, "Deployment", "policy-server"), find(docs, "StatefulSet", "learner")):
        env = [e["name"] for e in container(workload)["env"]]
        # Kubernetes expands $(REDIS_PASSWORD) only from variables defined earlier in the list.
        assert env.index("REDIS_PASSWORD") < env.index("GSRL_REDIS_URL")
        url = env_of(container(workload))["GSRL_REDIS_URL"]["value"]
        assert url == f"redis://:$(REDIS_PASSWORD)@gsrl-redis.{NAMESPACE}.svc.cluster.local:6379/0"
    env_server = env_of(container(find(docs, "Deployment", "env-server")))
    assert "GSRL_REDIS_URL" not in env_server and "REDIS_PASSWORD" not in env_server, "env servers need no Redis"


def test_redis_password_can_be_switched_off_or_taken_from_an_existing_secret() -> None:
    docs = render({"redis": {"auth": {"enabled": False}}})
    assert not [d for d in docs if d["kind"] == "Secret"]
    env = env_of(container(find(docs, "Deployment", "policy-server")))
    assert env["GSRL_REDIS_URL"]["value"] == f"redis://gsrl-redis.{NAMESPACE}.svc.cluster.local:6379/0"
    assert "--requirepass" not in container(find(docs, "StatefulSet", "redis"))["args"]

    docs = render({"redis": {"auth": {"existingSecret": "mine"}}})
    assert not [d for d in docs if d["kind"] == "Secret"]
    for workload in (find(docs, "StatefulSet", "redis"), find(docs, "StatefulSet", "learner")):
        ref = env_of(container(workload))["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "mine", "key": "redis-password"}


def test_external_redis_renders_no_redis_objects() -> None:
    docs = render(ci_values("external-redis"))
    assert not [d for d in docs if d["metadata"]["name"].startswith("gsrl-redis")]
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "StatefulSet"] == ["gsrl-learner"]
    env = env_of(container(find(docs, "Deployment", "policy-server")))
    assert env["GSRL_REDIS_URL"]["value"] == "redis://:$(REDIS_PASSWORD)@redis-master.data.svc.cluster.local:6379/0"
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "shared-redis", "key": "password"}


def test_a_stream_too_short_for_the_world_size_is_refused_at_render_time() -> None:
    with pytest.raises(HelmError, match=r"run.redis.max_stream_len \(48\) must be >= .* = 256"):
        render({"learner": {"replicas": 2, "gpus": 4}})


def test_observability_values_render_monitors_dashboard_policies_and_autoscaler() -> None:
    docs = render(ci_values("observability"))
    services = [d for d in docs if d["kind"] == "Service"]

    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert len(monitors) == 3
    for monitor in monitors:
        # Structural check of the CRD object (kubernetes-validate has no schema for it): every endpoint names a
        # port of a Service it selects, so Prometheus gets targets.
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        selector = monitor["spec"]["selector"]["matchLabels"]
        selected = [s for s in services if selector.items() <= s["metadata"]["labels"].items()]
        port_names = {p["name"] for s in selected for p in s["spec"]["ports"]}
        assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
    learner_monitor = find(docs, "ServiceMonitor", "learner")
    assert [e["port"] for e in learner_monitor["spec"]["endpoints"]] == ["metrics-0", "metrics-1"]

    dashboard = find(docs, "ConfigMap", "dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["gsrl.json"]) == json.loads((CHART_DIR / "dashboards/gsrl.json").read_text())

    hpa = find(docs, "HorizontalPodAutoscaler", "env-server")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gsrl-env-server"}
    assert "replicas" not in find(docs, "Deployment", "env-server")["spec"], "the HPA owns the replica count"

    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    assert set(policies) == {f"gsrl-{c}" for c in ("env-server", "policy-server", "learner", "redis")}
    pods = [(w["spec"]["template"]["metadata"]["labels"], container(w)) for w, _ in pod_specs(docs)]
    for policy in policies.values():
        # Each policy selects exactly one role's pods, and every port it names is a port of those pods.
        selector = policy["spec"]["podSelector"]["matchLabels"]
        (ctr,) = [c for labels, c in pods if selector.items() <= labels.items()]
        names = {p["name"] for p in ctr["ports"]}
        for rule in policy["spec"]["ingress"]:
            assert {p["port"] for p in rule.get("ports", [])} <= names, policy["metadata"]["name"]
    grpc_rule = policies["gsrl-policy-server"]["spec"]["ingress"][0]
    assert {"ipBlock": {"cidr": "10.20.0.0/16"}} in grpc_rule["from"]


def test_pod_disruption_budgets_cover_every_role() -> None:
    docs = render({})
    budgets = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "PodDisruptionBudget"}
    assert set(budgets) == {f"gsrl-{c}" for c in ("env-server", "policy-server", "learner", "redis")}
    assert budgets["gsrl-learner"]["maxUnavailable"] == 0, "one evicted rank stops the whole world"
