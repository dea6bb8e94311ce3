"""`contentml features serve`: Feast's feature server over the settings' store, end to end.

A real embedded store (file offline store, SQLite online store) holds three M4 series and three
days of trending snapshots; the server runs as its own process group on a free port (gunicorn
forks its workers) and must answer what the store answers in-process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pandas as pd
import pytest
from feast import FeatureStore

from contentml.features import (
    channel_history_frame,
    online_history,
)
from contentml.settings import Settings
from entrypoints.demo import free_port
from feature_repo.feature_services import niche_engagement_v1, trend_serving_v1
from feature_repo.niche_schema import CHANNEL_HISTORY
from tests.conftest import DATA_DIR, make_settings, run_cli
from tests.helpers.features import feature_step
from training.data import load_m4_hourly, load_youtube_trending

M4_PATH = DATA_DIR / "m4-hourly" / "Hourly-train.csv"
SERIES_IDS = ["H1", "H2", "H3"]
READY_SECONDS = 120


@pytest.fixture(scope="module")
def videos() -> pd.DataFrame:
    youtube = load_youtube_trending(DATA_DIR)
    first_days = sorted(youtube["event_timestamp"].unique())[:3]
    return youtube[youtube["event_timestamp"].isin(first_days)].reset_index(drop=True)


@pytest.fixture(scope="module")
def published(
    tmp_path_factory: pytest.TempPathFactory, videos: pd.DataFrame
) -> Iterator[tuple[Settings, FeatureStore]]:
    """The training pipeline's feature step on a small slice of the real data."""
    root = tmp_path_factory.mktemp("feature-server")
    settings = make_settings(root / "home", CONTENTML_FEAST_DATA_DIR=str(root / "offline"))
    store = feature_step(settings, load_m4_hourly(M4_PATH, limit=len(SERIES_IDS)), videos)
    yield settings, store
    store.teardown()


@pytest.fixture(scope="module")
def server(published: tuple[Settings, FeatureStore], tmp_path_factory) -> Iterator[str]:
    """`contentml features serve --workers 2` in its own process group, yielded once `/health`
    answers 200; the whole group (gunicorn's master and workers) is stopped afterwards."""
    settings, _ = published
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("feature-server-log") / "server.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "entrypoints.cli", "features", "serve"]
            + ["--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
            env={**os.environ, **settings.to_env()},
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + READY_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(f"feature server exited with {process.returncode}:\n{_tail(log)}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"feature server not healthy after {READY_SECONDS} s:\n{_tail(log)}")
            time.sleep(0.3)
        yield url
    finally:
        _stop_group(process)


def _stop_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    # The workers outlive a killed master unless the group goes too.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:]


def _online_features(url: str, body: dict) -> dict[str, list]:
    """POST /get-online-features -> {feature name: one value per entity row}."""
    response = httpx.post(
        f"{url}/get-online-features",
        json=body,
        headers={"Content-Type": "application/json"},
        timeout=30.0,
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    names = answer["metadata"]["feature_names"]
    return {name: result["values"] for name, result in zip(names, answer["results"], strict=True)}


def test_health(server: str) -> None:
    assert httpx.get(f"{server}/health", timeout=5.0).status_code == 200


def test_topic_history_over_http_is_the_in_process_one(
    server: str, published: tuple[Settings, FeatureStore]
) -> None:
    _, store = published
    ids = [*SERIES_IDS, "H999"]
    answer = _online_features(
        server, {"feature_service": trend_serving_v1.name, "entities": {"series_id": ids}}
    )
    assert answer["series_id"] == ids
    expected = online_history(store, ids)
    assert expected["H1"] is not None  # the store really holds the series
    assert dict(zip(ids, answer["interest_recent"], strict=True)) == expected
    assert answer["interest_recent"][-1] is None


def test_channel_history_over_http_is_the_in_process_one(
    server: str, published: tuple[Settings, FeatureStore], videos: pd.DataFrame
) -> None:
    _, store = published
    history = channel_history_frame(videos)
    last = history[history["event_timestamp"] == history["event_timestamp"].max()].iloc[:2]
    channels = [*last["channel_id"], "ch_unknown"]
    countries = [*last["country"], "US"]
    entities = {"channel_id": channels, "country": countries}
    features = [f"channel_history_fv:{name}" for name in CHANNEL_HISTORY]
    answer = _online_features(server, {"features": features, "entities": entities})
    rows = [{"channel_id": c, "country": k} for c, k in zip(channels, countries, strict=True)]
    expected = store.get_online_features(
        features=store.get_feature_service(niche_engagement_v1.name), entity_rows=rows
    ).to_dict()
    for name in CHANNEL_HISTORY:
        assert answer[name] == expected[name], name
        assert answer[name][:2] == pytest.approx(last[name].tolist()), name
        assert answer[name][-1] is None, name


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["--port", "0"], "port must be 1..65535, not 0"),
        (["--port", "abc"], "not a port number: 'abc'"),
        (["--workers", "0"], "must be at least 1, not 0"),
    ],
)
def test_bad_serve_arguments_exit_2(tmp_path: Path, argv: list[str], problem: str) -> None:
    result = run_cli(tmp_path / "state", "features", "serve", *argv)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert problem in result.stderr
