"""Model configuration: one frozen dataclass that describes every supported decoder-only family.

Llama-3.x / SmolLM2, Qwen2, Qwen3, Gemma-2, Gemma-3 and GPT-2 differ only in the values of these
fields (norm type and placement, biases, gating, positions, soft-capping, sliding windows). The
forward pass in `clt.lm.model` reads fields, never model names. Conversions from Hugging Face
`config.json` and from GGUF metadata live in `clt.lm.hf` and `clt.lm.gguf_io`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Literal

from clt.configs import ConfigError, doc, from_dict, to_dict

LayerType = Literal["full", "sliding"]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer (no weights, no device or dtype choices)."""

    vocab_size: int = doc("Number of token embeddings / logits.")
    d_model: int = doc("Width of the residual stream.")
    n_layers: int = doc("Number of transformer blocks.")
    n_heads: int = doc("Query heads per attention layer.")
    n_kv_heads: int = doc("Key/value heads (grouped-query attention when < n_heads).")
    head_dim: int = doc("Width of one attention head.")
    d_mlp: int = doc("Hidden width of the MLP.")
    max_position: int = doc("Longest context the model supports (positions or RoPE training length).")
    name: str = doc("Human-readable name, informational only.", default="model")
    norm: Literal["rmsnorm", "layernorm"] = doc(
        "RMSNorm (x / rms(x)) or LayerNorm ((x - mean) / std, with bias).", default="rmsnorm"
    )
    norm_eps: float = doc("Epsilon added to the mean square / variance.", default=1e-6)
    norm_offset: float = doc(
        "Added to norm weights before use: 1.0 for Gemma's (1 + w) norms, else 0.", default=0.0
    )
    post_attn_norm: bool = doc(
        "Norm the attention output before adding it to the residual (Gemma-2/3).", default=False
    )
    post_mlp_norm: bool = doc(
        "Norm the MLP output before adding it to the residual (Gemma-2/3).", default=False
    )
    qk_norm: bool = doc("RMSNorm over head_dim on queries and keys (Qwen3, Gemma-3).", default=False)
    qkv_bias: bool = doc("Biases on the q/k/v projections (Qwen2, GPT-2).", default=False)
    out_bias: bool = doc("Bias on the attention output projection (GPT-2).", default=False)
    mlp_bias: bool = doc("Biases in the MLP projections (GPT-2).", default=False)
    mlp: Literal["gated", "plain"] = doc(
        "'gated': down(act(gate(x)) * up(x)); 'plain': down(act(up(x))).", default="gated"
    )
    activation: Literal["silu", "gelu_tanh", "gelu", "relu"] = doc(
        "MLP nonlinearity (gelu_tanh is GPT-2's gelu_new and Gemma's gelu_pytorch_tanh).",
        default="silu",
    )
    positional: Literal["rope", "learned"] = doc(
        "Rotary embeddings on q/k, or a learned position table added to the embeddings.",
        default="rope",
    )
    rope_theta: float = doc("RoPE base for full-attention layers.", default=10000.0)
    rope_theta_local: float | None = doc(
        "RoPE base for sliding-window layers (Gemma-3: 1e4); None means rope_theta.", default=None
    )
    rope_scaling: Literal["none", "linear", "llama3"] = doc(
        "Frequency scaling of full-attention layers' RoPE (Llama-3.1+ 'llama3', Gemma-3 'linear').",
        default="none",
    )
    rope_factor: float = doc("Scaling factor for rope_scaling.", default=1.0)
    rope_low_freq_factor: float = doc("Llama-3 RoPE scaling: low frequency factor.", default=1.0)
    rope_high_freq_factor: float = doc("Llama-3 RoPE scaling: high frequency factor.", default=4.0)
    rope_original_max_position: int = doc(
        "Llama-3 RoPE scaling: context length before scaling.", default=8192
    )
    embed_scale: float = doc(
        "Multiplier on token embeddings (Gemma: sqrt(d_model)); 1.0 elsewhere.", default=1.0
    )
    attn_scale: float | None = doc(
        "Multiplier on q.k scores; None means head_dim**-0.5 (Gemma: query_pre_attn_scalar**-0.5).",
        default=None,
    )
    attn_softcap: float | None = doc(
        "Soft-cap attention scores to cap*tanh(s/cap) (Gemma-2).", default=None
    )
    final_softcap: float | None = doc("Soft-cap the logits likewise (Gemma-2).", default=None)
    sliding_window: int | None = doc(
        "Window of sliding-attention layers: query i sees keys j with i - j < window.", default=None
    )
    layer_types: tuple[LayerType, ...] = doc(
        "Per layer 'full' or 'sliding' attention; empty means all full.", default=()
    )
    tie_embeddings: bool = doc("Unembedding is the transposed token embedding.", default=True)
    bos_token_id: int | None = doc("Beginning-of-sequence token, prepended when tracing.", default=None)
    eos_token_ids: tuple[int, ...] = doc("Tokens that end generation.", default=())
    schema_version: int = doc("Version of this config's JSON layout.", default=1)

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "d_mlp", "max_position"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.layer_types and len(self.layer_types) != self.n_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers"
            )
        if "sliding" in self.layer_types and not self.sliding_window:
            raise ConfigError("sliding layers need a positive sliding_window")
        if self.head_dim % 2 and self.positional == "rope":
            raise ConfigError("RoPE needs an even head_dim")
        if self.norm == "layernorm" and self.norm_offset:
            raise ConfigError("norm_offset applies to RMSNorm only")

    # --- derived, read by the forward pass -------------------------------------------------------
    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        types = self.layer_types or ("full",) * self.n_layers
        return tuple(t == "sliding" for t in types)

    @property
    def n_params(self) -> int:
        d, L = self.d_model, self.n_layers
        attn = d * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = d * self.d_mlp * (3 if self.mlp == "gated" else 2)
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return L * (attn + mlp) + emb

    # --- serialisation ---------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(to_dict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return from_dict(cls, json.loads(text))

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


__all__ = ["LayerType", "ModelConfig", "known_config"]


def known_config(name: str) -> ModelConfig:
    """Config of an embedded model without reading its weights (shape checks, benchmarks)."""
    from pathlib import Path

    path = Path(__file__).with_name("known") / f"{name}.json"
    if not path.exists():
        known = sorted(p.stem for p in path.parent.glob("*.json"))
        raise ConfigError(f"no stored config for '{name}'; known: {', '.join(known)}")
    return ModelConfig.from_json(path.read_text())
