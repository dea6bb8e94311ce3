"""The cost ledger on both backends, SQLite (embedded) and the real PostgreSQL (cluster): the
per-day, per-channel summary, per-video sums, the over-budget streak and its alert, refused
entries, and the gauges `/metrics` shows."""

from __future__ import annotations

import datetime
import logging
import math

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from contentml.db import open_database
from contentml.errors import UserError
from serving.backend.costs import (
    COST_METRICS,
    PER_VIDEO_METRIC,
    STREAK_METRIC,
    CostCollector,
    CostEntry,
    CostLedger,
    compute_cost,
    metadata,
    register_cost_metrics,
)

DAY1 = datetime.datetime(2025, 3, 1, 12, tzinfo=datetime.UTC)
DAY2 = datetime.datetime(2025, 3, 2, 9, tzinfo=datetime.UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'backend.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
        # The database lives for the module: start every test from an empty ledger.
        engine = open_database(url, metadata)
        metadata.drop_all(engine)
        engine.dispose()
    ledger = CostLedger(url)
    yield ledger
    ledger.close()


def script(usd: float, channel: str = "cooking", video_id: str | None = None) -> CostEntry:
    return CostEntry(
        channel, "script", usd, compute_seconds=2.0, provider="openai", prompt_tokens=100,
        completion_tokens=400, video_id=video_id,
    )  # fmt: skip


def test_summary_is_per_day_and_channel(ledger):
    ledger.record(script(0.5, video_id="v1"), at=DAY1)
    ledger.record(CostEntry("cooking", "batch:quality", 0.25, video_id="v1", job_id="j1"), DAY1)
    ledger.record(script(0.75), at=DAY1)  # no video id: a video of its own
    ledger.record(CostEntry("travel", "batch:trend", 2.0, compute_seconds=60, job_id="j2"), DAY1)
    ledger.record(script(0.1, channel="travel", video_id="t1"), at=DAY2)

    rows = ledger.summary()
    assert [(r["day"], r["channel"]) for r in rows] == [
        ("2025-03-01", "cooking"),
        ("2025-03-01", "travel"),
        ("2025-03-02", "travel"),
    ]
    cooking, travel, travel2 = rows
    assert cooking == {
        "day": "2025-03-01", "channel": "cooking", "usd": pytest.approx(1.5), "calls": 3,
        "jobs": 1, "videos": 2, "prompt_tokens": 200, "completion_tokens": 800,
        "compute_seconds": pytest.approx(4.0), "usd_per_video": pytest.approx(0.75),
    }  # fmt: skip
    assert (travel["videos"], travel["jobs"], travel["usd_per_video"]) == (0, 1, None)
    assert travel2["usd_per_video"] == pytest.approx(0.1)
    assert all(type(r[k]) is int for r in rows for k in ("calls", "prompt_tokens", "videos"))

    assert [r["day"] for r in ledger.summary(channel="travel")] == ["2025-03-01", "2025-03-02"]
    assert [r["channel"] for r in ledger.summary(since=DAY2.date())] == ["travel"]
    assert len(ledger.summary(until=DAY1.date())) == 2
    assert ledger.summary(channel="gaming") == []


def test_a_video_sums_all_its_entries_and_a_script_without_one_is_its_own(ledger):
    ledger.record(script(0.5, video_id="v1"))
    ledger.record(script(0.2))
    ledger.record(CostEntry("cooking", "batch:quality", 0.3, video_id="v1"))
    ledger.record(CostEntry("cooking", "batch:trend", 9.0))  # no video: in no video's cost
    costs = ledger.video_costs()
    assert [c["usd"] for c in costs] == [pytest.approx(0.8), pytest.approx(0.2)]
    assert costs[0]["video_id"] == "v1" and costs[1]["video_id"].startswith("script-call:")
    assert ledger.video_costs(last=1) == [costs[1]]
    with pytest.raises(UserError, match="last must be"):
        ledger.video_costs(last=-1)


def test_ten_videos_over_budget_fire_the_alert_and_a_cheap_one_resets_it(ledger, caplog):
    for i in range(9):
        ledger.record(script(1.5, video_id=f"v{i}"))
    assert ledger.alert() == {"firing": False, "streak": 9, "budget_usd": 1.0, "streak_length": 10}
    with caplog.at_level(logging.WARNING, logger="serving.backend.costs"):
        ledger.record(script(0.6, video_id="v9"))
        assert ledger.over_budget_streak() == 0  # the latest video is within budget, so far
        ledger.record(CostEntry("cooking", "batch:quality", 0.5, video_id="v9"))
        assert ledger.alert()["streak"] == 10  # v9 now costs $1.10
        ledger.record(script(1.01))
    assert ledger.alert()["firing"] and ledger.over_budget_streak() == 11
    # Logged once when the streak reached 10, not again at 11.
    assert len([r for r in caplog.records if "videos in a row" in r.message]) == 1

    ledger.record(script(1.0))  # exactly the budget is not over it
    assert ledger.alert() == {"firing": False, "streak": 0, "budget_usd": 1.0, "streak_length": 10}
    ledger.record(script(3.0))
    assert ledger.over_budget_streak() == 1


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        (CostEntry("", "script", 0.1), "channel"),
        (CostEntry("cook\ning", "script", 0.1), "channel"),
        (CostEntry("cooking", " ", 0.1), "kind"),
        (CostEntry("cooking", "script", -0.1), "usd"),
        (CostEntry("cooking", "script", math.nan), "usd"),
        (CostEntry("cooking", "script", "1"), "usd"),
        (CostEntry("cooking", "script", 0.1, compute_seconds=math.inf), "compute_seconds"),
        (CostEntry("cooking", "script", 0.1, prompt_tokens=-1), "prompt_tokens"),
        (CostEntry("cooking", "script", 0.1, completion_tokens=1.5), "completion_tokens"),
        (CostEntry("cooking", "script", 0.1, video_id=""), "video_id"),
        (CostEntry("cooking", "script", 0.1, job_id="j" * 201), "job_id"),
    ],
)
def test_a_bad_entry_is_refused_naming_the_field_and_stores_nothing(ledger, entry, field):
    with pytest.raises(UserError, match=f"^{field} must"):
        ledger.record(entry)
    assert ledger.summary() == [] and ledger.video_costs() == []


