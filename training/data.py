"""Load the reference data sets into clean, typed frames the feature step can trust.

Every loader fails loudly with `DataError` (naming the file and the problem) instead of
passing a half-parsed frame downstream, where the damage would surface as a bad model.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from contentml.errors import DataError

# M4 carries no timestamps, so every series is aligned to end at this hour: the last observation
# of every series is at SERIES_END - 1 h and SERIES_END is the first hour of the forecast horizon.
SERIES_END = pd.Timestamp("2025-01-01 00:00", tz="UTC")

HORIZON = 48
"""M4's official forecast horizon for the hourly series."""

SEASONALITY = 24
"""M4's seasonal period for the hourly series."""

MIN_SERIES_LENGTH = 2 * HORIZON + SEASONALITY
"""Enough points for a validation and a test horizon plus one season of context to fit on."""

YOUTUBE_COUNTRIES = ("US", "GB")
"""Countries whose trending snapshots are loaded, in this order."""

YOUTUBE_YEAR = 2017
"""The trending files only carry `DD.MM`; all snapshots are from this year."""

_YOUTUBE_COLUMNS = (
    "video_id",
    "title",
    "channel_title",
    "category_id",
    "tags",
    "views",
    "likes",
    "dislikes",
    "comment_total",
    "thumbnail_link",
    "date",
)
_COUNT_COLUMNS = ("views", "likes", "dislikes", "comment_total")
# YouTube ids are 11 characters of URL-safe base64; the thumbnail URL repeats the id.
_VIDEO_ID = re.compile(r"^[A-Za-z0-9_-]{11}$")
_THUMBNAIL_ID = re.compile(r"/vi/([A-Za-z0-9_-]{11})/")
# `DD.MM` at the start of the cell; some cells have the next row's id glued after it.
_SNAPSHOT_DATE = re.compile(r"^(\d{1,2})\.(\d{1,2})")


