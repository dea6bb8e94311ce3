"""Data drift: does the current window (logged requests) still look like the reference window
(the training data)? Evidently 0.7 (`Report` with `DataDriftPreset`) tests every compared column
with a method chosen by the column's kind and the windows' size (`DriftConfig`); the window has
drifted when more than `DriftConfig.drift_share` of the columns drift (the retraining rule).

`run_drift_check` is what `contentml drift check` calls: it reads the two files, runs the check,
saves Evidently's HTML report and logs a monitoring run to MLflow (metrics, params, the
per-column results and the report as artifacts).

Columns compared: the ones asked for (`columns`, or a model's inputs from `MODEL_INPUTS`), else
every column both windows share whose kind can be compared: numbers are numerical; booleans,
strings and pandas categoricals are categorical unless they hold more than
`DriftConfig.max_categories` distinct values (identifiers, free text); dates (datetime columns,
or ISO 8601 text as a CSV holds them) are skipped. The skipped shared columns are reported with
their reason.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from evidently import ColumnType, DataDefinition, Dataset, Report
from evidently.core.report import Snapshot

# Evidently 0.7 resolves method names through this registry itself (`DataDriftPreset` imports
# it from here); there is no other, so config validation asks it too.
from evidently.legacy.calculations.stattests.registry import get_registered_stattest
from evidently.presets import DataDriftPreset

from contentml import events, registry
from contentml.errors import UserError
from contentml.settings import Settings
from feature_repo.niche_schema import FEATURES as NICHE_FEATURES
from monitoring.rules import DRIFTED_FEATURE_SHARE
from training.data import TEXT_COLUMNS


class DriftError(UserError):
    """A drift check that cannot run on the inputs as given (files, columns, config)."""


class ColumnKind(StrEnum):
    NUMERICAL = "num"
    CATEGORICAL = "cat"


class SampleSize(StrEnum):
    SMALL = "small"
    LARGE = "large"


_EVIDENTLY_TYPES = {
    ColumnKind.NUMERICAL: ColumnType.Numerical,
    ColumnKind.CATEGORICAL: ColumnType.Categorical,
}


@dataclass(frozen=True)
class DriftMethod:
    name: str
    """An Evidently drift method (`ks`, `wasserstein`, `chisquare`, `jensenshannon`, `psi`, ...)."""

    threshold: float
    """For a test, the p-value below which the column drifts; for a distance, the distance at or
    above which it drifts (Evidently's convention for each method)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.threshold) and self.threshold > 0):
            raise DriftError(
                f"drift method {self.name!r}: threshold must be > 0, not {self.threshold}"
            )

    def check_applies(self, kind: ColumnKind) -> None:
        """A `DriftError` unless Evidently has this method for columns of `kind`."""
        if not _applies(self.name, kind):
            raise DriftError(
                f"Evidently has no drift method {self.name!r} for {kind.name.lower()} columns"
            )


def _applies(method: str, kind: ColumnKind) -> bool:
    try:
        get_registered_stattest(method, _EVIDENTLY_TYPES[kind])
    except ValueError:  # unknown name, or not for this kind
        return False
    return True


@dataclass(frozen=True)
class DriftConfig:
    drift_share: float = DRIFTED_FEATURE_SHARE
    """The window has drifted when the share of drifted columns is MORE than this (the
    roadmap's retraining rule: more than 10 % of the features)."""

    large_sample_rows: int = 5000
    """Columns with more values than this in both windows use the large-sample methods
    (distances); others the small-sample ones (tests). Measured on the trending features
    (20 columns, windows drawn from one population): the normed Wasserstein distance's own
    sampling noise, largest of 20 columns, is 0.10 at 1,000 rows, up to 0.13 at 2,000 and
    0.06 at 5,000; so below ~5,000 rows it would cross its 0.1 threshold by chance."""

    small_numerical: DriftMethod = DriftMethod("ks", 0.01)
    """Kolmogorov-Smirnov p-value: a two-sample test, valid at small sizes whatever the shape.
    At 0.01, not Evidently's 0.05: on random halves of the trending features (1,000 rows each)
    0.05 flagged 3 or more of the 20 columns (a false "drifted") in 2 % of 200 splits; 0.01
    flagged one column in 5.7 % of 300 splits, two in 0.3 %, three never. A 0.5 standard
    deviation shift still scores p < 1e-26."""

    large_numerical: DriftMethod = DriftMethod("wasserstein", 0.1)
    """Wasserstein distance in units of the reference's standard deviation: an effect size,
    so a large window alarms on how far the distribution moved, not on the tiny differences a
    test's p-value turns significant at 100,000 rows (KS's false alarms)."""

    small_categorical: DriftMethod = DriftMethod("psi", 0.25)
    """Population stability index, at the conventional "significant shift" level. Not
    Evidently's `chisquare` (nor `g_test`): they take the reference's counts as exact expected
    counts and score p = 0 whenever a category appears in the current window only; on random
    halves of the real `category` column (1,000 rows each) they flagged 61 % of the splits at
    p < 0.01. PSI's own noise there: 0.05 (95th percentile of 100 draws), 0.18 at 300 rows."""

    large_categorical: DriftMethod = DriftMethod("jensenshannon", 0.1)
    """Jensen-Shannon distance of the category shares: an effect size, for the same reason
    as `large_numerical` (its noise on `category`: 0.04 at 5,000 rows, but 0.11 at 300)."""

    max_categories: int = 50
    """A shared text-like column with more distinct values than this is an identifier or free
    text, not a category: skipped when columns are chosen automatically."""

    per_column: Mapping[str, DriftMethod] = field(default_factory=dict)
    """Methods for named columns, overriding the rule above."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.drift_share < 1.0:
            raise DriftError(f"drift_share must be in [0, 1), not {self.drift_share}")
        if self.large_sample_rows < 1 or self.max_categories < 1:
            raise DriftError("large_sample_rows and max_categories must be positive")
        for (kind, _), method in self.methods().items():
            method.check_applies(kind)
        for column, method in self.per_column.items():
            if not any(_applies(method.name, kind) for kind in ColumnKind):
                raise DriftError(f"per_column[{column!r}]: Evidently has no method {method.name!r}")
        object.__setattr__(self, "per_column", dict(self.per_column))  # a copy: frozen as given

    def methods(self) -> dict[tuple[ColumnKind, SampleSize], DriftMethod]:
        """The method rule: (column kind, sample size) -> method."""
        return {
            (ColumnKind.NUMERICAL, SampleSize.SMALL): self.small_numerical,
            (ColumnKind.NUMERICAL, SampleSize.LARGE): self.large_numerical,
            (ColumnKind.CATEGORICAL, SampleSize.SMALL): self.small_categorical,
            (ColumnKind.CATEGORICAL, SampleSize.LARGE): self.large_categorical,
        }

    def method_for(self, column: str, kind: ColumnKind, values: int) -> DriftMethod:
        """The method for `column` of `kind` when the smaller window has `values` values: the
        smaller one, as a test's power (and a distance's noise) is set by it."""
        if column in self.per_column:
            return self.per_column[column]
        size = SampleSize.LARGE if values > self.large_sample_rows else SampleSize.SMALL
        return self.methods()[(kind, size)]


@dataclass(frozen=True)
class ColumnDrift:
    method: str
    """The Evidently method that tested the column."""
    score: float
    """Its result: a p-value for tests, a distance for distances."""
    threshold: float
    """The threshold it was compared with (see `DriftMethod.threshold`)."""
    drifted: bool
    """Evidently's verdict for the column."""


