"""``gsrl status`` and policy-server discovery against recorded Kubernetes API objects.

A live API server cannot exist here (no cluster, no kind/minikube, no network), so recorded objects stand in
for it: pod JSON under ``data/k8s/`` in the shape ``kubectl get pod -o json`` returns (an env server that is
ready, one that is crash-looping, a learner pending without a node, a ready and a starting policy server,
Redis), deserialized into ``V1Pod`` by the client's own ``ApiClient.deserialize``, and ``/metrics`` text
produced by the roles' real metric classes (``gsrl.metrics``). A small stand-in for ``CoreV1Api`` serves
them through the same two calls the command makes (``list_namespaced_pod`` and
``connect_get_namespaced_pod_proxy_with_path``). The pod objects were written by hand to match the
API's schema, not captured from a cluster, so label and port conventions of the Helm chart are assumptions.
"""

from __future__ import annotations

import copy
import inspect
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client import ApiClient, V1Pod, V1PodList
from kubernetes.client.exceptions import ApiException

from gsrl import k8s_status
from gsrl.k8s_status import (
    PodRow,
    collect_rows,
    discover_policy_servers,
    format_table,
    key_metrics,
    load_cluster_config,
    main,
    parse_metrics,
    policy_server_addresses,
    summarize_pods,
)

DATA = Path(__file__).parent / "data" / "k8s"
NOW = datetime(2025, 6, 2, 12, 0, 0, tzinfo=UTC)
POD_FILES = (
    "env-server-ready",
    "env-server-crashloop",
    "learner-pending",
    "policy-server-ready",
    "policy-server-starting",
    "redis",
)
ENV_READY = "gsrl-env-server-6c9d7f5b8d-x7k2p"
ENV_CRASH = "gsrl-env-server-6c9d7f5b8d-q4m9z"
LEARNER = "gsrl-learner-0"
POLICY_READY = "gsrl-policy-server-7f8b9c6d4-h2v5n"
POLICY_STARTING = "gsrl-policy-server-7f8b9c6d4-w8r3t"
REDIS = "gsrl-redis-0"


class FakeResponse:
    """What the REST layer hands to ``deserialize`` (older clients read ``.data``) or returns raw
    (``_preload_content=False``, a urllib3 response whose ``.data`` is the body)."""

    def __init__(self, data: str | bytes) -> None:
        self.data = data

    def release_conn(self) -> None:
        pass


def deserialize(json_text: str, response_type: str) -> Any:
    api_client = ApiClient()
    if "content_type" in inspect.signature(api_client.deserialize).parameters:
        # kubernetes >= 35 (pydantic models): deserialize(response_text, response_type, content_type)
        return api_client.deserialize(json_text, response_type, "application/json")
    return api_client.deserialize(FakeResponse(json_text), response_type)


def pod_json(name: str) -> dict[str, Any]:
    return json.loads((DATA / f"{name}.json").read_text())


def load_pod(name: str) -> V1Pod:
    return deserialize((DATA / f"{name}.json").read_text(), "V1Pod")


def metrics_text(role: str) -> str:
    return (DATA / f"{role}.metrics.txt").read_text()


def matches(selector: str, labels: dict[str, str]) -> bool:
    """The two selector forms the command uses: ``key=value`` and ``key in (a,b)``."""
    terms, depth, start = [], 0, 0
    for i, char in enumerate(selector + ","):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            terms.append(selector[start:i].strip())
            start = i + 1
    for term in terms:
        if " in " in term:
            key, values = term.split(" in ", 1)
            if labels.get(key.strip()) not in {v.strip() for v in values.strip("() ").split(",")}:
                return False
        else:
            key, value = term.split("=", 1)
            if labels.get(key) != value:
                return False
    return True


