"""The niche engagement models' feature schema: the columns of an engagement row, its features
(the video's own, and its channel's history that Feast serves) and its targets. The feature
store's sources and views (`contentml.features`, `features.channel_history_fv`), the trainers
(`training.niche`), drift checks and the niche predictors all read the schema from here."""

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
"""Features of the video itself, computed by `training.niche.data.video_features` from what the
caller sends: the first-day snapshot."""

CHANNEL_HISTORY = (
    # The channel's history in the same country, from snapshots before the first day only.
    "channel_prior_videos",  # earlier videos whose trending run had ended (see below)
    "channel_prior_log_views_gained",  # their mean log_views_gained; NO_HISTORY_LOG_GAIN if none
    "channel_days_since_trended",  # days since any channel video was on the list; NEW_CHANNEL_DAYS
    "channel_is_new",  # 1 if the channel was never on the list in this country before
)
"""Features of the channel before the video's first day, served from Feast
(`channel_history_fv`, built by `contentml.features.channel_history_frame`).

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
