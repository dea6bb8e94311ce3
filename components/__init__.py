"""KFP components: thin wiring around the pipelines' stage functions (`training.<family>.steps`,
`training.register`); no logic lives here."""