class FakeCoreV1Api:
    """Serves recorded pods and /metrics through the two CoreV1Api calls ``gsrl status`` makes."""

    def __init__(self, pods: list[V1Pod], metrics: dict[str, str], list_error: ApiException | None = None) -> None:
        self.pods, self.metrics, self.list_error = pods, metrics, list_error
        self.list_calls: list[tuple[str, str]] = []
        self.proxy_calls: list[tuple[str, str, str, dict[str, Any]]] = []

    def list_namespaced_pod(self, namespace: str, label_selector: str = "", **kwargs: Any) -> V1PodList:
        self.list_calls.append((namespace, label_selector))
        if self.list_error is not None:
            raise self.list_error
        in_namespace = [p for p in self.pods if p.metadata.namespace == namespace]
        return V1PodList(items=[p for p in in_namespace if matches(label_selector, p.metadata.labels)])

    def connect_get_namespaced_pod_proxy_with_path(
        self, name: str, namespace: str, path: str, **kwargs: Any
    ) -> FakeResponse:
        self.proxy_calls.append((name, namespace, path, kwargs))
        if name in self.metrics and path == "metrics":
            return FakeResponse(self.metrics[name].encode())
        pod_name, port = name.split(":")
        pod_ip = next(p.status.pod_ip for p in self.pods if p.metadata.name == pod_name)
        body = json.dumps(
            {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "message": f"error trying to reach service: dial tcp {pod_ip}:{port}: connect: connection refused",
                "reason": "ServiceUnavailable",
                "code": 503,
            }
        )
        raise ApiException(status=503, reason="Service Unavailable", body=body)


@pytest.fixture
def pods() -> list[V1Pod]:
    return [load_pod(name) for name in POD_FILES]


@pytest.fixture
def core_api(pods: list[V1Pod]) -> FakeCoreV1Api:
    return FakeCoreV1Api(
        pods,
        {
            f"{ENV_READY}:9201": metrics_text("env-server"),
            f"{POLICY_READY}:9101": metrics_text("policy-server"),
            f"{LEARNER}:9301": metrics_text("learner"),
        },
    )


def by_name(rows: list[PodRow]) -> dict[str, PodRow]:
    return {row.name: row for row in rows}


def test_recorded_pods_deserialize_into_typed_objects(pods: list[V1Pod]) -> None:
    crash = pods[1]
    assert isinstance(crash, V1Pod)
    assert crash.status.container_statuses[0].state.waiting.reason == "CrashLoopBackOff"
    assert crash.metadata.creation_timestamp == datetime(2025, 6, 2, 9, 30, tzinfo=UTC)


def test_summarize_pods_gives_readiness_restarts_node_gpus_and_age(pods: list[V1Pod]) -> None:
    rows = summarize_pods(pods, now=NOW)
    assert [r.role for r in rows] == ["env-server", "env-server", "policy-server", "policy-server", "learner", "redis"]
    row = by_name(rows)

    ready = row[ENV_READY]
    assert (ready.ready, ready.status, ready.restarts, ready.node, ready.gpus) == ("1/1", "Running", 0, "gpu-node-a", 1)
    assert ready.age_seconds == 9000 and ready.metrics_port == 9201 and ready.detail is None

    crash = row[ENV_CRASH]
    assert (crash.ready, crash.status, crash.restarts, crash.node) == ("0/1", "CrashLoopBackOff", 7, "gpu-node-b")
    assert crash.detail == (
        "env-server last exited 1 (Error): RuntimeError: CUDA error: no CUDA-capable device is detected"
    )

    learner = row[LEARNER]
    assert (learner.ready, learner.status, learner.node, learner.gpus) == ("0/1", "Pending", None, 8)
    assert learner.age_seconds == 300 and learner.pod_ip is None
    assert "3 Insufficient nvidia.com/gpu" in learner.detail

    policy = row[POLICY_READY]
    assert (policy.ready, policy.restarts, policy.gpus, policy.metrics_port) == ("1/1", 1, 1, 9101)
    assert policy.detail == "policy-server last exited 137 (OOMKilled)"

    redis = row[REDIS]
    assert (redis.ready, redis.gpus, redis.metrics_port) == ("1/1", 0, None)


def test_gpus_from_limits_only_and_metrics_port_falls_back_to_the_role_default() -> None:
    raw = pod_json("env-server-ready")
    container = raw["spec"]["containers"][0]
    del container["resources"]["requests"]["nvidia.com/gpu"]
    container["resources"]["limits"]["nvidia.com/gpu"] = "2"
    container["ports"] = []
    (row,) = summarize_pods([deserialize(json.dumps(raw), "V1Pod")], now=NOW)
    assert row.gpus == 2 and row.metrics_port == 9201


