"""Feature cards: what each transcoder feature responds to and what it promotes.

`scan` reads a corpus once through the model and the transcoder (both JAX) and keeps, for every
feature of every layer:

* its top-k activating tokens, each with a window of context and the feature's activation on
  every token of the window (for highlighting), as Neuronpedia's "top activations";
* a uniform random sample of its activating tokens (reservoir sampling by random priorities, so
  one pass suffices), sorted by activation: examples across its range, not only the extremes;
* its activation density (the fraction of tokens on which it fires).

`top_output_tokens` gives each feature's direct effect on the output vocabulary ("logit lens" of
the decoder, as on Neuronpedia's feature pages): the feature's total write to the residual stream
(its decoders summed over the layers it writes) through the final norm's weight (the norm's
per-token scale does not change a ranking) and the unembedding, top positive and negative.

Neurons (`neuron_cards`): with the MLP units of `attribution.neurons` in place of a transcoder,
the cards are over each unit's activation as a neuron graph's node has it (the hidden unit, times
a post-MLP norm's scale): top examples are its largest positive values (a gated unit is signed;
its negative side is not shown), its density the share of tokens where it is > 0, its output
tokens its W_out row's (the decoder of `neuron_transcoder`).

Cards are stored in one compressed `.npz` (`feature_cards.npz`, next to the transcoder): arrays
plus a JSON header with a schema version; no pickles. Arrays are [dictionary, feature, ...]; a
card is asked for by model layer (`FeatureCards.card(layer, feature)`), which for an SAE on some
layers only (`TranscoderConfig.layers`, recorded in the header) is found by its
`TranscoderConfig.layer_index`. Windows of activations are stored as uint8
fractions of the feature's maximum; contexts are stored once and referenced.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from attribution.intervene_cli import register_card_maxima
from attribution.neurons import is_neuron_config, neuron_factors, neuron_transcoder
from clt.configs import ConfigError, doc, to_dict
from clt.lm.model import forward
from clt.progress import progress_bar
from clt.transcoder import TranscoderConfig, TranscoderParams, activate
from viewer.explain import EXPLAIN_PROMPT

CARDS_SCHEMA_VERSION = 1
CARDS_FILE = "feature_cards.npz"
MAX_CARDS_BYTES = 4 * 2**30  # a 2.5M-feature CLT's cards are ~1 GiB


@dataclass(frozen=True)
class FeaturesConfig:
    """How to build feature cards; saved in the cards file's header."""

    transcoder: str = doc("Transcoder: a cltrace directory, a circuit-tracer layout directory, "
                          "or a Hugging Face repo in that layout.")
    model: str = doc("Model name or path (default: the model named in the transcoder's config).",
                     default="")
    data: str = doc("Text to scan: .txt/.jsonl files, a directory, globs, or hf:DATASET.",
                    default="data/corpus")
    out: str = doc(f"Output file (default: {CARDS_FILE} in the transcoder's directory).",
                   default="")
    n_contexts: int = doc("Contexts to scan (fewer if the text holds fewer).", default=1024)
    context_length: int = doc("Tokens per context, the BOS included.", default=64)
    batch_size: int = doc("Contexts per forward pass.", default=8)
    top_k: int = doc("Top activating examples kept per feature.", default=8)
    n_samples: int = doc("Random activating examples kept per feature (sorted by activation: "
                         "samples across the activation range).", default=4)
    window: int = doc("Tokens of context shown per example.", default=16)
    n_output_tokens: int = doc("Top positive and negative output tokens per feature.", default=8)
    text_field: str = doc("Field holding the text in .jsonl files and datasets.", default="text")
    seed: int = doc("Seed of the context order and of the random samples.", default=0)
    explain: bool = doc(
        "Also let the model explain features itself (Patchscopes / SelfIE style, "
        "`viewer.explain`): the features of --explain-graph first, then random ones, at most "
        "--explain-max.", default=False)
    explain_graph: str = doc("A graph.npz whose pruned graph's features are explained first, "
                             "most influential first.", default="")
    explain_max: int = doc("At most this many features explained.", default=256)
    explain_layer: int = doc("Layer after which the feature's direction is added at the "
                             "placeholder.", default=2)
    explain_scale: float = doc("The direction's size, in units of the residual's own norm there.",
                               default=2.0)
    explain_tokens: int = doc("Tokens the model writes per explanation.", default=8)
    explain_prompt: str = doc(
        "The prompt the model continues; the direction is added at each of its placeholder "
        "tokens (SelfIE's, by default).", default=EXPLAIN_PROMPT)
    explain_placeholder: str = doc("The placeholder token of the prompt.", default="?")
    schema_version: int = doc("Version of this config's JSON layout.", default=1)

    def __post_init__(self):
        """Every field's range, before anything loads: the CLI, config files and the Python API
        refuse the same values with the same one-line message."""
        c = "FeaturesConfig"

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(f"{c}.{message}")

        for name in ("transcoder", "data", "text_field", "explain_prompt",
                     "explain_placeholder"):
            value = getattr(self, name)
            need(isinstance(value, str) and value.strip() != "",
                 f"{name} must be a non-empty string, got {value!r}")
        # context_length >= 2: the BOS plus at least one token of text (a context of the BOS
        # alone holds no text, and packing text into it never ends).
        lows = {"n_contexts": 1, "context_length": 2, "batch_size": 1, "top_k": 1,
                "n_samples": 1, "window": 1, "n_output_tokens": 1, "explain_max": 0,
                "explain_layer": 0, "explain_tokens": 1, "seed": 0}
        for name, low in lows.items():
            value = getattr(self, name)
            need(value >= low, f"{name} must be >= {low}, got {value!r}")
        need(self.seed < 2**32, f"seed must be in 0..{2**32 - 1}, got {self.seed}")
        need(self.window <= self.context_length,
             f"window must be in 1..context_length ({self.context_length}), got {self.window}")
        tokens = self.batch_size * self.context_length  # tokens per scan step: the k candidates
        for name in ("top_k", "n_samples"):
            need(getattr(self, name) <= tokens,
                 f"{name} must be in 1..batch_size x context_length ({tokens}), got "
                 f"{getattr(self, name)}")
        need(math.isfinite(self.explain_scale) and self.explain_scale > 0,
             f"explain_scale must be a finite number > 0, got {self.explain_scale!r}")
        need(not self.explain_graph or self.explain,
             "explain_graph needs --explain")
        need(self.schema_version == 1,
             f"schema_version must be 1 (this version's layout), got {self.schema_version!r}")


