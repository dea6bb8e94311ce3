"""Serving follows the registry: hot swaps on promote and rollback without a failed request, a
version that fails to load leaves the old one serving, the champion/challenger split, the
per-version metrics and the prediction caches (in-process LRU and the real Redis).

Three registered versions of a real trend model (two seasonal-naive members: trained in a
second): 1 and 2 load, 3 has lost its artifacts."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pytest
import redis
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from contentml import registry
from contentml.errors import UserError
from contentml.registry import Alias
from contentml.settings import Settings
from entrypoints.demo import free_port, model_server
from serving.backend.costs import CostLedger
from serving.backend.tasks import TaskAnswerer, TrendBody
from serving.model_server.cache import CacheConfig, LruCache, make_cache
from serving.model_server.trend import TrendModel
from serving.model_server.versions import ServingOptions, VersionWatcher, split_bucket
from serving.server import parse_canary
from tests.conftest import make_settings, requires_redis, wait_until
from training.trend.ensemble import EnsembleConfig
from training.trend.forecasters import Member
from training.trend.model import TrendRequest
from training.trend.train import log_saved_model, train

pytestmark = pytest.mark.slow

NAME = "trend"
SWITCH_LIMIT_SECONDS = 10.0
"""The roadmap's limit from an alias change to the server answering with the new version."""

POLL_SECONDS = 0.5
CANARY_PERCENT = 30
REDIS_URL = "redis://127.0.0.1:6379/0"

QUICK = EnsembleConfig(members=(Member.SEASONAL_NAIVE_DAY, Member.SEASONAL_NAIVE_WEEK))
HOURS = np.arange(24 * 28)
BASE = 100 + 20 * np.sin(2 * np.pi * HOURS / 24)
REPEATED = {"history": BASE[-336:].round(3).tolist(), "horizon": 24}


def unique_instance(rng: np.random.Generator) -> dict:
    """A history no other request sends: a cache miss, fitted by the model."""
    return {"history": (BASE[-336:] + rng.normal(0, 1, 336)).round(3).tolist(), "horizon": 24}


def sample(metric: str, **labels: str) -> float:
    """A metric of this process's registry (0 when never set)."""
    return REGISTRY.get_sample_value(metric, labels) or 0.0


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """contentml's series on a server's `/metrics`, by (name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
        if family.name.startswith("contentml_")
        for s in family.samples
    }


def series(name: str, **labels: str) -> tuple[str, frozenset]:
    return name, frozenset(labels.items())


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> Settings:
    return make_settings(tmp_path_factory.mktemp("hot-swap") / "state")


@pytest.fixture(scope="module")
def client(settings: Settings):
    return registry.connect(settings)


def break_version(client, version: str) -> None:
    """Delete a registered version's artifacts, as a lost bucket prefix would."""
    location = client.get_model_version_download_uri(NAME, version)
    folder = Path(location.removeprefix("file://"))
    assert (folder / "MLmodel").is_file(), location
    shutil.rmtree(folder)


@pytest.fixture(scope="module")
def versions(settings: Settings, client, tmp_path_factory) -> list[str]:
    """Versions 1 and 2 (the same trained model, registered twice) and 3 (broken)."""
    histories = {f"S{i}": BASE * (i + 1) for i in range(3)}
    model_dir = tmp_path_factory.mktemp("trend-model") / "model"
    train(histories, QUICK, model_dir, workers=1)
    registered = []
    for _ in range(3):
        with mlflow.start_run(experiment_id=registry.experiment_id(client, settings)):
            registered.append(str(log_saved_model(model_dir, NAME).registered_model_version))
    assert registered == ["1", "2", "3"]
    break_version(client, "3")
    return registered


def served_version(url: str) -> str | None:
    """The champion version the server at `url` reports serving, from its /metrics."""
    value = scrape(url).get(series("contentml_served_version", model=NAME, alias="champion"))
    return None if value is None else str(int(value))


def champion_is(client, version: str) -> None:
    if registry.alias_version(client, NAME, Alias.CHAMPION) != version:
        # Forced: the champion before may be the broken version, whose inputs can't be read.
        registry.promote(client, NAME, version, reason="test setup", force=True)


