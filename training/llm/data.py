"""Instruction pairs for the script model, from the YouTube trending data, tokenised with the
shared chat template and packed into fixed-length sequences with the loss on responses only.

The trending files carry no descriptions, so the pairs are the two things the content pipeline
asks for that the data does answer: a title for a category and tags, and a short script for
a title, written from a template (hook, the tags as talking points, a call to action) so the
model learns the shape the ContentStrategist expects.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from training.data import load_youtube_trending
from training.llm.config import FinetuneConfig

IGNORE_INDEX = -100
"""Label of a token the loss skips: prompts and padding."""

MAX_TAGS = 8
"""Tags named in a prompt: the first ones are the channel's own keywords, the rest noise."""


@dataclass(frozen=True)
class Example:
    video_id: str
    messages: list[dict[str, str]]
    """The conversation up to the response: system and user turns."""
    response: str
    """The assistant turn the loss is computed on."""


def instruction_pairs(videos: pd.DataFrame) -> list[Example]:
    """Two examples per video (a title, a script) from its first snapshot, in a stable order.

    `videos` is the `training.data.load_youtube_trending` frame.
    """
    first = videos.sort_values("event_timestamp").drop_duplicates("video_id")
    examples = []
    for video in first.sort_values("video_id").itertuples():
        tags = [t for t in video.tags.split("|") if t][:MAX_TAGS]
        persona = f"You write for {video.channel_title}, a YouTube channel about {video.category}."
        tag_text = ", ".join(tags) if tags else "none"
        examples.append(
            Example(
                video.video_id,
                [
                    {"role": "system", "content": persona},
                    {
                        "role": "user",
                        "content": f"Write a title for a {video.category} video. Tags: {tag_text}.",
                    },
                ],
                video.title,
            )
        )
        examples.append(
            Example(
                video.video_id,
                [
                    {"role": "system", "content": persona},
                    {"role": "user", "content": f"Write a short video script about: {video.title}"},
                ],
                script_template(video.title, tags, video.category),
            )
        )
    return examples


def script_template(title: str, tags: list[str], category: str) -> str:
    """A short script: a hook, up to three talking points, a call to action."""
    points = "\n".join(f"- {tag}" for tag in tags[:3]) or f"- {title}"
    return (
        f"HOOK: {title}\n"
        f"POINTS:\n{points}\n"
        f"CLOSE: Like this {category.lower()} video? Subscribe for the next one."
    )


def held_out(video_id: str, fraction: float) -> bool:
    """Whether a video's examples are validation: a stable hash, so versions compare on the
    same videos and a video's two examples never straddle the split."""
    bucket = int(hashlib.sha256(video_id.encode("utf-8")).hexdigest()[:8], 16)
    return bucket / 0x1_0000_0000 < fraction


def recipe_examples(data_dir: Path, config: FinetuneConfig) -> tuple[list[Example], list[Example]]:
    """A recipe's training and validation examples: the first `max_examples` pairs of the
    trending data in `data_dir`, split by `held_out`. Training, its gate and `llm evaluate` all
    take them from here, so every score of a recipe's model is on the same videos."""
    examples = instruction_pairs(load_youtube_trending(data_dir))[: config.max_examples]
    train = [e for e in examples if not held_out(e.video_id, config.validation_fraction)]
    validation = [e for e in examples if held_out(e.video_id, config.validation_fraction)]
    return train, validation


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `messages` in the chat template, ending where the assistant's turn starts:
    the prompt as training saw it."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def encode(tokenizer: PreTrainedTokenizerBase, example: Example) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and its labels: the prompt is `IGNORE_INDEX`,
    the response and its closing EOS are learned."""
    prompt_ids = render_prompt(tokenizer, example.messages)
    response_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    response_ids = [*response_ids, tokenizer.eos_token_id]
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


def pack(
    tokenizer: PreTrainedTokenizerBase, examples: list[Example], seq_len: int
) -> dict[str, torch.Tensor]:
    """`input_ids` and `labels` of shape [n, seq_len]: the examples' tokens end to end, cut
    every `seq_len` tokens; the last sequence is padded (labels `IGNORE_INDEX`).

    Packing wastes no compute on padding; an example may continue into the next sequence, and
    attention crosses example boundaries within a sequence (each example starts with its own
    system turn, which the model learns to read as a fresh start).
    """
    if not examples:
        raise ValueError("no examples to pack")
    ids: list[int] = []
    labels: list[int] = []
    for example in examples:
        example_ids, example_labels = encode(tokenizer, example)
        ids += example_ids
        labels += example_labels
    padding = -len(ids) % seq_len
    ids += [tokenizer.pad_token_id] * padding
    labels += [IGNORE_INDEX] * padding
    return {
        "input_ids": torch.tensor(ids).view(-1, seq_len),
        "labels": torch.tensor(labels).view(-1, seq_len),
    }


def response_bytes(examples: list[Example]) -> int:
    """UTF-8 bytes of the responses: the tokenizer-independent unit of bits per byte."""
    return sum(len(example.response.encode("utf-8")) for example in examples)