@dataclass(frozen=True)
class DriftResult:
    drift_share: float
    """Share of the compared columns that drifted."""
    drifted: bool
    """`drift_share` > the config's `drift_share`."""
    features: dict[str, ColumnDrift]
    """Per compared column, in order."""
    skipped: dict[str, str]
    """Shared columns not compared (automatic choice only), with the reason."""
    reference_rows: int
    current_rows: int
    snapshot: Snapshot = field(repr=False, compare=False)
    """Evidently's run: `snapshot.save_html(path)` writes the report."""

    def to_dict(self) -> dict:
        """The JSON-ready summary (without the snapshot)."""
        return {
            "drift_share": self.drift_share,
            "drifted": self.drifted,
            "features": {name: asdict(column) for name, column in self.features.items()},
            "skipped": dict(self.skipped),
            "reference_rows": self.reference_rows,
            "current_rows": self.current_rows,
        }


def check_drift(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    columns: list[str] | None = None,
    config: DriftConfig | None = None,
) -> DriftResult:
    """Compare `current` with `reference` on `columns` (None: every comparable shared column,
    see the module docstring)."""
    config = config or DriftConfig()
    for name, frame in (("reference", reference), ("current", current)):
        if frame.empty:
            raise DriftError(f"the {name} window is empty (no rows or no columns)")
    kinds, skipped = _choose_columns(reference, current, columns, config)
    if not kinds:
        raise DriftError(
            "no column to compare: the windows share none of a numerical or categorical kind"
            + (f" (skipped: {skipped})" if skipped else "")
        )
    methods = {}
    for column, kind in kinds.items():
        values = min(reference[column].notna().sum(), current[column].notna().sum())
        if values == 0:
            empty = "reference" if reference[column].notna().sum() == 0 else "current"
            raise DriftError(f"column {column!r} has no values in the {empty} window")
        methods[column] = config.method_for(column, kind, int(values))
        methods[column].check_applies(kind)

    definition = DataDefinition(
        numerical_columns=[c for c, k in kinds.items() if k is ColumnKind.NUMERICAL],
        categorical_columns=[c for c, k in kinds.items() if k is ColumnKind.CATEGORICAL],
    )
    preset = DataDriftPreset(
        columns=list(kinds),
        # Evidently's dataset verdict is share >= drift_share; the next float up makes it
        # share > drift_share, the roadmap's rule, so the HTML says what `drifted` says.
        drift_share=float(np.nextafter(config.drift_share, 1.0)),
        per_column_method={c: m.name for c, m in methods.items()},
        per_column_threshold={c: m.threshold for c, m in methods.items()},
    )
    report = Report([preset], include_tests=True)  # the tests carry each column's verdict
    snapshot = report.run(
        Dataset.from_pandas(current[list(kinds)], data_definition=definition),
        Dataset.from_pandas(reference[list(kinds)], data_definition=definition),
    )
    features = _column_results(snapshot, list(kinds))
    share = sum(f.drifted for f in features.values()) / len(features)
    return DriftResult(
        drift_share=share,
        drifted=share > config.drift_share,
        features=features,
        skipped=skipped,
        reference_rows=len(reference),
        current_rows=len(current),
        snapshot=snapshot,
    )


