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

KEYS = ("video_id", "country", "channel_id", "category_id", "category", "title", "event_timestamp")
"""Identifying columns of an engagement row (not features); `event_timestamp` is the first day."""

VIDEO_FEATURES = (
    # Title of the first-day snapshot.
    "title_chars",  # characters
    "title_words",  # whitespace-separated words
    "title_upper_share",  # upper-case letters / letters (0 when the title has no letters)
    "title_has_exclamation",  # 1 if it contains '!'
    "title_has_question",  # 1 if it contains '?'
    "title_has_digit",  # 1 if it contains a digit
    "title_has_separator",  # 1 if it contains '|' or a free-standing dash ("Artist - Song")
    "title_mentions_official",  # 1 if it says "official"
    "title_mentions_trailer",  # 1 if it says "trailer" or "teaser"
    "title_mentions_versus",  # 1 if it says "vs", "vs." or "versus"
    # The first-day snapshot: the counts of the day the video enters the list are known then.
    "tag_count",  # number of '|'-separated tags (0 without tags)
    "first_log_views",  # log1p(views)
    "first_like_rate",  # likes / views (0 when views is 0)
    "first_dislike_rate",  # dislikes / views (0 when views is 0)
    "first_log_comments",  # log1p(comment_total)
    "day_of_week",  # of the first day, Monday = 0
)
"""Features of the video itself, computed by `video_features` from what the caller sends: the
first-day snapshot."""

CHANNEL_HISTORY = (
    # The channel's history in the same country, from snapshots before the first day only.
    "channel_prior_videos",  # earlier videos whose trending run had ended (see below)
    "channel_prior_log_views_gained",  # their mean log_views_gained; NO_HISTORY_LOG_GAIN if none
    "channel_days_since_trended",  # days since any channel video was on the list; NEW_CHANNEL_DAYS
    "channel_is_new",  # 1 if the channel was never on the list in this country before
)
"""Features of the channel before the video's first day, served from Feast
(`channel_history_fv`, built by `channel_history_frame`).

For a row whose first day is `t`: an earlier video of the same channel in the
same country counts in `channel_prior_videos` and `channel_prior_log_views_gained` only if it
was on the list before `t` and is NOT on the list on day `t`. Its views gained are only known
once its run has ended, so a video still trending on `t` does not count; its gain is measured
from its first snapshot to its last snapshot before `t`, so a video that leaves the list and
comes back later counts with what was known on `t` (its return is in the future).
`channel_days_since_trended` counts every snapshot of the channel's videos before `t`,
including videos still trending on `t` (then it is 1). None of them depends on the video
itself (it has no snapshot before `t`), so they are keyed by (country, channel, day).
"""

FEATURES = (*VIDEO_FEATURES, *CHANNEL_HISTORY)
"""Numeric feature columns, all float64 and never NaN."""

HISTORY_KEYS = ("country", "channel_id", "event_timestamp")
"""Join keys of `channel_history_frame` (and of Feast's `channel_history_fv`) with its time."""

SNAPSHOT_COLUMNS = ("title", "tags", "views", "likes", "dislikes", "comment_total")
"""What `video_features` reads from a video's first-day snapshot, besides `event_timestamp`."""

TARGETS = ("log_views_gained", "like_rate")
"""`log_views_gained` = log1p(max(views on the last trending day - views on the first, 0));
`like_rate` = likes / views on the last trending day (0 when views is 0). Rates are clipped
to [0, 1] as a guard; the real files have no likes above views."""

NEW_CHANNEL_DAYS = 60.0
"""`channel_days_since_trended` for a channel never seen: longer than the 40 days of data, so
"never" reads as "long ago"."""

NO_HISTORY_LOG_GAIN = 0.0
"""`channel_prior_log_views_gained` when no earlier video of the channel has ended its run;
`channel_prior_videos` is then 0, which tells the model the value carries no information."""

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


def channel_history_frame(videos: pd.DataFrame) -> pd.DataFrame:
    """`HISTORY_KEYS` and `CHANNEL_HISTORY` for every day a channel's video first trends in a
    country (what training joins), and for every channel on the last day of its country's data
    (what the online store serves for tomorrow's videos)."""
    _check_columns(videos, REQUIRED_COLUMNS, "channel_history_frame")
    snapshots = videos.sort_values([*_ROW_KEY, "event_timestamp"])
    first_days = snapshots.groupby(_ROW_KEY, sort=False).head(1)
    last_day = snapshots.groupby("country")["event_timestamp"].transform("max")
    latest = snapshots[snapshots["event_timestamp"] == last_day]
    keys = pd.concat([first_days, latest])[list(HISTORY_KEYS)].drop_duplicates()
    keys = keys.sort_values(list(HISTORY_KEYS)).reset_index(drop=True)
    history = _channel_history(snapshots, keys)
    return pd.concat([keys, history], axis=1).astype({name: "float64" for name in CHANNEL_HISTORY})


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
