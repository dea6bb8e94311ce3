"""`contentml llm evaluate`: the byte n-gram baseline is a proper model fitted on the training
split only, and a real tiny model, saved as a Hugging Face folder and LoRA-trained from it
through the recipe, scores lower bits per byte than its untrained self on the held-out videos
the training run's gate used."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from contentml.errors import UserError
from tests.conftest import DATA_DIR, make_settings, run_cli
from tests.helpers.registry import cli
from training.llm import data
from training.llm.config import FinetuneConfig
from training.llm.evaluate import (
    END,
    PROMPTS,
    START,
    ByteNgram,
    evaluate,
    load_folder,
    load_registered,
    ngram_bits_per_byte,
)
from training.llm.tokenizer import train_tokenizer
from training.llm.train import finetune

RECIPE = {
    "tokenizer": "",  # the folder's own
    "seq_len": 128,
    "lora_r": 8,
    "lora_alpha": 16,
    "modules_to_save": ["embed_tokens", "lm_head"],
    "micro_batch_size": 4,
    "learning_rate": 3e-3,
    "warmup_steps": 3,
    "max_steps": 30,
    "eval_every": 15,
    "max_examples": 300,
    "validation_fraction": 0.1,
}
"""LoRA on a saved folder, a few CPU steps; `base_model` is the fixture's folder."""

BYTES = [chr(b) for b in range(256)]


@pytest.fixture(scope="module")
def split() -> tuple[list[data.Example], list[data.Example]]:
    """Training and held-out examples of a recipe holding out a tenth of the videos."""
    return data.recipe_examples(DATA_DIR, FinetuneConfig(validation_fraction=0.1))


# --- the n-gram baseline --------------------------------------------------------------------


@pytest.mark.parametrize("order", [1, 3, 6])
@pytest.mark.parametrize("context", ["", "he", "hel", "zqx", "\u00c3"])
def test_the_baseline_is_a_distribution_over_bytes_and_the_end(order: int, context: str):
    ngram = ByteNgram.fit(["hello world", "help me", "héllo"], order)
    history = START * (order - 1) + context
    total = sum(ngram.probability(history, symbol) for symbol in [*BYTES, END])
    assert total == pytest.approx(1.0, abs=1e-9)
    assert ngram.probability(history, "\x07") > 0  # a byte never seen still has a chance


def test_the_baseline_learns_what_it_was_fitted_on():
    texts = ["Like this video? Subscribe for the next one."] * 20
    fitted = ByteNgram.fit(texts, 6)
    other = ByteNgram.fit(["Completely different words, numbers 0123456789."] * 20, 6)
    assert fitted.bits(texts[0]) < 0.2 * other.bits(texts[0])


def test_a_longer_context_and_more_data_give_lower_bits_per_byte(split):
    train, validation = split
    unigram = ngram_bits_per_byte(train, validation, 1)
    fivegram = ngram_bits_per_byte(train, validation, 5)
    fewer = ngram_bits_per_byte(train[:100], validation, 5)
    assert 0 < fivegram < unigram < 8 and fivegram < fewer


def test_the_baseline_is_fitted_on_the_training_split_only(split):
    train, validation = split
    assert not {e.video_id for e in train} & {e.video_id for e in validation}
    honest = ngram_bits_per_byte(train, validation, 6)
    leaked = ngram_bits_per_byte(train + validation, validation, 6)
    assert leaked < honest  # so the figure would show a leak


@pytest.mark.parametrize(
    ("call", "problem"),
    [
        (lambda: ByteNgram.fit([], 3), "needs some training text"),
        (lambda: ByteNgram.fit([""], 3), "needs some training text"),
        (lambda: ByteNgram.fit(["a"], 0), "order must be at least 1"),
        (lambda: ngram_bits_per_byte([_example("a")], [], 3), "no validation examples"),
    ],
)
def test_bad_baseline_inputs_name_the_problem(call, problem: str):
    with pytest.raises(ValueError, match=problem):
        call()


# --- a saved Hugging Face folder as the base, through the recipe ----------------------------


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("llm-evaluate")


