"""The provider alert rules (manifests/monitoring/provider-rules.yaml) and the cost rule: each
expression parses as PromQL (promql-parser, Prometheus' grammar), its thresholds are the
code's, and every metric it reads is one the code exports: a real usage store is filled by
the code, and the exporter scraped."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from serving.backend.costs import CostEntry, CostLedger, register_cost_metrics
from serving.caller import provider_monitor as pm
from serving.caller.provider_usage import ProviderUsage
from serving.caller.providers_config import ProviderConfig, StrategistConfig
from tests.unit.test_monitoring_manifests import PROVIDER_METRICS, dashboard_metrics, metric_names

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests" / "monitoring"
NOON = datetime.datetime(2026, 3, 2, 12, tzinfo=datetime.UTC).timestamp()

THRESHOLDS = {
    "ContentmlProviderQuota80PercentBefore18h": [
        f"> {pm.QUOTA_WARNING_SHARE}",
        f"hour() < {pm.QUOTA_WARNING_BEFORE_HOUR_UTC}",
    ],
    "ContentmlProviderRateLimited": [f"> {pm.RATE_LIMIT_WARNING_PER_HOUR}"],
    "ContentmlProviderSlow": [f"> {pm.SLOW_FACTOR:g} *"],
    "ContentmlProviderLowQuality": [f"> {pm.LOW_QUALITY_SHARE}"],
    "ContentmlProviderContingency": ["< 1"],
}
"""Each rule's thresholds, as the code (`provider_monitor`) has them."""


def rules(name: str) -> dict[str, dict]:
    document = yaml.safe_load((MANIFESTS / name).read_text())
    assert document["kind"] == "PrometheusRule"
    return {rule["alert"]: rule for group in document["spec"]["groups"] for rule in group["rules"]}


@pytest.fixture
def scraped(tmp_path: Path) -> set[str]:
    """The metric names the provider and cost exporters give, each with a sample, after the
    code recorded calls, a 429, a failure and a few costly videos."""
    url = f"sqlite:///{tmp_path / 'backend.db'}"
    usage = ProviderUsage(url, now=lambda: NOON)
    for latency, score in ((1.0, 0.9), (3.0, 0.5)):
        usage.record_call(
            "hosted", 0, prompt_tokens=10, completion_tokens=5, latency_s=latency,
            quality_score=score,
        )  # fmt: skip
    usage.record_rate_limit("hosted", 1, 30.0)
    usage.record_failure("hosted")
    hosted = ProviderConfig(
        name="hosted", model="gpt-4o", base_url="https://api.test/v1", api_key_env="KEYS",
        daily_quota_per_key=1, normal_latency_seconds=1.0,
    )  # fmt: skip
    monitor = pm.ProviderMonitor(StrategistConfig((hosted,)), {"hosted": 2}, usage)
    ledger = CostLedger(url)
    for video in ("v1", "v2"):
        ledger.record(CostEntry("cooking", "script", 1.5, video_id=video))
    registry = CollectorRegistry()
    pm.register_provider_metrics(monitor, registry)
    register_cost_metrics(ledger, registry)
    text = generate_latest(registry).decode()
    ledger.close()
    usage.close()
    return {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }


def test_every_provider_warning_has_a_rule_with_the_codes_thresholds() -> None:
    provider_rules = rules("provider-rules.yaml")
    assert set(provider_rules) == set(THRESHOLDS)
    for alert, fragments in THRESHOLDS.items():
        expr = " ".join(provider_rules[alert]["expr"].split())
        for fragment in fragments:
            assert fragment in expr, (alert, fragment)


@pytest.mark.parametrize(
    ("file", "alert"),
    [("provider-rules.yaml", alert) for alert in THRESHOLDS]
    + [("alert-rules.yaml", "ContentmlCostPerVideoOverBudget")],
)
def test_each_rule_is_promql_over_metrics_the_code_exports(
    file: str, alert: str, scraped: set[str]
) -> None:
    used = metric_names(rules(file)[alert]["expr"])
    assert used and used <= scraped, used - scraped


def test_the_collector_declares_every_metric_it_exports(scraped: set[str]) -> None:
    provider_metrics = {name for name in scraped if not name.startswith("contentml_cost")}
    assert provider_metrics == set(pm.PROVIDER_METRICS)


def test_an_expression_that_is_not_promql_is_refused() -> None:
    with pytest.raises(ValueError):
        metric_names("max(contentml_provider_skipped) >")


def test_the_dashboards_provider_panels_read_exported_metrics(scraped: set[str]) -> None:
    provider = {n for n in dashboard_metrics() if n.startswith(PROVIDER_METRICS)}
    assert {pm.QUOTA_METRIC, pm.RATE_LIMIT_METRIC, pm.P50_METRIC, pm.NORMAL_METRIC} <= provider
    assert {pm.LOW_QUALITY_METRIC, pm.RATE_METRIC} <= provider
    assert provider <= scraped, provider - scraped
