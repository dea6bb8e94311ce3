"""The engagement task: for a video on its first trending day in a country, predict how it does.

One row per (country, video_id), built from `training.data.load_youtube_trending`. The row's
`event_timestamp` is the video's first trending day in that country (00:00 UTC), and every
feature uses only what is known on that day: the video's own snapshot of that day and the
snapshots of earlier days. The targets look ahead to the video's last trending day.

Censoring, kept on purpose and to be handled by the caller:
- Videos already on the list on the first snapshot day of the data may have trended before;
  their "first day" is the first day seen, and their channel history is empty.
- Videos still on the list on the last snapshot day have their views gained cut short; this
  hits the latest days most, i.e. the validation part of `time_split`.
- A video on the list for a single day has `log_views_gained` 0 (nothing was gained while it
  was watched); those rows are kept, they are a real outcome.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from contentml.features import channel_history_frame
from feature_repo.niche_schema import (
    FEATURES,
    HISTORY_KEYS,
    KEYS,
    TARGETS,
    VIDEO_FEATURES,
)
from training.data import DataError

REQUIRED_COLUMNS = (
    "video_id",
    "title",
    "channel_id",
    "category_id",
    "category",
    "country",
    "tags",
    "views",
    "likes",
    "dislikes",
    "comment_total",
    "event_timestamp",
)
"""Columns of the `load_youtube_trending` frame that `engagement_frame` reads."""

SNAPSHOT_COLUMNS = ("title", "tags", "views", "likes", "dislikes", "comment_total")
"""What `video_features` reads from a video's first-day snapshot, besides `event_timestamp`."""

_SEPARATOR = r"\||\s[-\u2013\u2014]\s"
_OFFICIAL = r"(?i)\bofficial\b"
_TRAILER = r"(?i)\b(?:trailer|teaser)s?\b"
_VERSUS = r"(?i)\b(?:vs\.?|versus)(?:\s|$)"
_ROW_KEY = ["country", "video_id"]


def engagement_rows(videos: pd.DataFrame) -> pd.DataFrame:
    """One row per (country, video_id): `KEYS`, `VIDEO_FEATURES`, `TARGETS`, sorted by first
    day. The channel history is joined on `HISTORY_KEYS`: from Feast for training
    (`contentml.features.engagement_training_frame`) or in memory (`engagement_frame`).

    `videos` is the `load_youtube_trending` frame (one row per country, video and snapshot
    day). Identity columns and title come from the first-day snapshot.
    """
    _check_columns(videos, REQUIRED_COLUMNS, "engagement_rows")
    snapshots = videos.sort_values([*_ROW_KEY, "event_timestamp"])
    by_video = snapshots.groupby(_ROW_KEY, sort=False)
    first = by_video.head(1).reset_index(drop=True)
    last = by_video.tail(1).set_index(_ROW_KEY).loc[pd.MultiIndex.from_frame(first[_ROW_KEY])]

    frame = pd.concat([first[list(KEYS)], video_features(first)], axis=1)
    gained = last["views"].to_numpy() - first["views"].to_numpy()
    frame["log_views_gained"] = np.log1p(np.maximum(gained, 0))
    frame["like_rate"] = _rate(last["likes"], last["views"]).to_numpy()
    frame = frame.astype({name: "float64" for name in TARGETS})
    frame = frame.sort_values(["event_timestamp", "country", "video_id"])
    return frame[[*KEYS, *VIDEO_FEATURES, *TARGETS]].reset_index(drop=True)


def video_features(first: pd.DataFrame) -> pd.DataFrame:
    """`VIDEO_FEATURES` of first-day snapshots (`SNAPSHOT_COLUMNS` and `event_timestamp`), in
    their order and index: training and the model server compute them here alike."""
    frame = pd.DataFrame(_title_features(first["title"]), index=first.index)
    frame["tag_count"] = first["tags"].map(lambda tags: len(tags.split("|")) if tags else 0)
    frame["first_log_views"] = np.log1p(first["views"])
    frame["first_like_rate"] = _rate(first["likes"], first["views"])
    frame["first_dislike_rate"] = _rate(first["dislikes"], first["views"])
    frame["first_log_comments"] = np.log1p(first["comment_total"])
    frame["day_of_week"] = first["event_timestamp"].dt.dayofweek
    return frame[list(VIDEO_FEATURES)].astype("float64")


def engagement_frame(videos: pd.DataFrame) -> pd.DataFrame:
    """`engagement_rows` with their channel history joined in memory: `KEYS`, `FEATURES`,
    `TARGETS`. The reference the Feast join is tested against."""
    rows = engagement_rows(videos)
    frame = rows.merge(channel_history_frame(videos), on=list(HISTORY_KEYS), how="left")
    return frame[[*KEYS, *FEATURES, *TARGETS]]


def time_split(
    frame: pd.DataFrame, validation_fraction: float
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training, validation): the latest `validation_fraction` of the days are validation.

    Days, not rows, are split (rounded, at least one day in each part), so a day is never in
    both parts and every validation day is later than every training day.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    _check_columns(frame, ("event_timestamp",), "time_split")
    days = np.sort(frame["event_timestamp"].unique())
    if len(days) < 2:
        raise DataError(f"time_split needs at least 2 distinct days, got {len(days)}")
    n_validation = min(max(round(validation_fraction * len(days)), 1), len(days) - 1)
    first_validation_day = days[len(days) - n_validation]
    is_validation = frame["event_timestamp"] >= first_validation_day
    return frame[~is_validation].copy(), frame[is_validation].copy()


def _check_columns(frame: pd.DataFrame, columns: tuple[str, ...], caller: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{caller}: input is missing columns {missing}")
    if frame.empty:
        raise DataError(f"{caller}: input frame is empty")


def _rate(part: pd.Series, views: pd.Series) -> pd.Series:
    views = views.astype("float64")
    return (part / views.where(views > 0)).fillna(0.0).clip(0.0, 1.0)


def _title_features(title: pd.Series) -> dict[str, pd.Series]:
    # Letters of any script count; scripts without case (e.g. Thai) add letters but no capitals.
    letters = title.map(lambda text: sum(c.isalpha() for c in text))
    upper = title.map(lambda text: sum(c.isupper() for c in text))
    return {
        "title_chars": title.str.len(),
        "title_words": title.str.split().str.len(),
        "title_upper_share": (upper / letters.where(letters > 0)).fillna(0.0),
        "title_has_exclamation": title.str.contains("!", regex=False),
        "title_has_question": title.str.contains("?", regex=False),
        "title_has_digit": title.str.contains(r"\d"),
        "title_has_separator": title.str.contains(_SEPARATOR),
        "title_mentions_official": title.str.contains(_OFFICIAL),
        "title_mentions_trailer": title.str.contains(_TRAILER),
        "title_mentions_versus": title.str.contains(_VERSUS),
    }
