"""Engagement task data: quality on the real trending files, point-in-time correctness, the
channel-history rule on hand-made frames, the time split, and the input errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from feature_repo.niche_schema import FEATURES, KEYS, NEW_CHANNEL_DAYS, NO_HISTORY_LOG_GAIN, TARGETS
from tests.conftest import DATA_DIR
from training.data import DataError, load_youtube_trending
from training.niche.data import REQUIRED_COLUMNS, engagement_frame, time_split

# Cutoffs where reading a channel's earlier video's run end from the whole data (instead of
# from what was known on the day) changes features of rows up to the cutoff.
CUTOFFS = ("2017-09-20", "2017-10-08")
DAY0 = pd.Timestamp("2017-10-01", tz="UTC")


@pytest.fixture(scope="module")
def videos() -> pd.DataFrame:
    return load_youtube_trending(DATA_DIR)


@pytest.fixture(scope="module")
def frame(videos: pd.DataFrame) -> pd.DataFrame:
    return engagement_frame(videos)


def snapshot(
    video_id: str, day: int, views: int, *, channel: str = "ch_a", country: str = "US", **extra
) -> dict:
    """One row of a `load_youtube_trending` frame, `day` days after DAY0."""
    return {
        "video_id": video_id,
        "title": "A title",
        "channel_title": channel,
        "channel_id": channel,
        "category_id": 24,
        "category": "Entertainment",
        "country": country,
        "tags": "a|b",
        "views": views,
        "likes": views // 10,
        "dislikes": 0,
        "comment_total": 5,
        "event_timestamp": DAY0 + pd.Timedelta(days=day),
        **extra,
    }


def row(frame: pd.DataFrame, video_id: str, country: str = "US") -> pd.Series:
    match = frame[(frame["video_id"] == video_id) & (frame["country"] == country)]
    assert len(match) == 1
    return match.iloc[0]


# --- The real files -------------------------------------------------------------------------


def test_one_row_per_country_and_video_at_its_first_day(
    videos: pd.DataFrame, frame: pd.DataFrame
) -> None:
    assert list(frame.columns) == [*KEYS, *FEATURES, *TARGETS]
    assert not frame.duplicated(["country", "video_id"]).any()
    first_days = videos.groupby(["country", "video_id"])["event_timestamp"].min()
    assert len(frame) == len(first_days)
    indexed = frame.set_index(["country", "video_id"])["event_timestamp"]
    pd.testing.assert_series_equal(indexed.sort_index(), first_days.sort_index(), check_names=False)


def test_features_and_targets_are_finite_floats(frame: pd.DataFrame) -> None:
    values = frame[[*FEATURES, *TARGETS]]
    assert (values.dtypes == "float64").all()
    assert np.isfinite(values.to_numpy()).all()


def test_targets_are_in_range(videos: pd.DataFrame, frame: pd.DataFrame) -> None:
    assert (frame["log_views_gained"] >= 0).all()
    assert frame["like_rate"].between(0, 1).all()
    # Videos on the list for one day gained nothing; most videos stay longer and gain views.
    days_on_list = videos.groupby(["country", "video_id"]).size()
    single = days_on_list[days_on_list == 1].index
    indexed = frame.set_index(["country", "video_id"])
    assert (indexed.loc[single, "log_views_gained"] == 0).all()
    assert (indexed.drop(single)["log_views_gained"] > 0).mean() > 0.9


@pytest.mark.parametrize("cutoff", CUTOFFS)
def test_features_do_not_change_when_the_future_is_deleted(
    videos: pd.DataFrame, frame: pd.DataFrame, cutoff: str
) -> None:
    """Poison the future: without the snapshots after the cutoff, rows up to it keep every
    feature. Videos that leave the list and come back later make this bite on the history."""
    day = pd.Timestamp(cutoff, tz="UTC")
    truncated = engagement_frame(videos[videos["event_timestamp"] <= day])
    key = ["country", "video_id"]
    full = frame[frame["event_timestamp"] <= day].set_index(key).sort_index()
    cut = truncated.set_index(key).sort_index()
    assert len(full) == len(cut) > 1000
    pd.testing.assert_frame_equal(full[list(FEATURES)], cut[list(FEATURES)])
    # The deletion did reach these rows: their targets changed.
    assert (full["log_views_gained"] != cut["log_views_gained"]).sum() > 100


def test_channel_history_is_used_on_the_real_data(frame: pd.DataFrame) -> None:
    returning = frame[frame["channel_prior_videos"] > 0]
    assert len(returning) > 500
    assert (returning["channel_is_new"] == 0).all()
    assert (returning["channel_days_since_trended"] < NEW_CHANNEL_DAYS).all()
    new = frame[frame["channel_is_new"] == 1]
    assert (new["channel_prior_videos"] == 0).all()
    assert (new["channel_days_since_trended"] == NEW_CHANNEL_DAYS).all()


def test_time_split_keeps_days_apart(frame: pd.DataFrame) -> None:
    training, validation = time_split(frame, 0.25)
    assert len(training) + len(validation) == len(frame)
    assert training["event_timestamp"].max() < validation["event_timestamp"].min()
    days = frame["event_timestamp"].nunique()
    assert validation["event_timestamp"].nunique() == round(0.25 * days)


# --- Hand-made frames -----------------------------------------------------------------------


def test_a_video_still_trending_on_the_first_day_is_not_history() -> None:
    videos = pd.DataFrame(
        [
            # Video A trends on days 0-2 in the US and gains 300 views.
            snapshot("A", 0, 100),
            snapshot("A", 1, 200),
            snapshot("A", 2, 400),
            # B starts on day 2 while A is still trending: A's run has not ended.
            snapshot("B", 2, 50),
            snapshot("B", 3, 80),
            # C starts on day 4: A has ended (day 2), B has ended (day 3).
            snapshot("C", 4, 10),
            # The same channel in GB never counts for US rows.
            snapshot("G", 0, 10**6, country="GB"),
            snapshot("G", 1, 2 * 10**6, country="GB"),
            # Another channel's history is not this channel's.
            snapshot("X", 0, 1, channel="ch_x"),
        ]
    )
    frame = engagement_frame(videos)

    a = row(frame, "A")
    assert a["channel_is_new"] == 1
    assert a["channel_prior_videos"] == 0
    assert a["channel_prior_log_views_gained"] == NO_HISTORY_LOG_GAIN
    assert a["channel_days_since_trended"] == NEW_CHANNEL_DAYS

    b = row(frame, "B")
    assert b["channel_prior_videos"] == 0
    assert b["channel_prior_log_views_gained"] == NO_HISTORY_LOG_GAIN
    assert b["channel_is_new"] == 0  # A was on the list the day before
    assert b["channel_days_since_trended"] == 1

    c = row(frame, "C")
    assert c["channel_prior_videos"] == 2
    assert c["channel_prior_log_views_gained"] == pytest.approx((np.log1p(300) + np.log1p(30)) / 2)
    assert c["channel_days_since_trended"] == 1

    assert row(frame, "G", "GB")["channel_is_new"] == 1
    assert row(frame, "X")["channel_is_new"] == 1


def test_a_returning_video_counts_with_what_was_known_then() -> None:
    videos = pd.DataFrame(
        [
            # A trends on days 0-1, leaves, and comes back on day 5 with many more views.
            snapshot("A", 0, 100),
            snapshot("A", 1, 200),
            snapshot("A", 5, 10**6),
            snapshot("B", 3, 10),
        ]
    )
    b = row(engagement_frame(videos), "B")
    assert b["channel_prior_videos"] == 1
    assert b["channel_prior_log_views_gained"] == pytest.approx(np.log1p(100))
    assert b["channel_days_since_trended"] == 2
    a = row(engagement_frame(videos), "A")
    assert a["log_views_gained"] == pytest.approx(np.log1p(10**6 - 100))


def test_targets_and_first_day_features() -> None:
    videos = pd.DataFrame(
        [
            snapshot("A", 0, 1000, likes=100, dislikes=10, comment_total=0),
            snapshot("A", 3, 5000, likes=250),
            snapshot("S", 0, 0, likes=0),  # one day, no views: rates are 0, not NaN
        ]
    )
    frame = engagement_frame(videos)
    a = row(frame, "A")
    assert a["event_timestamp"] == DAY0
    assert a["first_log_views"] == pytest.approx(np.log1p(1000))
    assert a["first_like_rate"] == pytest.approx(0.1)
    assert a["first_dislike_rate"] == pytest.approx(0.01)
    assert a["first_log_comments"] == 0
    assert a["day_of_week"] == DAY0.dayofweek
    assert a["tag_count"] == 2
    assert a["log_views_gained"] == pytest.approx(np.log1p(4000))
    assert a["like_rate"] == pytest.approx(0.05)
    s = row(frame, "S")
    assert (s["log_views_gained"], s["like_rate"], s["first_like_rate"]) == (0, 0, 0)


@pytest.mark.parametrize(
    ("title", "expected"),
    [
        (
            "Artist - Song (OFFICIAL Video)",
            {"title_has_separator": 1, "title_mentions_official": 1, "title_words": 5},
        ),
        (
            "Movie Trailer #2 | Studio",
            {"title_has_separator": 1, "title_mentions_trailer": 1, "title_has_digit": 1},
        ),
        ("Cats vs. Dogs?!", {"title_mentions_versus": 1, "title_has_question": 1}),
        ("ABC def", {"title_upper_share": 0.5, "title_chars": 7, "title_has_exclamation": 0}),
        (
            "Spider-Man vsco officially",
            {"title_has_separator": 0, "title_mentions_versus": 0, "title_mentions_official": 0},
        ),
        ("", {"title_upper_share": 0, "title_words": 0, "title_chars": 0}),
    ],
)
def test_title_features(title: str, expected: dict[str, float]) -> None:
    frame = engagement_frame(pd.DataFrame([snapshot("A", 0, 10, title=title, tags="")]))
    assert frame.loc[0, "tag_count"] == 0
    assert {name: frame.loc[0, name] for name in expected} == pytest.approx(expected)


@pytest.mark.parametrize(("fraction", "n_validation"), [(0.2, 2), (0.01, 1), (0.99, 9)])
def test_time_split_counts_days_not_rows(fraction: float, n_validation: int) -> None:
    # Ten days, with many more rows on the last day than on the others.
    days = [DAY0 + pd.Timedelta(days=d) for d in range(10)] + [DAY0 + pd.Timedelta(days=9)] * 90
    frame = pd.DataFrame({"event_timestamp": days, "x": range(len(days))})
    training, validation = time_split(frame, fraction)
    assert validation["event_timestamp"].nunique() == n_validation
    assert training["event_timestamp"].nunique() == 10 - n_validation
    assert not set(training["event_timestamp"]) & set(validation["event_timestamp"])


# --- Errors ---------------------------------------------------------------------------------


def test_errors_name_the_problem() -> None:
    complete = pd.DataFrame([snapshot("A", 0, 10)])
    with pytest.raises(DataError, match="engagement_rows: input frame is empty"):
        engagement_frame(complete.iloc[:0])
    with pytest.raises(DataError, match=r"missing columns \['views', 'event_timestamp'\]"):
        engagement_frame(complete.drop(columns=["views", "event_timestamp"]))
    assert set(REQUIRED_COLUMNS) <= set(complete.columns)
    with pytest.raises(DataError, match="time_split: input frame is empty"):
        time_split(complete.iloc[:0], 0.2)
    with pytest.raises(DataError, match=r"time_split: input is missing columns \['event_t"):
        time_split(complete.drop(columns="event_timestamp"), 0.2)
    with pytest.raises(DataError, match="at least 2 distinct days, got 1"):
        time_split(complete, 0.2)
    with pytest.raises(ValueError, match="validation_fraction must be in"):
        time_split(complete, 1.0)
