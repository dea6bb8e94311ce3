"""`contentml status`: per model the champion and challenger, whether the server answers with it,
the score its gate saw, the last drift check and the last alias change, from a real registry,
a real drift check and a real HTTP server."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest

from contentml import registry
from entrypoints.cli import main
from entrypoints.status import model_status, status_lines
from monitoring.drift import run_drift_check
from tests.conftest import DATA_DIR
from tests.helpers.registry import register_versions


@pytest.fixture
def ready_server() -> Iterator[str]:
    """A server that answers KServe's readiness route: `quality` is ready, others are not."""

    class Ready(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/v2/models/quality/ready" else 503)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Ready)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def gate(client, version: str, score: float):
    return registry.promotion_gate(
        client,
        "quality",
        version,
        metric="weighted_f1",
        greater_is_better=True,
        challenger_score=score,
        score_champion=lambda uri: 0.7,
    )


def test_status_shows_each_model_as_the_registry_monitoring_and_server_know_it(
    settings, tmp_path, ready_server
):
    client = registry.connect(settings)
    v1, v2 = register_versions(settings, "quality", 2)
    register_versions(settings, "trend", 1)
    assert gate(client, v1, 0.7).promoted
    registry.register_challenger(client, "quality", v2, "newer")
    assert not gate(client, v2, 0.6).promoted  # refused: v1 stays champion, with its score
    tweets = pd.read_csv(DATA_DIR / "toxicity" / "train.csv", nrows=1_000)
    tweets.iloc[:500].to_csv(tmp_path / "reference.csv", index=False)
    tweets.iloc[500:].to_csv(tmp_path / "current.csv", index=False)
    drift = run_drift_check(
        settings, tmp_path / "reference.csv", tmp_path / "current.csv", "quality"
    )

    quality, trend = model_status(settings, ready_server)
    assert (quality["model"], quality["champion"], quality["challenger"]) == ("quality", v1, v2)
    assert quality["served"] is True
    assert quality["gate"] == {"metric": "weighted_f1", "score": 0.7}
    assert quality["last_drift_check"]["run_id"] == drift["run_id"]
    assert quality["last_drift_check"]["drift_share"] == pytest.approx(drift["drift_share"])
    change = quality["last_alias_change"]
    assert (change["alias"], change["to_version"], change["action"]) == (
        "challenger",
        v2,
        "register",
    )

    assert trend["model"] == "trend" and trend["champion"] is None and trend["served"] is False
    assert trend["gate"] is None and trend["last_drift_check"] is None
    assert trend["last_alias_change"] is None

    lines = status_lines([quality, trend])
    assert lines[0].startswith(f"quality: champion v{v1}, challenger v{v2}, served, weighted_f1")
    assert "never drift-checked" in lines[1] and "no alias change" in lines[1]


def test_without_a_server_served_is_unknown(settings, capsys, monkeypatch):
    register_versions(settings, "trend", 1)
    monkeypatch.setenv("CONTENTML_HOME", str(settings.home))
    monkeypatch.setenv("CONTENTML_SERVING_URL", "http://127.0.0.1:9")  # nothing listens there
    assert main(["status", "--json"]) == 0
    (trend,) = json.loads(capsys.readouterr().out)
    assert trend["served"] is None
    assert main(["status"]) == 0
    assert "trend: champion v-, challenger v-, no server" in capsys.readouterr().out
