"""`make bench`: what logging a served prediction costs the request path.

`PredictionLog.record()` only enqueues; a writer thread turns records into parquet part files.
Timed here: `CALLS` calls of `record()` for a trend answer (a week of hourly history in, a 48-hour
forecast out), with the writer running and writing to a temporary folder, one call every
`INTERVAL_S` (a busy server's request rate, so the writer keeps up as it does in service), and
how many records were dropped (a full queue drops, never blocks).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

from benchmarks.timing import summary
from serving.model_server.prediction_log import PredictionLog

CALLS = 20_000
INTERVAL_S = 0.0002
HISTORY = [float(h % 24) for h in range(168)]
ANSWER = {"forecast": [1.0] * 48, "lower": [0.5] * 48, "upper": [1.5] * 48, "direction": "up"}


def record_latency(calls: int) -> dict:
    timings, dropped = [], 0
    with tempfile.TemporaryDirectory(prefix="contentml-bench-") as root:
        with PredictionLog(root) as log:
            for index in range(calls):
                started = time.perf_counter()
                stored = log.record(
                    "trend", "1", f"req-{index}", [{"history": HISTORY}], [ANSWER], 0.004
                )
                timings.append((time.perf_counter() - started) * 1e6)
                dropped += not stored
                time.sleep(INTERVAL_S)
    return {**summary(timings, unit="us"), "dropped": dropped}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=CALLS)
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error("--calls must be at least 1")
    figures = record_latency(args.calls)
    print(f"[bench] prediction log record(): {figures}", file=sys.stderr)
    print(json.dumps({"benchmark": "prediction_log", "record": figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
