"""The base causal LM and its tokenizer, and the LoRA adapters put on it."""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from training.llm.config import BUILT_FROM_CONFIG, TRAINED_HERE, FinetuneConfig
from training.llm.tokenizer import CHAT_TEMPLATE, train_tokenizer

DTYPES = {"32-true": torch.float32, "bf16-mixed": torch.float32, "bf16-true": torch.bfloat16}
"""Weights' dtype per Lightning precision: bf16-mixed keeps fp32 weights and computes in bf16."""


def load_tokenizer(config: FinetuneConfig, corpus: list[str]) -> PreTrainedTokenizerBase:
    """The recipe's tokenizer, with the shared chat template (and a pad token) set."""
    if config.tokenizer == TRAINED_HERE:
        return train_tokenizer(corpus, config.vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.base_model)
    tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        # Llama-family tokenizers have none; padding is masked out of the loss anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(config: FinetuneConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A Llama built from the recipe's shape (random weights), or pre-trained weights from a
    folder or hub id."""
    if config.base_model != BUILT_FROM_CONFIG:
        return AutoModelForCausalLM.from_pretrained(
            config.base_model, dtype=DTYPES[config.precision]
        )
    torch.manual_seed(config.seed)
    shape = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.seq_len,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(shape).to(DTYPES[config.precision])


def add_lora(model: PreTrainedModel, config: FinetuneConfig) -> PeftModel:
    """Freeze the base and add trainable adapters (and full copies of `modules_to_save`)."""
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        # The frozen embeddings' output needs a gradient for checkpointed blocks to backprop.
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules,
        modules_to_save=config.modules_to_save or None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)
