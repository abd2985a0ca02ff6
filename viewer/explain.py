"""Features explained by the model itself, in the spirit of Patchscopes (Ghandeharioun et al.,
2024) and SelfIE (Chen et al., 2024): no external service, no labeller model.

The model reads a prompt of placeholders followed by a request to describe them (SelfIE's
"? ? ? ? ?\\nThe meaning of the above is"). We add the feature's decoder direction (its total
write to the residual stream, summed over the layers it writes, as for its output tokens),
unit-normed and scaled to `scale` times the residual's own norm there, to the residual stream at
every placeholder, after block `at_layer` (an early one: the later blocks must carry it to the
last position; by default the feature's own layer, which for late features leaves no block to do
so), and let the model continue greedily for a few tokens. On SmolLM2-135M an identity prompt
("cat -> cat\\n...\\n? ->", Patchscopes) made the model copy the examples ("hello", "1135")
whatever the direction, so the default is SelfIE's. What it says is a
guess at what the direction means to the rest of the model, to be read beside the feature's
top activations and output tokens (a 135M-parameter model is a weak explainer: see the issue's
report on how often these help).

Features are explained in batches; each batch runs the same prompt with one direction per
sequence (its layer read per sequence), recomputing the whole prompt at every new token so one
compilation serves every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from clt.configs import ConfigError
from clt.lm.model import MLPHook, forward
from clt.progress import progress_bar
from clt.transcoder import TranscoderConfig, TranscoderParams

EXPLAIN_PROMPT = "? ? ? ? ?\nThe meaning of the above is"


@dataclass(frozen=True)
class _Inject(MLPHook):
    """Adds each sequence's direction at `pos` after the block of its layer: hook_params =
    (directions [batch, d_model] unit-normed, layers [batch], scale)."""

    pos: tuple[int, ...]

    def apply(self, hook_params, layer, resid_mid, mlp_in, state, true_mlp):
        dirs, layers, scale = hook_params
        out = true_mlp(mlp_in)
        here = (layers == layer)[:, None, None]
        p = jnp.asarray(self.pos)
        norm = jnp.linalg.norm(resid_mid[:, p] + out[:, p], axis=-1, keepdims=True)
        add = jnp.where(here, scale * norm * dirs[:, None], 0.0).astype(out.dtype)
        return out.at[:, p].add(add), state


@partial(jax.jit, static_argnames=("cfg", "hook"))
def _next_tokens(params, tokens, n, hook_params, *, cfg, hook):
    logits, _ = forward(params, cfg, tokens, mlp_hook=hook, hook_params=hook_params)
    return jnp.argmax(logits[:, n - 1], axis=-1)


def directions(tc_cfg: TranscoderConfig, tc_params: TranscoderParams, layers, features):
    """Unit-normed total decoder writes of the given features (model layers): [n, d_model]
    float32."""
    out = []
    for s, f in zip(layers, features):
        d = np.asarray(tc_params.W_dec[tc_cfg.layer_index(int(s))][int(f)], np.float32).sum(0)
        out.append(d / max(float(np.linalg.norm(d)), 1e-12))
    return np.stack(out) if out else np.zeros((0, tc_cfg.d_model), np.float32)


def explain(model, tc_cfg: TranscoderConfig, tc_params: TranscoderParams, layers, features, *,
            n_tokens: int = 6, scale: float = 2.0, batch_size: int = 32,
            prompt: str = EXPLAIN_PROMPT, placeholder: str = "?", at_layer: int | None = None,
            progress: bool = False) -> list[str]:
    """The model's continuation of `prompt` for each feature (up to the first newline), its
    direction added after block `at_layer` (None: the feature's own layer)."""
    tok = model.tokenizer
    if tok is None:
        raise ConfigError("self-explanation needs the model's tokenizer")
    ids = tok.encode(prompt)
    marks = [i for i, t in enumerate(ids) if tok.decode([t]).strip() == placeholder]
    if not marks:
        raise ConfigError(f"the explanation prompt {prompt!r} has no {placeholder!r} token to "
                          "add the direction at (its tokens: "
                          f"{' '.join(repr(t) for t in tok.token_strings(ids))})")
    hook = _Inject(tuple(marks))
    dirs = directions(tc_cfg, tc_params, layers, features)
    layers = np.asarray(layers, np.int32) if at_layer is None else \
        np.full(len(dirs), at_layer, np.int32)
    n0, total = len(ids), len(ids) + n_tokens
    out: list[str] = []
    with progress_bar(progress) as bar:
        task = bar.add_task("self-explanations", total=len(dirs))
        for i in range(0, len(dirs), batch_size):
            d, lay = dirs[i:i + batch_size], layers[i:i + batch_size]
            B = len(d)
            pad = batch_size - B  # fixed shapes: one compilation
            d = np.concatenate([d, np.zeros((pad, d.shape[1]), np.float32)])
            lay = np.concatenate([lay, np.full(pad, -1, np.int32)])
            buf = np.zeros((batch_size, total), np.int32)
            buf[:, :n0] = ids
            hp = (jnp.asarray(d), jnp.asarray(lay), jnp.float32(scale))
            for n in range(n0, total):
                buf[:, n] = np.asarray(_next_tokens(model.params, jnp.asarray(buf), n, hp,
                                                    cfg=model.cfg, hook=hook))
            for row in buf[:B, n0:]:
                text = tok.decode([int(t) for t in row], skip_special=True)
                out.append(text.split("\n")[0].strip())
            bar.advance(task, B)
    return out


__all__ = ["EXPLAIN_PROMPT", "directions", "explain"]
