"""The `script` model end to end on a tiny real Llama: logged and registered as a pyfunc, served
by `contentml serve` on the OpenAI routes and called with the real `openai` client."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import mlflow
import openai
import pandas as pd
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from contentml import registry
from contentml.protocol import TIMEOUT_HEADER
from entrypoints.demo import free_port, model_server
from serving.caller.strategist import ContentStrategist
from serving.model_server.openai_schema import CompletionRequest
from serving.model_server.script import ANSWER_MARGIN_SECONDS, ScriptModel, StopFilter, time_limit
from tests.conftest import DATA_DIR, make_settings, run_cli
from training.data import load_youtube_trending
from training.llm.generation import FinishReason, Sampling, cut_at_stop
from training.llm.package import log_script_model
from training.llm.tokenizer import train_tokenizer
from training.quality.gate import Decision

slow = pytest.mark.slow

MAX_TOKENS_CAP = 24
"""The served cap (`CONTENTML_SCRIPT_MAX_TOKENS`), low enough for requests to exceed it."""

CHAT_PROMPTS = ["A Music title", "A Comedy title", "A Sports title", "A Gaming title"]


def chat(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def tiny_script_model(folder: Path) -> Path:
    """A 2-layer Llama and a BPE tokenizer trained for a few seconds on trending titles asked
    for by category, so that its chat answers look like titles and end with EOS."""
    frame = load_youtube_trending(DATA_DIR).drop_duplicates("title").head(300)
    tokenizer = train_tokenizer(frame["title"], vocab_size=512)
    texts = [
        tokenizer.apply_chat_template(
            [*chat(f"A {category} title"), {"role": "assistant", "content": title}],
            tokenize=False,
        )
        for title, category in zip(frame["title"], frame["category"], strict=True)
    ]
    batch = tokenizer(texts, padding=True, truncation=True, max_length=48, return_tensors="pt")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for _ in range(80):
        rows = torch.randint(0, len(texts), (32,))
        loss = model(
            input_ids=batch["input_ids"][rows],
            attention_mask=batch["attention_mask"][rows],
            labels=labels[rows],
        ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    return make_settings(
        tmp_path_factory.mktemp("script") / "state",
        CONTENTML_SCRIPT_MAX_TOKENS=str(MAX_TOKENS_CAP),
    )


@pytest.fixture(scope="module")
def champion(settings, tmp_path_factory, one_thread) -> str:
    """Version 1 of `script`, logged from a training run and promoted to champion."""
    folder = tiny_script_model(tmp_path_factory.mktemp("script-model"))
    client = registry.connect(settings)
    with mlflow.start_run(experiment_id=registry.experiment_id(client, settings)):
        info = log_script_model(folder)
    version = str(info.registered_model_version)
    registry.promote(client, "script", version, reason="tests")
    return version


@pytest.fixture(scope="module")
def generator(settings, champion):
    """The champion's pyfunc, loaded in this process as the server loads it."""
    registry.connect(settings)
    return mlflow.pyfunc.load_model("models:/script@champion").unwrap_python_model()


@pytest.fixture(scope="module")
def server(settings, champion) -> Iterator[str]:
    """`contentml serve` with `serving_url` naming itself, as a deployment sets it: the
    strategist behind `/generate/script` calls this very server's OpenAI routes."""
    port = free_port()
    ours = dataclasses.replace(settings, serving_url=f"http://127.0.0.1:{port}")
    with model_server(ours, port, "--workers", "0") as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{server}/openai/v1", api_key="unused", max_retries=0, timeout=60
    ) as client:
        yield client


# --- the pyfunc ----------------------------------------------------------------------------


@slow
def test_the_registered_pyfunc_predicts_one_continuation_per_prompt(settings, champion):
    registry.connect(settings)
    model = mlflow.pyfunc.load_model("models:/script@champion")
    frame = pd.DataFrame({"prompt": ["Music", "How to cook"]})
    texts = model.predict(frame, params={"max_tokens": 6, "temperature": 0.0})
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert model.predict(frame, params={"max_tokens": 6}) == texts  # greedy by default


@slow
def test_a_generation_ends_early_only_at_eos(generator):
    """Without stop sequences or a time limit, `stop` means EOS came before `max_tokens`;
    the trained model ends most chat answers (titles) that way."""
    endings = []
    for content in CHAT_PROMPTS:
        prompt = generator.tokenizer.apply_chat_template(chat(content), add_generation_prompt=True)
        generation = generator.generate(prompt["input_ids"], Sampling(max_tokens=40))
        assert "</s>" not in generation.text
        ended_early = generation.completion_tokens < 40
        assert (generation.finish_reason is FinishReason.STOP) == ended_early
        endings.append(generation.finish_reason)
    assert FinishReason.STOP in endings