def load_m4_hourly(path: Path, limit: int | None = None) -> pd.DataFrame:
    """The M4 hourly series in long format: `series_id`, `event_timestamp`, `interest`.

    Each series gets consecutive hourly UTC timestamps ending at `SERIES_END - 1 h`.
    `limit` keeps the first `limit` series in file order (for fast tests and demos).
    Rows are sorted by file order of the series, then by time.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        # Only the id column is text; reading it as str keeps ids like "H1" from any coercion.
        wide = pd.read_csv(path, dtype={"V1": str}, nrows=limit)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable CSV file: {e}") from e
    if "V1" not in wide.columns:
        raise DataError(f"{path}: missing the series id column V1")
    ids = wide["V1"]
    if ids.isna().any():
        raise DataError(f"{path}: empty series id in row {int(ids.isna().to_numpy().argmax()) + 2}")
    if ids.duplicated().any():
        raise DataError(f"{path}: duplicate series ids {sorted(set(ids[ids.duplicated()]))[:5]}")

    raw = wide.drop(columns="V1")
    values = raw.apply(pd.to_numeric, errors="coerce")
    bad = values.isna() & raw.notna()
    if bad.any().any():
        row, col = np.argwhere(bad.to_numpy())[0]
        raise DataError(
            f"{path}: non-numeric value {raw.iat[row, col]!r} in series {ids.iat[row]} "
            f"(column {raw.columns[col]})"
        )

    present = values.notna().to_numpy()
    lengths = present.sum(axis=1)
    # Observations must be one contiguous run from V2: only trailing cells may be empty.
    broken = (present[:, 1:] & ~present[:, :-1]).any(axis=1)
    if broken.any():
        raise DataError(f"{path}: series {ids[broken].iat[0]} has a gap between observations")
    short = lengths < MIN_SERIES_LENGTH
    if short.any():
        raise DataError(
            f"{path}: series {ids[short].iat[0]} has {lengths[short][0]} points, "
            f"fewer than the {MIN_SERIES_LENGTH} needed (2 horizons of {HORIZON} + {SEASONALITY})"
        )

    # Position p of a series with n points sits n - p hours before SERIES_END.
    row_index, position = np.nonzero(present)
    hours_before_end = lengths[row_index] - position
    timestamps = SERIES_END - pd.to_timedelta(hours_before_end, unit="h")
    return pd.DataFrame(
        {
            "series_id": ids.to_numpy(dtype=object)[row_index],
            "event_timestamp": timestamps,
            "interest": values.to_numpy(dtype="float64")[row_index, position],
        }
    )


def load_youtube_trending(data_dir: Path) -> pd.DataFrame:
    """Both countries' trending snapshots, cleaned, one row per country, video and snapshot day.

    Columns: `video_id`, `title`, `channel_title`, `channel_id`, `category_id` (int), `category`,
    `country` (`US`|`GB`), `tags`, `views`, `likes`, `dislikes`, `comment_total` (ints),
    `event_timestamp` (the snapshot day at 00:00 UTC).

    Cleaning, in the order applied:
    - `video_id` is taken from the thumbnail URL when it has one (the CSV export truncated or
      mangled some id cells, never the URL); rows with no valid 11-character id are dropped.
    - `date` is `DD.MM` written through a float, so `1.1` means 01.10 (the month lost its
      trailing zero); cells that do not start with `DD.MM` (e.g. `100`) are dropped.
    - `views` must be present; a blank `likes`, `dislikes` or `comment_total` means ratings or
      comments were disabled and becomes 0. Negative counts drop the row.
    - Categories must be in `US_category_id.json`; `category` is its title (GB's own free-text
      `category` column and its stray trailing column are ignored).
    - `channel_id` is a hash of the channel title: the files have no channel ids, and a channel
      with the same title in both countries is the same channel.
    - Exact repeats are dropped; of repeated (country, video, day) rows with different counts,
      the one with the most views (the later crawl) is kept.
    """
    data_dir = Path(data_dir)
    categories = _load_categories(data_dir / "youtube-trending" / "US_category_id.json")
    frames = [
        _load_trending_country(data_dir / "youtube-trending" / f"{country}videos.csv", country)
        for country in YOUTUBE_COUNTRIES
    ]
    videos = pd.concat(frames, ignore_index=True)
    videos = videos[videos["category_id"].isin(categories.keys())].copy()
    videos["category"] = videos["category_id"].map(categories)
    videos["channel_id"] = videos["channel_title"].map(_channel_id)
    videos = videos.drop_duplicates()
    videos = videos.sort_values(["country", "video_id", "event_timestamp", "views"])
    videos = videos.drop_duplicates(["country", "video_id", "event_timestamp"], keep="last")
    columns = [
        "video_id",
        "title",
        "channel_title",
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
    ]
    videos = videos.sort_values(["event_timestamp", "country", "video_id"])
    return videos[columns].reset_index(drop=True)


def _load_categories(path: Path) -> dict[int, str]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        items = json.loads(path.read_text(encoding="utf-8"))["items"]
        return {int(item["id"]): str(item["snippet"]["title"]) for item in items}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: not a YouTube videoCategories response: {e!r}") from e


def _load_trending_country(path: Path, country: str) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        # All text first: the counts have blanks, and parsing them here would turn ids into NaN.
        raw = pd.read_csv(
            path,
            dtype=str,
            keep_default_na=False,
            usecols=lambda column: column in _YOUTUBE_COLUMNS,
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable CSV file: {e}") from e
    missing = [c for c in _YOUTUBE_COLUMNS if c not in raw.columns]
    if missing:
        raise DataError(f"{path}: missing columns {missing}")

    from_thumbnail = raw["thumbnail_link"].str.extract(_THUMBNAIL_ID, expand=False)
    from_cell = raw["video_id"].str.strip().where(raw["video_id"].str.match(_VIDEO_ID))
    video_id = from_thumbnail.fillna(from_cell)

    parts = raw["date"].str.strip().str.extract(_SNAPSHOT_DATE)
    month = parts[1].str.ljust(2, "0")
    day = parts[0].str.zfill(2)
    event_timestamp = pd.to_datetime(
        f"{YOUTUBE_YEAR}-" + month + "-" + day, format="%Y-%m-%d", errors="coerce", utc=True
    )

    counts = {c: pd.to_numeric(raw[c].str.strip(), errors="coerce") for c in _COUNT_COLUMNS}
    category_id = pd.to_numeric(raw["category_id"].str.strip(), errors="coerce")
    channel_title = raw["channel_title"].str.strip()
    keep = (
        video_id.notna()
        & event_timestamp.notna()
        & counts["views"].notna()
        & category_id.notna()
        & (channel_title != "")
    )
    for column in _COUNT_COLUMNS:
        keep &= counts[column].fillna(0) >= 0

    frame = pd.DataFrame(
        {
            "video_id": video_id,
            "title": raw["title"].str.strip(),
            "channel_title": channel_title,
            "category_id": category_id,
            # `[none]` is how the export writes a video without tags.
            "tags": raw["tags"].str.strip().replace("[none]", ""),
            **{c: counts[c].fillna(0) for c in _COUNT_COLUMNS},
            "event_timestamp": event_timestamp,
        }
    )[keep]
    frame = frame.astype({"category_id": "int64", **{c: "int64" for c in _COUNT_COLUMNS}})
    frame["country"] = country
    return frame


def _channel_id(channel_title: str) -> str:
    # A short stable hash: titles hold any Unicode, ids must be plain keys in Feast and Redis.
    return "ch_" + hashlib.sha1(channel_title.encode("utf-8")).hexdigest()[:12]


TEXT_COLUMNS = ("tweet", "text", "title")
"""Columns a text file may hold its texts in, in order of preference."""

TOXICITY_CLASSES = ("hate_speech", "offensive_language", "neither")
"""Davidson et al.'s classes, in the order of their `class` codes 0, 1, 2."""


