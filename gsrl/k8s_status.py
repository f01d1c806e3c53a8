"""``gsrl status``: the pods of a Helm release per role, with readiness, restarts, GPUs and key metrics.

Pure functions turn Kubernetes API objects and ``/metrics`` text into rows (``summarize_pods``,
``parse_metrics``, ``key_metrics``, ``format_table``, ``rows_to_json``); a thin edge lists the pods and
scrapes each one through the API server's pod proxy (``/api/v1/namespaces/<ns>/pods/<pod>:<port>/proxy/metrics``),
so the command works from a laptop with only a kubeconfig, without port-forwarding.

Pods are found by the labels the Helm chart puts on them: ``app.kubernetes.io/instance=<release>`` and
``app.kubernetes.io/component`` in (env-server, policy-server, learner, redis).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from prometheus_client.parser import text_string_to_metric_families
from urllib3.exceptions import HTTPError

from gsrl.config import EnvServerConfig, LearnerConfig, PolicyServerConfig

ROLES = ("env-server", "policy-server", "learner", "redis")
INSTANCE_LABEL = "app.kubernetes.io/instance"
COMPONENT_LABEL = "app.kubernetes.io/component"
# Where a role serves /metrics when its pod spec names no container port "metrics" (the config defaults).
DEFAULT_METRICS_PORTS = {
    "env-server": EnvServerConfig.metrics_port,
    "policy-server": PolicyServerConfig.metrics_port,
    "learner": LearnerConfig.metrics_port,
}
DEFAULT_POLICY_GRPC_PORT = PolicyServerConfig.port
GPU_RESOURCE = "nvidia.com/gpu"
# The few numbers worth a glance per role: (Prometheus sample name, short column label).
KEY_METRICS: dict[str, tuple[tuple[str, str], ...]] = {
    "env-server": (("gsrl_env_steps_total", "steps"), ("gsrl_env_success_ratio", "success")),
    "policy-server": (
        ("gsrl_policy_version", "version"),
        ("gsrl_policy_connected_streams", "streams"),
        ("gsrl_policy_stream_length", "stream_len"),
    ),
    "learner": (("gsrl_learner_policy_version", "version"), ("gsrl_learner_updates_total", "updates")),
}
IN_CLUSTER_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


@dataclass(frozen=True)
class PodRow:
    """One pod as ``gsrl status`` shows it. ``metrics`` holds only the role's KEY_METRICS that were found."""

    role: str
    name: str
    ready: str  # ready containers / containers, as kubectl prints it ("1/1")
    status: str  # kubectl's STATUS column: phase, or the reason a container is not running (CrashLoopBackOff)
    restarts: int
    node: str | None  # None while the pod is not scheduled
    gpus: int  # nvidia.com/gpu requested by the pod
    age_seconds: int | None
    pod_ip: str | None
    metrics_port: int | None  # None for roles without a metrics endpoint (redis)
    detail: str | None = None  # why the pod is unhealthy, one line (scheduler message, last exit), else None
    metrics: dict[str, float] = field(default_factory=dict)
    metrics_error: str | None = None


def pod_selector(release: str, roles: Iterable[str] = ROLES) -> str:
    """The label selector of a release's pods in the given roles."""
    return f"{INSTANCE_LABEL}={release},{COMPONENT_LABEL} in ({','.join(roles)})"


# ---------------------------------------------------------------------------------------------------- pure: pods


def summarize_pods(pods: Iterable[Any], now: datetime | None = None) -> list[PodRow]:
    """Rows for V1Pod objects, sorted by role (ROLES order) then name. ``now`` (UTC) fixes the ages in tests."""
    now = now or datetime.now(UTC)
    rows = [_pod_row(pod, now) for pod in pods]
    order = {role: i for i, role in enumerate(ROLES)}
    return sorted(rows, key=lambda r: (order.get(r.role, len(ROLES)), r.name))


def _pod_row(pod: Any, now: datetime) -> PodRow:
    meta, spec, status = pod.metadata, pod.spec, pod.status
    role = (meta.labels or {}).get(COMPONENT_LABEL, "?")
    containers = spec.containers or []
    statuses = (status.container_statuses if status else None) or []
    created = meta.creation_timestamp
    return PodRow(
        role=role,
        name=meta.name,
        ready=f"{sum(1 for s in statuses if s.ready)}/{len(containers)}",
        status=pod_status(pod),
        restarts=sum(s.restart_count or 0 for s in statuses),
        node=spec.node_name or None,
        gpus=requested_gpus(spec),
        age_seconds=None if created is None else max(0, int((now - created).total_seconds())),
        pod_ip=(status.pod_ip if status else None) or None,
        metrics_port=metrics_port(spec, role),
        detail=pod_detail(pod),
    )


