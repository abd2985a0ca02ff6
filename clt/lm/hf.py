"""Hugging Face checkpoints: `config.json` -> ModelConfig, safetensors names -> canonical names.

This is the one place that reads Hugging Face's `model_type`: it translates a foreign format into
our config fields. The forward pass never sees a family name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from clt.configs import ConfigError
from clt.lm.config import ModelConfig

# Field values that distinguish the families; everything else is read from config.json.
FAMILY_FIELDS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "qwen2": {"qkv_bias": True},
    "qwen3": {"qk_norm": True},
    "gemma": {"norm_offset": 1.0, "activation": "gelu_tanh", "embed_scale": None},
    "gemma2": {"norm_offset": 1.0, "activation": "gelu_tanh", "embed_scale": None,
               "post_attn_norm": True, "post_mlp_norm": True},
    "gemma3": {"norm_offset": 1.0, "activation": "gelu_tanh", "embed_scale": None,
               "post_attn_norm": True, "post_mlp_norm": True, "qk_norm": True},
    "gpt2": {"norm": "layernorm", "qkv_bias": True, "out_bias": True, "mlp_bias": True,
             "mlp": "plain", "activation": "gelu_tanh", "positional": "learned"},
}
FAMILY_ALIASES = {"gemma3_text": "gemma3", "smollm": "llama", "smollm2": "llama"}
SUPPORTED = sorted(FAMILY_FIELDS)

_ACT = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
        "gelu_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def family_of(model_type: str) -> str:
    fam = FAMILY_ALIASES.get(model_type, model_type)
    if fam not in FAMILY_FIELDS:
        raise ConfigError(
            f"unsupported architecture '{model_type}'; supported: {', '.join(SUPPORTED)}")
    return fam


def _text_config(raw: dict) -> dict:
    # Multimodal Gemma-3 checkpoints nest the language model's config.
    return raw.get("text_config", raw) if raw.get("model_type") == "gemma3" and \
        "text_config" in raw else raw


def config_from_hf(raw: dict, name: str = "model") -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict."""
    raw = _text_config(raw)
    model_type = raw.get("model_type")
    if model_type is None:
        raise ConfigError("config.json has no 'model_type'; is this a transformers checkpoint?")
    fam = family_of(model_type)
    f = dict(FAMILY_FIELDS[fam])
    if fam == "gpt2":
        d = raw.get("n_embd", 768)
        heads = raw.get("n_head", 12)
        f.update(vocab_size=raw["vocab_size"], d_model=d, n_layers=raw["n_layer"], n_heads=heads,
                 n_kv_heads=heads, head_dim=d // heads, d_mlp=raw.get("n_inner") or 4 * d,
                 max_position=raw.get("n_positions", 1024),
                 norm_eps=raw.get("layer_norm_epsilon", 1e-5),
                 activation=_ACT[raw.get("activation_function", "gelu_new")])
        if raw.get("scale_attn_by_inverse_layer_idx") or not raw.get("scale_attn_weights", True):
            raise ConfigError("GPT-2 variants with non-default attention scaling are not supported")
    else:
        d, heads = raw["hidden_size"], raw["num_attention_heads"]
        f.update(vocab_size=raw["vocab_size"], d_model=d, n_layers=raw["num_hidden_layers"],
                 n_heads=heads, n_kv_heads=raw.get("num_key_value_heads") or heads,
                 head_dim=raw.get("head_dim") or d // heads, d_mlp=raw["intermediate_size"],
                 max_position=raw.get("max_position_embeddings", 2048),
                 norm_eps=raw.get("rms_norm_eps", 1e-6))
        act = (raw.get("hidden_activation") or raw.get("hidden_act")
               or f.get("activation", "silu"))
        if act not in _ACT:
            raise ConfigError(f"unsupported MLP activation '{act}'")
        f["activation"] = _ACT[act]
        if raw.get("attention_bias"):
            f["qkv_bias"] = True
            f["out_bias"] = fam not in ("qwen2",)  # Qwen2's o_proj never has a bias
        if raw.get("mlp_bias"):
            f["mlp_bias"] = True
        if f.get("embed_scale", 1.0) is None:
            f["embed_scale"] = float(d) ** 0.5
        if "query_pre_attn_scalar" in raw:
            f["attn_scale"] = float(raw["query_pre_attn_scalar"]) ** -0.5
        f["attn_softcap"] = raw.get("attn_logit_softcapping")
        f["final_softcap"] = raw.get("final_logit_softcapping")
        f.update(_rope_fields(raw))
        types = raw.get("layer_types")
        if types:
            f["layer_types"] = tuple("sliding" if t == "sliding_attention" else "full"
                                     for t in types)
            if "sliding" in f["layer_types"]:
                f["sliding_window"] = raw.get("sliding_window")
    f["tie_embeddings"] = bool(raw.get("tie_word_embeddings", fam in ("gemma", "gemma2", "gemma3",
                                                                        "gpt2")))
    f["bos_token_id"] = raw.get("bos_token_id")
    eos = raw.get("eos_token_id")
    f["eos_token_ids"] = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    return ModelConfig(name=name, **{k: v for k, v in f.items() if v is not None})