def test_a_naive_time_is_refused(ledger):
    with pytest.raises(UserError, match="timezone-aware"):
        ledger.record(script(0.1), at=datetime.datetime(2025, 3, 1))


def test_compute_cost_charges_seconds_at_the_hourly_price():
    assert compute_cost(1800, 2.0) == pytest.approx(1.0)


def test_the_collector_reads_the_ledger_at_each_scrape(ledger):
    registry = CollectorRegistry()
    collector = register_cost_metrics(ledger, registry)
    assert register_cost_metrics(ledger, registry) is collector  # registered once
    assert {f.name for f in collector.collect()} == set(COST_METRICS)
    assert registry.get_sample_value(STREAK_METRIC) == 0
    assert registry.get_sample_value(PER_VIDEO_METRIC) is None  # no video yet

    for usd in (2.0, 1.5, 1.25):
        ledger.record(script(usd))
    assert registry.get_sample_value(STREAK_METRIC) == 3
    assert registry.get_sample_value(PER_VIDEO_METRIC) == pytest.approx(1.25)


def test_a_ledger_that_cannot_be_read_leaves_metrics_working(tmp_path, caplog):
    ledger = CostLedger(f"sqlite:///{tmp_path / 'backend.db'}")
    with ledger.engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE cost_videos")
    registry = CollectorRegistry()
    registry.register(CostCollector(ledger))
    with caplog.at_level(logging.ERROR, logger="serving.backend.costs"):
        text = generate_latest(registry).decode()
    assert STREAK_METRIC not in text and "reading the ledger failed" in caplog.text
    ledger.close()


def test_from_settings_uses_the_backend_store(settings):
    ledger = CostLedger.from_settings(settings)
    assert ledger.engine.url.database == str(settings.home / "backend.db")
    ledger.close()
