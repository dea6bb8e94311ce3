"""`make bench`: the trend model against plain Prophet, measured in the same run.

1. Backtest wall time: the ensemble on every M4 hourly series (`contentml trend backtest`)
   beside plain Prophet (daily + weekly seasonality) fitted and forecast on the same series.
2. Per-request latency through the KServe model server: a cached forecast (known series) and
   an uncached one (an unseen history), beside plain Prophet fitting that history in-process.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.timing import percentiles
from contentml import registry
from contentml.settings import Settings
from entrypoints import runner
from entrypoints.demo import free_port, model_server
from serving.caller.client import ContentMLClient
from training.trend.backtest import default_prophet_config, read_m4_series, run_backtest
from training.trend.ensemble import LocalRunner
from training.trend.forecasters import ForecasterConfig, Member
from training.trend.model import fit_forecast

HORIZON = 48
CACHED_CALLS = 300
UNCACHED_CALLS = 30
UNSEEN_SERIES = "H414"
"""Not among the demo's training series: the server must fit it on request."""


def backtest_seconds(train_csv: Path, workers: int) -> dict[str, float]:
    """Wall time of the ensemble's backtest and of plain Prophet on the same series."""
    series = read_m4_series(train_csv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        run_backtest(train_csv, HORIZON, Path(scratch) / "forecasts.csv", workers)
    ensemble = time.monotonic() - started
    prophet = ForecasterConfig(prophet=default_prophet_config(max(len(y) for y in series.values())))
    started = time.monotonic()
    histories = [[y] for y in series.values()]
    with LocalRunner(workers, len(histories)) as runner:
        runner.start([Member.PROPHET], prophet, histories, HORIZON)()
    plain_prophet = time.monotonic() - started
    return {
        "series": len(series),
        "ensemble_seconds": round(ensemble, 1),
        "prophet_seconds": round(plain_prophet, 1),
        "ensemble_over_prophet": round(ensemble / plain_prophet, 2),
    }


def serving_latency(settings: Settings, unseen: list[float]) -> dict[str, dict[str, float]]:
    client = registry.connect(settings)
    if registry.alias_version(client, "trend", registry.Alias.CHAMPION) is None:
        print("[bench] no trend champion yet: running the training pipeline", file=sys.stderr)
        runner.run_local(settings, "training", {"max_series": 24})
    prophet = default_prophet_config(len(unseen))
    results = {
        "prophet_uncached": percentiles(
            lambda: fit_forecast(np.asarray(unseen), HORIZON, prophet), UNCACHED_CALLS
        )
    }
    with model_server(settings, free_port()) as url, ContentMLClient(url) as serving:
        results["served_cached"] = percentiles(
            lambda: serving.predict_trend(series_id="H1", horizon=HORIZON), CACHED_CALLS
        )
        results["served_uncached"] = percentiles(
            lambda: serving.predict_trend(history=unseen, horizon=HORIZON), UNCACHED_CALLS
        )
    for kind in ("cached", "uncached"):
        results[f"served_{kind}"]["over_prophet_p50"] = round(
            results[f"served_{kind}"]["p50_ms"] / results["prophet_uncached"]["p50_ms"], 4
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--skip-backtest", action="store_true", help="latency only (the backtest takes minutes)"
    )
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    train_csv = settings.data_dir / "m4-hourly" / "Hourly-train.csv"
    report: dict = {"benchmark": "trend", "workers": args.workers}
    if not args.skip_backtest:
        report["backtest"] = backtest_seconds(train_csv, args.workers)
        print(f"[bench] backtest: {report['backtest']}", file=sys.stderr)
    unseen = read_m4_series(train_csv)[UNSEEN_SERIES].tolist()
    report["latency"] = serving_latency(settings, unseen)
    for name, figures in report["latency"].items():
        print(
            f"[bench] {name:<18} p50 {figures['p50_ms']:>9} ms  p99 {figures['p99_ms']:>9} ms",
            file=sys.stderr,
        )
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