def pod_status(pod: Any) -> str:
    """kubectl's STATUS: Terminating, a waiting/terminated container's reason (CrashLoopBackOff), or the phase."""
    if pod.metadata.deletion_timestamp is not None:
        return "Terminating"
    status = pod.status
    if status is None:
        return "Unknown"
    for init in status.init_container_statuses or []:
        if init.state and init.state.waiting and init.state.waiting.reason:
            return f"Init:{init.state.waiting.reason}"
        if init.state and init.state.terminated and init.state.terminated.exit_code != 0:
            return f"Init:{init.state.terminated.reason or 'Error'}"
    for container in status.container_statuses or []:
        state = container.state
        if state and state.waiting and state.waiting.reason:
            return state.waiting.reason
        if state and state.terminated:
            return state.terminated.reason or f"ExitCode:{state.terminated.exit_code}"
    return status.reason or status.phase or "Unknown"


def pod_detail(pod: Any) -> str | None:
    """One line on why a pod is not healthy: the scheduler's message, or how its container last exited."""
    status = pod.status
    if status is None:
        return None
    for condition in status.conditions or []:
        if condition.type == "PodScheduled" and condition.status == "False":
            return _one_line(condition.message or condition.reason or "not scheduled")
    for container in status.container_statuses or []:
        waiting = container.state.waiting if container.state else None
        last = container.last_state.terminated if container.last_state else None
        if last is not None:
            how = f"{container.name} last exited {last.exit_code} ({last.reason or 'Error'})"
            return _one_line(f"{how}: {last.message}" if last.message else how)
        if waiting is not None and waiting.message:
            return _one_line(f"{container.name} {waiting.reason}: {waiting.message}")
    return None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def requested_gpus(spec: Any) -> int:
    """nvidia.com/gpu the scheduler reserves: max(sum over containers, largest init container).

    Extended resources may be given as limits only (requests then default to limits), so limits count too.
    """

    def gpus(container: Any) -> int:
        resources = container.resources
        if resources is None:
            return 0
        quantity = (resources.requests or {}).get(GPU_RESOURCE) or (resources.limits or {}).get(GPU_RESOURCE)
        return int(float(quantity)) if quantity else 0

    regular = sum(gpus(c) for c in spec.containers or [])
    init = max((gpus(c) for c in spec.init_containers or []), default=0)
    return max(regular, init)


def _named_port(spec: Any, name: str) -> int | None:
    for container in spec.containers or []:
        for port in container.ports or []:
            if port.name == name:
                return int(port.container_port)
    return None


def metrics_port(spec: Any, role: str) -> int | None:
    """The container port named "metrics" if the chart declares one, else the role's config default."""
    if role not in DEFAULT_METRICS_PORTS:
        return None
    return _named_port(spec, "metrics") or DEFAULT_METRICS_PORTS[role]


