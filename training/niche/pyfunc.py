"""A niche model as MLflow stores and serves it: the fitted estimator behind a pyfunc that
takes the engagement features as a frame."""

from __future__ import annotations

from pathlib import Path

import joblib
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext

from feature_repo.niche_schema import FEATURES


class NicheModel(PythonModel):
    def load_context(self, context: PythonModelContext) -> None:
        # Our own registry's artifact, written by `training.niche.automl`: a trusted pickle.
        self.estimator = joblib.load(Path(context.artifacts["estimator"]))

    def predict(self, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        """Predicted log views gained, one per row of FEATURES."""
        return self.estimator.predict(model_input[list(FEATURES)].to_numpy(dtype=float))
