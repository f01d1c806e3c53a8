"""values.yaml and values.schema.json: documented, strict, and enforced by Helm; the chart lints clean and every
rendered object is valid for current Kubernetes versions."""

from __future__ import annotations

import json
import re
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
from _chart import CHART_DIR, CI_NAMES, ci_values, render, validate_schema
from kubernetes_validate.utils import latest_version

pytestmark = pytest.mark.integration

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion >= 1.28 for the pod-index label; 1.30 is the
# oldest release still commonly run) and the newest one kubernetes-validate ships schemas for.
KUBE_VERSIONS = ("1.30.0", latest_version())
# CRDs have no schema in kubernetes-validate; test_chart_render checks the ServiceMonitors structurally instead.
CRD_KINDS = {"ServiceMonitor"}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"envServer": {"replicas": -1}}, r"at '/envServer/replicas': minimum: got -1, want 0"),
        ({"learner": {"gpus": "4"}}, r"at '/learner/gpus': got string, want integer"),
        ({"policyServer": {"gpu": 1}}, r"at '/policyServer': additional properties 'gpu' not allowed"),
        ({"run": {"algo": {"clip_ratoi": 0.1}}}, r"at '/run/algo': additional properties 'clip_ratoi' not allowed"),
        ({"run": {"task": {"obs_mode": "pixels"}}}, r"at '/run/task/obs_mode': value must be one of"),
        ({"learner": {"gpus": 1.5}}, r"at '/learner/gpus': got number, want integer"),
        ({"redis": {"external": {"url": "http://redis:6379"}}}, r"at '/redis/external/url'"),
    ],
)
def test_bad_values_are_refused_with_the_schema_message(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=message):
        validate_schema(values)
    with pytest.raises(helm.HelmValuesError, match=message):
        render(values)  # `helm install` checks the schema before rendering anything


@pytest.mark.parametrize("name", CI_NAMES)
def test_ci_values_pass_the_schema(name: str) -> None:
    validate_schema(ci_values(name))


def _walk(node: Any, path: str = "#"):
    if isinstance(node, dict):
        yield path, node
        for key, child in node.items():
            yield from _walk(child, f"{path}/{key}")
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from _walk(child, f"{path}[{i}]")


def test_schema_refuses_unknown_keys_wherever_it_lists_properties() -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    listed = [(path, node) for path, node in _walk(schema) if "properties" in node]
    assert len(listed) > 40
    for path, node in listed:
        assert node.get("additionalProperties") is False, path
    replicas = [node for path, node in _walk(schema) if path.endswith("/properties/replicas")]
    assert replicas and all(node["minimum"] == 0 for node in replicas)


def test_every_value_is_documented_with_a_helm_docs_comment() -> None:
    lines = (CHART_DIR / "values.yaml").read_text().splitlines()
    undocumented = []
    for number, line in enumerate(lines):
        key = re.match(r"^(\s*)([A-Za-z0-9_.\-/]+):", line)
        if not key:
            continue
        indent, above = key.group(1), number - 1
        block = []
        while above >= 0 and lines[above].startswith(f"{indent}#"):
            block.insert(0, lines[above].strip())
            above -= 1
        if not block or not block[0].startswith("# --"):
            undocumented.append(f"values.yaml:{number + 1}: {line.strip()}")
    assert not undocumented, "\n".join(undocumented)


@pytest.mark.parametrize("name", CI_NAMES)
def test_chart_lints_clean(name: str) -> None:
    report = helm.lint(CHART_DIR, ci_values(name), strict=True, kube_version=f"v{KUBE_VERSIONS[0]}")
    assert report["total_charts_linted"] == 1
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 = warning, 3 = error
    assert not problems and not report["errors"], problems or report["errors"]


EDGE_VALUES = {
    "redis-without-password": {"redis": {"auth": {"enabled": False}, "persistence": {"enabled": False}}},
    "redis-existing-secret": {"redis": {"auth": {"existingSecret": "mine"}}},
    "everything-scaled-to-zero": {
        "envServer": {"replicas": 0},
        "policyServer": {"replicas": 0},
        "learner": {"replicas": 0, "persistence": {"enabled": False}},
    },
    "image-by-digest": {"image": {"digest": "sha256:" + "a" * 64}},
}


@pytest.mark.parametrize("name", CI_NAMES + sorted(EDGE_VALUES))
def test_rendered_objects_are_valid_kubernetes(name: str) -> None:
    values = EDGE_VALUES[name] if name in EDGE_VALUES else ci_values(name)
    docs = [d for d in render(values) if d["kind"] not in CRD_KINDS]
    assert docs
    for doc in docs:
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']} on {version}: {exc.message}")