def is_pod_ready(pod: Any) -> bool:
    """Ready as a Service sees it: the pod's Ready condition is True and it is not being deleted."""
    if pod.metadata.deletion_timestamp is not None or pod.status is None:
        return False
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def policy_server_addresses(pods: Iterable[Any], default_port: int = DEFAULT_POLICY_GRPC_PORT) -> list[str]:
    """``ip:port`` (``[ip]:port`` for IPv6) of the ready policy-server pods, sorted; gRPC port named "grpc"."""
    addresses = []
    for pod in pods:
        if (pod.metadata.labels or {}).get(COMPONENT_LABEL) != "policy-server" or not is_pod_ready(pod):
            continue
        ip = pod.status.pod_ip
        if not ip:
            continue
        port = _named_port(pod.spec, "grpc") or default_port
        addresses.append(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")
    return sorted(addresses)


# ------------------------------------------------------------------------------------------------- pure: metrics


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {sample: value}; labelled samples are keyed ``name{label="value",...}``.

    Counters appear under their sample name, ``<name>_total``. Raises ValueError on malformed text.
    """
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}"] = float(sample.value)
            else:
                samples[sample.name] = float(sample.value)
    return samples


def key_metrics(role: str, samples: dict[str, float]) -> dict[str, float]:
    """The role's KEY_METRICS found in ``samples`` (parse_metrics output), by Prometheus name."""
    return {name: samples[name] for name, _label in KEY_METRICS.get(role, ()) if name in samples}


# ---------------------------------------------------------------------------------------------- pure: rendering


def format_age(seconds: int | None) -> str:
    """kubectl-style age: 45s, 12m, 5h, 3d."""
    if seconds is None:
        return "<unknown>"
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 2 * 3600:
        return f"{seconds // 60}m"
    if seconds < 48 * 3600:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def format_number(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.3g}"


def metrics_cell(row: PodRow) -> str:
    if row.metrics_error:
        return f"({row.metrics_error.split(': ')[0]})"  # the full text is in --json
    labels = dict(KEY_METRICS.get(row.role, ()))
    return " ".join(f"{labels[name]}={format_number(v)}" for name, v in row.metrics.items() if name in labels)


TABLE_COLUMNS = ("ROLE", "NAME", "READY", "STATUS", "RESTARTS", "NODE", "GPUS", "AGE", "METRICS")


def table_cells(row: PodRow) -> tuple[str, ...]:
    return (
        row.role,
        row.name,
        row.ready,
        row.status,
        str(row.restarts),
        row.node or "<none>",
        str(row.gpus),
        format_age(row.age_seconds),
        metrics_cell(row),
    )


def format_table(rows: Sequence[PodRow]) -> str:
    """A kubectl-like table, then one line per unhealthy pod saying why (scheduler message, last exit)."""
    cells = [TABLE_COLUMNS, *(table_cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(TABLE_COLUMNS))]
    lines = ["   ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells]
    notes = [f"  {r.name}: {r.detail}" for r in rows if r.detail]
    if notes:
        lines += ["", "problems:", *notes]
    return "\n".join(lines)


def rows_to_json(rows: Sequence[PodRow], release: str, namespace: str) -> str:
    pods = [dataclasses.asdict(r) for r in rows]
    return json.dumps({"release": release, "namespace": namespace, "pods": pods}, indent=2)


# ------------------------------------------------------------------------------------------------- edge: the API


class ClusterConfigError(Exception):
    """No usable Kubernetes credentials; the message is one line for the user."""


def load_cluster_config(kubeconfig: str | None, context: str | None, in_cluster: bool) -> str:
    """Load credentials into the client's default configuration and return the default namespace.

    A kubeconfig (``kubeconfig`` may be a KUBECONFIG-style path list; default ~/.kube/config) wins; without
    one, a pod's service account (``in_cluster``: KUBERNETES_SERVICE_HOST is set) is used.
    """
    path = kubeconfig or "~/.kube/config"
    if any(Path(p).expanduser().is_file() for p in path.split(os.pathsep) if p):
        try:
            config.load_kube_config(config_file=path, context=context)
            contexts, active = config.list_kube_config_contexts(config_file=path)
        except (ConfigException, OSError, yaml.YAMLError) as exc:
            raise ClusterConfigError(f"kubeconfig {path}: {_one_line(str(exc))}") from None
        if context is not None:
            active = next((c for c in contexts if c.get("name") == context), active)
        return ((active or {}).get("context") or {}).get("namespace") or "default"
    if in_cluster:
        try:
            config.load_incluster_config()
        except ConfigException as exc:
            raise ClusterConfigError(f"in-cluster config: {_one_line(str(exc))}") from None
        if IN_CLUSTER_NAMESPACE_FILE.is_file():
            return IN_CLUSTER_NAMESPACE_FILE.read_text().strip() or "default"
        return "default"
    raise ClusterConfigError(
        f"no Kubernetes configuration: kubeconfig {path} not found and not running in a pod "
        "(KUBERNETES_SERVICE_HOST unset); set KUBECONFIG or pass --kubeconfig"
    )


def api_error_text(exc: BaseException) -> str:
    """One line for an ApiException (status, reason, the server's message) or a connection error."""
    status = getattr(exc, "status", None)
    if status is not None and status != 0:
        message = ""
        try:
            message = json.loads(getattr(exc, "body", None) or "{}").get("message", "")
        except (ValueError, AttributeError):
            message = ""
        text = f"HTTP {status} {getattr(exc, 'reason', '') or ''}".rstrip()
        return _one_line(f"{text}: {message}" if message else text)
    reason = getattr(exc, "reason", None)
    return _one_line(f"{type(exc).__name__}: {reason or exc}")


def scrape_metrics(core_api: Any, namespace: str, pod_name: str, port: int, timeout_s: float) -> dict[str, float]:
    """GET a pod's /metrics through the API server's proxy and parse it."""
    response = core_api.connect_get_namespaced_pod_proxy_with_path(
        f"{pod_name}:{port}", namespace, "metrics", _preload_content=False, _request_timeout=timeout_s
    )
    try:
        body = response.data
    finally:
        release = getattr(response, "release_conn", None)
        if release is not None:
            release()
    return parse_metrics(body.decode("utf-8") if isinstance(body, bytes) else str(body))


def with_metrics(core_api: Any, namespace: str, row: PodRow, timeout_s: float) -> PodRow:
    """The row with its key metrics, or with ``metrics_error`` saying why there are none."""
    if row.metrics_port is None:
        return row
    if row.status != "Running":
        return dataclasses.replace(row, metrics_error="not running")
    try:
        samples = scrape_metrics(core_api, namespace, row.name, row.metrics_port, timeout_s)
    except (ApiException, HTTPError, OSError) as exc:
        return dataclasses.replace(row, metrics_error=api_error_text(exc))
    except ValueError:
        return dataclasses.replace(row, metrics_error="unparseable /metrics")
    return dataclasses.replace(row, metrics=key_metrics(row.role, samples))


def collect_rows(
    core_api: Any,
    namespace: str,
    release: str,
    *,
    scrape: bool = True,
    timeout_s: float = 5.0,
    now: datetime | None = None,
) -> list[PodRow]:
    """List the release's pods and (unless ``scrape`` is False) scrape each one's metrics in parallel."""
    pods = core_api.list_namespaced_pod(
        namespace, label_selector=pod_selector(release), _request_timeout=timeout_s
    ).items
    rows = summarize_pods(pods, now=now)
    if not scrape or not rows:
        return rows
    with ThreadPoolExecutor(max_workers=min(16, len(rows))) as pool:
        return list(pool.map(lambda r: with_metrics(core_api, namespace, r, timeout_s), rows))


def discover_policy_servers(core_api: Any, namespace: str, release: str) -> list[str]:
    """``ip:port`` of the release's ready policy servers: peer discovery for env servers instead of DNS round robin.

    Needs RBAC to list pods in ``namespace`` (a Role with pods: list for the env servers' service account).
    """
    pods = core_api.list_namespaced_pod(namespace, label_selector=pod_selector(release, ("policy-server",))).items
    return policy_server_addresses(pods)


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Show a run's pods per role with readiness, restarts, GPUs and key metrics."
    )
    parser.add_argument("--release", default="gsrl", help="Helm release name (label app.kubernetes.io/instance)")
    parser.add_argument("-n", "--namespace", default=None, help="namespace (default: kubeconfig context, or 'default')")
    parser.add_argument("--context", default=None, help="kubeconfig context (default: the current one)")
    parser.add_argument("--kubeconfig", default=None, help="kubeconfig path (default: $KUBECONFIG or ~/.kube/config)")
    parser.add_argument("--no-metrics", action="store_true", help="do not scrape each pod's /metrics")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per API request and metrics scrape")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "gsrl status", *, core_api: Any = None) -> int:
    """Entry point; ``core_api`` (a CoreV1Api or a stand-in) skips loading credentials, for tests."""
    args = build_parser(prog).parse_args(argv)
    default_namespace = "default"
    if core_api is None:
        try:
            default_namespace = load_cluster_config(
                args.kubeconfig or os.environ.get("KUBECONFIG"),
                args.context,
                in_cluster=bool(os.environ.get("KUBERNETES_SERVICE_HOST")),
            )
        except ClusterConfigError as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return 1
        core_api = client.CoreV1Api()
    namespace = args.namespace or default_namespace

    try:
        rows = collect_rows(core_api, namespace, args.release, scrape=not args.no_metrics, timeout_s=args.timeout)
    except (ApiException, HTTPError, OSError) as exc:
        print(f"{prog}: cannot list pods in namespace '{namespace}': {api_error_text(exc)}", file=sys.stderr)
        return 1
    if args.json:
        print(rows_to_json(rows, args.release, namespace))
    elif not rows:
        print(f"{prog}: no pods of release '{args.release}' in namespace '{namespace}'", file=sys.stderr)
    else:
        print(format_table(rows))
    return 0