@pytest.fixture(scope="module")
def base_folder(state: Path, split) -> Path:
    """A randomly initialised 2-layer Llama and its tokenizer, saved as any hub model is."""
    some = split[0][: RECIPE["max_examples"]]
    corpus = [m["content"] for e in some for m in e.messages] + [e.response for e in some]
    tokenizer = train_tokenizer(corpus, 600)
    shape = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    folder = state / "base"
    LlamaForCausalLM(shape).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def recipe(base_folder: Path) -> FinetuneConfig:
    return FinetuneConfig(**RECIPE, base_model=str(base_folder))


@pytest.fixture(scope="module")
def trained(state: Path, recipe: FinetuneConfig) -> dict:
    return finetune(make_settings(state / "home"), recipe)


@pytest.mark.slow
def test_a_saved_folder_trains_through_the_recipe_and_registers(trained: dict):
    assert trained["version"] == "1" and trained["promoted"]
    assert trained["train_loss_last"] < trained["train_loss_first"]


@pytest.mark.slow
def test_training_lowers_bits_per_byte_on_the_same_held_out_videos(
    trained: dict, state: Path, recipe: FinetuneConfig, base_folder: Path
):
    settings = make_settings(state / "home")
    train, validation = data.recipe_examples(settings.data_dir, recipe)
    registered = load_registered(settings, None)
    assert registered.version == "1" and registered.recipe == recipe  # the run's own recipe
    after = evaluate(registered.generator, train, validation)
    before = evaluate(load_folder(base_folder), train, validation)
    assert math.isfinite(after["bits_per_byte"]) and 0 < after["bits_per_byte"]
    assert after["bits_per_byte"] < before["bits_per_byte"] - 0.5
    # The gate's figure at training time, on the same videos.
    assert after["bits_per_byte"] == pytest.approx(trained["bits_per_byte"], abs=1e-3)
    assert after["baseline"] == before["baseline"]
    assert after["baseline"]["bits_per_byte"] == pytest.approx(
        ngram_bits_per_byte(train, validation), abs=1e-4
    )
    assert after["validation_bytes"] == data.response_bytes(validation)
    assert [g["user"] for g in after["generations"]] == [p[-1]["content"] for p in PROMPTS]
    assert all(isinstance(g["text"], str) for g in after["generations"])


@pytest.mark.slow
def test_the_cli_evaluates_the_champion_with_its_runs_recipe(trained: dict, state: Path):
    result = run_cli(state / "home", "llm", "evaluate")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["version"] == "1"
    assert report["bits_per_byte"] == pytest.approx(trained["bits_per_byte"], abs=1e-3)
    assert report["validation_examples"] == trained["validation_examples"]
    assert 0 < report["baseline"]["bits_per_byte"] < 8


def test_an_empty_validation_set_is_refused(base_folder: Path):
    with pytest.raises(UserError, match="no held-out videos"):
        evaluate(load_folder(base_folder), [_example("a")], [])


def test_a_folder_without_a_model_is_refused(tmp_path: Path, base_folder: Path):
    with pytest.raises(UserError, match="no config.json"):
        load_folder(tmp_path)
    (tmp_path / "config.json").write_text((base_folder / "config.json").read_text())
    with pytest.raises(UserError, match="cannot load a causal LM and its tokenizer"):
        load_folder(tmp_path)


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["--model-dir", "somewhere"], "--model-dir needs --config"),
        (["--version", "1", "--model-dir", "x"], "not allowed with argument --version"),
        (["--version", "0"], "must be at least 1"),
        ([], "has no champion: run `contentml llm finetune` first"),
        (["--version", "3"], "has no version '3'"),
    ],
)
def test_bad_arguments_exit_2_naming_the_problem(
    tmp_path: Path, argv: list[str], problem: str, monkeypatch, capsys
):
    settings = make_settings(tmp_path / "state")
    status, _, err = cli(settings, monkeypatch, capsys, "llm", "evaluate", *argv)
    assert status == 2, err[-2000:]
    assert problem in err


@pytest.mark.slow
def test_a_folder_is_evaluated_with_the_recipe_given(tmp_path: Path, base_folder: Path):
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump({**RECIPE, "base_model": str(base_folder)}))
    result = run_cli(
        tmp_path / "state",
        "llm",
        "evaluate",
        "--model-dir",
        str(base_folder),
        "--config",
        str(config),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["model_dir"] == str(base_folder) and report["bits_per_byte"] > 0


def _example(response: str) -> data.Example:
    return data.Example("video", [{"role": "user", "content": "say"}], response)