def test_parse_metrics_reads_counters_gauges_and_labelled_samples() -> None:
    env = parse_metrics(metrics_text("env-server"))
    assert env["gsrl_env_steps_total"] == 1843200.0
    assert env["gsrl_env_success_ratio"] == pytest.approx(0.42)
    assert env['gsrl_env_episodes_total{outcome="success"}'] == 512.0
    assert key_metrics("env-server", env) == {"gsrl_env_steps_total": 1843200.0, "gsrl_env_success_ratio": 0.42}
    assert key_metrics("policy-server", parse_metrics(metrics_text("policy-server"))) == {
        "gsrl_policy_version": 57.0,
        "gsrl_policy_connected_streams": 4.0,
        "gsrl_policy_stream_length": 17.0,
    }
    assert key_metrics("learner", parse_metrics(metrics_text("learner"))) == {
        "gsrl_learner_policy_version": 58.0,
        "gsrl_learner_updates_total": 57.0,
    }
    with pytest.raises(ValueError):
        parse_metrics('gsrl_env_steps_total{outcome="x" 1\n')


def test_collect_rows_scrapes_running_pods_through_the_pod_proxy(core_api: FakeCoreV1Api) -> None:
    rows = by_name(collect_rows(core_api, "rl", "gsrl", now=NOW))
    selector = "app.kubernetes.io/instance=gsrl,app.kubernetes.io/component in (env-server,policy-server,learner,redis)"
    assert core_api.list_calls == [("rl", selector)]
    assert rows[ENV_READY].metrics == {"gsrl_env_steps_total": 1843200.0, "gsrl_env_success_ratio": 0.42}
    assert rows[POLICY_READY].metrics["gsrl_policy_connected_streams"] == 4.0
    # Not scraped: the crash-looping and pending pods have no running container, redis no metrics port.
    assert rows[ENV_CRASH].metrics_error == rows[LEARNER].metrics_error == "not running"
    assert rows[REDIS].metrics == {} and rows[REDIS].metrics_error is None
    # Running but not serving /metrics yet: the proxy's error, on one line.
    assert rows[POLICY_STARTING].metrics == {}
    assert rows[POLICY_STARTING].metrics_error.startswith("HTTP 503 Service Unavailable")
    assert "dial tcp 10.42.5.30:9101: connect: connection refused" in rows[POLICY_STARTING].metrics_error

    scraped = sorted(call[0] for call in core_api.proxy_calls)
    assert scraped == [f"{ENV_READY}:9201", f"{POLICY_READY}:9101", f"{POLICY_STARTING}:9101"]
    name, namespace, path, kwargs = core_api.proxy_calls[0]
    assert (namespace, path, kwargs["_preload_content"]) == ("rl", "metrics", False)


def test_format_table_rows_and_problems(core_api: FakeCoreV1Api) -> None:
    text = format_table(collect_rows(core_api, "rl", "gsrl", now=NOW))
    lines = text.splitlines()
    assert lines[0].split() == ["ROLE", "NAME", "READY", "STATUS", "RESTARTS", "NODE", "GPUS", "AGE", "METRICS"]
    cells = {line.split()[1]: line.split(maxsplit=8) for line in lines[1:7]}
    assert cells[ENV_READY] == [
        *("env-server", ENV_READY, "1/1", "Running", "0", "gpu-node-a", "1", "2h"),
        "steps=1843200 success=0.42",
    ]
    assert cells[ENV_CRASH][2:8] == ["0/1", "CrashLoopBackOff", "7", "gpu-node-b", "1", "2h"]
    assert cells[LEARNER][2:] == ["0/1", "Pending", "0", "<none>", "8", "5m", "(not running)"]
    assert cells[POLICY_READY][-1] == "version=57 streams=4 stream_len=17"
    assert cells[POLICY_STARTING][7:] == ["40s", "(HTTP 503 Service Unavailable)"]
    assert len(cells[REDIS]) == 8  # empty METRICS cell
    problems = lines[lines.index("problems:") + 1 :]
    assert [p.split(":")[0].strip() for p in problems] == [ENV_CRASH, POLICY_READY, LEARNER]


