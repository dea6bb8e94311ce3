"""Code that runs on the caller's side of the platform's HTTP API: the content pipeline's client
(`client`) and the script writer's provider chain (`strategist`). It imports no server code;
both sides share `contentml.protocol`."""
