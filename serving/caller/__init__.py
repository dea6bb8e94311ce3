"""Code that runs on the caller's side of the platform's HTTP API: the content pipeline's client
(`client`) and the script writer's provider chain (`strategist`), with its configuration
(`providers_config`), rate limits (`rate_limit`) and provider failures (`provider_errors`). It
imports no server code; both sides share `contentml.protocol`."""
