"""MLflow models-from-code entry point: the registry stores this file, not a pickle."""

import mlflow

from training.trend.pyfunc import TrendForecaster

mlflow.models.set_model(TrendForecaster())
