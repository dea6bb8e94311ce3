"""The demo's parts that run before and beside the pipelines: its budgets, the progress it reads
from kfp.local's logs, a failed pipeline, and the inputs it sends. The whole demo runs in
tests/e2e/test_e2e.py."""

from __future__ import annotations

import io

import pytest
from tqdm import tqdm

from contentml.errors import UserError
from entrypoints import demo
from entrypoints.runner import typed_arguments
from serving.model_server.niche import TrendingVideo
from tests.helpers.registry import cli


def test_every_family_has_a_stage_whose_arguments_its_pipeline_takes(settings, tmp_path):
    stages = demo.demo_stages(settings, 3, tmp_path / "outcomes.csv")
    assert [s.family for s in stages] == ["niche", "quality", "trend", "script", "revenue"]
    assert set(demo.FAMILIES) == {s.family for s in stages}
    for stage in stages:
        assert typed_arguments(stage.pipeline, stage.arguments) == stage.arguments


@pytest.mark.parametrize("families", [["trend", "weather"], []])
def test_unknown_families_are_refused_before_anything_runs(settings, families):
    with pytest.raises(UserError, match="trend, quality, niche, script, revenue"):
        demo.run_demo(settings, families=families)
    assert not (settings.home / "demo").exists()


def test_retraining_a_family_outside_the_demo_is_refused_before_anything_runs(settings):
    with pytest.raises(UserError, match=r"--retrain names \['quality'\]"):
        demo.run_demo(settings, families=["trend"], retrain=["quality"])
    assert not (settings.home / "demo").exists()


@pytest.mark.parametrize(
    ("argv", "retrained"),
    [
        ([], []),
        (["--retrain"], ["trend", "revenue"]),
        (["--retrain", "revenue"], ["revenue"]),
        (["--retrain", " trend, "], ["trend"]),
    ],
)
def test_retrain_names_families_to_train_again_and_alone_means_all(
    settings, monkeypatch, capsys, argv, retrained
):
    called = {}

    def fake_run_demo(settings, max_series, retrain, families):
        called.update(retrain=retrain, families=families)
        return {}

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    status, _, err = cli(
        settings, monkeypatch, capsys, "demo", "--families", "trend,revenue", *argv
    )
    assert status == 0, err
    assert called == {"retrain": retrained, "families": ["trend", "revenue"]}


def test_the_progress_bar_counts_finished_tasks_and_shows_the_latest_epoch(tmp_path):
    log = tmp_path / "quality-training.log"
    log.write_text(
        "00:07:58.134 - INFO - Executing task \x1b[96m'ingest-toxicity'\x1b[0m\n"
        "00:08:17.357 - INFO - Task \x1b[96m'ingest-toxicity'\x1b[0m finished with status "
        "\x1b[92mSUCCESS\x1b[0m\n"
        "00:08:17.358 - INFO - Executing task \x1b[96m'train-quality'\x1b[0m\n"
        "    [quality] epoch 1: train_loss 1.0035, val_f1 0.6165\n"
    )
    stage = demo.DemoStage("quality", "quality-training", {}, "quality")
    bar = tqdm(file=io.StringIO())
    run = demo._PipelineRun(stage, process=None, log=log, bar=bar)
    run.follow()
    assert bar.n == 1
    assert bar.postfix == "epoch 1: train_loss 1.0035, val_f1 0.6165"
    with log.open("a") as more:
        more.write("[I 2026-12-06] Trial 3 finished with value: 4.7 and parameters: {}\n")
    run.follow()
    assert bar.postfix.startswith("Trial 3 finished with value: 4.7")
    run.close()


@pytest.mark.slow
def test_a_failed_pipeline_stops_the_demo_naming_its_log(settings):
    broken = demo.DemoStage("trend", "training", {"no_such_parameter": 1}, "trend")
    with pytest.raises(demo.DemoFailed, match=r"the training pipeline failed \(exit 2\)") as e:
        demo.run_pipelines(settings, [broken])
    log = settings.home / "demo" / "logs" / "training.log"
    assert str(log) in str(e.value)
    assert "no_such_parameter" in log.read_text()


def test_the_niche_video_is_one_the_router_takes(settings):
    video = demo.trending_video(settings, demo.NICHE_CATEGORY)
    assert TrendingVideo.model_validate(video).category == demo.NICHE_CATEGORY


def test_batch_items_are_distinct_two_week_windows(settings):
    items = demo.trend_items(settings, 500)
    assert len({item["id"] for item in items}) == 500
    assert {len(item["history"]) for item in items} == {demo.WINDOW}
    assert {item["horizon"] for item in items} == {demo.HORIZON}