def _kind(series: pd.Series) -> tuple[ColumnKind | None, str | None]:
    """(the column's drift kind, None) from its dtype, or (None, why it has none)."""
    dtype = series.dtype
    if pd.api.types.is_bool_dtype(dtype):
        return ColumnKind.CATEGORICAL, None
    if pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_complex_dtype(dtype):
        return ColumnKind.NUMERICAL, None
    if isinstance(dtype, pd.CategoricalDtype):
        return ColumnKind.CATEGORICAL, None
    if pd.api.types.is_string_dtype(dtype):
        # A CSV holds timestamps as text: ISO 8601 values are dates, not categories.
        sample = series.dropna().head(_DATE_SAMPLE).astype(str)
        dates = pd.to_datetime(sample, format="ISO8601", errors="coerce", utc=True)
        if len(sample) and dates.notna().all():
            return None, "holds dates (ISO 8601 text)"
        return ColumnKind.CATEGORICAL, None
    return None, f"type {dtype} is neither numerical nor categorical"


_DATE_SAMPLE = 100
"""Values of a text column looked at to tell dates from categories."""


def _choose_columns(
    reference: pd.DataFrame, current: pd.DataFrame, columns: list[str] | None, config: DriftConfig
) -> tuple[dict[str, ColumnKind], dict[str, str]]:
    """(compared columns -> kind, skipped shared columns -> reason)."""
    if columns is not None:
        if not columns:
            raise DriftError("no columns given to compare")
        for name, frame in (("reference", reference), ("current", current)):
            missing = [c for c in columns if c not in frame.columns]
            if missing:
                raise DriftError(f"the {name} window has no column(s) {missing}")
        kinds = {}
        for column in dict.fromkeys(columns):
            kind, problem = _shared_kind(reference[column], current[column])
            if problem:
                raise DriftError(f"column {column!r}: {problem}")
            kinds[column] = kind
        return kinds, {}
    kinds, skipped = {}, {}
    for column in (c for c in reference.columns if c in current.columns):
        kind, problem = _shared_kind(reference[column], current[column])
        if problem is None and kind is ColumnKind.CATEGORICAL:
            distinct = pd.concat([reference[column], current[column]]).nunique()
            if distinct > config.max_categories:
                problem = f"{distinct} distinct values (identifier or free text?)"
        if problem:
            skipped[column] = problem
        else:
            kinds[column] = kind
    return kinds, skipped