def loaded(settings: Settings, **options) -> TrendModel:
    model = TrendModel(NAME, settings, ServingOptions(**options))
    assert model.load()
    return model


def version_of(response: dict) -> str:
    (prediction,) = response["predictions"]
    return prediction["model_version"]


# --- in process: swap, failure, split, caches ------------------------------------------------


def test_a_swap_serves_the_new_version_and_a_rollback_finds_its_answers_cached(
    versions, settings, client
):
    champion_is(client, "1")
    model = loaded(settings)
    hits = sample("contentml_cache_lookups_total", model=NAME, version="1", result="hit")
    first = model.predict_now({"instances": [REPEATED]})
    again = model.predict_now({"instances": [REPEATED]})
    assert again["predictions"] == first["predictions"]
    assert again["request_id"] != first["request_id"]  # one id per request, cached or not
    assert sample("contentml_cache_lookups_total", model=NAME, version="1", result="hit") == (
        hits + 1
    )
    assert version_of(first) == "1" and len(model.cache) == 1

    registry.promote(client, NAME, "2", reason="test")
    misses = sample("contentml_cache_lookups_total", model=NAME, version="2", result="miss")
    assert model.refresh(client) is True
    assert model.version == "2" and len(model.cache) == 1  # v1's answer is kept
    assert version_of(model.predict_now({"instances": [REPEATED]})) == "2"
    assert sample("contentml_cache_lookups_total", model=NAME, version="2", result="miss") == (
        misses + 1
    )
    assert model.refresh(client) is False  # nothing moved

    registry.rollback(client, NAME, reason="test")
    assert model.refresh(client) is True
    rolled_back = model.predict_now({"instances": [REPEATED]})
    assert version_of(rolled_back) == "1" and rolled_back["predictions"] == first["predictions"]
    assert sample("contentml_cache_lookups_total", model=NAME, version="1", result="hit") == (
        hits + 2
    )


def test_a_load_and_a_poll_each_read_the_registry_once(versions, settings, client, monkeypatch):
    champion_is(client, "1")
    calls = {"search_registered_models": 0, "get_model_version_by_alias": 0}

    def counting(method: str):
        read = getattr(registry.RegistryClient, method)

        def counted(self, *args, **kwargs):
            calls[method] += 1
            return read(self, *args, **kwargs)

        return counted

    for method in calls:
        monkeypatch.setattr(registry.RegistryClient, method, counting(method))

    models = [loaded(settings), loaded(settings, canary_percent=CANARY_PERCENT)]
    # The canary's challenger is found in the same read as the champion.
    assert calls == {"search_registered_models": 2, "get_model_version_by_alias": 0}

    registry.promote(client, NAME, "2", reason="test")
    calls.update(dict.fromkeys(calls, 0))
    VersionWatcher(settings, models, POLL_SECONDS).poll_once(client)

    assert calls == {"search_registered_models": 1, "get_model_version_by_alias": 0}
    assert [m.version for m in models] == ["2", "2"]


def test_a_late_trend_task_falls_back_to_the_champions_cached_forecast(versions, settings, client):
    champion_is(client, "1")
    model = loaded(settings)
    repeated = TrendRequest.model_validate(REPEATED)
    assert model.cached_answer(repeated) is None  # not asked yet
    (answer,) = model.predict_now({"instances": [REPEATED]})["predictions"]
    assert model.cached_answer(repeated)["forecast"] == answer["forecast"]
    ledger = CostLedger.from_settings(settings)
    answerer = TaskAnswerer(settings, [model], ledger)
    try:
        body = TrendBody(history=REPEATED["history"], horizon=REPEATED["horizon"])
        fallback = answerer.trend_fallback(body)
        assert fallback.fallback and fallback.model_version == "1"
        assert fallback.forecast == answer["forecast"]
        other = TrendBody(history=(BASE[-336:] + 1).tolist(), horizon=24)
        assert answerer.trend_fallback(other).model_version == "seasonal-naive"
    finally:
        answerer.close()
        ledger.close()


