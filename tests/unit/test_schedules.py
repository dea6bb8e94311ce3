"""KFP recurring runs as data: `manifests/base/pipelines/schedules.yaml`, its checks, and
`contentml pipeline schedule` against a fake KFP client."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from kfp import compiler

from contentml.settings import Settings
from entrypoints.runner import (
    PIPELINES,
    PipelineError,
    RecurringRun,
    load_schedules,
    pipeline,
    schedule,
    typed_arguments,
)
from tests.conftest import make_settings
from tests.helpers.registry import cli

ROOT = Path(__file__).resolve().parents[2]
SCHEDULES = ROOT / "manifests" / "base" / "pipelines" / "schedules.yaml"


class FakeKfpClient:
    """The four `kfp.Client` calls `schedule` makes; KFP holds `existing` {name: id} already."""

    def __init__(self, existing: dict[str, str] | None = None):
        self.existing = existing or {}
        self.calls: list[tuple] = []

    def create_experiment(self, name):
        self.calls.append(("create_experiment", name))
        return SimpleNamespace(experiment_id="exp-1")

    def list_recurring_runs(self, experiment_id, page_size):
        self.calls.append(("list_recurring_runs", experiment_id))
        runs = [
            SimpleNamespace(display_name=name, recurring_run_id=run_id)
            for name, run_id in self.existing.items()
        ]
        return SimpleNamespace(recurring_runs=runs or None)  # KFP answers None, not []

    def delete_recurring_run(self, recurring_run_id):
        self.calls.append(("delete_recurring_run", recurring_run_id))

    def create_recurring_run(self, **kwargs):
        # The package is a temporary file: read it while it exists.
        kwargs["package"] = Path(kwargs["pipeline_package_path"]).read_text()
        self.calls.append(("create_recurring_run", kwargs))
        return SimpleNamespace(recurring_run_id=f"rr-{kwargs['job_name']}")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, str]:
    """Each pipeline compiled now. test_pipelines checks that the committed
    `pipelines/compiled/*.yaml` equal these, so this module does not fail on a stale commit."""
    folder = tmp_path_factory.mktemp("compiled")
    packages = {}
    for name in PIPELINES:
        compiler.Compiler().compile(pipeline(name), str(folder / f"{name}.yaml"))
        packages[name] = (folder / f"{name}.yaml").read_text()
    return packages


# --- the checked-in file ------------------------------------------------------------------


def test_checked_in_schedules_load_and_are_typed() -> None:
    runs = load_schedules(SCHEDULES)
    assert runs, "schedules.yaml lists no recurring run"
    for run in runs:
        assert run.pipeline in PIPELINES
        assert len(run.cron.split()) == 6
        inputs = pipeline(run.pipeline).component_spec.inputs or {}
        assert set(run.params) <= set(inputs), run.name
        assert run.params == typed_arguments(run.pipeline, run.params), run.name
    by_name = {run.name: run for run in runs}
    assert by_name["retrain-trend"].params == {"max_series": 400}
    assert isinstance(by_name["retrain-trend"].params["max_series"], int)


def test_checked_in_schedules_give_every_required_input() -> None:
    # A missing input without a default passes no type check but fails every run in KFP.
    for run in load_schedules(SCHEDULES):
        inputs = pipeline(run.pipeline).component_spec.inputs or {}
        required = {name for name, spec in inputs.items() if not spec.optional}
        assert required <= set(run.params), f"{run.name} lacks {required - set(run.params)}"


# --- schedule: the calls KFP gets ---------------------------------------------------------


def test_schedule_creates_one_recurring_run_per_entry(
    settings: Settings, compiled: dict[str, str]
) -> None:
    runs = load_schedules(SCHEDULES)
    client = FakeKfpClient(existing={"retrain-trend": "rr-old", "someone-elses": "rr-keep"})

    scheduled = schedule(settings, runs, client=client)

    assert scheduled == {run.name: f"rr-{run.name}" for run in runs}
    assert client.calls[0] == ("create_experiment", "contentml")
    assert client.calls[1] == ("list_recurring_runs", "exp-1")
    # KFP cannot update a recurring run: the one of the same name goes, another name stays.
    assert client.calls[2] == ("delete_recurring_run", "rr-old")
    created = client.calls[3:]
    assert [call[0] for call in created] == ["create_recurring_run"] * len(runs)
    for run, (_, kwargs) in zip(runs, created, strict=True):
        assert kwargs.pop("package") == compiled[run.pipeline], run.name
        assert kwargs == {
            "experiment_id": "exp-1",
            "job_name": run.name,
            "description": run.description or f"{run.pipeline} on {run.cron}",
            "cron_expression": run.cron,
            "max_concurrency": 1,
            "no_catchup": True,
            "params": run.params,
            "pipeline_package_path": kwargs["pipeline_package_path"],
            "enable_caching": False,
            "service_account": "contentml",
        }
        assert len(kwargs["cron_expression"].split()) == 6


def test_schedule_into_another_experiment_on_an_empty_kfp(settings: Settings) -> None:
    run = RecurringRun(
        name="nightly-trend",
        pipeline="training",
        cron="0 30 2 * * *",
        params={"max_series": "8"},
        description="small nightly run",
    )
    client = FakeKfpClient()
    assert schedule(settings, [run], experiment="nightly", client=client) == {
        "nightly-trend": "rr-nightly-trend"
    }
    (_, experiment), _, (_, kwargs) = client.calls
    assert experiment == "nightly"
    assert kwargs["description"] == "small nightly run"
    assert kwargs["params"] == {"max_series": 8}


def test_schedule_needs_kfp_host(settings: Settings) -> None:
    assert settings.kfp_host == ""
    with pytest.raises(PipelineError, match="set KFP_HOST"):
        schedule(settings, load_schedules(SCHEDULES))


# --- bad files ----------------------------------------------------------------------------

GOOD_ENTRY = """\
- name: retrain-trend
  pipeline: training
  cron: "0 0 3 * * *"
  params:
    max_series: 4