# --- the scan ------------------------------------------------------------------------------------
_KEYS = ("top_act", "top_ctx", "top_pos", "top_win", "smp_prio", "smp_act", "smp_ctx", "smp_pos",
         "smp_win", "count")


def _init_state(L: int, F: int, k: int, q: int, W: int) -> dict:
    def z(*s, dt=jnp.int32):
        return jnp.zeros((L, F) + s, dt)

    return {"top_act": jnp.full((L, F, k), -1.0), "top_ctx": z(k), "top_pos": z(k),
            "top_win": z(k, W, dt=jnp.float16), "smp_prio": jnp.full((L, F, q), -2.0),
            "smp_act": z(q, dt=jnp.float32), "smp_ctx": z(q), "smp_pos": z(q),
            "smp_win": z(q, W, dt=jnp.float16), "count": jnp.zeros((L, F), jnp.int32)}


def _merge(old: dict, new: dict, by: str, k: int) -> dict:
    """Keep the k entries with the largest `by` among the old and the new ones."""
    cat = {name: jnp.concatenate([old[name], new[name]], axis=1) for name in old}
    _, sel = jax.lax.top_k(cat[by], k)
    return {name: jnp.take_along_axis(v, sel.reshape(sel.shape + (1,) * (v.ndim - 2)), axis=1)
            for name, v in cat.items()}


def _candidates(a, key_values, n: int, ctx_base, W: int, before: int):
    """The n tokens with the largest key per feature, with their windows of activations.

    a: [batch, pos, feature] activations of one layer; key_values: [feature, batch * pos]."""
    _, T, F = a.shape
    vals, idx = jax.lax.top_k(key_values, n)  # [F, n]
    b, t = idx // T, idx % T
    start = jnp.clip(t - before, 0, T - W)
    f = jnp.arange(F)[:, None, None]
    win = a[b[..., None], start[..., None] + jnp.arange(W), f]  # [F, n, W]
    act = a[b, t, jnp.arange(F)[:, None]]
    return vals, {"act": act, "ctx": (ctx_base + b).astype(jnp.int32), "pos": t.astype(jnp.int32),
                  "win": win.astype(jnp.float16)}


