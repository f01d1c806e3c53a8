"""The Grafana dashboard queries only metrics gsrl really exports (plus DCGM's GPU memory, marked external)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from _chart import CHART_DIR
from prometheus_client import CollectorRegistry

from gsrl.metrics import EnvServerMetrics, LearnerMetrics, PolicyServerMetrics

pytestmark = pytest.mark.integration

DASHBOARD = CHART_DIR / "dashboards" / "gsrl.json"
EXTERNAL = {"DCGM_FI_DEV_FB_USED"}
# The series prometheus-client exposes for each metric family type.
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created")}
METRIC_NAME = re.compile(r"\b(gsrl_[a-z0-9_]+|DCGM_[A-Z0-9_]+)\b")


def exported_series() -> set[str]:
    """Every series name the three roles' registries expose (labelled families included, though they have no
    samples until a label value is used)."""
    names: set[str] = set()
    for metrics in (EnvServerMetrics(), PolicyServerMetrics(), LearnerMetrics()):
        registry: CollectorRegistry = metrics.registry
        for family in registry.collect():
            series = {family.name + suffix for suffix in SUFFIXES[family.type]}
            assert {s.name for s in family.samples} <= series, family.name
            names |= series
    return names


def panels() -> list[dict[str, Any]]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def queries() -> list[tuple[dict[str, Any], str]]:
    return [(panel, target["expr"]) for panel in panels() for target in panel.get("targets", [])]


def test_dashboard_loads_with_unique_panel_ids_and_a_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in panels():
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and panel["description"], panel["title"]


def test_every_queried_gsrl_metric_exists_in_gsrl_metrics() -> None:
    exported = exported_series()
    for panel, expr in queries():
        for name in METRIC_NAME.findall(expr):
            assert name in exported or name in EXTERNAL, f"panel '{panel['title']}' queries unknown {name}: {expr}"


def test_external_metrics_are_marked_as_such() -> None:
    for panel, expr in queries():
        if EXTERNAL & set(METRIC_NAME.findall(expr)):
            assert "EXTERNAL" in panel["description"] and "DCGM" in panel["description"], panel["title"]


def test_dashboard_covers_every_stage_of_the_loop() -> None:
    text = "\n".join(expr for _, expr in queries())
    wanted = [
        r"rate\(gsrl_env_steps_total",
        r"gsrl_env_success_ratio",
        r"gsrl_env_episodes_total",
        r"histogram_quantile\(0\.5, sum by \(le\) \(rate\(gsrl_policy_inference_seconds_bucket",
        r"histogram_quantile\(0\.99, sum by \(le\) \(rate\(gsrl_policy_inference_seconds_bucket",
        r"gsrl_policy_inference_batch_size_bucket",
        r"gsrl_policy_stream_length",
        r"gsrl_learner_update_seconds_bucket",
        r"gsrl_learner_policy_version",
        r"\(gsrl_policy_version",
        r"gsrl_learner_policy_lag_versions_bucket",
        r"gsrl_learner_broadcast_seconds_bucket",
        r"DCGM_FI_DEV_FB_USED",
    ]
    missing = [w for w in wanted if not re.search(w, text)]
    assert not missing, missing