def test_a_pinned_version_ignores_the_aliases(versions, settings, client):
    # What a KServe predictor rendered by `contentml deploy` does: KServe moves the traffic.
    champion_is(client, "1")
    pinned = loaded(dataclasses.replace(settings, pinned_versions=f"{NAME}=2"))
    assert pinned.version == "2"
    registry.promote(client, NAME, "1", Alias.CHALLENGER, reason="test")
    assert pinned.refresh(client) is False and pinned.version == "2"
    assert version_of(pinned.predict_now({"instances": [REPEATED]})) == "2"


def test_a_version_that_fails_to_load_leaves_the_old_one_serving(versions, settings, client):
    champion_is(client, "1")
    model = loaded(settings)
    failures = sample("contentml_model_load_failures_total", model=NAME, version="3")

    registry.promote(client, NAME, "3", reason="broken artifacts", force=True)
    assert model.refresh(client) is False
    assert model.version == "1"
    assert version_of(model.predict_now({"instances": [REPEATED]})) == "1"
    assert sample("contentml_model_load_failures_total", model=NAME, version="3") == failures + 1
    assert model.refresh(client) is False  # not retried while the alias stays on it
    assert sample("contentml_model_load_failures_total", model=NAME, version="3") == failures + 1
    assert sample("contentml_served_version", model=NAME, alias="champion") == 1

    registry.promote(client, NAME, "2", reason="away from a broken one", force=True)
    assert model.refresh(client) is True and model.version == "2"
    registry.rollback(client, NAME)  # back to 3, which still does not load
    assert model.refresh(client) is False and model.version == "2"


def test_the_challenger_answers_its_share_by_a_stable_hash(versions, settings, client):
    champion_is(client, "1")
    registry.promote(client, NAME, "2", Alias.CHALLENGER, reason="canary")
    model = loaded(settings, canary_percent=CANARY_PERCENT, cache=CacheConfig("off"))
    assert (model.serving.champion.version, model.serving.challenger.version) == ("1", "2")
    rng = np.random.default_rng(1)
    instances = [unique_instance(rng) for _ in range(500)]
    answered = [version_of(model.predict_now({"instances": [i]})) for i in instances]
    share = answered.count("2") / len(answered)
    assert abs(share - CANARY_PERCENT / 100) < 0.06, share
    # The same request always goes to the same version (a retry, a cached answer).
    again = [version_of(model.predict_now({"instances": [i]})) for i in instances[:50]]
    assert again == answered[:50]


def test_split_buckets_are_uniform_and_stable():
    buckets = [split_bucket(f"request-{i}") for i in range(10_000)]
    assert set(buckets) == set(range(100))
    assert sum(b < 10 for b in buckets) == pytest.approx(1_000, rel=0.1)
    assert split_bucket("same") == split_bucket("same")


def test_lru_cache_is_bounded_and_keyed_by_version():
    cache = LruCache(entries=2)
    cache.put_many("1", [({"x": 1}, {"y": 1}), ({"x": 2}, {"y": 2})])
    assert cache.get_many("1", [{"x": 1}]) == [{"y": 1}]  # now the most recent
    cache.put_many("1", [({"x": 3}, {"y": 3})])
    assert cache.get_many("1", [{"x": 1}, {"x": 2}, {"x": 3}]) == [{"y": 1}, None, {"y": 3}]
    assert cache.get_many("2", [{"x": 1}]) == [None]


@pytest.mark.parametrize(
    ("build", "problem"),
    [
        (lambda: CacheConfig("memcached://x"), "redis:// URL"),
        (lambda: CacheConfig(entries=0), "entries"),
        (lambda: ServingOptions(canary_percent=101), "0-100"),
        (lambda: parse_canary(["trend"]), "MODEL=PERCENT"),
        (lambda: parse_canary(["trend=ten"]), "MODEL=PERCENT"),
    ],
)
def test_bad_serving_options_name_the_problem(build, problem):
    with pytest.raises(UserError, match=problem):
        build()


def test_parse_canary():
    assert parse_canary(["trend=10", "niche=5"]) == {"trend": 10, "niche": 5}


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    prefix = f"contentml-test:{uuid.uuid4().hex}"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


