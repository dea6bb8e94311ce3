"""A tiny script-model recipe: a 2-layer Llama and 40 LoRA steps, seconds on a CPU."""

TINY = {
    "vocab_size": 600,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "seq_len": 128,
    "lora_r": 8,
    "lora_alpha": 16,
    "modules_to_save": ["embed_tokens", "lm_head"],
    "micro_batch_size": 4,
    "learning_rate": 3e-3,
    "warmup_steps": 5,
    "max_steps": 40,
    "eval_every": 20,
    "max_examples": 400,
    "validation_fraction": 0.1,
}
