"""The feature step: build the Feast store from settings, write its sources, serve its features.

Typical flow (the training pipeline's "features" step, then serving):

    store = feature_store(settings)
    write_sources(settings, load_m4_hourly(...), load_youtube_trending(...))
    apply_definitions(store)
    materialize(store, end=SERIES_END)
    trend_training_frame(store, ["H1"], start, end)   # offline, point-in-time correct
    online_history(store, ["H1"])                     # online, what the model server reads

Every step overwrites what a previous run wrote, so running the flow twice is safe.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import typeguard

from contentml.errors import DataError
from contentml.settings import Settings


@contextlib.contextmanager
def _without_typeguard() -> Iterator[None]:
    """Feast wraps its definition classes in typeguard's `@typechecked`, which re-parses and
    recompiles their source on every import: about half of what `import feast` costs, paid
    by every server, batch worker and pipeline task. typeguard calls these checks a development
    aid (they are off under `python -O`); our definitions are checked by Feast's own
    validation at `apply` and by the tests. Only Feast's import runs without them."""
    checked = typeguard.typechecked

    def unchecked(target: Any = None, **_: Any) -> Any:
        return target if target is not None else unchecked

    typeguard.typechecked = unchecked
    try:
        yield
    finally:
        typeguard.typechecked = checked