@partial(jax.jit, static_argnames=("cfg", "tc_cfg", "W", "before", "k", "q", "drop_first"),
         donate_argnames=("state",))
def _scan_step(params, tc_params, tokens, valid, state, key, ctx_base, *, cfg, tc_cfg, W: int,
               before: int, k: int, q: int, drop_first: bool):
    """Fold one batch of contexts [batch, pos] into the running statistics of every layer."""
    neurons = is_neuron_config(tc_cfg)
    post = ("post_mlp_norm_scale",) if neurons and cfg.post_mlp_norm else ()
    _, cap = forward(params, cfg, tokens, capture=(tc_cfg.input_point,) + post)
    x = getattr(cap, tc_cfg.input_point)  # [layer, batch, pos, d_model]
    if tc_cfg.layers:  # an SAE on some layers: theirs, in the order of its dictionaries
        x = x[jnp.asarray(tc_cfg.layers)]
    B, T = tokens.shape
    if neurons:  # the MLP's hidden units themselves: [layer, batch, pos, d_mlp]
        x = _neuron_acts(params, cfg, x, cap.post_mlp_norm_scale if post else None)
    mask = valid[:, None].astype(x.dtype) * jnp.ones((1, T), x.dtype)
    if drop_first:  # the BOS position is an attention sink, not text: its activations mislead
        mask = mask.at[:, 0].set(0)

    def one_layer(_, xs):  # a scan over layers: compiled once, whatever the depth
        x_l, W_enc, b_enc, log_th, old, layer = xs
        if neurons:
            a = x_l.astype(jnp.float32)
        else:
            z = x_l @ W_enc.astype(x.dtype) + b_enc
            one = dataclasses.replace(tc_params, log_threshold=log_th[None])
            a = activate(tc_cfg, one, z[..., None, :])[..., 0, :].astype(jnp.float32)
        a = a * mask[..., None]
        flat = a.reshape(B * T, -1).T  # [feature, tokens]
        # Masked tokens (padding, BOS) never rank: a signed activation (a neuron's) would rank
        # their zeros above its negative values, and padding points past the contexts.
        key_top = jnp.where(mask.reshape(1, B * T) > 0, flat, -jnp.inf)
        vals, top = _candidates(a, key_top, k, ctx_base, W, before)
        merged = _merge({"act": old["top_act"], "ctx": old["top_ctx"], "pos": old["top_pos"],
                         "win": old["top_win"]}, {**top, "act": vals}, "act", k)
        prio = jnp.where(flat > 0, jax.random.uniform(jax.random.fold_in(key, layer), flat.shape),
                         -1.0)
        pv, smp = _candidates(a, prio, q, ctx_base, W, before)
        sampled = _merge({"prio": old["smp_prio"], "act": old["smp_act"], "ctx": old["smp_ctx"],
                          "pos": old["smp_pos"], "win": old["smp_win"]}, {**smp, "prio": pv},
                         "prio", q)
        new = {"top_" + n: v for n, v in merged.items()}
        new.update({"smp_" + n: v for n, v in sampled.items()})
        new["count"] = old["count"] + (flat > 0).sum(axis=1, dtype=jnp.int32)
        return None, {name: new[name] for name in old}

    # Each layer's samples drawn with a key of its model layer: an SAE on some layers samples
    # as the all-layer one does there.
    xs = (x, tc_params.W_enc, tc_params.b_enc, tc_params.log_threshold, state,
          jnp.asarray(tc_cfg.model_layers))
    return jax.lax.scan(one_layer, None, xs)[1]


def _neuron_acts(params, cfg, mlp_in, post_scale):
    """Every MLP unit's activation as a neuron graph's node has it (`attribution.neurons`: the
    hidden unit, times a post-MLP norm's scale), [layer, batch, pos, d_mlp], from the MLP input
    [layer, batch, pos, d_model]."""
    L, B, T, D = mlp_in.shape
    flat = None if post_scale is None else post_scale.reshape(L, B * T)
    acts, _ = neuron_factors(params, cfg, mlp_in.reshape(L, B * T, D), flat)  # [B*T, L, M]
    return jnp.moveaxis(acts.reshape(B, T, L, -1), 2, 0)


