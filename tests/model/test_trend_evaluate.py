"""`contentml trend evaluate`: the README's trend tables, printed as JSON by a real CLI process
on a few M4 series."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import DATA_DIR, make_settings, run_cli
from tests.helpers.registry import cli
from training.trend import metrics
from training.trend.ensemble import EnsembleConfig

M4_TRAIN = DATA_DIR / "m4-hourly" / "Hourly-train.csv"
SCORES = {"owa", "smape", "mase", "direction_accuracy"}


@pytest.fixture(scope="module")
def m4_slice(tmp_path_factory) -> Path:
    if not M4_TRAIN.is_file():
        pytest.skip(f"{M4_TRAIN} is not here")
    path = tmp_path_factory.mktemp("m4") / "Hourly-train.csv"
    pd.read_csv(M4_TRAIN, nrows=3).to_csv(path, index=False)
    return path


@pytest.mark.slow
def test_evaluate_prints_every_models_holdout_scores(m4_slice, tmp_path, monkeypatch):
    # Three series gain nothing from threads; on a busy machine OpenMP threads only spin.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    done = run_cli(
        tmp_path, "trend", "evaluate", "--train", str(m4_slice), "--limit", "2", "--workers", "1"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert (report["series"], report["horizon"]) == (2, 48)
    scores = report["scores"]
    members = {m.value for m in EnsembleConfig().members}
    assert {"ensemble", "seasonal_naive", "prophet_default", "naive2"} | members == set(scores)
    for name, values in scores.items():
        assert SCORES <= set(values), name
    assert scores["naive2"]["owa"] == 1.0

    # The baseline scored on the last 48 hours of each series, recomputed here independently.
    series = pd.read_csv(m4_slice, nrows=2).drop(columns="V1").to_numpy()
    histories = [row[~np.isnan(row)][:-48] for row in series]
    actuals = [row[~np.isnan(row)][-48:] for row in series]
    naive = [np.resize(h[-24:], 48) for h in histories]
    expected = np.mean([metrics.smape(a, f) for a, f in zip(actuals, naive, strict=True)])
    assert scores["seasonal_naive"]["smape"] == pytest.approx(expected, abs=1e-4)
    assert scores["seasonal_naive_day"] == scores["seasonal_naive"]


def test_evaluate_names_a_bad_file(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("V1,V2\nH1,abc\n")
    settings = make_settings(tmp_path)
    status, _, err = cli(settings, monkeypatch, capsys, "trend", "evaluate", "--train", str(bad))
    assert status == 2
    assert "non-numeric value 'abc'" in err
    short = tmp_path / "short.csv"
    # 150 hours: the loader takes it, but after the holdout too little is left to validate on.
    header = ",".join(["V1", *(f"V{i}" for i in range(2, 152))])
    short.write_text(header + "\nH1," + ",".join(["1"] * 150) + "\n")
    status, _, err = cli(settings, monkeypatch, capsys, "trend", "evaluate", "--train", str(short))
    assert status == 2
    assert "series 'H1' has 102 values, fewer than the 144 needed" in err
