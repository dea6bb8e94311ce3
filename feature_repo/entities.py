"""The things features describe: what each feature view's join key means."""

from feast import Entity, ValueType

# A topic is one interest series (an M4 hourly series stands in for a topic's search interest).
topic = Entity(
    name="topic",
    join_keys=["series_id"],
    value_type=ValueType.STRING,
    description="A topic whose hourly interest is forecast; the M4 series id.",
)

# A video is the unit the content pipeline ranks; YouTube's 11-character id.
video = Entity(
    name="video",
    join_keys=["video_id"],
    value_type=ValueType.STRING,
    description="A YouTube video seen on a trending snapshot.",
)

# A channel aggregates its videos' reach; the data has only titles, so the id is their hash.
channel = Entity(
    name="channel",
    join_keys=["channel_id"],
    value_type=ValueType.STRING,
    description="A YouTube channel: 'ch_' + the first 12 hex digits of sha1(channel title).",
)

# A country's trending list is its own market: a channel's history there is kept apart.
country = Entity(
    name="country",
    join_keys=["country"],
    value_type=ValueType.STRING,
    description="The country of a trending list: US or GB.",
)

# A niche is a YouTube category: the market a new video competes in.
niche = Entity(
    name="niche",
    join_keys=["category_id"],
    value_type=ValueType.INT64,
    description="A YouTube video category id from US_category_id.json.",
)
