"""KFP pipelines, compiled by `contentml pipeline compile` for the KFP UI."""