def _shared_kind(reference: pd.Series, current: pd.Series) -> tuple[ColumnKind | None, str | None]:
    """(the kind both windows' column has, None), or (None, why it cannot be compared)."""
    (ours, problem), (theirs, their_problem) = _kind(reference), _kind(current)
    if problem or their_problem:
        return None, problem or their_problem
    if ours is not theirs:
        return (
            None,
            f"{ours.name.lower()} in the reference but {theirs.name.lower()} in the current",
        )
    return ours, None


def _column_results(snapshot: Snapshot, columns: list[str]) -> dict[str, ColumnDrift]:
    """Each column's `ValueDrift` result from the snapshot, in `columns` order."""
    found = {}
    for result in snapshot.metric_results.values():
        params = result.metric_value_location.metric.params
        if params.get("type") != "evidently:metric_v2:ValueDrift":
            continue
        found[params["column"]] = ColumnDrift(
            method=params["method"],
            score=float(result.value),
            threshold=float(params["threshold"]),
            drifted=any(test.status == "FAIL" for test in result.tests),
        )
    return {column: found[column] for column in columns}


def reference_from_frame(
    frame: pd.DataFrame, columns: list[str], max_rows: int | None = None, seed: int = 0
) -> pd.DataFrame:
    """A reference window from a training frame (e.g. Feast's training frame): its `columns`,
    sampled down to `max_rows` rows when it has more (a fixed seed: reports are repeatable)."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DriftError(f"the training frame has no column(s) {missing}")
    reference = frame[list(columns)]
    if max_rows is not None and len(reference) > max_rows:
        reference = reference.sample(n=max_rows, random_state=seed)
    return reference.reset_index(drop=True)


TEXT_STATS = ("text_chars", "text_words", "text_upper_share", "text_has_link", "text_has_mention")
"""What the quality model's drift check compares: simple statistics of the texts scored."""


def text_stats(frame: pd.DataFrame) -> pd.DataFrame:
    """`TEXT_STATS` of the first of `TEXT_COLUMNS` the frame has (training files: `tweet`,
    request logs: `text`)."""
    column = next((c for c in TEXT_COLUMNS if c in frame.columns), None)
    if column is None:
        raise DriftError(f"needs a text column (one of {TEXT_COLUMNS}), has {list(frame.columns)}")
    text = frame[column].fillna("").astype(str)
    letters = text.map(lambda t: sum(c.isalpha() for c in t))
    upper = text.map(lambda t: sum(c.isupper() for c in t))
    return pd.DataFrame(
        {
            "text_chars": text.str.len(),
            "text_words": text.str.split().str.len(),
            "text_upper_share": (upper / letters.where(letters > 0)).fillna(0.0),
            "text_has_link": text.str.contains(r"https?://", regex=True),
            "text_has_mention": text.str.contains(r"(?:^|\s)@\w", regex=True),
        }
    ).astype("float64")


@dataclass(frozen=True)
class ModelInputs:
    columns: tuple[str, ...]
    """The columns a model's drift check compares."""
    derive: Callable[[pd.DataFrame], pd.DataFrame] | None = None
    """Turns a window as stored into `columns`; None when the windows hold them already."""


MODEL_INPUTS: dict[str, ModelInputs] = {
    # Every niche model (`niche-<slug>`) takes the engagement features; the windows hold them
    # (the training frame and the prediction log of the served features).
    "niche": ModelInputs(NICHE_FEATURES),
    # The quality gate takes texts: compared through their statistics.
    "quality": ModelInputs(TEXT_STATS, text_stats),
}
"""Model name, or the prefix before `-` of a family's names, -> its drift inputs."""


