"""MLflow models-from-code entry point: the registry stores this file, not a pickle."""

import mlflow

from training.llm.package import ScriptGenerator

mlflow.models.set_model(ScriptGenerator())
