"""`contentml llm`: the script model (LoRA fine-tuned causal LM)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from contentml.settings import Settings
from entrypoints.cli.base import (
    OneLineParser,
    UsageError,
    positive_int,
    print_json,
    write_yaml,
)


def cmd_llm_finetune(settings: Settings, args: argparse.Namespace) -> int:
    from training.llm.config import load_config
    from training.llm.train import finetune

    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    config = load_config(Path(args.config), max_steps=args.max_steps)
    started = time.monotonic()
    summary = finetune(settings, config)
    if summary is not None:  # rank 0 reports; the other ranks of a TrainJob stay quiet
        print_json({**summary, "seconds": round(time.monotonic() - started, 1)})
    return 0


def cmd_llm_evaluate(settings: Settings, args: argparse.Namespace) -> int:
    if args.model_dir is not None and args.config is None:
        raise UsageError("--model-dir needs --config: the recipe that says its held-out videos")
    from training.llm.config import load_config
    from training.llm.data import recipe_examples
    from training.llm.evaluate import evaluate, load_folder, load_registered

    started = time.monotonic()
    config = load_config(Path(args.config)) if args.config else None
    if args.model_dir is not None:
        generator, source = load_folder(Path(args.model_dir)), {"model_dir": args.model_dir}
    else:
        loaded = load_registered(settings, None if args.version is None else str(args.version))
        generator, source = loaded.generator, {"model": "script", "version": loaded.version}
        config = config or loaded.recipe
        if config is None:
            raise UsageError(
                f"script version {loaded.version}'s run logged no recipe: pass --config with "
                "the recipe it was trained with"
            )
    train, validation = recipe_examples(settings.data_dir, config)
    result = evaluate(generator, train, validation)
    print_json({**source, **result, "seconds": round(time.monotonic() - started, 1)})
    return 0


def cmd_llm_trainjob(settings: Settings, args: argparse.Namespace) -> int:
    from training.llm.config import load_config
    from training.llm.trainjob import trainjob_manifest

    config = load_config(Path(args.config))
    manifest = trainjob_manifest(
        config, args.config, settings, args.name, args.namespace, suspend=args.suspend
    )
    write_yaml(manifest, args.output)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """The `llm` command."""
    llm = commands.add_parser("llm", help="the script model (LoRA fine-tuned causal LM)")
    llm_commands = llm.add_subparsers(dest="action", required=True, parser_class=OneLineParser)
    llm_finetune = llm_commands.add_parser(
        "finetune", help="LoRA fine-tune with DeepSpeed, merge, register and gate `script`"
    )
    llm_finetune.add_argument(
        "--config", required=True, help="YAML of FinetuneConfig fields (training/llm/configs/)"
    )
    llm_finetune.add_argument("--max-steps", type=positive_int, default=None)
    llm_finetune.set_defaults(handler=cmd_llm_finetune)
    llm_evaluate = llm_commands.add_parser(
        "evaluate",
        help="validation bits per byte beside a byte n-gram baseline, and sample generations",
    )
    which = llm_evaluate.add_mutually_exclusive_group()
    which.add_argument(
        "--version", type=positive_int, default=None, help="`script` version (default: champion)"
    )
    which.add_argument(
        "--model-dir", default=None, help="a saved model and tokenizer instead (needs --config)"
    )
    llm_evaluate.add_argument(
        "--config",
        default=None,
        help="the recipe it was trained with (default: the one its run logged)",
    )
    llm_evaluate.set_defaults(handler=cmd_llm_evaluate)
    llm_trainjob = llm_commands.add_parser(
        "trainjob", help="render the Kubeflow Trainer TrainJob of a `launcher: trainjob` recipe"
    )
    llm_trainjob.add_argument("config", help="recipe path inside the image (training/llm/configs/)")
    llm_trainjob.add_argument("--name", required=True, help="the TrainJob's name (a DNS label)")
    llm_trainjob.add_argument("--namespace", default=None)
    llm_trainjob.add_argument(
        "--suspend", action="store_true", help="created suspended: starts when unsuspended"
    )
    llm_trainjob.add_argument("--output", default=None, help="YAML file (default: stdout)")
    llm_trainjob.set_defaults(handler=cmd_llm_trainjob)