@partial(jax.jit, static_argnames=("n", "layernorm"))
def _top_tokens(dirs, norm_w, W_U, *, n: int, layernorm: bool):
    if layernorm:  # LayerNorm's mean subtraction is linear: part of the direction's path
        dirs = dirs - dirs.mean(axis=-1, keepdims=True)
    logits = (dirs * norm_w) @ W_U
    pv, pt = jax.lax.top_k(logits, n)
    nv, nt = jax.lax.top_k(-logits, n)
    return pt, pv, nt, -nv


def top_output_tokens(params, cfg, tc_cfg: TranscoderConfig, tc_params: TranscoderParams,
                      n: int = 8, chunk: int = 1024) -> dict[str, np.ndarray]:
    """Each feature's top positive and negative output tokens, [layer, feature, n] ids and
    values, from its decoders through the final norm weight and the unembedding (in JAX)."""
    norm_w = params.final_norm_w.astype(jnp.float32) + cfg.norm_offset
    W_U = params.W_U.astype(jnp.float32)
    n = min(n, W_U.shape[1])
    out = {name: [] for name in ("out_pos_tok", "out_pos_val", "out_neg_tok", "out_neg_val")}
    for s in range(tc_cfg.n_layers):
        dirs = tc_params.W_dec[s].astype(jnp.float32).sum(axis=1)  # [feature, d_model]
        parts = [_top_tokens(dirs[i:i + chunk], norm_w, W_U, n=n,
                             layernorm=cfg.norm == "layernorm")
                 for i in range(0, dirs.shape[0], chunk)]
        for name, j in zip(out, range(4)):
            out[name].append(np.concatenate([np.asarray(p[j]) for p in parts]))
    return {name: np.stack(v).astype(np.int32 if "tok" in name else np.float32)
            for name, v in out.items()}


def scan(model, tc_cfg: TranscoderConfig, tc_params: TranscoderParams, contexts: np.ndarray,
         config: FeaturesConfig, progress: bool = False) -> FeatureCards:
    """Feature cards of every feature from token contexts [n, context_length] (one pass)."""
    from clt.transcoder import check_model

    check_model(tc_cfg, model.cfg)
    L, F = tc_cfg.n_layers, tc_cfg.n_features
    N, T = contexts.shape
    W, k, q, B = config.window, config.top_k, config.n_samples, config.batch_size
    before = (W * 3) // 4  # more context before the activating token than after: text is causal
    bos = model.cfg.bos_token_id
    drop_first = bos is not None and bool(np.all(contexts[:, 0] == bos))
    state = _init_state(L, F, k, q, W)
    key = jax.random.key(config.seed)
    t0 = time.perf_counter()
    with progress_bar(progress) as bar:
        task = bar.add_task("scanning contexts", total=N)
        for i in range(0, N, B):
            batch = contexts[i:i + B]
            valid = np.arange(B) < len(batch)
            if len(batch) < B:  # pad the last batch (no recompilation); padding is masked out
                batch = np.concatenate([batch, np.repeat(batch[-1:], B - len(batch), axis=0)])
            state = _scan_step(model.params, tc_params, jnp.asarray(batch), jnp.asarray(valid),
                               state, jax.random.fold_in(key, i), jnp.int32(i), cfg=model.cfg,
                               tc_cfg=tc_cfg, W=W, before=before, k=k, q=q,
                               drop_first=drop_first)
            bar.advance(task, int(valid.sum()))
    state = {name: np.asarray(v) for name, v in state.items()}
    seconds = time.perf_counter() - t0
    outputs = top_output_tokens(model.params, model.cfg, tc_cfg, tc_params,
                                config.n_output_tokens)
    n_tokens = N * (T - int(drop_first))
    return _assemble(state, outputs, contexts, model, tc_cfg, config, n_tokens, before, seconds)


def neuron_cards(model, contexts: np.ndarray, config: FeaturesConfig,
                 progress: bool = False) -> FeatureCards:
    """Cards of the model's own MLP neurons (the features of a neuron graph, `cltrace trace
    --neurons`), [layer, unit] as a transcoder's [layer, feature]; `config.transcoder` is only
    recorded."""
    tc_cfg, tc_params = neuron_transcoder(model.params, model.cfg)
    return scan(model, tc_cfg, tc_params, contexts, config, progress=progress)