"""


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("name: retrain-trend\npipeline: training\n", "must be a list of recurring runs"),
        ("- retrain-trend\n", "must be a list of recurring runs"),
        ("- [unclosed\n", "not a readable YAML file"),
        (GOOD_ENTRY + "  every: day\n", r"unknown keys \['every'\]"),
        (GOOD_ENTRY.replace("pipeline: training", "pipeline: nope"), "unknown pipeline 'nope'"),
        (GOOD_ENTRY.replace('"0 0 3 * * *"', '"0 3 * * *"'), "must have six fields"),
        (GOOD_ENTRY.replace("max_series", "max_seris"), "bad parameter 'max_seris'"),
        (GOOD_ENTRY.replace("max_series: 4", "max_series: many"), "max_series needs a int"),
        (GOOD_ENTRY.replace("max_series: 4", "max_series: 2.5"), "max_series needs a int"),
        (GOOD_ENTRY.replace("max_series: 4", "max_series: true"), "max_series needs a int"),
        (GOOD_ENTRY.replace("max_series: 4", "model_name: null"), "model_name needs a str"),
        (GOOD_ENTRY.replace("max_series: 4", "model_name: [a, b]"), "model_name needs a str"),
        (GOOD_ENTRY.replace("max_series: 4", "promotion_margin: x"), "needs a float"),
        (GOOD_ENTRY.replace("params:\n    max_series: 4", "params: [4]"), "must be a mapping"),
        (GOOD_ENTRY + GOOD_ENTRY, "names must be unique"),
        (GOOD_ENTRY.replace("name: retrain-trend", "name: Retrain-Trend"), "name 'Retrain-Trend'"),
        (GOOD_ENTRY.replace("name: retrain-trend", "name: retrain_trend"), "name 'retrain_trend'"),
        (GOOD_ENTRY.replace('  cron: "0 0 3 * * *"\n', ""), "retrain-trend: .*'cron'"),
        (
            '- name: drift\n  pipeline: monitoring\n  cron: "0 0 * * * *"\n'
            "  params:\n    model: quality\n",
            "needs reference_path, current_path",
        ),
    ],
    ids=[
        "not-a-list",
        "not-a-list-of-mappings",
        "not-yaml",
        "unknown-key",
        "unknown-pipeline",
        "five-field-cron",
        "unknown-param",
        "word-for-int",
        "float-for-int",
        "bool-for-int",
        "null-for-str",
        "list-for-str",
        "word-for-float",
        "params-not-a-mapping",
        "duplicate-names",
        "upper-case-name",
        "underscore-name",
        "missing-cron",
        "missing-required-param",
    ],
)
def test_bad_files_name_the_problem(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "schedules.yaml"
    path.write_text(text)
    with pytest.raises(PipelineError, match=problem):
        load_schedules(path)


def test_a_missing_file_is_a_pipeline_error(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="not a readable YAML file"):
        load_schedules(tmp_path / "absent.yaml")


def test_good_entry_loads(tmp_path: Path) -> None:
    path = tmp_path / "schedules.yaml"
    path.write_text(GOOD_ENTRY.replace("max_series: 4", 'max_series: "4"\n    horizon: 24'))
    (run,) = load_schedules(path)
    assert run == RecurringRun(
        "retrain-trend", "training", "0 0 3 * * *", {"max_series": 4, "horizon": 24}
    )


# --- the CLI ------------------------------------------------------------------------------


def test_cli_refuses_a_bad_file(tmp_path: Path, monkeypatch, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD_ENTRY.replace("pipeline: training", "pipeline: nope"))
    settings = make_settings(tmp_path / "state")
    status, _, err = cli(settings, monkeypatch, capsys, "pipeline", "schedule", str(bad))
    assert status == 2, err
    assert err.count("\n") == 1, err
    assert "unknown pipeline 'nope'" in err


def test_cli_needs_kfp_host(tmp_path: Path, monkeypatch, capsys) -> None:
    # make_settings has KFP_HOST empty, whatever this shell has.
    settings = make_settings(tmp_path / "state")
    status, out, err = cli(settings, monkeypatch, capsys, "pipeline", "schedule", str(SCHEDULES))
    assert status == 2, err
    assert err.count("\n") == 1, err
    assert "KFP_HOST" in err
    # Stripped: kfp.local indents task logs by replacing `builtins.print` with one that writes
    # the indent to stdout, and a local run earlier in this test process can leave it so.
    assert out.strip() == ""
