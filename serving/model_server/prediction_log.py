"""The prediction log: every answered instance (inputs, outputs, model, version, latency,
request id) written to parquet off the request path, for ground truth to be joined to later
(`monitoring/performance.py`) and for drift checks on what was served.

A request only enqueues (`PredictionLog.record`: a tuple into a bounded queue, microseconds);
when the queue is full the record is dropped and counted
(`contentml_prediction_log_dropped_total{model,reason}`), never waited for. One writer thread
per server process turns the records into rows and writes a part file per model and UTC day
every `flush_rows` rows or `flush_seconds`, and on `close()`:

    <root>/model=<name>/date=<YYYY-MM-DD>/part-<uuid>.parquet

Each file is written under a hidden temporary name and renamed, so a reader never sees half a
file. `root` is `settings.prediction_log`: a folder, or a URI pyarrow writes to (`s3://...`
in the cluster); `off` logs nothing.

One row per instance: `timestamp` (UTC, when answered), `model`, `version`, `request_id`,
`index` (the instance's position in the request: ground truth joins on `request_id` and
`index`), `latency_ms` (the request's time in the predictor up to the answers, shared by its
instances), `inputs` and `outputs` (the model's input and answer, canonical JSON).
"""

from __future__ import annotations

import datetime
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from prometheus_client import Counter

from contentml.errors import UserError
from contentml.settings import Settings
from serving.model_server.cache import canonical_json

logger = logging.getLogger(__name__)

OFF = "off"

SCHEMA = pa.schema(
    [
        ("timestamp", pa.timestamp("us", tz="UTC")),
        ("model", pa.string()),
        ("version", pa.string()),
        ("request_id", pa.string()),
        ("index", pa.int32()),
        ("latency_ms", pa.float64()),
        ("inputs", pa.string()),
        ("outputs", pa.string()),
    ]
)
"""The columns of every part file."""

WRITTEN = Counter("contentml_prediction_log_rows", "Predictions written to the log", ["model"])
DROPPED = Counter(
    "contentml_prediction_log_dropped",
    "Predictions not logged: `queue_full` (the writer fell behind), `closed`, "
    "`unserializable` (not JSON), `write_failed`",
    ["model", "reason"],
)


class PredictionLogError(UserError):
    """The prediction log cannot be opened or read as configured."""


class _Record(NamedTuple):
    """One request's answers by one version, as the request path hands them over (a tuple:
    the cheapest object to build)."""

    time: float
    model: str
    version: str
    request_id: str
    inputs: Sequence[Any]
    outputs: Sequence[Any]
    latency_s: float
    indices: Sequence[int] | None


@dataclass
class _Flush:
    """Asks the writer to write what it holds now; `done` is set once written."""

    done: threading.Event = field(default_factory=threading.Event)


_STOP = object()


