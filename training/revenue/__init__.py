"""RevenueOptimizer: bandit experiments over title, thumbnail and hook variants, and Bayesian
optimization of channel settings."""
