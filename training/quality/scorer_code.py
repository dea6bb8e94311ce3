"""MLflow models-from-code entry point: the registry stores this file, not a pickle."""

import mlflow

from training.quality.pyfunc import QualityClassifier

mlflow.models.set_model(QualityClassifier())
