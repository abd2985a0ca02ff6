"""GGUF files (llama.cpp): metadata -> ModelConfig, dequantized tensors -> canonical names.

Tensors are dequantized with the `gguf` package. Two llama.cpp storage conventions are undone here:
llama-arch q/k weights are permuted for llama.cpp's interleaved RoPE (we un-permute them to the
rotate-half layout), and Gemma norm weights are stored as 1 + w (we subtract 1, as our config adds
`norm_offset`). The tokenizer is rebuilt from the file's metadata by `clt.lm.tokenizer`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from clt.configs import ConfigError
from clt.lm.config import ModelConfig
from clt.lm.hf import config_from_hf, family_of

# GGUF metadata key (after the architecture prefix) -> Hugging Face config key.
_KEYS = {
    "context_length": "max_position_embeddings", "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size", "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim", "rope.freq_base": "rope_theta",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps", "attention.sliding_window": "sliding_window",
    "attn_logit_softcapping": "attn_logit_softcapping",
    "final_logit_softcapping": "final_logit_softcapping",
}
# What the file leaves out and the reference implementation assumes (transformers' config defaults).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma2": {"query_pre_attn_scalar": 256, "layer_period": 2},
    "gemma3": {"query_pre_attn_scalar": 256, "layer_period": 6, "rope_local_base_freq": 10000.0},
}
_TENSORS = {
    "attn_norm.weight": "attn_norm_w", "attn_q.weight": "q", "attn_k.weight": "k",
    "attn_v.weight": "v", "attn_output.weight": "o", "attn_q.bias": "q_bias",
    "attn_k.bias": "k_bias", "attn_v.bias": "v_bias", "attn_q_norm.weight": "q_norm_w",
    "attn_k_norm.weight": "k_norm_w", "post_attention_norm.weight": "post_attn_norm_w",
    "ffn_norm.weight": "mlp_norm_w", "ffn_gate.weight": "gate", "ffn_up.weight": "up",
    "ffn_down.weight": "down", "post_ffw_norm.weight": "post_mlp_norm_w",
}


def _reader(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:
        raise ConfigError(f"cannot read GGUF file {path}: {e}") from None


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def config_from_gguf(reader, name: str) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch is None:
        raise ConfigError("GGUF file has no general.architecture")
    family_of(arch)  # raises a clear error for unsupported architectures
    raw: dict[str, Any] = {"model_type": arch}
    for key, hf_key in _KEYS.items():
        v = _field(reader, f"{arch}.{key}")
        if v is not None:
            raw[hf_key] = v
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    raw["vocab_size"] = _field(reader, f"{arch}.vocab_size") or (len(tokens.data) if tokens else 0)
    defaults = dict(_DEFAULTS.get(arch, {}))
    period = defaults.pop("layer_period", None)
    raw.update({k: v for k, v in defaults.items() if k not in raw})
    if period and raw.get("sliding_window"):
        raw["layer_types"] = ["full_attention" if (i + 1) % period == 0 else "sliding_attention"
                              for i in range(raw["num_hidden_layers"])]
    raw["tie_word_embeddings"] = all(t.name != "output.weight" for t in reader.tensors)
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    eot = _field(reader, "tokenizer.ggml.eot_token_id")
    raw["bos_token_id"] = bos
    raw["eos_token_id"] = [t for t in dict.fromkeys((eos, eot)) if t is not None]
    return config_from_hf(raw, name=name)


def read_gguf(path: str | Path, name: str | None = None,
              progress: Callable[[int, int], None] | None = None
              ) -> tuple[ModelConfig, dict[str, np.ndarray], Any]:
    """(config, canonical float32 tensors, reader) of a GGUF file."""
    from gguf.quants import dequantize

    path = Path(path)
    reader = _reader(path)
    cfg = config_from_gguf(reader, name or path.stem)
    arch = _field(reader, "general.architecture")
    out: dict[str, np.ndarray] = {}
    n = len(reader.tensors)
    for i, t in enumerate(reader.tensors):
        if progress:
            progress(i, n)
        cname = _canonical(t.name)
        if cname is None:
            continue
        arr = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        arr = arr.reshape(tuple(int(s) for s in reversed(t.shape)))
        short = cname.rsplit(".", 1)[-1]
        if arch == "llama" and short in ("q", "k"):
            arr = _unpermute(arr, cfg.n_heads if short == "q" else cfg.n_kv_heads)
        if cfg.norm_offset and short.endswith("norm_w"):
            arr = arr - cfg.norm_offset
        out[cname] = arr
    return cfg, out, reader


def _canonical(name: str) -> str | None:
    top = {"token_embd.weight": "embed", "output_norm.weight": "final_norm_w",
           "output.weight": "unembed"}
    if name in top:
        return top[name]
    if not name.startswith("blk."):
        return None
    _, i, rest = name.split(".", 2)
    short = _TENSORS.get(rest)
    return None if short is None else f"layers.{i}.{short}"


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of each head's rotary pairs (rows of q/k weights)."""
    rows = w.shape[0]
    heads = w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
    return heads.swapaxes(1, 2).reshape(w.shape)
