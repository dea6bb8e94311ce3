"""KFP components: thin wiring around `training.steps`; no logic lives here."""
