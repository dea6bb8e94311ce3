"""The quality classifier as MLflow stores and serves it: the fine-tuned encoder, its
calibration and the policy lists it was released with, behind a pyfunc."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext

from training.data import TOXICITY_CLASSES
from training.quality import classifier, lexical
from training.quality.calibration import Calibration

PROBABILITY_COLUMNS = [f"prob_{name}" for name in TOXICITY_CLASSES]


class QualityClassifier(PythonModel):
    def load_context(self, context: PythonModelContext) -> None:
        self.model, self.tokenizer = classifier.load_fitted(Path(context.artifacts["classifier"]))
        self.lexical = lexical.load_lexical(Path(context.artifacts["lexical"]))
        self.calibration = Calibration.load(Path(context.artifacts["calibration"]))
        self.policy_path = Path(context.artifacts["policy"])

    def probabilities(self, texts: list[str]) -> np.ndarray:
        """Calibrated probabilities [len(texts), 3]: one forward pass per 256 text windows."""
        logits = classifier.predict_logits(self.model, self.tokenizer, texts)
        scores = lexical.blend(logits, self.lexical, texts, self.calibration.lexical_weight)
        return self.calibration.probabilities(scores)

    def predict(self, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """`text` column in; `class` (0 hate speech, 1 offensive, 2 neither) and the three
        calibrated probabilities out."""
        probabilities = self.probabilities(model_input["text"].astype(str).tolist())
        frame = pd.DataFrame(probabilities, columns=PROBABILITY_COLUMNS, index=model_input.index)
        frame.insert(0, "class", self.calibration.classes(probabilities))
        return frame
