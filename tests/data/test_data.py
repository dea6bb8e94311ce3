"""Data tests: quality expectations on the real reference files, and the loaders' failure modes."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import DATA_DIR
from training.data import (
    MIN_SERIES_LENGTH,
    SERIES_END,
    DataError,
    load_m4_hourly,
    load_youtube_trending,
)

M4_PATH = DATA_DIR / "m4-hourly" / "Hourly-train.csv"
YOUTUBE_COLUMNS = [
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
COUNTS = ["views", "likes", "dislikes", "comment_total"]


@pytest.fixture(scope="module")
def m4() -> pd.DataFrame:
    return load_m4_hourly(M4_PATH)


@pytest.fixture(scope="module")
def youtube() -> pd.DataFrame:
    return load_youtube_trending(DATA_DIR)


# --- M4 hourly: the real file -------------------------------------------------------------


def test_m4_schema(m4: pd.DataFrame) -> None:
    assert list(m4.columns) == ["series_id", "event_timestamp", "interest"]
    assert m4["series_id"].map(type).eq(str).all()
    assert str(m4["event_timestamp"].dtype) == "datetime64[ns, UTC]"
    assert m4["interest"].dtype == "float64"


def test_m4_has_all_series_with_their_lengths(m4: pd.DataFrame) -> None:
    lengths = m4.groupby("series_id").size()
    assert len(lengths) == 414
    assert set(lengths.index) == {f"H{i}" for i in range(1, 415)}
    assert lengths.between(700, 960).all()
    assert m4["interest"].notna().all()


def test_m4_series_are_hourly_and_end_before_series_end(m4: pd.DataFrame) -> None:
    by_series = m4.groupby("series_id")["event_timestamp"]
    assert (by_series.max() == SERIES_END - pd.Timedelta(hours=1)).all()
    steps = by_series.diff().dropna()
    assert (steps == pd.Timedelta(hours=1)).all()


def test_m4_keeps_file_order(m4: pd.DataFrame) -> None:
    assert list(m4["series_id"].unique()[:3]) == ["H1", "H2", "H3"]
    assert m4.groupby("series_id", sort=False)["event_timestamp"].is_monotonic_increasing.all()


def test_m4_limit_keeps_first_series(m4: pd.DataFrame) -> None:
    first = load_m4_hourly(M4_PATH, limit=3)
    assert list(first["series_id"].unique()) == ["H1", "H2", "H3"]
    expected = m4[m4["series_id"].isin(["H1", "H2", "H3"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(first, expected)


# --- M4 hourly: broken files --------------------------------------------------------------


def _wide_csv(path: Path, rows: list[list[object]], header: list[str] | None = None) -> Path:
    width = max(len(r) for r in rows)
    header = header or ["V1", *(f"V{i}" for i in range(2, width + 1))]
    padded = [[*r, *[""] * (width - len(r))] for r in rows]
    pd.DataFrame(padded, columns=header).to_csv(path, index=False)
    return path


GOOD = list(range(MIN_SERIES_LENGTH))


@pytest.mark.parametrize(
    ("rows", "header", "problem"),
    [
        ([["H1", *GOOD]], ["id", *(f"V{i}" for i in range(2, len(GOOD) + 2))], "V1"),
        ([["H1", *GOOD[:-1], "lots"]], None, "non-numeric value 'lots' in series H1"),
        ([["H1", *GOOD], ["H2", *GOOD[:-1]]], None, "series H2 has 119 points"),
        ([["H1", 1.0, "", *GOOD]], None, "series H1 has a gap"),
        ([["H1", *GOOD], ["H1", *GOOD]], None, "duplicate series ids"),
    ],
    ids=["no-id-column", "non-numeric", "too-short", "gap", "duplicate-id"],
)
def test_m4_rejects_broken_files(
    tmp_path: Path, rows: list[list[object]], header: list[str] | None, problem: str
) -> None:
    path = _wide_csv(tmp_path / "broken.csv", rows, header)
    with pytest.raises(DataError, match=problem) as error:
        load_m4_hourly(path)
    assert str(path) in str(error.value)


def test_m4_rejects_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        load_m4_hourly(tmp_path / "absent.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="not a readable CSV"):
        load_m4_hourly(tmp_path / "empty.csv")


def test_m4_loads_a_minimal_valid_file(tmp_path: Path) -> None:
    path = _wide_csv(tmp_path / "ok.csv", [["A", *GOOD], ["B", *GOOD, 7.5]])
    frame = load_m4_hourly(path)
    assert frame.groupby("series_id").size().to_dict() == {"A": 120, "B": 121}
    last = frame.groupby("series_id").last()
    assert last.loc["B", "interest"] == 7.5
    assert (last["event_timestamp"] == SERIES_END - pd.Timedelta(hours=1)).all()


# --- YouTube trending: the real files -----------------------------------------------------


def test_youtube_schema(youtube: pd.DataFrame) -> None:
    assert list(youtube.columns) == YOUTUBE_COLUMNS
    for column in ["category_id", *COUNTS]:
        assert youtube[column].dtype == "int64", column
    assert str(youtube["event_timestamp"].dtype) == "datetime64[ns, UTC]"
    assert youtube.notna().all().all()


def test_youtube_values_are_plausible(youtube: pd.DataFrame) -> None:
    categories = json.loads((DATA_DIR / "youtube-trending" / "US_category_id.json").read_text())
    titles = {int(item["id"]): item["snippet"]["title"] for item in categories["items"]}
    assert youtube["category_id"].isin(titles.keys()).all()
    assert (youtube["category"] == youtube["category_id"].map(titles)).all()
    assert (youtube[COUNTS] >= 0).all().all()
    # Zero views are real (live streams, Google doodles); the like rate must cope with them.
    assert (youtube["views"] > 0).mean() > 0.99
    assert set(youtube["country"]) == {"US", "GB"}
    assert youtube["video_id"].str.fullmatch(r"[A-Za-z0-9_-]{11}").all()
    assert youtube["channel_id"].str.fullmatch(r"ch_[0-9a-f]{12}").all()


def test_youtube_snapshots_are_autumn_2017_midnights(youtube: pd.DataFrame) -> None:
    stamps = youtube["event_timestamp"]
    assert stamps.min() == pd.Timestamp("2017-09-13", tz="UTC")
    assert stamps.max() <= pd.Timestamp("2017-10-31", tz="UTC")
    assert (stamps == stamps.dt.normalize()).all()
    # Oct 1-9 are written `1.1`..`9.1`; they must not be parsed as January.
    assert stamps.dt.month.isin([9, 10]).all()
    assert (stamps.dt.month == 10).sum() > 1000


def test_youtube_rows_are_unique_per_country_video_and_day(youtube: pd.DataFrame) -> None:
    assert not youtube.duplicated(["country", "video_id", "event_timestamp"]).any()
    per_country = youtube.groupby("country").size()
    assert per_country.between(7_500, 8_000).all()


# --- YouTube trending: cleaning and broken files ------------------------------------------

_HEADER = (
    "video_id,title,channel_title,category_id,tags,views,likes,dislikes,comment_total,"
    "thumbnail_link,date"
)


def _thumb(video_id: str) -> str:
    return f"https://i.ytimg.com/vi/{video_id}/default.jpg"


def _trending_dir(tmp_path: Path, us_rows: list[str], gb_rows: list[str]) -> Path:
    folder = tmp_path / "youtube-trending"
    folder.mkdir()
    (folder / "USvideos.csv").write_text("\n".join([_HEADER, *us_rows]) + "\n")
    # GB's real file has an extra free-text `category` column and a trailing comma.
    (folder / "GBvideos.csv").write_text(
        "\n".join([_HEADER + ",category,", *(r + ",News," for r in gb_rows)]) + "\n"
    )
    categories = {"items": [{"id": "24", "snippet": {"title": "Entertainment"}}]}
    (folder / "US_category_id.json").write_text(json.dumps(categories))
    return tmp_path


def test_youtube_cleaning_rules(tmp_path: Path) -> None:
    a, b, c = "AAAAAAAAAAA", "BBBBBBBBBBB", "CCCCCCCCCCC"
    us = [
        f"{a},T,Chan,24,x|y,100,10,1,5,{_thumb(a)},13.09",
        f"{a},T,Chan,24,x|y,100,10,1,5,{_thumb(a)},13.09",  # exact repeat
        f"{a},T,Chan,24,[none],200,,,,{_thumb(a)},1.1",  # 01.10, blank counts
        f",T,Chan,24,x,300,1,1,1,{_thumb(b)},14.09",  # id recovered from the thumbnail
        f"{c},T,Chan,24,x,,1,1,1,{_thumb(c)},14.09",  # no views
        f"{c},T,Chan,24,x,5,1,1,1,{_thumb(c)},100",  # no DD.MM date
        f"{c},T,Chan,99,x,5,1,1,1,{_thumb(c)},14.09",  # unknown category
    ]
    gb = [f"{a},T,Chan,24,x,150,10,1,5,{_thumb(a)},13.09xyz"]  # glued next id
    frame = load_youtube_trending(_trending_dir(tmp_path, us, gb))

    assert len(frame) == 4
    oct_1 = frame[frame["event_timestamp"] == pd.Timestamp("2017-10-01", tz="UTC")].iloc[0]
    assert (oct_1["likes"], oct_1["dislikes"], oct_1["comment_total"]) == (0, 0, 0)
    assert oct_1["tags"] == ""
    assert b in set(frame["video_id"])
    assert c not in set(frame["video_id"])
    assert frame.groupby("country").size().to_dict() == {"GB": 1, "US": 3}
    assert frame["category"].eq("Entertainment").all()
    assert frame["channel_id"].nunique() == 1


def test_youtube_rejects_missing_files_and_columns(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="US_category_id.json: file not found"):
        load_youtube_trending(tmp_path)
    data_dir = _trending_dir(tmp_path, [], [])
    (data_dir / "youtube-trending" / "USvideos.csv").write_text("video_id,title\nx,y\n")
    with pytest.raises(DataError, match=r"USvideos.csv: missing columns \['channel_title'"):
        load_youtube_trending(data_dir)
