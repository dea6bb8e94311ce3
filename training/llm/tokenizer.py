"""A byte-level BPE tokenizer trained here on the fine-tuning corpus (the tiny model has no
pre-trained tokenizer to inherit), carrying the chat template that training and serving share.

The chat template is the one contract between the two: training renders each example with it,
the OpenAI-compatible server renders `messages` with it, and in the cluster vLLM reads it from
the saved tokenizer, so a prompt looks the same everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}" + EOS + "{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""Roles as `<|system|>`, `<|user|>`, `<|assistant|>` lines; an assistant turn ends with EOS,
which is where generation stops."""

ROLE_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>")


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE of `vocab_size` entries (special tokens and role markers included)."""
    special = [PAD, BOS, EOS, *ROLE_MARKERS]
    if vocab_size <= len(special) + 256:
        raise ValueError(f"vocab_size must exceed {len(special) + 256} (bytes and special tokens)")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_MARKERS),
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
