"""`contentml quality`: the content quality gate."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from contentml.settings import Settings
from entrypoints.cli.base import (
    OneLineParser,
    model_name,
    positive_int,
    print_json,
)


def cmd_quality_train(settings: Settings, args: argparse.Namespace) -> int:
    from training.quality import steps
    from training.quality.config import load_config

    # Lightning sets its logger to INFO when imported (by `steps`): device and tip notices.
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    config = load_config(
        Path(args.config) if args.config else None,
        epochs=args.epochs,
        max_train_rows=args.max_train_rows,
    )
    started = time.monotonic()
    result = steps.run_quality_training(
        settings,
        Path(args.data),
        config,
        args.model,
        args.margin,
        run_name=f"quality-cli-{time.strftime('%Y%m%d-%H%M%S')}",
    )
    print_json({**result, "seconds": round(time.monotonic() - started, 1)})
    return 0


def _version(settings: Settings, args: argparse.Namespace) -> str:
    """`--version`, checked to exist, else the champion's."""
    from contentml import registry

    client = registry.connect(settings)
    if args.version is not None:
        return registry.model_version(client, args.model, str(args.version)).version
    version = registry.alias_version(client, args.model, registry.Alias.CHAMPION)
    if version is None:
        raise registry.RegistryError(
            f"model {args.model!r} has no champion: run `contentml quality train` first"
        )
    return version


def cmd_quality_predict(settings: Settings, args: argparse.Namespace) -> int:
    import pandas as pd

    from training.data import load_texts

    texts = load_texts(Path(args.input))
    version = _version(settings, args)
    # The model code (torch, transformers) only once there is a version to run: a missing
    # file or champion is reported in a second, not after ten.
    from training.quality.train import predict_frame

    started = time.monotonic()
    predictions = predict_frame(f"models:/{args.model}/{version}", texts["text"])
    pd.concat([texts.iloc[:, [0]], predictions], axis=1).to_csv(args.output, index=False)
    print_json(
        {
            "output": args.output,
            "rows": len(texts),
            "model": args.model,
            "version": version,
            "seconds": round(time.monotonic() - started, 1),
        }
    )
    return 0


def cmd_quality_evaluate(settings: Settings, args: argparse.Namespace) -> int:
    from training.data import load_toxicity

    frame = load_toxicity(Path(args.data))
    version = _version(settings, args)
    from training.quality.train import evaluate_views

    started = time.monotonic()
    views = evaluate_views(f"models:/{args.model}/{version}", frame)
    print_json(
        {
            "model": args.model,
            "version": version,
            "views": views,
            "seconds": round(time.monotonic() - started, 1),
        }
    )
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """The `quality` command."""
    quality = commands.add_parser("quality", help="the content quality gate")
    quality_commands = quality.add_subparsers(
        dest="action", required=True, parser_class=OneLineParser
    )
    quality_train = quality_commands.add_parser(
        "train", help="fine-tune, calibrate, register and gate the quality classifier"
    )
    quality_train.add_argument("--data", required=True, help="labelled CSV: id, class, tweet")
    quality_train.add_argument("--config", default=None, help="YAML of QualityConfig fields")
    quality_train.add_argument("--epochs", type=positive_int, default=None)
    quality_train.add_argument("--max-train-rows", type=positive_int, default=None)
    quality_train.add_argument(
        "--model", type=model_name, default="quality", help="registered model name"
    )
    quality_train.add_argument(
        "--margin", type=float, default=0.0, help="weighted F1 to gain over the champion"
    )
    quality_train.set_defaults(handler=cmd_quality_train)
    quality_predict = quality_commands.add_parser(
        "predict", help="class and probabilities for every text of a CSV"
    )
    quality_predict.add_argument("--input", required=True, help="CSV: id, then tweet or text")
    quality_predict.add_argument("--output", required=True, help="CSV: id, class, probabilities")
    quality_predict.add_argument(
        "--model", type=model_name, default="quality", help="registered model name"
    )
    quality_predict.add_argument(
        "--version", type=positive_int, default=None, help="model version (default: champion)"
    )
    quality_predict.set_defaults(handler=cmd_quality_predict)
    quality_evaluate = quality_commands.add_parser(
        "evaluate",
        help="the model and its ablations (encoder, lexical, fixed blend; threshold and argmax) "
        "on the fixed evaluation slice",
    )
    quality_evaluate.add_argument("--data", required=True, help="labelled CSV: id, class, tweet")
    quality_evaluate.add_argument(
        "--model", type=model_name, default="quality", help="registered model name"
    )
    quality_evaluate.add_argument(
        "--version", type=positive_int, default=None, help="model version (default: champion)"
    )
    quality_evaluate.set_defaults(handler=cmd_quality_evaluate)