def _assemble(state, outputs, contexts, model, tc_cfg, config, n_tokens, before, seconds):
    """Compact arrays: windows as uint8 of the feature's max, only referenced contexts kept."""
    top_max = np.maximum(state["top_act"][..., :1], 1e-12)  # [L, F, 1]
    arrays = {"density": (state["count"] / max(n_tokens, 1)).astype(np.float32),
              "top_act": np.where(state["top_act"] > 0, state["top_act"], 0).astype(np.float32),
              "smp_act": np.where(state["smp_prio"] >= 0, state["smp_act"], 0).astype(np.float32)}
    for p in ("top", "smp"):
        win = np.clip(state[f"{p}_win"].astype(np.float32) / top_max[..., None], 0, 1)
        arrays[f"{p}_win"] = np.round(win * 255).astype(np.uint8)
        arrays[f"{p}_pos"] = state[f"{p}_pos"].astype(np.int16 if contexts.shape[1] < 2**15
                                                      else np.int32)
    # Samples sorted by activation, so that they read as quantiles of the feature's range.
    order = np.argsort(-arrays["smp_act"], axis=-1, kind="stable")
    for name in ("smp_act", "smp_win", "smp_pos"):
        v = arrays[name]
        arrays[name] = np.take_along_axis(v, order.reshape(order.shape + (1,) * (v.ndim - 3)),
                                          axis=2)
    smp_ctx = np.take_along_axis(state["smp_ctx"], order, axis=2)
    used = np.unique(np.concatenate([state["top_ctx"][arrays["top_act"] > 0],
                                     smp_ctx[arrays["smp_act"] > 0]]))
    remap = np.zeros(len(contexts), np.int32)
    remap[used] = np.arange(len(used))
    arrays["top_ctx"] = remap[state["top_ctx"]]
    arrays["smp_ctx"] = remap[smp_ctx]
    arrays["contexts"] = contexts[used].astype(np.int32)
    arrays.update(outputs)
    ids = np.unique(np.concatenate([arrays["contexts"].ravel(), outputs["out_pos_tok"].ravel(),
                                    outputs["out_neg_tok"].ravel()]))
    tok = model.tokenizer
    strings = tok.token_strings(ids) if tok is not None else [str(i) for i in ids]
    arrays["vocab_ids"] = ids.astype(np.int32)
    meta = {"kind": "feature_cards", "schema_version": CARDS_SCHEMA_VERSION,
            "n_layers": tc_cfg.n_layers, "layers": list(tc_cfg.model_layers),
            "n_features": tc_cfg.n_features,
            "d_model": tc_cfg.d_model, "model": model.cfg.name, "config": to_dict(config),
            "transcoder_config": to_dict(tc_cfg), "n_tokens": int(n_tokens),
            "n_contexts": len(contexts), "window_before": before,
            "seconds": round(seconds, 2), "vocab_strings": strings}
    return FeatureCards(meta, arrays)