def test_main_json_output(core_api: FakeCoreV1Api, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--json", "--namespace", "rl"], core_api=core_api) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["release"], out["namespace"]) == ("gsrl", "rl")
    pods = {p["name"]: p for p in out["pods"]}
    assert set(pods) == {ENV_READY, ENV_CRASH, LEARNER, POLICY_READY, POLICY_STARTING, REDIS}
    env = pods[ENV_READY]
    assert (env["role"], env["ready"], env["status"], env["restarts"]) == ("env-server", "1/1", "Running", 0)
    assert (env["gpus"], env["node"], env["pod_ip"], env["metrics_port"]) == (1, "gpu-node-a", "10.42.3.21", 9201)
    assert env["metrics"] == {"gsrl_env_steps_total": 1843200.0, "gsrl_env_success_ratio": 0.42}
    assert pods[LEARNER]["node"] is None and pods[LEARNER]["metrics_error"] == "not running"
    assert pods[ENV_CRASH]["restarts"] == 7
    assert isinstance(env["age_seconds"], int)


def test_main_no_metrics_does_not_scrape(core_api: FakeCoreV1Api, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--no-metrics", "-n", "rl"], core_api=core_api) == 0
    assert core_api.proxy_calls == []
    out = capsys.readouterr().out
    assert ENV_READY in out and "steps=" not in out


def test_main_other_release_or_namespace_finds_nothing(
    core_api: FakeCoreV1Api, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--release", "other", "-n", "rl"], core_api=core_api) == 0
    assert "no pods of release 'other' in namespace 'rl'" in capsys.readouterr().err
    assert main(["--json"], core_api=core_api) == 0  # namespace "default" holds none of the recorded pods
    assert json.loads(capsys.readouterr().out)["pods"] == []


def test_main_forbidden_is_one_line(pods: list[V1Pod], capsys: pytest.CaptureFixture[str]) -> None:
    body = json.dumps(
        {
            "kind": "Status",
            "message": 'pods is forbidden: User "alice" cannot list resource "pods" in API group "" '
            'in the namespace "rl"',
            "reason": "Forbidden",
            "code": 403,
        }
    )
    api = FakeCoreV1Api(pods, {}, list_error=ApiException(status=403, reason="Forbidden", body=body))
    assert main(["-n", "rl"], core_api=api) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("gsrl status: cannot list pods in namespace 'rl': HTTP 403 Forbidden: pods is forbidden")


def test_discover_policy_servers_returns_only_ready_pods(core_api: FakeCoreV1Api) -> None:
    assert discover_policy_servers(core_api, "rl", "gsrl") == ["10.42.3.17:50051"]
    selector = "app.kubernetes.io/instance=gsrl,app.kubernetes.io/component in (policy-server)"
    assert core_api.list_calls == [("rl", selector)]
    assert discover_policy_servers(core_api, "rl", "other-release") == []


def test_policy_server_addresses_ipv6_named_port_and_terminating() -> None:
    ready = pod_json("policy-server-ready")
    ipv6 = copy.deepcopy(ready)
    ipv6["metadata"]["name"] = "gsrl-policy-server-7f8b9c6d4-v6v6v"
    ipv6["status"]["podIP"] = "fd00:10:42::17"
    ipv6["spec"]["containers"][0]["ports"][0]["containerPort"] = 50052
    terminating = copy.deepcopy(ready)
    terminating["metadata"]["deletionTimestamp"] = "2025-06-02T11:59:00Z"
    terminating["status"]["podIP"] = "10.42.9.9"
    pods = [deserialize(json.dumps(p), "V1Pod") for p in (ready, ipv6, terminating)]
    pods.append(load_pod("env-server-ready"))  # ready, but not a policy server
    assert policy_server_addresses(pods) == ["10.42.3.17:50051", "[fd00:10:42::17]:50052"]
    assert summarize_pods([pods[2]], now=NOW)[0].status == "Terminating"


def test_no_kubeconfig_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    assert main([]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.err.startswith("gsrl status: no Kubernetes configuration: kubeconfig ")
    assert "missing-kubeconfig" in captured.err


def test_default_namespace_comes_from_the_kubeconfig_context(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(k8s_status.client.Configuration, "_default", None, raising=False)
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "lab", "cluster": {"server": "https://127.0.0.1:6443"}}],
                "users": [{"name": "alice", "user": {"token": "not-a-real-token"}}],
                "contexts": [
                    {"name": "train", "context": {"cluster": "lab", "user": "alice", "namespace": "rl"}},
                    {"name": "plain", "context": {"cluster": "lab", "user": "alice"}},
                ],
                "current-context": "train",
            }
        )
    )
    assert load_cluster_config(str(kubeconfig), None, in_cluster=False) == "rl"
    assert load_cluster_config(str(kubeconfig), "plain", in_cluster=False) == "default"
    with pytest.raises(k8s_status.ClusterConfigError, match="kubeconfig"):
        load_cluster_config(str(kubeconfig), "no-such-context", in_cluster=False)
