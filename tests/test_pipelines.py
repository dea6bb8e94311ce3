"""Pipelines compile to the committed YAML, which KFP's own loader accepts."""

from __future__ import annotations

from pathlib import Path

import pytest
from kfp import components

from contentml import pipelines
from contentml.pipelines import PipelineError


def test_compiled_yaml_is_committed_and_current(tmp_path: Path):
    for path in pipelines.compile_all(tmp_path):
        committed = pipelines.COMPILED_DIR / path.name
        assert committed.exists(), f"run `make compile` and commit {committed}"
        assert path.read_text() == committed.read_text(), f"run `make compile`: {path.name}"


def test_kfp_loads_the_compiled_pipeline():
    loaded = components.load_component_from_file(str(pipelines.COMPILED_DIR / "training.yaml"))
    assert loaded.name == "training"
    assert set(loaded.component_spec.inputs) == {
        "model_name",
        "max_series",
        "window_hours",
        "horizon",
        "members",
        "validation_origins",
        "workers",
        "promotion_margin",
    }


def test_arguments_are_typed_from_the_pipeline_inputs():
    arguments = pipelines.parse_arguments(
        "training", ["max_series=3", "promotion_margin=0.1", "model_name=trend"]
    )
    assert arguments == {"max_series": 3, "promotion_margin": 0.1, "model_name": "trend"}


@pytest.mark.parametrize(
    ("name", "pairs", "problem"),
    [
        ("nope", [], "unknown pipeline 'nope'"),
        ("training", ["colour=red"], "bad parameter 'colour=red'"),
        ("training", ["max_series"], "bad parameter 'max_series'"),
        ("training", ["max_series=many"], "max_series needs a int"),
    ],
)
def test_bad_arguments_name_the_problem(name, pairs, problem):
    with pytest.raises(PipelineError, match=problem):
        pipelines.parse_arguments(name, pairs)
