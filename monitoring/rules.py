"""The roadmap's retraining rule, in one place for the drift check and the retraining trigger:
retrain when more than 10 % of the features drift, or when the model's metric is more than 5 %
worse than at registration. Plain constants, so the trigger (and the pipeline runner that
imports it) loads no Evidently."""

DRIFTED_FEATURE_SHARE = 0.1
"""A window has drifted when the share of drifted features is MORE than this."""

PERFORMANCE_DROP = 0.05
"""Retrain when the metric is worse than at registration by MORE than this (relative: 0.05 is
5 % worse)."""
