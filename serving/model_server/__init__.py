"""The model server's predictors: one `kserve.Model` per model family (trend, quality, the niche
router and its niche models, script, revenue), and what they share: following the registry's
versions (`versions`), the prediction cache, the prediction log and payload parsing. The
`script` model answers OpenAI's API: its bodies are `openai_schema`, its routes
`openai_routes`."""
