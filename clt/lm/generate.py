"""Text generation with a KV cache: greedy or temperature / top-k sampling."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from clt.configs import ConfigError, doc
from clt.lm.loading import LoadedModel
from clt.lm.model import InputError, forward_cached, init_cache


@dataclass(frozen=True)
class GenerateConfig:
    """How `cltrace generate` continues a prompt."""

    prompt: str = doc("Text to continue.")
    model: str = doc("Embedded name, .gguf file, Hugging Face directory or hub id.",
                     default="smollm2-135m")
    max_new_tokens: int = doc("Tokens to generate at most.", default=32)
    temperature: float = doc("0 for greedy decoding; otherwise sample from softmax(logits/T).",
                             default=0.0)
    top_k: int = doc("Sample only among the k most probable tokens (0: all).", default=0)
    seed: int = doc("PRNG seed for sampling.", default=0)
    chat: bool = doc("Wrap the prompt as a user message with the model's chat template.",
                     default=False)
    show_top: int = doc("Print the k most probable first next tokens.", default=5)
    stop_at_eos: bool = doc("Stop when the model emits an end-of-sequence token.", default=True)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"GenerateConfig.max_new_tokens must be at least 1, got "
                              f"{self.max_new_tokens}")
        if not 0 <= self.temperature < float("inf"):  # NaN fails this too
            raise ConfigError(f"GenerateConfig.temperature must be a finite number >= 0 (0: "
                              f"greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"GenerateConfig.top_k must be >= 0 (0: all), got {self.top_k}")
        if not 0 <= self.show_top <= 100:
            raise ConfigError(f"GenerateConfig.show_top must be in [0, 100], got "
                              f"{self.show_top}")
        if not self.prompt.strip():
            raise ConfigError("GenerateConfig.prompt is empty: give some text to continue")


@dataclass
class Generation:
    prompt_ids: list[int]
    new_ids: list[int]
    text: str
    first_top: list[tuple[str, float]]  # (token, probability) of the first next token


def _pick(logits, key, temperature: float, top_k: int):
    if temperature == 0:
        return jnp.argmax(logits, -1)
    scaled = logits / temperature
    if top_k:
        kth = jax.lax.top_k(scaled, top_k)[0][..., -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    return jax.random.categorical(key, scaled, -1)


def generate(model: LoadedModel, gc: GenerateConfig) -> Generation:
    tok, cfg = model.tokenizer, model.cfg
    if tok is None:
        raise ConfigError(f"model {model.source} has no tokenizer; cannot generate from text")
    text = gc.prompt
    if gc.chat:
        text = tok.apply_chat_template([{"role": "user", "content": gc.prompt}])
        ids = tok.encode(text, add_bos=False)
    else:
        ids = tok.encode(text)
    if not ids:
        raise InputError("the prompt is empty; give some text to continue")
    total = len(ids) + gc.max_new_tokens
    if total > cfg.max_position:
        raise InputError(f"prompt ({len(ids)} tokens) + max_new_tokens ({gc.max_new_tokens}) "
                         f"exceeds the model's context of {cfg.max_position}; shorten them")
    length = min(cfg.max_position, -(-total // 64) * 64)  # fewer distinct shapes to compile
    dtype = jax.tree.leaves(model.params)[0].dtype
    cache = init_cache(cfg, 1, length, dtype)
    key_mask = jnp.ones((1, length), bool)
    key = jax.random.key(gc.seed)
    logits, cache = forward_cached(model.params, cfg, jnp.asarray([ids]), 0, cache, key_mask)
    last = logits[0, -1]
    probs = np.asarray(jax.nn.softmax(last))
    top = np.argsort(-probs)[: gc.show_top]
    first_top = [(tok.decode([int(i)]), float(probs[i])) for i in top]
    new: list[int] = []
    eos = set(cfg.eos_token_ids) | set(tok.eos_token_ids)
    for step in range(gc.max_new_tokens):
        key, sub = jax.random.split(key)
        nxt = int(_pick(last, sub, gc.temperature, gc.top_k))
        new.append(nxt)
        if gc.stop_at_eos and nxt in eos:
            break
        if step == gc.max_new_tokens - 1:
            break
        logits, cache = forward_cached(model.params, cfg, jnp.asarray([[nxt]]), len(ids) + step,
                                       cache, key_mask)
        last = logits[0, -1]
    return Generation(ids, new, tok.decode(new, skip_special=True), first_top)
