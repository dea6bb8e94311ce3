"""`make bench`: trend serving latency through KServe, beside the same work (Feast online
read + forecast) done in-process: the ratio is what HTTP and KServe add."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable

import mlflow
import numpy as np

from contentml import features, pipelines, registry
from contentml.demo import free_port, model_server
from contentml.settings import Settings
from serving.client import ContentMLClient
from training import data

CACHED_CALLS = 300
FITTED_CALLS = 30
UNSEEN_SERIES = "H414"


def percentiles(call: Callable[[], object], count: int) -> dict[str, float]:
    call()  # warm-up: first-call imports and connections are not steady state
    timings = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        timings.append((time.perf_counter() - started) * 1000)
    return {
        "p50_ms": round(statistics.median(timings), 2),
        "p99_ms": round(float(np.percentile(timings, 99)), 2),
        "calls": count,
    }


def main() -> int:
    settings = Settings.from_env()
    client = registry.connect(settings)
    if registry.alias_version(client, "trend", registry.Alias.CHAMPION) is None:
        print("[bench] no trend champion yet: running the training pipeline", file=sys.stderr)
        pipelines.run_local(settings, "training", {"max_series": 8})
    version = registry.alias_version(client, "trend", registry.Alias.CHAMPION)
    forecaster = mlflow.pyfunc.load_model(f"models:/trend/{version}")
    store = features.feature_store(settings)
    # The uncached path: a real series the model was not trained on, fitted per call.
    unseen = data.load_m4_hourly(settings.data_dir / "m4-hourly" / "Hourly-train.csv")
    raw_history = unseen.loc[unseen["series_id"] == UNSEEN_SERIES, "interest"].tolist()

    results = {
        "in_process_cached": percentiles(
            lambda: forecaster.predict(
                [
                    {
                        "series_id": "H1",
                        "horizon": 48,
                        "history": features.online_history(store, ["H1"])["H1"],
                    }
                ]
            ),
            CACHED_CALLS,
        ),
        "in_process_fitted": percentiles(
            lambda: forecaster.predict([{"history": raw_history, "horizon": 48}]), FITTED_CALLS
        ),
    }
    with model_server(settings, free_port()) as url, ContentMLClient(url) as serving:
        results["served_cached"] = percentiles(
            lambda: serving.predict_trend(series_id="H1", horizon=48), CACHED_CALLS
        )
        results["served_fitted"] = percentiles(
            lambda: serving.predict_trend(history=raw_history, horizon=48), FITTED_CALLS
        )
    for kind in ("cached", "fitted"):
        served, baseline = results[f"served_{kind}"], results[f"in_process_{kind}"]
        results[f"served_over_in_process_{kind}_p50"] = round(
            served["p50_ms"] / baseline["p50_ms"], 2
        )
    print(f"{'path':<22}{'p50 ms':>10}{'p99 ms':>10}{'calls':>8}", file=sys.stderr)
    for name, figures in results.items():
        if isinstance(figures, dict):
            print(
                f"{name:<22}{figures['p50_ms']:>10}{figures['p99_ms']:>10}{figures['calls']:>8}",
                file=sys.stderr,
            )
    print(json.dumps({"benchmark": "trend_serving", "model_version": version, **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
