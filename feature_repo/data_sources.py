"""Parquet files behind the file offline store, written by `contentml.features.write_sources`.

Paths are relative on purpose: Feast resolves them against `RepoConfig.repo_path`, which
`contentml.features.feature_store` sets to `settings.feast_data_dir`, so the registry holds no
machine-specific path and every process finds the files under its own settings.
"""

from feast import FileSource

# Hourly interest per topic with its trailing means: the training view's history.
topic_interest_source = FileSource(
    name="topic_interest_source",
    path="topic_interest.parquet",
    timestamp_field="event_timestamp",
    description="One row per series and hour.",
)

# The last week of interest per topic, one row per series: what the model server reads.
topic_recent_source = FileSource(
    name="topic_recent_source",
    path="topic_recent.parquet",
    timestamp_field="event_timestamp",
    description="One row per series at its last observed hour.",
)

# Per-video counts per trending snapshot (both countries merged).
video_stats_source = FileSource(
    name="video_stats_source",
    path="video_stats.parquet",
    timestamp_field="event_timestamp",
    description="One row per video and snapshot day.",
)

# Per-channel aggregates per trending snapshot.
channel_stats_source = FileSource(
    name="channel_stats_source",
    path="channel_stats.parquet",
    timestamp_field="event_timestamp",
    description="One row per channel and snapshot day.",
)

# Per-category aggregates per trending snapshot.
niche_stats_source = FileSource(
    name="niche_stats_source",
    path="niche_stats.parquet",
    timestamp_field="event_timestamp",
    description="One row per category and snapshot day.",
)

# A channel's trending history per country, as of the days its videos first trend.
channel_history_source = FileSource(
    name="channel_history_source",
    path="channel_history.parquet",
    timestamp_field="event_timestamp",
    description="One row per country, channel and day a video of the channel first trends, "
    "plus each channel on the last day of the data.",
)