# --- the cards file ------------------------------------------------------------------------------
@dataclass
class FeatureCards:
    """Every feature's card data (see the module docstring); `card()` gives one for a page."""

    meta: dict
    arrays: dict

    @property
    def n_layers(self) -> int:
        return int(self.meta["n_layers"])

    @property
    def n_features(self) -> int:
        return int(self.meta["n_features"])

    @functools.cached_property
    def transcoder_config(self) -> TranscoderConfig:
        """The config of the transcoder the cards are for (its model layers: `row`)."""
        from clt.configs import from_dict

        got = self.meta.get("transcoder_config")
        if not isinstance(got, dict):  # not recorded: every layer of a transcoder
            return TranscoderConfig(d_model=int(self.meta.get("d_model", 1)),
                                    n_layers=self.n_layers, n_features=self.n_features)
        return from_dict(TranscoderConfig, got)

    @property
    def layers(self) -> tuple[int, ...]:
        """The model layer of every row of the arrays."""
        return self.transcoder_config.model_layers

    def row(self, layer: int) -> int:
        """The arrays' row of model layer `layer` (one-line ConfigError if not covered)."""
        return self.transcoder_config.layer_index(layer)

    def save(self, path: str | Path) -> Path:
        from clt.io import atomic_write

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: np.savez_compressed(
            f, meta=np.array(json.dumps(self.meta)), **self.arrays))
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureCards:
        """Read a cards file; one-line errors for a missing, truncated or foreign file."""
        path = Path(path)
        if path.is_dir():
            path = path / CARDS_FILE
        if not path.exists():
            raise ConfigError(f"no feature cards at {path}: run `cltrace features`")
        from clt.io import check_npz_size

        check_npz_size(path, MAX_CARDS_BYTES, "feature-cards file")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                arrays = {name: z[name] for name in z.files if name != "meta"}
        except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise ConfigError(f"{path} is not a readable feature-cards file (truncated or "
                              f"corrupt? {type(e).__name__}: {str(e)[:80]}); re-run "
                              "`cltrace features`") from None
        if meta.get("kind") != "feature_cards" or meta.get("schema_version") != \
                CARDS_SCHEMA_VERSION:
            raise ConfigError(f"{path}: feature-cards schema {meta.get('schema_version')!r} "
                              f"is not supported (this version reads {CARDS_SCHEMA_VERSION}); "
                              "re-run `cltrace features`")
        return cls(meta, arrays)

    def check(self, n_layers: int, n_features: int | None, source: str = "graph",
              layers: tuple[int, ...] | None = None) -> None:
        """Refuse cards of another transcoder shape (feature indices would mean other features);
        `layers`: the model layers the transcoder's dictionaries cover, when known."""
        if n_layers != self.n_layers or (n_features is not None and n_features
                                         != self.n_features):
            raise ConfigError(f"feature cards are for {self.n_layers} layers x "
                              f"{self.n_features} features but the {source} has {n_layers} "
                              f"layers x {n_features} features; build cards for its transcoder")
        if layers is not None and tuple(layers) != self.layers:
            raise ConfigError(f"feature cards are for model layers "
                              f"{', '.join(map(str, self.layers))} but the {source} covers "
                              f"{', '.join(map(str, layers))}; build cards for its transcoder")

    def _examples(self, p: str, rows: np.ndarray, features: np.ndarray, T: int) -> list:
        """Per feature (array row, index), its examples of kind `p` ("top" or "smp"): the
        activating ones, in stored order. Gathered for every feature at once (as Python
        numbers at once: per-element casts cost more)."""
        a = self.arrays
        W = a[f"{p}_win"].shape[-1]
        before = int(self.meta["window_before"])
        acts = a[f"{p}_act"][rows, features]  # [n, examples]
        i, j = np.nonzero(acts > 0)
        pos = a[f"{p}_pos"][rows[i], features[i], j].astype(np.int64)
        start = np.minimum(np.maximum(pos - before, 0), T - W)
        toks = a["contexts"][a[f"{p}_ctx"][rows[i], features[i], j][:, None],
                             start[:, None] + np.arange(W)].tolist()
        wins = a[f"{p}_win"][rows[i], features[i], j].tolist()
        flat = [[round(act, 4), t, w, at] for act, t, w, at in zip(
            acts[i, j].astype(np.float64).tolist(), toks, wins, (pos - start).tolist())]
        ends = np.cumsum(np.bincount(i, minlength=len(rows))).tolist()
        return [flat[b:e] for b, e in zip([0] + ends[:-1], ends)]

    def card(self, layer: int, feature: int, label: str = "") -> dict:
        """One feature's card for the page: label, density, max activation, output tokens
        [[id, value], ...], top and sampled examples [[act, token ids, uint8 acts, index of
        the activating token], ...]. Token ids resolve through `vocab()`. `layer` is a model
        layer (`row`)."""
        return self.cards([layer], [feature], [label])[0]

    def cards(self, layers, features, labels=None) -> list[dict]:
        """`card` of each (model layer, feature), `labels` (default none) theirs: read for all
        of them at once (the 3,108 cards of the demo's page: 0.40 -> 0.25 s)."""
        a = self.arrays
        T = a["contexts"].shape[1] if len(a["contexts"]) else 0
        layers = [int(x) for x in layers]
        rows = np.array([self.row(x) for x in layers], np.int64)
        feats = np.asarray(features, np.int64).reshape(-1)
        labels = [""] * len(layers) if labels is None else list(labels)

        def outs(kind):  # [[id, value], ...] per feature
            toks = a[f"out_{kind}_tok"][rows, feats].tolist()
            vals = a[f"out_{kind}_val"][rows, feats].astype(np.float64).tolist()
            return [[[int(t), round(v, 3)] for t, v in zip(ts, vs)] for ts, vs in zip(toks, vals)]

        density = a["density"][rows, feats].astype(np.float64).tolist()
        top_act = a["top_act"][rows, feats, 0].astype(np.float64).tolist()
        said = self.meta.get("explanations", {})
        out = []
        for k, card in enumerate(zip(density, top_act, outs("pos"), outs("neg"),
                                     self._examples("top", rows, feats, T),
                                     self._examples("smp", rows, feats, T))):
            d, mx, pos, neg, top, smp = card
            card = {"d": round(d, 6), "max": round(mx, 4), "pos": pos, "neg": neg, "top": top,
                    "smp": smp}
            card["auto"] = self.auto_label(card)
            card["label"] = labels[k] or card["auto"]
            own = said.get(f"{layers[k]}_{int(feats[k])}")
            if own is not None:
                card["self"] = own  # what the model said of it (viewer.explain)
            out.append(card)
        return out

    def clerp(self, layer: int, feature: int, label: str = "") -> str:
        """The feature's label in a graph JSON: the researcher's, else the automatic one, with
        the model's own explanation when there is one."""
        card = self.card(layer, feature, label)
        said = card.get("self")
        return card["label"] + (f" | self: {said}" if said and not label else "")

    @functools.cached_property
    def _vocab(self) -> dict[int, str]:
        return dict(zip((int(i) for i in self.arrays["vocab_ids"]), self.meta["vocab_strings"]))

    def vocab(self) -> dict[int, str]:
        """Token id -> string of every token the cards mention."""
        return self._vocab

    def auto_label(self, card: dict) -> str:
        """A short label from the card itself: the tokens the feature fires on most, then what
        it promotes, e.g. `France, French → Paris` (a researcher's label, or the model's own
        explanation, replaces it where given)."""
        vocab = self._vocab
        fired = [_short(vocab.get(toks[at], "?")) for _, toks, _, at in card["top"]]
        outs = [_short(vocab.get(t, "?")) for t, v in card["pos"][:2] if v > 0]
        if not fired:
            return "never active in the scanned text" + (f" → {outs[0]}" if outs else "")
        return ", ".join(_distinct(fired)[:3]) + (" → " + ", ".join(_distinct(outs))
                                                  if outs else "")