def model_inputs(model_name: str) -> ModelInputs:
    """The drift inputs of `model_name` (exact name, or `<family>-...`)."""
    for name in (model_name, model_name.split("-", 1)[0]):
        if name in MODEL_INPUTS:
            return MODEL_INPUTS[name]
    known = ", ".join(f"{name}, {name}-*" for name in MODEL_INPUTS)
    raise DriftError(f"no drift inputs known for model {model_name!r}; known: {known}")


def model_columns(model_name: str) -> list[str]:
    """The columns `contentml drift check --model NAME` compares."""
    return list(model_inputs(model_name).columns)


_READERS: dict[str, Callable[[Path], pd.DataFrame]] = {
    ".csv": pd.read_csv,
    ".parquet": pd.read_parquet,
    ".pq": pd.read_parquet,
}


def read_window(path: Path) -> pd.DataFrame:
    """A window from a CSV or parquet file, by its suffix."""
    path = Path(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DriftError(f"{path}: unknown file type {path.suffix!r}; use one of {list(_READERS)}")
    if not path.is_file():
        raise DriftError(f"{path}: file not found")
    try:
        frame = reader(path)
    except (OSError, ValueError) as e:  # pandas' and pyarrow's parse errors are ValueErrors
        raise DriftError(f"{path}: not a readable {path.suffix[1:]} file: {e}") from e
    if frame.empty:
        raise DriftError(f"{path}: no rows")
    return frame


def _derive(
    derive: Callable[[pd.DataFrame], pd.DataFrame], frame: pd.DataFrame, path: Path
) -> pd.DataFrame:
    try:
        return derive(frame)
    except DriftError as e:
        raise DriftError(f"{path}: {e}") from e


def run_drift_check(
    settings: Settings,
    reference_path: Path,
    current_path: Path,
    model: str | None = None,
    output_dir: Path | None = None,
    config: DriftConfig | None = None,
) -> dict:
    """`contentml drift check`: compare the files, save the HTML report under `output_dir`
    (default `<home>/monitoring`), log a `drift-<model>` run (`drift-shared-columns` without a
    model) to the settings' experiment. Returns the CLI's JSON: `drift_share`, `drifted`,
    `features`, `report` (the HTML path), `run_id`, `skipped`."""
    config = config or DriftConfig()
    reference, current = read_window(Path(reference_path)), read_window(Path(current_path))
    columns = None
    if model is not None:
        inputs = model_inputs(model)
        if inputs.derive is not None:
            reference = _derive(inputs.derive, reference, reference_path)
            current = _derive(inputs.derive, current, current_path)
        columns = list(inputs.columns)
    result = check_drift(reference, current, columns, config)

    run_name = f"drift-{model}" if model else "drift-shared-columns"
    output_dir = Path(output_dir) if output_dir is not None else settings.home / "monitoring"
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = result.to_dict()
    client = registry.connect(settings)
    with mlflow.start_run(
        experiment_id=registry.experiment_id(client, settings), run_name=run_name
    ) as run:
        report_path = output_dir / f"{run_name}-{run.info.run_id}.html"
        result.snapshot.save_html(str(report_path))
        mlflow.set_tag("contentml.kind", "drift")
        mlflow.log_params(
            {
                "model": model or "",
                "reference": str(reference_path),
                "current": str(current_path),
                "reference_rows": result.reference_rows,
                "current_rows": result.current_rows,
                "columns": len(result.features),
                "drift_share_threshold": config.drift_share,
                "large_sample_rows": config.large_sample_rows,
            }
        )
        mlflow.log_metrics(
            {
                "drift_share": result.drift_share,
                "drifted_features": sum(f.drifted for f in result.features.values()),
                "drifted": float(result.drifted),
            }
        )
        mlflow.log_text(json.dumps(summary, indent=2), "drift/features.json")
        mlflow.log_artifact(str(report_path), "drift")
    if result.drifted:
        alert = {
            "model": model,
            "drift_share": result.drift_share,
            "drifted_columns": [name for name, f in result.features.items() if f.drifted],
            "threshold": config.drift_share,
            "run_id": run.info.run_id,
        }
        events.publish(events.EventKind.ALERT_DRIFT, alert)
    return {
        "drift_share": result.drift_share,
        "drifted": result.drifted,
        "features": summary["features"],
        "report": str(report_path),
        "run_id": run.info.run_id,
        "skipped": result.skipped,
    }