@requires_redis
def test_redis_cache_round_trips_answers_by_version(redis_prefix: str):
    cache = make_cache(CacheConfig(REDIS_URL, ttl_seconds=60, prefix=redis_prefix), NAME)
    answer = {"b": 1.5, "a": [1, 2], "class": np.int64(2)}
    cache.put_many("1", [({"text": "x"}, answer)])
    (found,) = cache.get_many("1", [{"text": "x"}])
    assert found == {"b": 1.5, "a": [1, 2], "class": 2}
    assert list(found) == ["b", "a", "class"]  # order kept: V2 outputs read values in order
    assert cache.get_many("2", [{"text": "x"}]) == [None]
    (key,) = redis.Redis.from_url(REDIS_URL).keys(f"{redis_prefix}:*")
    assert key.decode().startswith(f"{redis_prefix}:{NAME}:1:")
    assert 0 < redis.Redis.from_url(REDIS_URL).ttl(key) <= 60


@requires_redis
def test_replicas_share_answers_through_redis(versions, settings, client, redis_prefix: str):
    champion_is(client, "1")
    shared = CacheConfig(REDIS_URL, prefix=redis_prefix)
    first, second = loaded(settings, cache=shared), loaded(settings, cache=shared)
    hits = sample("contentml_cache_lookups_total", model=NAME, version="1", result="hit")
    answer = first.predict_now({"instances": [REPEATED]})
    assert second.predict_now({"instances": [REPEATED]})["predictions"] == answer["predictions"]
    assert sample("contentml_cache_lookups_total", model=NAME, version="1", result="hit") == (
        hits + 1
    )


def test_an_unreachable_redis_costs_only_the_lookup(versions, settings, client):
    champion_is(client, "1")
    model = loaded(settings, cache=CacheConfig("redis://127.0.0.1:9/0"))
    started = time.monotonic()
    for _ in range(5):
        assert version_of(model.predict_now({"instances": [REPEATED]})) == "1"
    assert time.monotonic() - started < 5  # bypassed after the first failure


# --- the real server under load -----------------------------------------------------------


@contextlib.contextmanager
def serving(settings: Settings, canary: dict[str, int] | None = None) -> Iterator[str]:
    """`contentml serve --models trend [--canary ...]` with a short poll, yielded once ready."""
    fast = dataclasses.replace(settings, serving_poll_seconds=POLL_SECONDS)
    canary_args = [a for name, p in (canary or {}).items() for a in ("--canary", f"{name}={p}")]
    with model_server(fast, free_port(), "--models", "trend", *canary_args) as url:
        yield url


@dataclass(frozen=True)
class Call:
    sent: float
    done: float
    version: str | None
    error: str | None


class LoadGenerator:
    """Threads calling the server back to back: half a repeated instance (cache hits), half
    fresh ones (fitted by the model)."""

    def __init__(self, url: str, threads: int = 4):
        self.url = url
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(seed,), daemon=True) for seed in range(threads)
        ]

    def __enter__(self) -> LoadGenerator:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=self.url, timeout=10.0) as http:
            while not self._stop.is_set():
                instance = REPEATED if rng.random() < 0.5 else unique_instance(rng)
                sent = time.monotonic()
                version = error = None
                try:
                    response = http.post("/v1/models/trend:predict", json={"instances": [instance]})
                    if response.status_code == 200:
                        version = version_of(response.json())
                    else:
                        error = f"{response.status_code}: {response.text[:300]}"
                except httpx.HTTPError as e:
                    error = repr(e)
                with self._lock:
                    self.calls.append(Call(sent, time.monotonic(), version, error))

    def switch_seconds(self, version: str, since: float) -> float:
        """Seconds from `since` (an alias change) until a request sent after it was answered
        by `version`."""
        while time.monotonic() < since + SWITCH_LIMIT_SECONDS:
            with self._lock:
                done = [c.done for c in self.calls if c.sent >= since and c.version == version]
            if done:
                return min(done) - since
            time.sleep(0.02)
        raise AssertionError(f"v{version} not served {SWITCH_LIMIT_SECONDS} s after the change")

    def versions_sent_after(self, moment: float, until: float, collect=set) -> set[str | None]:
        """The versions that answered requests sent after `moment`, done before `until`;
        `collect=list` keeps one per request."""
        with self._lock:
            return collect(c.version for c in self.calls if moment < c.sent and c.done < until)


@pytest.fixture(scope="module")
def server(versions, settings: Settings, client) -> Iterator[str]:
    champion_is(client, "1")
    with serving(settings) as url:
        yield url


