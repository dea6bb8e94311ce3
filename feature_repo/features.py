"""Feature views: which columns of which source, keyed by which entity, valid for how long."""

from datetime import timedelta

from feast import FeatureView, Field
from feast.types import Array, Float64, Int64, String

from feature_repo.data_sources import (
    channel_history_source,
    channel_stats_source,
    niche_stats_source,
    topic_interest_source,
    topic_recent_source,
    video_stats_source,
)
from feature_repo.entities import channel, country, niche, topic, video

# Training history: interest and its trailing means, computed from the past and the current hour
# only. A row is valid within its own hour (ttl < 1 h, Feast's ttl bound is inclusive), so an hour
# without an observation joins as NaN instead of silently repeating the previous hour.
topic_interest_fv = FeatureView(
    name="topic_interest_fv",
    entities=[topic],
    ttl=timedelta(minutes=59),
    schema=[
        Field(name="interest", dtype=Float64),
        Field(name="interest_mean_24h", dtype=Float64),
        Field(name="interest_mean_168h", dtype=Float64),
    ],
    source=topic_interest_source,
    online=False,
    description="Hourly interest per topic with trailing 24 h and 168 h means.",
)

# Serving history: the model server forecasts from the last week of a topic, read in one lookup.
# No ttl: a series' last week stays its latest history until a newer one is written.
topic_recent_fv = FeatureView(
    name="topic_recent_fv",
    entities=[topic],
    ttl=timedelta(0),
    schema=[Field(name="interest_recent", dtype=Array(Float64))],
    source=topic_recent_source,
    online=True,
    description="Up to the last 168 hourly interest values of a topic, oldest first.",
)

# How a video is doing on the trending list; a snapshot describes one day.
video_stats_fv = FeatureView(
    name="video_stats_fv",
    entities=[video],
    ttl=timedelta(days=1),
    schema=[
        Field(name="views", dtype=Int64),
        Field(name="likes", dtype=Int64),
        Field(name="dislikes", dtype=Int64),
        Field(name="comment_total", dtype=Int64),
        Field(name="like_rate", dtype=Float64),
        Field(name="days_on_trending", dtype=Int64),
    ],
    source=video_stats_source,
    online=True,
    description="Counts of a trending video (the larger of its US/GB rows), likes per view, "
    "and the number of snapshot days it has been trending so far.",
)

# How strong a channel is on the trending list that day.
channel_stats_fv = FeatureView(
    name="channel_stats_fv",
    entities=[channel],
    ttl=timedelta(days=1),
    schema=[
        Field(name="videos_trending", dtype=Int64),
        Field(name="mean_views", dtype=Float64),
        Field(name="total_views", dtype=Int64),
        Field(name="mean_like_rate", dtype=Float64),
    ],
    source=channel_stats_source,
    online=True,
    description="Per channel and snapshot day, over both countries.",
)

# How crowded and how rewarding a category is on the trending list that day.
niche_stats_fv = FeatureView(
    name="niche_stats_fv",
    entities=[niche],
    ttl=timedelta(days=1),
    schema=[
        Field(name="category", dtype=String),
        Field(name="videos_trending", dtype=Int64),
        Field(name="channels_trending", dtype=Int64),
        Field(name="mean_views", dtype=Float64),
        Field(name="mean_like_rate", dtype=Float64),
    ],
    source=niche_stats_source,
    online=True,
    description="Per category and snapshot day, over both countries.",
)

# What a channel brings to its next video: its earlier trending runs in the same country, from
# snapshots before the video's first day only (`feature_repo.niche_schema.CHANNEL_HISTORY`). No ttl:
# a row stays the channel's history until a newer one, however long the channel is away.
channel_history_fv = FeatureView(
    name="channel_history_fv",
    entities=[channel, country],
    ttl=timedelta(0),
    schema=[
        Field(name="channel_prior_videos", dtype=Float64),
        Field(name="channel_prior_log_views_gained", dtype=Float64),
        Field(name="channel_days_since_trended", dtype=Float64),
        Field(name="channel_is_new", dtype=Float64),
    ],
    source=channel_history_source,
    online=True,
    description="Ended trending runs of a channel's earlier videos in a country: how many, "
    "their mean log views gained, days since the channel last trended, whether it is new.",
)