def _short(token: str) -> str:
    """A token as a label shows it: stripped of surrounding spaces; whitespace named."""
    s = token.strip()
    if s:
        return s
    return {"\n": "⏎", "\t": "⇥"}.get(token.strip(" "), "␣" if " " in token else repr(token))


def _distinct(items: list[str]) -> list[str]:
    """Items in order, each once (case-insensitively)."""
    seen, out = set(), []
    for x in items:
        if x.lower() not in seen:
            seen.add(x.lower())
            out.append(x)
    return out


def cards_for(cards: FeatureCards, layers, features,
              labels: dict[tuple[int, int], str] | None = None) -> dict:
    """The cards of the given features and the strings of the tokens they mention, for a page:
    {"cards": {"layer_feature": card}, "vocab": {id: string}}."""
    labels = labels or {}
    out, ids = {}, set()
    pairs = sorted({(int(a), int(b)) for a, b in zip(layers, features)})
    made = cards.cards([p[0] for p in pairs], [p[1] for p in pairs],
                       [labels.get(p, "") for p in pairs]) if pairs else []
    for (layer, f), c in zip(pairs, made):
        out[f"{layer}_{f}"] = c
        ids.update(t for t, _ in c["pos"] + c["neg"])
        for ex in c["top"] + c["smp"]:
            ids.update(ex[1])
    vocab = cards.vocab()
    return {"cards": out, "vocab": {str(i): vocab.get(i, f"<{i}>") for i in sorted(ids)}}


def default_path(transcoder: str) -> Path | None:
    """Where the cards of a transcoder live by default (None: not a local directory, or a
    bundled one this install lacks)."""
    from clt.bundled import locate

    if not transcoder:
        return None
    try:
        p = Path(locate(transcoder)).expanduser()
    except ConfigError:
        return None
    return p / CARDS_FILE if p.is_dir() else None


