"""MLflow models-from-code entry point: the registry stores this file, not a pickle."""

import mlflow

from training.niche.pyfunc import NicheModel

mlflow.models.set_model(NicheModel())
