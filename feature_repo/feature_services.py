"""Feature services: the versioned feature sets a model is trained on and served with."""

from feast import FeatureService

from feature_repo.features import channel_history_fv, topic_interest_fv, topic_recent_fv

# What the trend forecaster trains on; a new version gets a new name, never an edit.
trend_training_v1 = FeatureService(
    name="trend_training_v1",
    features=[topic_interest_fv],
    description="Point-in-time hourly interest and trailing means for training.",
)

# What the trend model server reads per request: one series' recent history.
trend_serving_v1 = FeatureService(
    name="trend_serving_v1",
    features=[topic_recent_fv],
    description="The last 168 hourly interest values of a topic for online forecasting.",
)

# What the niche models read besides the video's own first-day snapshot, offline and online.
niche_engagement_v1 = FeatureService(
    name="niche_engagement_v1",
    features=[channel_history_fv],
    description="A channel's history in a country before a video's first trending day.",
)
