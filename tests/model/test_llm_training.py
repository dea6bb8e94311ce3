"""The script model's fine-tuning: recipe checks, instruction data, tokenizer, and a real
LoRA + DeepSpeed run on a tiny Llama (ZeRO-2 and ZeRO-3 on CPU) that registers `script`."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from contentml import registry
from tests.conftest import DATA_DIR, make_settings, run_cli
from tests.helpers.llm import TINY
from tests.helpers.registry import cli
from training.data import load_youtube_trending
from training.llm import data
from training.llm.config import ConfigError, FinetuneConfig, load_config
from training.llm.tokenizer import train_tokenizer
from training.llm.train import finetune


@pytest.fixture(scope="module")
def videos() -> pd.DataFrame:
    return load_youtube_trending(DATA_DIR)


# --- recipe ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"zero_stage": 1}, "zero_stage must be 2 or 3"),
        ({"offload_parameters": True}, "offload_parameters needs zero_stage 3"),
        ({"precision": "bf16-mixed"}, "precision on cpu must be '32-true'"),
        ({"hidden_size": 130}, "hidden_size must be a multiple of num_heads"),
        ({"launcher": "slurm"}, "launcher must be one of"),
        ({"lora_target_modules": "q_proj"}, "lora_target_modules must be a list"),
        ({"lora_target_modules": [1]}, "lora_target_modules must be a list of strings"),
        ({"devices": True}, "devices must be int"),
        ({"warmup_steps": 200}, r"warmup_steps must be in \[0, max_steps\)"),
    ],
)
def test_a_bad_recipe_names_the_field(change: dict, problem: str):
    with pytest.raises(ConfigError, match=problem):
        FinetuneConfig(**change)


def test_recipe_yaml_reads_rates_in_exponent_notation(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: 2e-4\nlora_target_modules: [q_proj]\n")
    config = load_config(recipe, max_steps=300)
    assert config.learning_rate == pytest.approx(2e-4) and config.max_steps == 300
    assert config.lora_target_modules == ["q_proj"]


# --- data -----------------------------------------------------------------------------------


def test_two_examples_per_video_a_title_and_a_script(videos: pd.DataFrame):
    examples = data.instruction_pairs(videos)
    assert len(examples) == 2 * videos["video_id"].nunique()
    title, script = (e for e in examples if e.video_id == examples[0].video_id)
    first = videos[videos["video_id"] == title.video_id].sort_values("event_timestamp").iloc[0]
    assert title.response == first["title"]
    assert script.response.startswith(f"HOOK: {first['title']}\nPOINTS:\n- ")
    assert first["category"] in title.messages[0]["content"]


def test_held_out_is_stable_and_near_the_fraction(videos: pd.DataFrame):
    ids = videos["video_id"].unique()
    share = sum(data.held_out(i, 0.1) for i in ids) / len(ids)
    assert 0.07 < share < 0.13
    assert [data.held_out(i, 0.1) for i in ids[:50]] == [data.held_out(i, 0.1) for i in ids[:50]]


def test_only_the_response_and_its_eos_are_learned(videos: pd.DataFrame):
    examples = data.instruction_pairs(videos)[:20]
    tokenizer = train_tokenizer([e.response for e in examples] * 5, 400)
    ids, labels = data.encode(tokenizer, examples[0])
    learned = [i for i, label in zip(ids, labels, strict=True) if label != data.IGNORE_INDEX]
    assert tokenizer.decode(learned) == examples[0].response + tokenizer.eos_token
    prompt = tokenizer.decode(ids[: len(ids) - len(learned)])
    assert prompt.endswith("<|assistant|>\n") and examples[0].messages[1]["content"] in prompt

    packed = data.pack(tokenizer, examples, 64)
    assert packed["input_ids"].shape == packed["labels"].shape
    assert packed["input_ids"].shape[1] == 64
    total = sum(len(data.encode(tokenizer, e)[0]) for e in examples)
    assert packed["input_ids"].numel() - total < 64  # only the last sequence is padded


def test_a_tokenizer_too_small_for_bytes_is_refused():
    with pytest.raises(ValueError, match="vocab_size must exceed"):
        train_tokenizer(["a"], 100)


# --- fine-tuning ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory):
    return make_settings(tmp_path_factory.mktemp("llm") / "state")


@pytest.fixture(scope="module")
def first_run(settings) -> dict:
    return finetune(settings, FinetuneConfig(**TINY))


@pytest.mark.slow
def test_finetune_lowers_the_loss_and_registers_the_champion(first_run: dict, settings):
    assert first_run["train_loss_last"] < first_run["train_loss_first"] - 0.5
    assert first_run["version"] == "1" and first_run["promoted"]
    assert first_run["bits_per_byte"] > 0 and first_run["validation_examples"] > 0
    client = registry.connect(settings)
    assert registry.alias_version(client, "script", registry.Alias.CHAMPION) == "1"
    run_id = client.get_model_version("script", "1").run_id
    logged = {a.path for a in client.list_artifacts(run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in logged
    history = client.get_metric_history(run_id, "train_loss")
    assert len(history) == TINY["max_steps"]


@pytest.mark.slow
def test_the_registered_model_is_a_plain_transformers_model_that_writes(first_run, settings):
    script = mlflow.pyfunc.load_model("models:/script@champion")
    assert type(script.unwrap_python_model().model).__name__ == "LlamaForCausalLM"
    prompt = pd.DataFrame({"prompt": ["<|user|>\nWrite a title for a Music video.\n"]})
    (text,) = script.predict(prompt, params={"max_tokens": 8})
    assert isinstance(text, str) and text


@pytest.mark.slow
def test_zero3_trains_the_same_code_path_and_is_gated(first_run: dict, settings):
    stage3 = finetune(settings, FinetuneConfig(**{**TINY, "zero_stage": 3, "max_steps": 10}))
    assert stage3["version"] == "2"
    # 10 steps cannot beat 40: the gate keeps version 1 on the same validation videos.
    assert not stage3["promoted"] and stage3["bits_per_byte"] > first_run["bits_per_byte"]
    client = registry.connect(settings)
    assert registry.alias_version(client, "script", registry.Alias.CHAMPION) == "1"
    assert registry.alias_version(client, "script", registry.Alias.CHALLENGER) == "2"


def test_the_cli_refuses_a_bad_recipe_with_exit_2(tmp_path: Path, monkeypatch, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("zero_stage: 1\n")
    settings = make_settings(tmp_path / "state")
    status, _, err = cli(settings, monkeypatch, capsys, "llm", "finetune", "--config", str(recipe))
    assert status == 2
    assert "zero_stage must be 2 or 3" in err


@pytest.mark.slow
def test_two_processes_train_with_gloo_and_only_rank_0_reports(tmp_path: Path):
    # Lightning starts the second rank by running the same command again: the CLI is the
    # entry point a TrainJob's ranks run too.
    recipe = tmp_path / "two.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "devices": 2, "max_steps": 10}))
    result = run_cli(tmp_path / "state", "llm", "finetune", "--config", str(recipe))
    assert result.returncode == 0, result.stderr[-2000:]
    (summary,) = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert summary["version"] == "1" and summary["promoted"]
