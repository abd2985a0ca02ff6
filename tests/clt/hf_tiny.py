"""Tiny random `transformers` models of every supported family, saved as Hugging Face directories.

Weights are redrawn at a scale that gives O(1) activations (transformers' own init leaves norms at
one and biases at zero, which would hide mistakes in those paths).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SLIDING_WINDOW = 8  # sequences in the tests are longer than this


def tiny_config(family: str):
    import transformers as tf

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":  # with Llama-3.1 RoPE scaling, untied unembedding
        return tf.LlamaConfig(**common, head_dim=16, tie_word_embeddings=False, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    if family == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=False)
    if family == "qwen3":  # head_dim != hidden/heads, q/k norms
        return tf.Qwen3Config(**common, head_dim=24, tie_word_embeddings=True)
    if family == "gemma2":
        return tf.Gemma2Config(**common, head_dim=16, sliding_window=SLIDING_WINDOW,
                               query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                               final_logit_softcapping=3.0)
    if family == "gemma3":  # local/global RoPE bases, linear scaling on global layers
        return tf.Gemma3TextConfig(
            **common, head_dim=16, sliding_window=SLIDING_WINDOW, query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=3, n_head=4, n_positions=64,
                             bos_token_id=1, eos_token_id=2)
    raise ValueError(family)


FAMILIES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "gpt2")


def make_tiny(family: str, directory: Path, seed: int = 0, max_shard_size: str | None = None):
    """Random model of `family` saved to `directory`; returns the torch model (eval mode)."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="eager")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1.0 if ("embed" in name or "wte" in name or "wpe" in name) else 0.15
            if p.ndim == 1 and ("norm" in name or "ln_" in name) and "bias" not in name:
                # Around the identity: 1 + noise for plain norms, noise for Gemma's (1 + w).
                base = 0.0 if family.startswith("gemma") else 1.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
    model.eval()
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kw)
    return model


def torch_logits(model, tokens: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        kw = {}
        if attention_mask is not None:
            kw["attention_mask"] = torch.tensor(attention_mask)
        out = model(torch.tensor(tokens), **kw)
    return out.logits.float().numpy()