def _rope_fields(raw: dict) -> dict:
    params = raw.get("rope_parameters") or {}
    legacy = raw.get("rope_scaling") or {}
    if "full_attention" in params:  # per layer type (Gemma-3)
        glob, local = params["full_attention"], params.get("sliding_attention", {})
    else:
        glob, local = params, {}
    out: dict[str, Any] = {
        "rope_theta": glob.get("rope_theta", raw.get("rope_theta", 10000.0)),
    }
    if local.get("rope_theta") is not None:
        out["rope_theta_local"] = local["rope_theta"]
    elif raw.get("rope_local_base_freq") is not None:
        out["rope_theta_local"] = raw["rope_local_base_freq"]
    kind = glob.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    src = glob if glob.get("rope_type") not in (None, "default") else (legacy or glob)
    if kind == "linear":
        out.update(rope_scaling="linear", rope_factor=src["factor"])
    elif kind == "llama3":
        out.update(rope_scaling="llama3", rope_factor=src["factor"],
                   rope_low_freq_factor=src["low_freq_factor"],
                   rope_high_freq_factor=src["high_freq_factor"],
                   rope_original_max_position=src["original_max_position_embeddings"])
    elif kind != "default":
        raise ConfigError(f"unsupported RoPE scaling '{kind}' (supported: default, linear, llama3)")
    return out


# --- tensor names ------------------------------------------------------------------------------
_LLAMA_LIKE = {
    "self_attn.q_proj.weight": "q", "self_attn.k_proj.weight": "k", "self_attn.v_proj.weight": "v",
    "self_attn.o_proj.weight": "o", "self_attn.q_proj.bias": "q_bias",
    "self_attn.k_proj.bias": "k_bias", "self_attn.v_proj.bias": "v_bias",
    "self_attn.o_proj.bias": "o_bias", "self_attn.q_norm.weight": "q_norm_w",
    "self_attn.k_norm.weight": "k_norm_w", "input_layernorm.weight": "attn_norm_w",
    "mlp.gate_proj.weight": "gate", "mlp.up_proj.weight": "up", "mlp.down_proj.weight": "down",
    "mlp.up_proj.bias": "up_bias", "mlp.down_proj.bias": "down_bias",
    "pre_feedforward_layernorm.weight": "mlp_norm_w",
    "post_feedforward_layernorm.weight": "post_mlp_norm_w",
}