def load_texts(path: Path) -> pd.DataFrame:
    """Texts to score: the file's first column (the row's id, as text), then `text`.

    The texts come from the first of `TEXT_COLUMNS` the file has; a blank cell is an empty text.
    """
    raw = _read_text_csv(Path(path))
    return pd.DataFrame({raw.columns[0]: raw.iloc[:, 0], "text": raw[_text_column(path, raw)]})


def load_toxicity(path: Path) -> pd.DataFrame:
    """The labelled toxicity tweets: `id` (the first column), `text`, `label` (0 hate speech,
    1 offensive, 2 neither). Empty texts are dropped; a missing or unknown label is an error,
    since silently dropping labels would shift the class balance the model learns."""
    raw = _read_text_csv(Path(path))
    text = raw[_text_column(path, raw)]
    if "class" not in raw.columns:
        raise DataError(f"{path}: needs a 'class' column (0, 1 or 2) to train on")
    labels = raw["class"].str.strip()
    known = labels.isin([str(code) for code in range(len(TOXICITY_CLASSES))])
    if not known.all():
        row = int(np.flatnonzero(~known.to_numpy())[0])
        raise DataError(
            f"{path}: 'class' must be 0, 1 or 2; data row {row + 1} has {labels.iloc[row]!r}"
        )
    frame = pd.DataFrame({"id": raw.iloc[:, 0], "text": text, "label": labels.astype("int64")})
    if frame["id"].duplicated().any():
        raise DataError(f"{path}: ids in the first column repeat; the splits need unique ids")
    return frame[frame["text"].str.strip() != ""].reset_index(drop=True)


def _read_text_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        # All text: ids stay as written ("007" is not 7) and no text turns into NaN or a number.
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
        with path.open(newline="", encoding="utf-8") as file:
            header = next(csv.reader(file))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable CSV file: {e}") from e
    # pandas names a blank header cell `Unnamed: 0`; the id column keeps the file's own name so
    # that an output written from it has the input's header.
    return raw.rename(columns={raw.columns[0]: header[0]})


def _text_column(path: Path, raw: pd.DataFrame) -> str:
    column = next((c for c in TEXT_COLUMNS if c in raw.columns), None)
    if column is None:
        raise DataError(
            f"{path}: needs a column named one of {TEXT_COLUMNS}, has {list(raw.columns)}"
        )
    if column == raw.columns[0]:
        raise DataError(f"{path}: the first column must be an id, not the texts")
    return column
