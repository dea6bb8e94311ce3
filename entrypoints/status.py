"""`contentml status`: the operator's one glance at every registered model: its champion and
challenger, whether the model server answers with it, the score its gate saw, the last drift
check and the last alias change."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import httpx
from mlflow import MlflowClient

from contentml import registry
from contentml.settings import Settings

DRIFT_RUNS_SEARCHED = 500
"""Newest drift runs read for the last check of each model."""


def served(url: str, model: str, token: str = "") -> bool | None:
    """Whether the model server at `url` answers `model` (KServe's readiness route): True or
    False, or None when no server answers there."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        response = httpx.get(f"{url}/v2/models/{model}/ready", headers=headers, timeout=5.0)
    except httpx.TransportError:
        return None
    return response.status_code == 200


def last_drift_checks(client: MlflowClient, settings: Settings) -> dict[str, dict]:
    """The newest `contentml drift check` run of each model: time, drift share, drifted."""
    runs = client.search_runs(
        [registry.experiment_id(client, settings)],
        filter_string="tags.`contentml.kind` = 'drift'",
        order_by=["attributes.start_time DESC"],
        max_results=DRIFT_RUNS_SEARCHED,
    )
    checks: dict[str, dict] = {}
    for run in runs:
        model = run.data.params.get("model", "")
        if model and model not in checks:
            checks[model] = {
                "time": _iso(run.info.start_time / 1000),
                "drift_share": run.data.metrics.get("drift_share"),
                "drifted": bool(run.data.metrics.get("drifted")),
                "run_id": run.info.run_id,
            }
    return checks


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(seconds))


def _gate(client: MlflowClient, name: str, version: str | None) -> dict | None:
    if version is None:
        return None
    tags = registry.model_version(client, name, version).tags
    if registry.GATE_METRIC_TAG not in tags:
        return None  # promoted by hand, or registered before gates kept their score
    return {"metric": tags[registry.GATE_METRIC_TAG], "score": float(tags[registry.GATE_SCORE_TAG])}


def model_status(settings: Settings, server_url: str | None = None) -> list[dict[str, Any]]:
    """One entry per registered model, by name. `served` asks the server at `server_url`
    (default `settings.serving_url`); None there means no server answered."""
    client = registry.connect(settings)
    url = (server_url or settings.serving_url).rstrip("/")
    drift = last_drift_checks(client, settings)
    statuses = []
    for model in registry.registered_models(client):
        aliases = {alias: str(version) for alias, version in model.aliases.items()}
        champion = aliases.get(registry.Alias.CHAMPION.value)
        events = registry.history(client, model.name)
        statuses.append(
            {
                "model": model.name,
                "champion": champion,
                "challenger": aliases.get(registry.Alias.CHALLENGER.value),
                "served": served(url, model.name, settings.api_token),
                "gate": _gate(client, model.name, champion),
                "last_drift_check": drift.get(model.name),
                "last_alias_change": (
                    dataclasses.asdict(events[-1]) | {"time": _iso(events[-1].time)}
                    if events
                    else None
                ),
            }
        )
    return statuses


def status_lines(statuses: list[dict[str, Any]]) -> list[str]:
    """The statuses as one line per model, for a terminal."""
    lines = []
    for s in statuses:
        served_text = {True: "served", False: "not served", None: "no server"}[s["served"]]
        gate = s["gate"]
        gate_text = f"{gate['metric']} {gate['score']:.4f}" if gate else "no gate score"
        drift = s["last_drift_check"]
        drift_text = (
            f"drift {drift['drift_share']:.0%} at {drift['time']}"
            if drift
            else "never drift-checked"
        )
        change = s["last_alias_change"]
        change_text = (
            f"{change['alias']} -> v{change['to_version']} ({change['action']}, {change['time']})"
            if change
            else "no alias change"
        )
        lines.append(
            f"{s['model']}: champion v{s['champion'] or '-'}, challenger "
            f"v{s['challenger'] or '-'}, {served_text}, {gate_text}, {drift_text}, "
            f"last change {change_text}"
        )
    return lines
