"""The alert rules and the dashboard query metrics the model server really exports."""

from __future__ import annotations

import json
from pathlib import Path

import promql_parser
import yaml
from prometheus_client import REGISTRY

import serving.model_server.versions  # noqa: F401  (registers the serving metrics)
from monitoring.performance import PERFORMANCE_DROP
from serving.backend.costs import COST_METRICS
from serving.backend.review import ITEMS_METRIC

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests" / "monitoring"
SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")


def exported() -> set[str]:
    names = {PERFORMANCE_DROP, ITEMS_METRIC}  # pushed; registered by the server with its store
    names.update(
        COST_METRICS
    )  # registered by the server with its ledger (tests/serving/test_costs.py)
    for family in REGISTRY.collect():
        names.add(family.name)
        names.update(family.name + suffix for suffix in SUFFIXES)
    return names


def metric_names(expr: str) -> set[str]:
    """The metrics `expr` selects, from its syntax tree (ValueError if it is not PromQL)."""
    names: set[str] = set()

    def visit(node) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def test_alert_rules_use_exported_metrics():
    rules = yaml.safe_load((MANIFESTS / "alert-rules.yaml").read_text())
    (group,) = rules["spec"]["groups"]
    alerts = {rule["alert"]: rule for rule in group["rules"]}
    assert {
        "ContentmlErrorRateHigh",
        "ContentmlLatencyUp20Percent",
        "ContentmlAccuracyDown5Percent",
        "ContentmlCostPerVideoOverBudget",
        "ContentmlReviewOverdue",
    } <= set(alerts)
    assert "> 0.05" in alerts["ContentmlAccuracyDown5Percent"]["expr"]
    assert "> 0.01" in alerts["ContentmlErrorRateHigh"]["expr"]
    assert "1.2 *" in alerts["ContentmlLatencyUp20Percent"]["expr"]
    assert alerts["ContentmlLatencyUp20Percent"]["for"] == "1h"
    assert ">= 10" in alerts["ContentmlCostPerVideoOverBudget"]["expr"]
    used = set().union(*(metric_names(rule["expr"]) for rule in group["rules"]))
    assert used and used <= exported(), used - exported()


def dashboard_metrics() -> set[str]:
    dashboard = json.loads((MANIFESTS / "dashboard.json").read_text())
    return {
        name
        for panel in dashboard["panels"]
        for t in panel["targets"]
        for name in metric_names(t["expr"])
    }


PROVIDER_METRICS = ("contentml_provider_", "contentml_generation_rate_")
"""The script providers' metrics, which their exporter gives once the strategist has used a
store: tests/unit/test_provider_rules.py scrapes it for the dashboard's provider panels."""


def test_dashboard_panels_use_exported_metrics():
    used = {name for name in dashboard_metrics() if not name.startswith(PROVIDER_METRICS)}
    assert len(used) >= 5
    assert used and used <= exported(), used - exported()
