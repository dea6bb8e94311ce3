"""The quality classifier as MLflow stores and serves it: the fold encoders and lexical
models, the stacker that calibrates them, the ablations' calibrations (for `quality
evaluate`) and the policy lists it was released with, behind a pyfunc."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext

from training.data import TOXICITY_CLASSES
from training.quality.calibration import Calibration
from training.quality.ensemble import Members

PROBABILITY_COLUMNS = [f"prob_{name}" for name in TOXICITY_CLASSES]


class QualityClassifier(PythonModel):
    def load_context(self, context: PythonModelContext) -> None:
        artifacts = {name: Path(path) for name, path in context.artifacts.items()}
        self.members = Members.load(artifacts["classifier"], artifacts["lexical"])
        self.calibration = Calibration.load(artifacts["calibration"])
        ablations = json.loads(artifacts["ablations"].read_text())
        self.ablations = {name: Calibration.from_dict(c) for name, c in ablations.items()}
        self.policy_path = artifacts["policy"]

    def probabilities(self, texts: list[str]) -> np.ndarray:
        """Calibrated probabilities [len(texts), 3]: one forward pass per fold encoder and 256
        text windows."""
        return self.calibration.probabilities(self.members.features(texts))

    def predict(self, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """`text` column in; `class` (0 hate speech, 1 offensive, 2 neither) and the three
        calibrated probabilities out."""
        probabilities = self.probabilities(model_input["text"].astype(str).tolist())
        frame = pd.DataFrame(probabilities, columns=PROBABILITY_COLUMNS, index=model_input.index)
        frame.insert(0, "class", self.calibration.classes(probabilities))
        return frame