@slow
def test_the_same_seed_samples_the_same_text(generator):
    prompt = generator.tokenizer("Music")["input_ids"]
    sampling = Sampling(max_tokens=12, temperature=1.0, seed=7)
    assert generator.generate(prompt, sampling) == generator.generate(prompt, sampling)


@slow
@pytest.mark.parametrize("temperature", [2.2250738585e-313, 1e-40, 1e-7])
def test_a_temperature_too_small_to_sample_at_decodes_greedily(generator, temperature):
    """Found by `make fuzz`: such a temperature failed the generation (a 500)."""
    prompt = generator.tokenizer("Music")["input_ids"]
    greedy = generator.generate(prompt, Sampling(max_tokens=12, temperature=0))
    assert generator.generate(prompt, Sampling(max_tokens=12, temperature=temperature)) == greedy


@slow
def test_a_generation_past_the_time_limit_ends_with_length(settings, champion):
    """The limit comes from the settings the predictor reads in `load()`."""
    hurried = make_settings(settings.home, CONTENTML_SCRIPT_TIMEOUT_SECONDS="0.000001")
    model = ScriptModel("script", hurried)
    assert model.load()
    request = CompletionRequest(model="script", prompt="Music", max_tokens=20, temperature=0)
    answer = asyncio.run(model.create_completion(request))
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 1  # the clock is checked after each token


@slow
def test_time_waiting_for_another_generation_counts_against_the_limit(generator):
    prompt = generator.tokenizer("Music")["input_ids"]
    sampling = Sampling(max_tokens=200, temperature=0, max_seconds=0.2)
    with ThreadPoolExecutor(1) as pool:
        with generator._lock:  # another generation running for 0.3 s
            waiting = pool.submit(generator.generate, prompt, sampling)
            time.sleep(0.3)
        generation = waiting.result(timeout=30)
    assert generation.finish_reason is FinishReason.LENGTH
    assert generation.completion_tokens == 1  # the clock is checked after each token


@pytest.mark.parametrize(
    ("caller_seconds", "limit"),
    [
        (None, 30.0),
        (100.0, 30.0),
        (10.0, 10.0 - ANSWER_MARGIN_SECONDS),
        (ANSWER_MARGIN_SECONDS, ANSWER_MARGIN_SECONDS / 2),  # a short wait: half of it
        (2e-6, 1e-6),
    ],
)
def test_the_callers_wait_cuts_the_time_limit_by_the_margin(caller_seconds, limit):
    assert time_limit(30.0, caller_seconds) == pytest.approx(limit)


@slow
def test_a_long_generation_ends_in_time_for_a_caller_that_waits_less(settings, champion):
    """The model slowed to 50 ms a token, so 200 tokens would take 10 s: a caller that waits
    1 s gets the text of the first 0.5 s, before it gives up."""
    model = ScriptModel("script", make_settings(settings.home))  # the default cap, 512 tokens
    assert model.load()
    slowed = model.serving.champion.generator.model.register_forward_hook(
        lambda *_: time.sleep(0.05)
    )
    request = CompletionRequest(model="script", prompt="Music", max_tokens=200, temperature=0)
    wait = 1.0
    try:
        started = time.monotonic()
        answer = asyncio.run(model.create_completion(request, caller_seconds=wait))
        seconds = time.monotonic() - started
    finally:
        slowed.remove()
    (choice,) = answer["choices"]
    assert choice["finish_reason"] == "length" and choice["text"]
    assert 1 < answer["usage"]["completion_tokens"] < 200
    assert wait - ANSWER_MARGIN_SECONDS <= seconds < wait


# --- the OpenAI routes ---------------------------------------------------------------------


@slow
def test_a_completion_reports_usage_and_the_version(client: openai.OpenAI, champion: str):
    completion = client.completions.create(
        model="script", prompt="Music", max_tokens=8, temperature=0
    )
    (choice,) = completion.choices
    assert isinstance(choice.text, str) and choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert completion.system_fingerprint == f"script-v{champion}"


@slow
def test_a_streamed_chat_joins_to_the_unstreamed_answer(client: openai.OpenAI):
    request = {"model": "script", "messages": chat(CHAT_PROMPTS[0]), "temperature": 0}
    answer = client.chat.completions.create(**request)
    chunks = list(
        client.chat.completions.create(
            **request, stream=True, stream_options={"include_usage": True}
        )
    )
    choices = [c.choices[0] for c in chunks if c.choices]
    assert choices[0].delta.role == "assistant"
    text = "".join(c.delta.content or "" for c in choices)
    assert len([c for c in choices if c.delta.content]) >= 2  # pieces, not one final blob
    assert text == answer.choices[0].message.content
    assert choices[-1].finish_reason == answer.choices[0].finish_reason
    assert [c.finish_reason for c in choices[:-1]] == [None] * (len(choices) - 1)
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens


@slow
def test_max_tokens_above_the_cap_is_clipped_not_refused(client: openai.OpenAI):
    completion = client.completions.create(
        model="script", prompt="Music", max_tokens=10_000, temperature=0
    )
    assert completion.usage.completion_tokens <= MAX_TOKENS_CAP
    answer = client.chat.completions.create(
        model="script", messages=chat("A Music title"), max_completion_tokens=10_000
    )
    assert answer.usage.completion_tokens <= MAX_TOKENS_CAP


@slow
@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_sequence_cuts_the_text(client: openai.OpenAI, stream: bool):
    request = {"model": "script", "prompt": "Music", "max_tokens": 20, "temperature": 0}
    full = client.completions.create(**request).choices[0].text
    start = next(i for i in range(1, len(full) - 1) if full[i : i + 2].isascii())
    stop = full[start : start + 2]
    if stream:
        chunks = list(client.completions.create(**request, stop=[stop], stream=True))
        text = "".join(c.choices[0].text for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        (choice,) = client.completions.create(**request, stop=stop).choices
        text, finish = choice.text, choice.finish_reason
    assert text == full[: full.index(stop)]
    assert finish == "stop"


@slow
def test_the_models_route_lists_script(client: openai.OpenAI):
    assert [m.id for m in client.models.list()] == ["script"]


@slow
@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("chat/completions", {"model": "script"}, "messages"),
        ("chat/completions", {"model": "script", "messages": []}, "messages"),
        ("chat/completions", {"model": "script", "messages": chat("hi"), "n": 2}, "n"),
        ("chat/completions", {"messages": chat("hi")}, "model"),
        ("chat/completions", {"model": "script", "messages": [{"role": "robot"}]}, "messages"),
        ("completions", {"model": "script", "prompt": "hi", "max_tokens": -1}, "max_tokens"),
        ("completions", {"model": "script", "prompt": "  "}, "prompt"),
        ("completions", {"model": "script", "prompt": ["a", "b"]}, "prompt"),
        ("completions", {"model": "script", "prompt": "hi", "temperature": 3}, "temperature"),
        ("completions", {"model": "script", "prompt": "hi", "stop": list("abcde")}, "stop"),
        ("completions", {"model": "script", "prompt": "hi", "echo": True}, "echo"),
        ("completions", {"model": "script", "prompt": "hi", "stream": True, "n": 3}, "n"),
    ],
)
def test_a_malformed_request_gets_400_naming_the_field(server, route, body, param):
    response = httpx.post(f"{server}/openai/v1/{route}", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"]
    assert error["type"] == "invalid_request_error"


@slow
@pytest.mark.parametrize("stream", [False, True])
def test_the_timeout_header_ends_the_generation_with_the_text_so_far(
    client: openai.OpenAI, stream: bool
):
    """A caller that waits 2 µs leaves the generation 1 µs: it ends after its first token (the
    clock is checked after each) and answers that token's text."""
    request = {"model": "script", "prompt": "Music", "max_tokens": 10_000, "temperature": 0}
    full = client.completions.create(**request)
    assert full.usage.completion_tokens > 1
    hurried = {**request, "extra_headers": {TIMEOUT_HEADER: "0.000002"}}
    if stream:
        chunks = list(
            client.completions.create(
                **hurried, stream=True, stream_options={"include_usage": True}
            )
        )
        choices = [c.choices[0] for c in chunks if c.choices]
        text, finish = "".join(c.text for c in choices), choices[-1].finish_reason
        usage = chunks[-1].usage
    else:
        answer = client.completions.create(**hurried)
        (choice,) = answer.choices
        text, finish, usage = choice.text, choice.finish_reason, answer.usage
    assert finish == "length" and usage.completion_tokens == 1
    assert text and full.choices[0].text.startswith(text)


@slow
@pytest.mark.parametrize(
    ("route", "value"),
    [
        ("completions", "abc"),
        ("completions", "-1"),
        ("completions", "0"),
        ("completions", "nan"),
        ("completions", "1e999"),
        ("chat/completions", "inf"),
    ],
)
def test_a_timeout_header_that_is_not_a_positive_number_gets_400(server, route, value):
    body = {"model": "script", "prompt": "hi", "messages": chat("hi")}
    response = httpx.post(
        f"{server}/openai/v1/{route}", json=body, headers={TIMEOUT_HEADER: value}, timeout=30
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == TIMEOUT_HEADER and TIMEOUT_HEADER in error["message"]
    assert error["type"] == "invalid_request_error"


@slow
def test_a_prompt_longer_than_the_context_gets_400(server):
    body = {"model": "script", "prompt": "Music video " * 400}
    response = httpx.post(f"{server}/openai/v1/completions", json=body, timeout=30)
    assert response.status_code == 400
    assert "context" in response.json()["error"]["message"]


@slow
def test_a_body_that_is_not_json_gets_400(server):
    response = httpx.post(f"{server}/openai/v1/completions", content=b"{nope", timeout=30)
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]


@slow
def test_the_v1_predict_route_points_at_the_openai_routes(server):
    response = httpx.post(f"{server}/v1/models/script:predict", json={"instances": []})
    assert response.status_code == 400
    assert "/openai/v1/chat/completions" in response.json()["error"]


@slow
def test_an_unknown_model_gets_404(client: openai.OpenAI):
    with pytest.raises(openai.NotFoundError, match="served: script"):
        client.completions.create(model="gpt-4", prompt="hi")


# --- stop sequences while streaming --------------------------------------------------------


@pytest.mark.parametrize(
    ("pieces", "stop", "sent", "stopped"),
    [
        (["Hel", "lo wo", "rld"], ("o w",), "Hell", True),
        (["Hel", "lo wo", "rld"], ("xyz",), "Hello world", False),
        (["ab", "c"], ("bc", "c"), "a", True),
        (["a", "b", "c"], (), "abc", False),
        (["stop", "more"], ("stop",), "", True),
    ],
)
def test_the_stop_filter_never_sends_a_stop_sequence(pieces, stop, sent, stopped):
    held = StopFilter(stop)
    out = []
    for piece in pieces:
        out.append(held.push(piece))
        assert not any(s in "".join(out) for s in stop)
    out.append(held.flush())
    assert "".join(out) == sent and held.stopped is stopped


def test_cut_at_stop_cuts_at_the_earliest_sequence():
    assert cut_at_stop("one. two! three", (".", "!")) == ("one", True)
    assert cut_at_stop("one two", ("!",)) == ("one two", False)


@pytest.mark.parametrize(
    "fields",
    [{"max_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"max_seconds": 0}, {"stop": ("",)}],
)
def test_sampling_refuses_impossible_values(fields):
    with pytest.raises(ValueError):
        Sampling(**{"max_tokens": 4, **fields})


@slow
def test_the_strategist_writes_a_script_with_our_served_model(settings, server: str):
    # The default chain (no API key): our endpoint only; the quality model is not served here,
    # so the script goes to human review rather than out unchecked. Greedy, as a sampled answer
    # of a 60-step model may be whitespace alone, which the strategist rightly refuses.
    ours = dataclasses.replace(settings, serving_url=server)
    with ContentStrategist.from_settings(ours, environ={}) as strategist:
        script = strategist.generate_script(
            "tomato varieties", "A calm gardening channel.", temperature=0.0
        )
    assert script.provider == "contentml" and script.model == "script"
    assert script.text and script.completion_tokens > 0 and script.cost_usd == 0
    assert script.quality_decision == Decision.REVIEW and script.quality_score is None


# --- the backend's script route ------------------------------------------------------------

SCRIPT_SLA_SECONDS = 30.0


@slow
def test_the_script_route_writes_a_script_and_books_its_cost(settings, server: str):
    body = {
        "topic": "tomato varieties",
        "persona": "A calm gardening channel.",
        "channel": "garden-channel",
    }
    started = time.perf_counter()
    response = httpx.post(f"{server}/generate/script", json=body, timeout=60)
    seconds = time.perf_counter() - started
    assert response.status_code == 200, response.text
    assert seconds < SCRIPT_SLA_SECONDS
    answer = response.json()
    assert answer["script"].strip() and answer["provider"] == "contentml"
    assert answer["cached"] is False
    # Our endpoint's tokens are free: the cost is the call's compute seconds at the hourly price.
    assert 0 < answer["cost_usd"] <= seconds * settings.compute_usd_per_hour / 3600
    # No quality model here: the script goes to a person.
    assert answer["quality_decision"] == "review" and answer["quality_score"] is None

    result = run_cli(settings.home, "costs", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    (day,) = [d for d in json.loads(result.stdout)["days"] if d["channel"] == "garden-channel"]
    assert day["usd"] == pytest.approx(answer["cost_usd"])
    assert day["calls"] == 1 and day["videos"] == 1 and day["completion_tokens"] > 0


@slow
def test_a_script_body_without_persona_gets_422(server: str):
    response = httpx.post(f"{server}/generate/script", json={"topic": "tomatoes"}, timeout=30)
    assert response.status_code == 422, response.text
    assert [error["loc"] for error in response.json()["detail"]] == [["body", "persona"]]