@contextlib.contextmanager
def _without_torch() -> Iterator[None]:
    """Feast imports torch when it is imported, for tensor outputs (`to_tensor`) we never ask
    for: 2 s of CPU in every process that reads features (servers, batch workers, pipeline
    tasks), most of which need no torch. While Feast imports, `import torch` fails, so Feast
    records torch as unavailable; a process that has already imported torch keeps it."""
    if "torch" in sys.modules:
        yield
        return
    sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` fail
    try:
        yield
    finally:
        del sys.modules["torch"]


with _without_typeguard(), _without_torch():
    from feast import Entity, FeatureService, FeatureStore, FeatureView, FileSource, RepoConfig
    from feast.data_source import DataSource

    from feature_repo import data_sources, entities, feature_services
    from feature_repo import features as feature_views
    from feature_repo.data_sources import (
        channel_history_source,
        channel_stats_source,
        niche_stats_source,
        topic_interest_source,
        topic_recent_source,
        video_stats_source,
    )
    from feature_repo.feature_services import (
        niche_engagement_v1,
        trend_serving_v1,
        trend_training_v1,
    )
    from feature_repo.features import channel_history_fv
    from feature_repo.niche_schema import (
        CHANNEL_HISTORY,
        FEATURES,
        HISTORY_KEYS,
        KEYS,
        NEW_CHANNEL_DAYS,
        NO_HISTORY_LOG_GAIN,
        TARGETS,
    )

RECENT_HOURS = 168
"""Length of the history the model server gets per series: one week of hourly values."""

MATERIALIZE_START = datetime(1970, 1, 1, tzinfo=UTC)
"""Materialization reads from here: the sources are small and rewritten whole on every run."""

TRAINING_DTYPES = {
    "series_id": "object",
    "event_timestamp": "datetime64[ns, UTC]",
    "interest": "float64",
    "interest_mean_24h": "float64",
    "interest_mean_168h": "float64",
}
"""Columns of `trend_training_frame`, in order, with their dtypes."""

TRAINING_COLUMNS = list(TRAINING_DTYPES)

MAX_JOIN_ROWS = 4_000_000
"""Upper bound on the rows of one historical join; see `trend_training_frame`."""

# Feast's file offline store is Dask; its point-in-time join merges every entity row with every
# source row of the same key before filtering, so a join costs entity rows x source rows per key.
_SOURCE_ROWS_PER_SERIES = 960  # M4's longest hourly series

_DEFINITION_MODULES = (entities, data_sources, feature_views, feature_services)
_DEFINITION_TYPES = (Entity, DataSource, FeatureView, FeatureService)


def _sqlite_online_store(settings: Settings) -> dict[str, Any]:
    return {"type": "sqlite", "path": str(settings.home / "feast" / "online.db")}


def _redis_online_store(settings: Settings) -> dict[str, Any]:
    return {"type": "redis", "connection_string": settings.feast_redis_url}


ONLINE_STORES: dict[str, Callable[[Settings], dict[str, Any]]] = {
    "sqlite": _sqlite_online_store,
    "redis": _redis_online_store,
}
"""Feast online store config per `settings.feast_online_store`."""


def _registry_config(registry: str) -> dict[str, Any]:
    if registry.startswith("postgresql"):
        # Name the psycopg 3 driver that the platform installs (Feast warns on a bare URL).
        if registry.startswith("postgresql://"):
            registry = "postgresql+psycopg://" + registry.removeprefix("postgresql://")
        return {"registry_type": "sql", "path": registry, "cache_ttl_seconds": 60}
    return {"registry_type": "file", "path": str(Path(registry)), "cache_ttl_seconds": 60}


def repo_config(settings: Settings) -> RepoConfig:
    """Feast's repo config for the settings, built in code (there is no feature_store.yaml).

    `repo_path` is `settings.feast_data_dir`: Feast resolves the sources' relative parquet paths
    against it, for historical retrieval and materialization alike.
    """
    return RepoConfig(
        project=settings.feast_project,
        provider="local",
        registry=_registry_config(settings.feast_registry),
        online_store=ONLINE_STORES[settings.feast_online_store](settings),
        offline_store={"type": "file"},
        repo_path=settings.feast_data_dir,
        # Version 3 is the only scheme Feast 0.67 does not deprecate (Redis keys depend on it).
        entity_key_serialization_version=3,
    )


def feature_store(settings: Settings) -> FeatureStore:
    """The Feast store the settings describe; creates the local folders its SQLite files need."""
    config = repo_config(settings)
    # SQLite creates neither the folder of its database nor that of a file registry.
    if config.registry.registry_type == "file":
        Path(config.registry.path).parent.mkdir(parents=True, exist_ok=True)
    if settings.feast_online_store == "sqlite":
        Path(config.online_store.path).parent.mkdir(parents=True, exist_ok=True)
    return FeatureStore(repo_path=str(settings.feast_data_dir), config=config)


def topic_interest_frame(series: pd.DataFrame) -> pd.DataFrame:
    """Per series and hour: `interest` and its trailing means over the last 24 and 168 hours.

    The windows are time-based and right-closed, `(t - window, t]`: a mean at `t` uses the
    value at `t` and earlier values only. Early hours average over the hours that exist.
    """
    frame = series.sort_values(["series_id", "event_timestamp"]).reset_index(drop=True)
    by_series = frame.set_index("event_timestamp").groupby("series_id", sort=False)["interest"]
    for hours in (24, 168):
        # groupby(sort=False) keeps the frame's order, so the values line up positionally.
        means = by_series.rolling(f"{hours}h").mean()
        frame[f"interest_mean_{hours}h"] = means.to_numpy()
    return frame[TRAINING_COLUMNS]


def topic_recent_frame(series: pd.DataFrame) -> pd.DataFrame:
    """One row per series at its last hour; `interest_recent` its last `RECENT_HOURS` values."""
    frame = series.sort_values(["series_id", "event_timestamp"])
    tail = frame.groupby("series_id", sort=False).tail(RECENT_HOURS)
    recent = tail.groupby("series_id", sort=False).agg(
        event_timestamp=("event_timestamp", "max"),
        interest_recent=("interest", lambda values: [float(v) for v in values]),
    )
    return recent.reset_index()


def _daily_videos(videos: pd.DataFrame) -> pd.DataFrame:
    # A video trending in both countries on one day counts once, with its larger (later) counts.
    daily = videos.sort_values("views", kind="stable")
    daily = daily.drop_duplicates(["video_id", "event_timestamp"], keep="last")
    daily = daily.sort_values(["video_id", "event_timestamp"]).reset_index(drop=True)
    views = daily["views"].astype("float64")
    daily["like_rate"] = (daily["likes"] / views.where(views > 0)).fillna(0.0)
    return daily


def video_stats_frame(videos: pd.DataFrame) -> pd.DataFrame:
    """Per video and snapshot day: counts, likes per view, days on trending so far (this one
    included)."""
    daily = _daily_videos(videos)
    daily["days_on_trending"] = daily.groupby("video_id").cumcount().astype("int64") + 1
    columns = ["video_id", "event_timestamp", "views", "likes", "dislikes", "comment_total"]
    return daily[[*columns, "like_rate", "days_on_trending"]]


def channel_stats_frame(videos: pd.DataFrame) -> pd.DataFrame:
    """Per channel and snapshot day: trending videos, their mean and total views, mean like rate."""
    stats = (
        _daily_videos(videos)
        .groupby(["channel_id", "event_timestamp"])
        .agg(
            videos_trending=("video_id", "nunique"),
            mean_views=("views", "mean"),
            total_views=("views", "sum"),
            mean_like_rate=("like_rate", "mean"),
        )
    )
    return stats.reset_index().astype({"videos_trending": "int64", "total_views": "int64"})


def niche_stats_frame(videos: pd.DataFrame) -> pd.DataFrame:
    """Per category and snapshot day: its title, trending videos and channels, mean views and
    like rate."""
    stats = (
        _daily_videos(videos)
        .groupby(["category_id", "event_timestamp"])
        .agg(
            category=("category", "first"),
            videos_trending=("video_id", "nunique"),
            channels_trending=("channel_id", "nunique"),
            mean_views=("views", "mean"),
            mean_like_rate=("like_rate", "mean"),
        )
    )
    return stats.reset_index().astype({"videos_trending": "int64", "channels_trending": "int64"})


HISTORY_INPUT_COLUMNS = ("country", "channel_id", "video_id", "views", "event_timestamp")
"""Columns of the `load_youtube_trending` frame that `channel_history_frame` reads."""

_ROW_KEY = ["country", "video_id"]


def channel_history_frame(videos: pd.DataFrame) -> pd.DataFrame:
    """`HISTORY_KEYS` and `CHANNEL_HISTORY` for every day a channel's video first trends in a
    country (what training joins), and for every channel on the last day of its country's data
    (what the online store serves for tomorrow's videos)."""
    missing = [column for column in HISTORY_INPUT_COLUMNS if column not in videos.columns]
    if missing or videos.empty:
        raise DataError(f"channel_history_frame: input is missing columns {missing} or empty")
    snapshots = videos.sort_values([*_ROW_KEY, "event_timestamp"])
    first_days = snapshots.groupby(_ROW_KEY, sort=False).head(1)
    last_day = snapshots.groupby("country")["event_timestamp"].transform("max")
    latest = snapshots[snapshots["event_timestamp"] == last_day]
    keys = pd.concat([first_days, latest])[list(HISTORY_KEYS)].drop_duplicates()
    keys = keys.sort_values(list(HISTORY_KEYS)).reset_index(drop=True)
    history = _channel_history(snapshots, keys)
    return pd.concat([keys, history], axis=1).astype({name: "float64" for name in CHANNEL_HISTORY})


def _channel_history(snapshots: pd.DataFrame, keys: pd.DataFrame) -> pd.DataFrame:
    """`CHANNEL_HISTORY` for each row of `keys` (`HISTORY_KEYS`), in its order."""
    rows = keys.rename(columns={"event_timestamp": "t"})
    rows["row"] = np.arange(len(rows))
    # Every snapshot of the same channel in the same country up to and including day t.
    pairs = rows.merge(
        snapshots[["country", "channel_id", "video_id", "event_timestamp", "views"]],
        on=["country", "channel_id"],
    )
    pairs = pairs[pairs["event_timestamp"] <= pairs["t"]]
    on_t = pairs[pairs["event_timestamp"] == pairs["t"]][["row", "video_id"]].drop_duplicates()
    before = pairs[pairs["event_timestamp"] < pairs["t"]].sort_values("event_timestamp")

    days_since = pd.Series(NEW_CHANNEL_DAYS, index=rows["row"])
    last_seen = before.groupby("row")["event_timestamp"].max()
    days_since[last_seen.index] = (rows["t"].iloc[last_seen.index] - last_seen).dt.days.to_numpy()

    runs = before.groupby(["row", "video_id"])["views"].agg(["first", "last"]).reset_index()
    ended = runs.merge(on_t, on=["row", "video_id"], how="left", indicator=True)
    ended = ended[ended["_merge"] == "left_only"]
    ended_gain = np.log1p(np.maximum(ended["last"] - ended["first"], 0))
    per_row = ended_gain.groupby(ended["row"]).agg(["size", "mean"])

    return pd.DataFrame(
        {
            "channel_prior_videos": per_row["size"].reindex(rows["row"], fill_value=0),
            "channel_prior_log_views_gained": per_row["mean"].reindex(
                rows["row"], fill_value=NO_HISTORY_LOG_GAIN
            ),
            "channel_days_since_trended": days_since,
            "channel_is_new": ~rows["row"].isin(last_seen.index).to_numpy(),
        },
        index=rows["row"],
    ).reset_index(drop=True)


SERIES_SOURCES: list[tuple[FileSource, Callable[[pd.DataFrame], pd.DataFrame]]] = [
    (topic_interest_source, topic_interest_frame),
    (topic_recent_source, topic_recent_frame),
]
"""Sources built from `training.data.load_m4_hourly`'s frame, and how."""

VIDEO_SOURCES: list[tuple[FileSource, Callable[[pd.DataFrame], pd.DataFrame]]] = [
    (video_stats_source, video_stats_frame),
    (channel_stats_source, channel_stats_frame),
    (niche_stats_source, niche_stats_frame),
    (channel_history_source, channel_history_frame),
]
"""Sources built from `training.data.load_youtube_trending`'s frame, and how."""


def write_sources(settings: Settings, series: pd.DataFrame, videos: pd.DataFrame) -> None:
    """Turn the loaders' frames into the parquet files behind every Feast source, replacing
    what a previous run wrote."""
    for source, build in SERIES_SOURCES:
        _write_parquet(build(series), settings.feast_data_dir / source.path)
    for source, build in VIDEO_SOURCES:
        _write_parquet(build(videos), settings.feast_data_dir / source.path)


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a concurrent reader sees the old file or the new one, never half.
    partial = path.with_name(f".{path.name}.partial")
    frame.to_parquet(partial, index=False)
    os.replace(partial, path)


def _definitions() -> list[Any]:
    found: dict[int, Any] = {}
    for module in _DEFINITION_MODULES:
        for value in vars(module).values():
            # Modules import each other's objects; count each object once.
            if isinstance(value, _DEFINITION_TYPES):
                found.setdefault(id(value), value)
    return list(found.values())


def apply_definitions(store: FeatureStore) -> None:
    """Register every entity, source, feature view and service of `feature_repo`."""
    store.apply(_definitions())


def materialize(store: FeatureStore, end: datetime, views: list[FeatureView] | None = None) -> None:
    """Load the latest value per entity with a timestamp at or before `end` (inclusive) into
    the online store, for `views` (default: every online view); a later run overwrites what
    an earlier one wrote."""
    names = None if views is None else [view.name for view in views]
    # Feast prints its progress to stdout, which is the CLI's JSON answer: send it to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        store.materialize(start_date=MATERIALIZE_START, end_date=_utc(end), feature_views=names)


NEW_CHANNEL_HISTORY = {
    "channel_prior_videos": 0.0,
    "channel_prior_log_views_gained": NO_HISTORY_LOG_GAIN,
    "channel_days_since_trended": NEW_CHANNEL_DAYS,
    "channel_is_new": 1.0,
}
"""The history of a channel the online store does not know: what training sees for a channel
new to the country's list."""


def publish_engagement_features(settings: Settings, videos: pd.DataFrame) -> FeatureStore:
    """Write the channel history of the `load_youtube_trending` frame to its Feast source and
    the online store (up to the last snapshot day): the niche models' training and serving
    read it from there."""
    store = feature_store(settings)
    history = channel_history_frame(videos)
    _write_parquet(history, settings.feast_data_dir / channel_history_source.path)
    apply_definitions(store)
    materialize(store, history["event_timestamp"].max().to_pydatetime(), [channel_history_fv])
    return store


def engagement_training_frame(store: FeatureStore, rows: pd.DataFrame) -> pd.DataFrame:
    """`training.niche.data.engagement_rows` with the channel history each row's channel had
    on its first day, joined point-in-time by Feast: `KEYS`, `FEATURES`, `TARGETS`, in the
    rows' order."""
    service = store.get_feature_service(niche_engagement_v1.name)
    joined = store.get_historical_features(rows, features=service).to_df()
    # Every row has a history row on its own day once its data is published; a row with none
    # at or before its day has a channel Feast never saw.
    missing = joined[list(CHANNEL_HISTORY)].isna().any(axis=1).sum()
    if len(joined) != len(rows) or missing:
        raise ValueError(
            f"{missing or abs(len(rows) - len(joined))} of {len(rows)} rows have no channel "
            "history in Feast: publish the features of the same data first "
            "(`publish_engagement_features`)"
        )
    joined["event_timestamp"] = pd.to_datetime(joined["event_timestamp"], utc=True)
    joined = joined.set_index(["country", "video_id"]).loc[
        pd.MultiIndex.from_frame(rows[["country", "video_id"]])
    ]
    frame = joined.reset_index()[[*KEYS, *FEATURES, *TARGETS]]
    return frame.astype({name: "float64" for name in CHANNEL_HISTORY})


def online_channel_history(store: FeatureStore, keys: pd.DataFrame) -> pd.DataFrame:
    """`CHANNEL_HISTORY` for each (`channel_id`, `country`) row of `keys`, in its order and
    index, from the online store; a channel it does not know gets `NEW_CHANNEL_HISTORY`."""
    response = store.get_online_features(
        features=store.get_feature_service(niche_engagement_v1.name),
        entity_rows=keys[["channel_id", "country"]].to_dict(orient="records"),
    ).to_dict()
    history = pd.DataFrame({name: response[name] for name in CHANNEL_HISTORY}, index=keys.index)
    return history.astype("float64").fillna(NEW_CHANNEL_HISTORY)


def trend_training_frame(
    store: FeatureStore, series_ids: list[str], start: datetime, end: datetime
) -> pd.DataFrame:
    """Point-in-time correct training rows: every hour of `[start, end]` for every series.

    Columns `TRAINING_COLUMNS`, sorted by series and time. An hour a series has no observation
    for gets NaN features (Feast's Dask store drops such entity rows; they are put back here).
    Series are joined in chunks to keep Dask's join (entity rows x source rows per key) under
    `MAX_JOIN_ROWS`.
    """
    hours = pd.date_range(_utc(start), _utc(end), freq="h")
    if not series_ids or hours.empty:
        return pd.DataFrame({c: pd.Series(dtype=d) for c, d in TRAINING_DTYPES.items()})
    service = store.get_feature_service(trend_training_v1.name)
    chunk = max(1, MAX_JOIN_ROWS // (len(hours) * _SOURCE_ROWS_PER_SERIES))
    parts = []
    for ids in _chunks(list(dict.fromkeys(series_ids)), chunk):
        entity_df = pd.DataFrame(
            {
                "series_id": [s for s in ids for _ in hours],
                "event_timestamp": list(hours) * len(ids),
            }
        )
        joined = store.get_historical_features(entity_df, features=service).to_df()
        joined["event_timestamp"] = pd.to_datetime(joined["event_timestamp"], utc=True)
        keys = ["series_id", "event_timestamp"]
        parts.append(entity_df.merge(joined[TRAINING_COLUMNS], on=keys, how="left"))
    frame = pd.concat(parts, ignore_index=True).astype(TRAINING_DTYPES)
    return frame.sort_values(["series_id", "event_timestamp"]).reset_index(drop=True)


def online_history(store: FeatureStore, series_ids: list[str]) -> dict[str, list[float] | None]:
    """The recent hourly history per series from the online store; None for an unknown id."""
    if not series_ids:
        return {}
    response = store.get_online_features(
        features=store.get_feature_service(trend_serving_v1.name),
        entity_rows=[{"series_id": series_id} for series_id in series_ids],
    ).to_dict()
    return {
        series_id: None if values is None else [float(v) for v in values]
        for series_id, values in zip(series_ids, response["interest_recent"], strict=True)
    }


def _utc(moment: datetime) -> pd.Timestamp:
    # Naive datetimes are taken as UTC, the only zone the sources use.
    stamp = pd.Timestamp(moment)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def serve_features(settings: Settings, host: str, port: int, workers: int) -> None:
    """Run Feast's feature server (`/get-online-features`, `/push`, `/health`) over the
    settings' store until stopped; Feast's own `feast serve` defaults otherwise."""
    from feast.feature_server import start_server

    start_server(
        feature_store(settings),
        host=host,
        port=port,
        no_access_log=True,
        workers=workers,
        worker_connections=1000,
        max_requests=1000,
        max_requests_jitter=50,
        keep_alive_timeout=30,
        registry_ttl_sec=60,
        tls_key_path="",
        tls_cert_path="",
        metrics=False,
    )