def test_zero_failed_requests_through_five_promote_rollback_cycles(server: str, client):
    champion_is(client, "1")
    wait_until(lambda: served_version(server) == "1", SWITCH_LIMIT_SECONDS, "v1 served")
    switches: list[float] = []
    with LoadGenerator(server) as load:
        wait_until(lambda: len(load.calls) >= 20, 30, "the load's first 20 answers")
        for _ in range(5):
            for change, version in (
                (lambda: registry.promote(client, NAME, "2", reason="cycle"), "2"),
                (lambda: registry.rollback(client, NAME, reason="cycle"), "1"),
            ):
                changed = time.monotonic()
                change()
                switches.append(load.switch_seconds(version, changed))
                switched = changed + switches[-1]
                # Serve the new version a while: 20 requests sent after the switch answered.
                wait_until(
                    lambda since=switched: (
                        len(load.versions_sent_after(since, time.monotonic(), list)) >= 20
                    ),
                    30,
                    f"20 answers of v{version}",
                )
                # Once answered by the new version, never again by the old one.
                assert load.versions_sent_after(switched, time.monotonic()) == {version}
    failed = [c.error for c in load.calls if c.error is not None]
    print(
        f"\nhot swap: {len(load.calls)} requests, {len(failed)} failed, switch seconds "
        f"max {max(switches):.2f}, all {[round(s, 2) for s in switches]}"
    )
    assert not failed, failed[:5]
    assert len(load.calls) > 200
    assert max(switches) < SWITCH_LIMIT_SECONDS

    metrics = scrape(server)
    for version in ("1", "2"):
        assert metrics[series("contentml_requests_total", model=NAME, version=version)] > 0
        assert metrics[series("contentml_request_seconds_count", model=NAME, version=version)] > 0
        # Loaded once each: a rollback swaps back to the version kept in memory.
        assert metrics[series("contentml_model_loads_total", model=NAME, version=version)] == 1
    assert metrics[series("contentml_served_version", model=NAME, alias="champion")] == 1
    hits = series("contentml_cache_lookups_total", model=NAME, version="1", result="hit")
    assert metrics[hits] > 0


def test_a_broken_version_is_reported_and_the_old_one_keeps_serving(server: str, client):
    champion_is(client, "1")
    failures = series("contentml_model_load_failures_total", model=NAME, version="3")
    with LoadGenerator(server, threads=2) as load:
        wait_until(lambda: len(load.calls) >= 10, 30, "the load's first 10 answers")
        registry.promote(client, NAME, "3", reason="broken artifacts", force=True)
        wait_until(lambda: scrape(server).get(failures) == 1, 30, "v3's failed load reported")
        wait_until(lambda: len(load.calls) >= 40, 30, "answers while v3 is the champion")
        registry.rollback(client, NAME)
    assert {c.version for c in load.calls} == {"1"}
    assert all(c.error is None for c in load.calls)
    assert scrape(server)[failures] == 1


def test_the_server_splits_traffic_and_counts_each_version(versions, settings, client):
    champion_is(client, "1")
    registry.promote(client, NAME, "2", Alias.CHALLENGER, reason="canary")
    rng = np.random.default_rng(2)
    with serving(settings, canary={NAME: CANARY_PERCENT}) as url, httpx.Client() as http:
        answered = [
            version_of(
                http.post(
                    f"{url}/v1/models/trend:predict", json={"instances": [unique_instance(rng)]}
                ).json()
            )
            for _ in range(300)
        ]
        metrics = scrape(url)
    assert abs(answered.count("2") / len(answered) - CANARY_PERCENT / 100) < 0.08
    assert metrics[series("contentml_canary_percent", model=NAME)] == CANARY_PERCENT
    assert metrics[series("contentml_served_version", model=NAME, alias="challenger")] == 2
    for version in ("1", "2"):
        requests = series("contentml_requests_total", model=NAME, version=version)
        assert metrics[requests] == answered.count(version)


def test_the_server_also_hosts_the_crisis_routes(server: str):
    response = httpx.get(f"{server}/v1/channels/ch_none")
    assert response.status_code == 200 and response.json()["quarantined"] is False