def card_maxima(ref: str, cards: str | None, tc_cfg: TranscoderConfig
                ) -> tuple[np.ndarray, str]:
    """Each feature's maximum activation [dictionary, feature] from its card, for `cltrace
    steer`'s values written Nx: the cards at `cards`, else those beside the transcoder `ref`
    (`tc_cfg`: its config; the cards must be of its shape and model layers)."""
    path = Path(cards).expanduser() if cards else default_path(ref)
    if path is None:
        raise ConfigError(f"values written Nx need the features' cards: transcoder '{ref}' is "
                          "not a local directory; pass --cards FILE (`cltrace features`)")
    try:
        loaded = FeatureCards.load(path)
    except ConfigError as e:
        raise ConfigError(f"values written Nx need each feature's maximum activation from its "
                          f"card: {e} (or pass --cards FILE)") from None
    loaded.check(tc_cfg.n_layers, tc_cfg.n_features, "transcoder", tc_cfg.model_layers)
    return loaded.arrays["top_act"][..., 0], f"cards {path}"


register_card_maxima(card_maxima)


def build(config: FeaturesConfig, progress: bool = False) -> tuple[FeatureCards, Path]:
    """`cltrace features`: load the model and transcoder, scan, save; returns (cards, path)."""
    from clt.circuit_tracer_io import open_transcoder
    from clt.data import LocalContexts, open_contexts
    from clt.lm.loading import load_model

    out = Path(config.out) if config.out else default_path(config.transcoder)
    if out is None:
        raise ConfigError(f"transcoder '{config.transcoder}' is not a local directory: give "
                          "--out PATH for the cards file")
    # The transcoder first: its config names the model when --model is not given (scan checks
    # that they fit).
    ref, tc_cfg, tc_params = open_transcoder(config.transcoder)
    name = config.model or tc_cfg.model_name
    if not name:
        raise ConfigError("the transcoder's config names no model: pass --model NAME")
    model = load_model(name)
    ctx = open_contexts(config.data, model.tokenizer, config.context_length, seed=config.seed,
                        text_field=config.text_field)
    n = min(config.n_contexts, len(ctx)) if isinstance(ctx, LocalContexts) else config.n_contexts
    if config.explain_layer >= model.cfg.n_layers:
        raise ConfigError(f"--explain-layer {config.explain_layer}: the model has "
                          f"{model.cfg.n_layers} layers")
    cards = scan(model, tc_cfg, tc_params, ctx.take(0, n), config, progress=progress)
    cards.meta["transcoder"] = ref  # as graphs record it: resolvable from any folder
    if config.explain:
        from viewer.explain import explain

        which = _to_explain(config, tc_cfg)
        said = explain(model, tc_cfg, tc_params, [a for a, _ in which], [f for _, f in which],
                       n_tokens=config.explain_tokens, scale=config.explain_scale,
                       at_layer=config.explain_layer, prompt=config.explain_prompt,
                       placeholder=config.explain_placeholder, progress=progress)
        cards.meta["explanations"] = {f"{a}_{f}": s for (a, f), s in zip(which, said)}
    return cards, cards.save(out)


def _to_explain(config: FeaturesConfig, tc_cfg: TranscoderConfig) -> list[tuple[int, int]]:
    """(model layer, feature) to explain: a graph's pruned features by influence, then random
    ones."""
    out: list[tuple[int, int]] = []
    if config.explain_graph:
        from attribution.graph import Graph
        from attribution.prune import prune
        from attribution.slim import thresholds

        g = Graph.load(config.explain_graph)
        res = prune(g, *thresholds(g))
        feats = np.nonzero(res.node_mask[g.ranges.feature])[0]
        for i in feats[np.argsort(-res.influence[feats], kind="stable")]:
            key = (int(g.feature_layer[i]), int(g.feature_index[i]))
            if key not in out:
                out.append(key)
    rng = np.random.default_rng(config.seed)
    total = tc_cfg.n_layers * tc_cfg.n_features
    for flat in rng.permutation(total):
        if len(out) >= min(config.explain_max, total):
            break
        key = (tc_cfg.model_layers[flat // tc_cfg.n_features], int(flat % tc_cfg.n_features))
        if key not in out:
            out.append(key)
    return out[:config.explain_max]


__all__ = ["CARDS_FILE", "CARDS_SCHEMA_VERSION", "FeatureCards", "FeaturesConfig", "build",
           "cards_for", "default_path", "neuron_cards", "scan", "top_output_tokens"]
