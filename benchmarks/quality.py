"""`make bench`: the quality classifier against Hugging Face's `pipeline`, measured in the
same run, on the same fine-tuned model and the same tweets (the fixed evaluation slice).

1. In-process: one text at a time (p50/p99) and batches of 64 (texts per second), ours
   (`QualityClassifier.probabilities`: every fold encoder over length-sorted windows, the
   lexical models, the stacker) beside `pipeline("text-classification")` on one fold
   encoder; and dynamic int8 quantisation of the Linear layers, with its weighted F1 beside
   the float model's, to see whether it would pay.
2. Served: one text per call through the KServe model server over HTTP (the content
   pipeline's view), and a 64-text call.

Threads are pinned to 2, the serving machine's cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import mlflow
import numpy as np
import torch
from sklearn.metrics import f1_score

from benchmarks.timing import percentiles
from contentml import registry
from contentml.settings import Settings
from entrypoints.demo import free_port, model_server
from training.data import load_toxicity
from training.quality import split, steps
from training.quality.config import QualityConfig
from training.quality.ensemble import Members
from training.quality.pyfunc import QualityClassifier

SINGLE_CALLS = 200
BATCH = 64
BATCHES = 8
THREADS = 2


def throughput(score_batch: Callable[[list[str]], object], texts: list[str]) -> dict[str, float]:
    batches = [texts[i * BATCH : (i + 1) * BATCH] for i in range(BATCHES)]
    score_batch(batches[0])
    started = time.perf_counter()
    for batch in batches:
        score_batch(batch)
    seconds = time.perf_counter() - started
    return {"texts_per_second": round(BATCH * BATCHES / seconds, 1), "batch": BATCH}


QUICK_MODEL = QualityConfig(epochs=1, max_train_rows=2_000, folds=2)
"""Trained when there is no champion yet: latency does not depend on how well it learned."""


def champion(settings: Settings, data: Path) -> tuple[QualityClassifier, str]:
    client = registry.connect(settings)
    version = registry.alias_version(client, "quality", registry.Alias.CHAMPION)
    if version is None:
        print("[bench] no quality champion yet: training a quick one", file=sys.stderr)
        steps.run_quality_training(settings, data, QUICK_MODEL, "quality", 0.0, "bench-quick")
        version = registry.alias_version(client, "quality", registry.Alias.CHAMPION)
    model = mlflow.pyfunc.load_model(f"models:/quality/{version}").unwrap_python_model()
    return model, version


def in_process(model: QualityClassifier, texts: list[str], labels: np.ndarray) -> dict:
    from transformers import pipeline

    # One fold encoder: ours runs every fold's encoder and the lexical models.
    encoder, tokenizer = model.members.encoders[0]
    hf = pipeline(
        "text-classification",
        model=encoder,
        tokenizer=tokenizer,
        device="cpu",
        top_k=None,
        truncation=True,
    )
    report = {
        "ours_single": percentiles(lambda: model.probabilities([texts[0]]), SINGLE_CALLS),
        "hf_pipeline_single": percentiles(lambda: hf(texts[0]), SINGLE_CALLS),
        "ours_batch": throughput(model.probabilities, texts),
        "hf_pipeline_batch": throughput(lambda batch: hf(batch, batch_size=BATCH), texts),
    }
    report["single_p50_over_hf"] = round(
        report["ours_single"]["p50_ms"] / report["hf_pipeline_single"]["p50_ms"], 3
    )
    report["batch_throughput_over_hf"] = round(
        report["ours_batch"]["texts_per_second"] / report["hf_pipeline_batch"]["texts_per_second"],
        3,
    )
    report["int8"] = int8_quantisation(model, texts, labels)
    return report


def int8_quantisation(model: QualityClassifier, texts: list[str], labels: np.ndarray) -> dict:
    """Dynamic int8 Linear layers in the encoders: speed and weighted F1 against float."""
    quantised = copy.copy(model)
    quantised.members = Members(
        [
            (torch.ao.quantization.quantize_dynamic(m, {torch.nn.Linear}, dtype=torch.qint8), t)
            for m, t in model.members.encoders
        ],
        model.members.lexical,
    )
    report = {}
    for name, candidate in (("float", model), ("int8", quantised)):
        probabilities = candidate.probabilities(texts)
        predicted = candidate.calibration.classes(probabilities)
        report[f"{name}_weighted_f1"] = round(
            float(f1_score(labels, predicted, average="weighted")), 4
        )
        report[f"{name}_texts_per_second"] = throughput(candidate.probabilities, texts)[
            "texts_per_second"
        ]
    report["int8_over_float_throughput"] = round(
        report["int8_texts_per_second"] / report["float_texts_per_second"], 3
    )
    return report


def served(settings: Settings, texts: list[str]) -> dict:
    def call(instances: list[dict]) -> None:
        response = http.post(f"{url}/v1/models/quality:predict", json={"instances": instances})
        response.raise_for_status()

    with model_server(settings, free_port()) as url, httpx.Client(timeout=30) as http:
        single = iter(texts * (SINGLE_CALLS // len(texts) + 2))
        return {
            "served_single": percentiles(
                lambda: call([{"text": next(single), "kind": "title"}]), SINGLE_CALLS
            ),
            "served_batch": throughput(
                lambda batch: call([{"text": t, "kind": "title"} for t in batch]), texts
            ),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    settings = Settings.from_env()
    data = settings.data_dir / "toxicity" / "train.csv"
    evaluation = split.split(load_toxicity(data))[split.Split.EVALUATION]
    texts = evaluation["text"].tolist()
    model, version = champion(settings, data)
    report: dict = {"benchmark": "quality", "threads": THREADS, "texts": len(texts)}
    report["model_version"] = version
    report |= in_process(model, texts, evaluation["label"].to_numpy())
    report |= served(settings, texts)
    for name, figures in report.items():
        if isinstance(figures, dict) and "p50_ms" in figures:
            print(
                f"[bench] {name:<20} p50 {figures['p50_ms']:>8} ms  p99 {figures['p99_ms']:>8} ms",
                file=sys.stderr,
            )
        elif isinstance(figures, dict) and "texts_per_second" in figures:
            print(f"[bench] {name:<20} {figures['texts_per_second']:>8} texts/s", file=sys.stderr)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