def canonical_name(cfg: ModelConfig, hf_name: str) -> str | None:
    """Canonical tensor name for a Hugging Face one (None: not a weight we use)."""
    name = hf_name
    for prefix in ("model.language_model.", "language_model.model.", "language_model.",
                   "model.", "transformer."):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    if cfg.positional == "learned":  # GPT-2 layout
        return _gpt2_name(name)
    top = {"embed_tokens.weight": "embed", "norm.weight": "final_norm_w",
           "lm_head.weight": "unembed"}
    if hf_name == "lm_head.weight" or name in top:
        return top.get(name, "unembed")
    if not name.startswith("layers."):
        return None
    _, i, rest = name.split(".", 2)
    if rest == "post_attention_layernorm.weight":
        # Gemma's sandwich norm vs Llama's pre-MLP norm share this name.
        return f"layers.{i}." + ("post_attn_norm_w" if cfg.post_attn_norm else "mlp_norm_w")
    short = _LLAMA_LIKE.get(rest)
    return None if short is None else f"layers.{i}.{short}"


_GPT2 = {"ln_1.weight": "attn_norm_w", "ln_1.bias": "attn_norm_b", "attn.c_proj.weight": "o",
         "attn.c_proj.bias": "o_bias", "ln_2.weight": "mlp_norm_w", "ln_2.bias": "mlp_norm_b",
         "mlp.c_fc.weight": "up", "mlp.c_fc.bias": "up_bias", "mlp.c_proj.weight": "down",
         "mlp.c_proj.bias": "down_bias", "attn.c_attn.weight": "qkv", "attn.c_attn.bias": "qkv_bias"}


def _gpt2_name(name: str) -> str | None:
    top = {"wte.weight": "embed", "wpe.weight": "pos_embed", "ln_f.weight": "final_norm_w",
           "ln_f.bias": "final_norm_b"}
    if name in top:
        return top[name]
    if not name.startswith("h."):
        return None
    _, i, rest = name.split(".", 2)
    short = _GPT2.get(rest)
    return None if short is None else f"layers.{i}.{short}"


def canonical_tensors(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename (and for GPT-2, split and transpose) Hugging Face tensors to canonical ones."""
    out: dict[str, np.ndarray] = {}
    for hf_name, arr in tensors.items():
        name = canonical_name(cfg, hf_name)
        if name is None:
            continue
        if cfg.positional == "learned":
            arr = _gpt2_fix(name, arr, out)
            if arr is None:
                continue
        out[name] = arr
    return out


def _gpt2_fix(name: str, arr: np.ndarray, out: dict) -> np.ndarray | None:
    """GPT-2 uses Conv1D ([in, out]) and a fused qkv; convert to canonical [out, in] pieces."""
    short = name.rsplit(".", 1)[-1]
    prefix = name[: -len(short)]
    if short == "qkv":
        for part, w in zip(("q", "k", "v"), np.split(arr, 3, axis=1)):
            out[prefix + part] = np.ascontiguousarray(w.T)
        return None
    if short == "qkv_bias":
        for part, b in zip(("q_bias", "k_bias", "v_bias"), np.split(arr, 3)):
            out[prefix + part] = b
        return None
    if short in ("o", "up", "down"):
        return np.ascontiguousarray(arr.T)
    return arr


def read_safetensors_dir(path: Path, progress: Callable[[str], None] | None = None
                         ) -> dict[str, np.ndarray]:
    """All tensors of a (possibly sharded) safetensors checkpoint as float32 numpy arrays."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{path} has no *.safetensors weights (only safetensors are supported)")
    out: dict[str, np.ndarray] = {}
    for fname in files:
        if progress:
            progress(fname)
        try:
            with safe_open(str(path / fname), framework="flax") as f:
                for key in f.keys():
                    out[key] = _to_f32(f, key)
        except Exception as e:  # corrupt or truncated shard
            raise ConfigError(f"cannot read {path / fname}: {e}") from None
    return out


def _to_f32(f, key: str) -> np.ndarray:
    # Through jax: numpy has no bfloat16, the usual dtype of released checkpoints.
    return np.asarray(f.get_tensor(key).astype("float32"))