def _filesystem(root: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The filesystem and base path of a log root: a URI (`s3://bucket/prefix`) or a folder."""
    text = str(root)
    if "://" in text:
        try:
            return pafs.FileSystem.from_uri(text)
        except (pa.ArrowInvalid, OSError) as e:
            raise PredictionLogError(f"prediction log {text!r} cannot be opened: {e}") from e
    return pafs.LocalFileSystem(), Path(text).resolve().as_posix()


def _date(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).date().isoformat()


class PredictionLog:
    """Enqueues answered requests (`record`) for one writer thread that writes them to
    parquet part files under `root`. Use one per process; `close()` writes what is left."""

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        queue_size: int = 10_000,
        flush_rows: int = 5_000,
        flush_seconds: float = 30.0,
    ):
        if queue_size < 1 or flush_rows < 1 or not flush_seconds > 0:
            raise PredictionLogError("queue_size, flush_rows and flush_seconds must be positive")
        self.filesystem, self.root = _filesystem(root)
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)

    def start(self) -> PredictionLog:
        self._thread.start()
        return self

    def __enter__(self) -> PredictionLog:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the request path: enqueue only ----------------------------------------------------

    def record(
        self,
        model: str,
        version: str,
        request_id: str,
        inputs: Sequence[Any],
        outputs: Sequence[Any],
        latency_s: float,
        indices: Sequence[int] | None = None,
    ) -> bool:
        """Log one request's answers: `inputs[i]` was answered `outputs[i]`, the instance at
        position `indices[i]` of the request (`i` when None). Never blocks; False when the
        record was dropped (queue full, log closed). Neither sequence may change afterwards."""
        if self._closed:
            DROPPED.labels(model, "closed").inc(len(inputs))
            return False
        try:
            self._queue.put_nowait(
                _Record(
                    time.time(), model, version, request_id, inputs, outputs, latency_s, indices
                )
            )
        except queue.Full:
            DROPPED.labels(model, "queue_full").inc(len(inputs))
            return False
        return True

    # --- control -----------------------------------------------------------------------

    def flush(self, timeout: float = 30.0) -> bool:
        """Write everything recorded so far now; True once written within `timeout`."""
        if self._closed or not self._thread.is_alive():
            return False
        request = _Flush()
        try:
            self._queue.put(request, timeout=timeout)
        except queue.Full:
            return False
        return request.done.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Write what is left and stop the writer; later records are dropped. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            try:
                self._queue.put(_STOP, timeout=timeout)
            except queue.Full:
                logger.error("prediction log: the writer is stuck; stopping without a flush")
                return
            self._thread.join(timeout)

    # --- the writer thread -------------------------------------------------------------

    def _run(self) -> None:
        pending: list[_Record] = []
        rows = 0
        due = time.monotonic() + self.flush_seconds
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, due - time.monotonic()))
            except queue.Empty:
                item = None
            if isinstance(item, _Record):
                pending.append(item)
                rows += len(item.inputs)
            if (
                item is _STOP
                or isinstance(item, _Flush)
                or rows >= self.flush_rows
                or time.monotonic() >= due
            ):
                self._write(pending)
                pending, rows = [], 0
                due = time.monotonic() + self.flush_seconds
            if isinstance(item, _Flush):
                item.done.set()
            if item is _STOP:
                return

    def _write(self, records: list[_Record]) -> None:
        """One part file per (model, day) of `records`; failures are logged and counted."""
        parts: dict[tuple[str, str], dict[str, list]] = {}
        for record in records:
            time.sleep(0)  # hand the GIL to a waiting request now, not after the 5 ms interval
            try:
                encoded = [
                    (canonical_json(i), canonical_json(o))
                    for i, o in zip(record.inputs, record.outputs, strict=True)
                ]
            except (TypeError, ValueError) as e:
                DROPPED.labels(record.model, "unserializable").inc(len(record.inputs))
                logger.error(
                    "prediction log: %s request %s: %s", record.model, record.request_id, e
                )
                continue
            columns = parts.setdefault(
                (record.model, _date(record.time)), {name: [] for name in SCHEMA.names}
            )
            indices = record.indices if record.indices is not None else range(len(encoded))
            when = datetime.datetime.fromtimestamp(record.time, datetime.UTC)
            for index, (inputs, outputs) in zip(indices, encoded, strict=True):
                columns["timestamp"].append(when)
                columns["model"].append(record.model)
                columns["version"].append(record.version)
                columns["request_id"].append(record.request_id)
                columns["index"].append(index)
                columns["latency_ms"].append(record.latency_s * 1000.0)
                columns["inputs"].append(inputs)
                columns["outputs"].append(outputs)
        for (model, day), columns in parts.items():
            try:
                self._write_part(model, day, pa.Table.from_pydict(columns, schema=SCHEMA))
            except Exception as e:  # a full disk or a lost bucket must not stop the writer
                DROPPED.labels(model, "write_failed").inc(len(columns["model"]))
                logger.error("prediction log: writing %s rows failed: %s", model, e, exc_info=e)
            else:
                WRITTEN.labels(model).inc(len(columns["model"]))

    def _write_part(self, model: str, day: str, table: pa.Table) -> None:
        folder = f"{self.root}/model={model}/date={day}"
        self.filesystem.create_dir(folder, recursive=True)
        name = f"part-{uuid.uuid4().hex}.parquet"
        temporary = f"{folder}/.{name}.tmp"  # hidden from readers (`part-*.parquet`)
        pq.write_table(table, temporary, filesystem=self.filesystem)
        self.filesystem.move(temporary, f"{folder}/{name}")


def open_prediction_log(settings: Settings, **options: Any) -> PredictionLog | None:
    """The started log `settings.prediction_log` names, or None when it is `off`."""
    if settings.prediction_log == OFF:
        return None
    return PredictionLog(settings.prediction_log, **options).start()


def read_predictions(
    source: Settings | str | os.PathLike,
    model: str,
    since: datetime.datetime | datetime.date | str | None = None,
) -> pd.DataFrame:
    """Logged predictions of `model` (oldest first): from the log `source` names (settings, or
    the log's root), answered at or after `since` (UTC when naive) when given. Columns as
    `SCHEMA`; inputs and outputs stay JSON text."""
    root = source.prediction_log if isinstance(source, Settings) else source
    if str(root) == OFF:
        raise PredictionLogError("the prediction log is off (CONTENTML_PREDICTION_LOG=off)")
    filesystem, base = _filesystem(root)
    start = None if since is None else pd.Timestamp(since)
    if start is not None and start.tzinfo is None:
        start = start.tz_localize("UTC")
    folder = f"{base}/model={model}"
    found = filesystem.get_file_info(
        pafs.FileSelector(folder, allow_not_found=True, recursive=True)
    )
    paths = sorted(
        info.path
        for info in found
        if info.type == pafs.FileType.File
        and info.base_name.startswith("part-")
        and info.base_name.endswith(".parquet")
        and (start is None or _partition_date(info.path) >= start.date().isoformat())
    )
    dataset = ds.dataset(paths, schema=SCHEMA, format="parquet", filesystem=filesystem)
    if start is not None:
        moment = pa.scalar(start.to_pydatetime(), SCHEMA.field("timestamp").type)
        dataset = dataset.filter(ds.field("timestamp") >= moment)
    frame = dataset.to_table().to_pandas()
    return frame.sort_values(["timestamp", "request_id", "index"], ignore_index=True)


def _partition_date(path: str) -> str:
    """`YYYY-MM-DD` of a part file's `date=` folder."""
    return path.rsplit("/date=", 1)[-1].split("/", 1)[0]
