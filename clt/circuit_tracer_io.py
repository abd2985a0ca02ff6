"""Export transcoders to, and import them from, the safetensors layout of `circuit-tracer`.

`circuit-tracer` (Hanna, Piotrowski, Lindsey, Ameisen 2025; github.com/decoderesearch/
circuit-tracer, formerly safety-research/circuit-tracer) computes attribution graphs with
transcoders published on the Hugging Face Hub in two layouts. The facts below were read from its
sources (paths in that repo):

Per-layer transcoders (PLT), `model_kind: transcoder_set`
(circuit_tracer/transcoder/single_layer_transcoder.py: `SingleLayerTranscoder.to_safetensors`,
`load_transcoder`, `TranscoderSet.to_safetensors`; circuit_tracer/utils/hf_utils.py:
`resolve_transcoder_paths`):
  * one `layer_{i}.safetensors` per layer i = 0..L-1 (the set must cover 0..max without gaps);
  * `W_enc` [d_transcoder, d_model], applied as `F.linear(x, W_enc, b_enc)` = x @ W_enc.T + b_enc,
    i.e. the transpose of our `W_enc[i]` [d_model, feature];
  * `W_dec` [d_transcoder, d_model], applied as `acts @ W_dec + b_dec` (our `W_dec[i][:, 0]`);
  * `b_enc` [d_transcoder], `b_dec` [d_model];
  * optional `activation_function.threshold` [d_transcoder] (its presence makes the activation
    JumpReLU, `x * (x > threshold)` in transcoder/activation_functions.py; absent: ReLU);
  * optional `W_skip` [d_model, d_model] applied as `x @ W_skip.T` (the transpose of ours);
  * config.yaml may say `activation: topk` with `k` (TopK keeps the k largest entries, even
    negative ones; ours also requires them > 0) or `activation: relu`.
Cross-layer transcoders (CLT), `model_kind: cross_layer_transcoder`
(circuit_tracer/transcoder/cross_layer_transcoder.py: `CrossLayerTranscoder.to_safetensors`,
`_load_state_dict`, `load_clt`):
  * `W_enc_{i}.safetensors` holding `W_enc_{i}` [d_transcoder, d_model] (used as
    einsum("...d,fd->...f")), `b_enc_{i}` [d_transcoder], `b_dec_{i}` [d_model] (the bias of
    target layer i's reconstruction), optional `threshold_{i}` [d_transcoder] (JumpReLU; absent:
    ReLU) and optional `W_skip_{i}` [d_model, d_model] applied as `x @ W_skip_{i}` (same
    orientation as ours; read by decoderesearch's loader, ignored by older safety-research ones);
  * `W_dec_{i}.safetensors` holding `W_dec_{i}` [d_transcoder, L - i, d_model] (target i + j at
    index j), the same as our `W_dec[i]` for a full CLT;
  * L is the number of `W_enc_*.safetensors` files; only ReLU and JumpReLU are supported.
config.yaml (hf_utils.py `load_transcoder_from_hub` / `load_transcoders`, utils/caching.py):
  `model_name`, `model_kind`, `feature_input_hook`, `feature_output_hook` (TransformerLens hook
  names relative to `blocks.{layer}`), optional `activation` / `k`, optional `transcoders` (a list
  of external files, which we do not read); `scan` / `scan_name` is derived from the repo id.
Hook names (circuit_tracer/utils/tl_nnsight_mapping.py; TransformerLens RMSNorm/LayerNorm, whose
`hook_normalized` is taken before the norm's weight): `hook_resid_mid` is the residual stream
before the MLP's norm (our 'resid_mid'); `mlp.hook_in` is the MLP's input after its norm, weight
included (our 'mlp_in'); `ln2.hook_normalized` is that norm's output *before* its weight and
bias, which we can read only by folding the norm into the encoder (`input_norm`); `hook_mlp_out`
is the MLP output as added to the residual (our 'mlp_out'); `mlp.hook_out` (the MLP module's
output) equals it only in models without a norm after the MLP (not Gemma). Its TransformerLens
backend loads models with fold_ln=False and wraps each MLP so that `mlp.hook_in` / `mlp.hook_out`
exist (replacement_model/replacement_model_transformerlens.py: `ReplacementMLP`).

What we add: a `cltrace_config` mapping in config.yaml (our `TranscoderConfig`; circuit-tracer
ignores unknown keys) so that a round trip restores the activation rule, k, model name and the
window of a windowed CLT. circuit-tracer has no windowed CLT, so a CLT with 1 < max_reach < L is
exported with its decoders zero-padded to the full width L - s; on import the padding is checked to
be zero and cut off again. BatchTopK is exported as JumpReLU with its inference thresholds.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jax.numpy as jnp
import yaml

from clt import transcoder as tcm
from clt.configs import ConfigError, doc, from_dict, to_dict
from clt.io import atomic_write, check_output_dir
from clt.transcoder import TranscoderConfig, TranscoderParams, check_params

INPUT_HOOKS = {"resid_mid": "hook_resid_mid", "mlp_in": "mlp.hook_in"}
NORMALIZED_HOOK = "ln2.hook_normalized"
OUTPUT_HOOKS = ("hook_mlp_out", "mlp.hook_out")
PLT_THRESHOLD = "activation_function.threshold"
_LAYOUT = re.compile(r"^(layer|W_enc|W_dec)_(\d+)\.safetensors$")


# --- export ------------------------------------------------------------------------------------
def export_circuit_tracer(path: str | Path, cfg: TranscoderConfig, params: TranscoderParams,
                          model_name: str | None = None, dtype: Any = None,
                          overwrite: bool = False) -> Path:
    """Write `cfg`/`params` as a circuit-tracer transcoder directory (PLT when max_reach == 1,
    else CLT) plus its config.yaml. Weights and biases are cast to `dtype` (default float32);
    thresholds stay float32. `model_name` (default `cfg.model_name`) is the Hugging Face id of the
    model, which circuit-tracer users pass to `ReplacementModel.from_pretrained`."""
    check_params(cfg, params, "export_circuit_tracer")
    model_name = model_name or cfg.model_name
    if not model_name:
        raise ConfigError("export_circuit_tracer needs the model's name: pass model_name=... "
                          "(its Hugging Face id) or set TranscoderConfig.model_name")
    if cfg.is_sae:
        raise ConfigError("an SAE (output_point == input_point) has no circuit-tracer layout: "
                          "circuit-tracer reads transcoders that write MLP outputs")
    if cfg.kind == "clt" and cfg.activation == "topk":
        raise ConfigError("circuit-tracer's CLT supports only relu and jumprelu; a topk CLT "
                          "cannot be exported (use jumprelu or batchtopk)")
    path = check_output_dir(path, "export directory")
    stale = [p for p in path.iterdir() if _LAYOUT.match(p.name)]
    if stale and not overwrite:
        raise ConfigError(f"{path} already holds transcoder files ({stale[0].name}, ...); choose "
                          "an empty directory or pass --overwrite (overwrite=True)")
    files = _export_files(cfg, params, dtype)
    meta: dict[str, Any] = {
        "model_name": model_name,
        "model_kind": "transcoder_set" if cfg.kind == "plt" else "cross_layer_transcoder",
        "feature_input_hook": INPUT_HOOKS[cfg.input_point],
        "feature_output_hook": "hook_mlp_out"}
    if cfg.activation == "topk":
        meta.update(activation="topk", k=cfg.k)
    meta["cltrace_config"] = to_dict(cfg.replace(model_name=model_name))
    _write_staged(path, files, yaml.safe_dump(meta, sort_keys=False), stale)
    return path


def _export_files(cfg: TranscoderConfig, params: TranscoderParams, dtype) -> dict[str, dict]:
    """{file name: {tensor name: array}} of the circuit-tracer layout (module docstring)."""

    def cast(x, keep32: bool = False):
        return jnp.asarray(x, jnp.float32 if (dtype is None or keep32) else dtype)

    jump = cfg.activation in ("jumprelu", "batchtopk")
    th = params.threshold
    files: dict[str, dict] = {}
    for i in range(cfg.n_layers):
        if cfg.kind == "plt":
            t = {"W_enc": params.W_enc[i].T, "W_dec": params.W_dec[i][:, 0],
                 "b_enc": params.b_enc[i], "b_dec": params.b_dec[i]}
            if params.W_skip is not None:
                t["W_skip"] = params.W_skip[i].T
            if jump:
                t[PLT_THRESHOLD] = th[i]
            files[f"layer_{i}.safetensors"] = {k: cast(v, k == PLT_THRESHOLD)
                                               for k, v in t.items()}
            continue
        t = {f"W_enc_{i}": params.W_enc[i].T, f"b_enc_{i}": params.b_enc[i],
             f"b_dec_{i}": params.b_dec[i]}
        if params.W_skip is not None:
            t[f"W_skip_{i}"] = params.W_skip[i]
        if jump:
            t[f"threshold_{i}"] = th[i]
        files[f"W_enc_{i}.safetensors"] = {k: cast(v, k.startswith("threshold"))
                                           for k, v in t.items()}
        w = params.W_dec[i]
        pad = cfg.n_layers - i - w.shape[1]  # windowed CLT: zero decoders beyond the window
        w = jnp.pad(w, ((0, 0), (0, pad), (0, 0))) if pad else w
        files[f"W_dec_{i}.safetensors"] = {f"W_dec_{i}": cast(w)}
    return files


def _write_staged(path: Path, files: dict[str, dict], config_yaml: str, stale: list[Path]) -> None:
    """Write every file of an export into a hidden folder inside `path` first (each through
    `clt.io.atomic_write`), then move them into place and remove stale layer files. A failed
    write (a full disk) leaves `path` as it was: no half export, no old export half replaced."""
    import os
    import shutil

    from safetensors.flax import save

    staging = path / f".export-{os.getpid()}.tmp"
    staging.mkdir(exist_ok=True)
    try:
        for name, tensors in files.items():
            atomic_write(staging / name, save(tensors))
        atomic_write(staging / "config.yaml", config_yaml)
        for p in stale:
            if p.name not in files:
                p.unlink()
        for name in [*files, "config.yaml"]:  # config.yaml last: it completes the export
            os.replace(staging / name, path / name)  # a rename within one folder: atomic
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --- import ------------------------------------------------------------------------------------
def load_circuit_tracer(path: str | Path, dtype: Any = jnp.float32, *,
                        input_norm: tuple | None = None
                        ) -> tuple[TranscoderConfig, TranscoderParams]:
    """Read a circuit-tracer transcoder directory (PLT or CLT, detected from its files).

    `input_norm` = (weight [layer, d_model], bias [layer, d_model] or None): the effective weight
    (any +1 offset included) and bias of each layer's pre-MLP norm. It is needed only when the
    features read `ln2.hook_normalized`; it is then folded into the encoder so that the result
    reads our 'mlp_in'. Raises ConfigError naming the file and the fix for every problem found.
    """
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory; pass the directory holding a circuit-tracer "
                          "transcoder (config.yaml + layer_{i}.safetensors or W_enc_{i}/W_dec_{i})")
    meta = _read_meta(path)
    kind, n_layers = _detect_layout(path, meta)
    raw = (_read_plt if kind == "plt" else _read_clt)(path, n_layers)
    cfg = _config(path, meta, kind, raw)
    W_dec = raw["W_dec"]
    if cfg.kind == "clt" and cfg.max_reach is not None:
        W_dec = [_unpad(path, s, w, cfg.n_targets(s)) for s, w in enumerate(W_dec)]
    th = raw["threshold"]
    if th is not None and bool(jnp.any(th < 0)):
        layer = int(jnp.argmax(jnp.any(th < 0, axis=1)))
        raise ConfigError(f"{path}: layer {layer} has negative JumpReLU thresholds, which cltrace "
                          "cannot represent (it stores log thresholds); clip them to >= 0")
    params = TranscoderParams(
        W_enc=raw["W_enc"], b_enc=raw["b_enc"],
        # ReLU is JumpReLU at threshold 0 (log = -inf); the relu rule never reads it.
        log_threshold=jnp.log(th) if th is not None else jnp.full(raw["b_enc"].shape, -jnp.inf),
        W_dec=tuple(W_dec), b_dec=raw["b_dec"], W_skip=raw["W_skip"])
    if meta["feature_input_hook"] == NORMALIZED_HOOK:
        params = _fold_input_norm(path, params, input_norm)
    check_params(cfg, params, str(path))
    return cfg, TranscoderParams(
        W_enc=params.W_enc.astype(dtype), b_enc=params.b_enc.astype(jnp.float32),
        log_threshold=params.log_threshold.astype(jnp.float32),
        W_dec=tuple(w.astype(dtype) for w in params.W_dec),
        b_dec=params.b_dec.astype(jnp.float32),
        W_skip=None if params.W_skip is None else params.W_skip.astype(dtype))


def load_transcoder(ref: str | Path, dtype: Any = jnp.float32, *,
                    input_norm: tuple | None = None) -> tuple[TranscoderConfig, TranscoderParams]:
    """A transcoder from our own layout directory, a circuit-tracer layout directory, or a Hugging
    Face repo in circuit-tracer layout (`org/name[/subfolder][@revision]` or `hf://...`).
    `input_norm` is used only by transcoders that read `ln2.hook_normalized`. A bundled one may
    be named `bundled:MODEL` (`clt.bundled.record`)."""
    from clt.bundled import locate

    ref = locate(str(ref))
    p = Path(ref).expanduser()
    if p.is_dir():
        if (p / "transcoder.safetensors").exists() or (p / "config.json").exists():
            return tcm.load(p, dtype)
        if (p / "config.yaml").exists() or any(_LAYOUT.match(f.name) for f in p.iterdir()):
            return load_circuit_tracer(p, dtype, input_norm=input_norm)
        raise ConfigError(f"{p} holds no transcoder: expected config.json + transcoder.safetensors "
                          "(cltrace) or config.yaml + layer_{i}.safetensors or W_enc_{i}/W_dec_{i}"
                          ".safetensors (circuit-tracer)")
    if p.exists():
        raise ConfigError(f"{p} is a file; pass the directory that holds the transcoder")
    hub = _parse_hub_ref(str(ref))
    if hub is None:
        raise ConfigError(f"no transcoder at '{ref}': not a directory, nor a Hugging Face repo id "
                          "like org/name[/subfolder][@revision]")
    return load_circuit_tracer(_download(*hub), dtype, input_norm=input_norm)


@dataclass(frozen=True)
class ExportConfig:
    """`cltrace export`: a transcoder converted to circuit-tracer's layout."""

    transcoder: str = doc("Transcoder directory or hub repo.")
    out: str = doc("Output directory.", short="-o")
    model_name: str | None = doc("Model id written to config.yaml (default: the transcoder's).",
                                 default=None)
    dtype: Literal["float32", "float16", "bfloat16"] = doc("Stored dtype.", default="float32")
    overwrite: bool = doc("Replace existing files in --out.", default=False)

    def __post_init__(self):
        """Values, then the output directory (read, never created here), before the transcoder
        loads: the same one-line refusals from the CLI, config files and the Python API."""
        for name in ("transcoder", "out"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"ExportConfig.{name} must be a non-empty string, got "
                                  f"{value!r}")
        if self.model_name is not None and (not isinstance(self.model_name, str)
                                            or not self.model_name.strip()):
            raise ConfigError("ExportConfig.model_name must be a non-empty model id (or "
                              f"omitted), got {self.model_name!r}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError("ExportConfig.dtype must be one of ['float32', 'float16', "
                              f"'bfloat16'], got {self.dtype!r}")
        if not isinstance(self.overwrite, bool):
            raise ConfigError(f"ExportConfig.overwrite must be true/false, got "
                              f"{self.overwrite!r}")
        _check_export_dir(Path(self.out).expanduser(), self.overwrite)


def _check_export_dir(path: Path, overwrite: bool) -> None:
    """`clt.io.check_output_dir`'s refusals without creating anything (the config only reads),
    and no earlier export unless overwrite."""
    from clt.io import check_output_dir

    check_output_dir(path, "export directory", create=False)
    if path.is_dir():
        stale = sorted(p.name for p in path.iterdir() if _LAYOUT.match(p.name))
        if stale and not overwrite:
            raise ConfigError(f"{path} already holds transcoder files ({stale[0]}, ...); choose "
                              "an empty directory or pass --overwrite (overwrite=True)")


def open_transcoder(ref: str | Path | None, model_cfg=None, dtype: Any = jnp.float32
                    ) -> tuple[str, TranscoderConfig, TranscoderParams]:
    """How every command gets its transcoder: `ref` resolved (None or "": the one bundled for
    `model_cfg`'s model, `clt.bundled`), loaded from any layout (`load_transcoder`) and, when the
    model's config is given, checked against it (`check_model`; one-line errors). Returns (the
    reference as artifacts record it, `clt.bundled.record`: it resolves from any folder; config,
    params)."""
    from clt.bundled import record, resolve_transcoder

    if not ref and model_cfg is None:
        raise ConfigError("no transcoder given: pass --transcoder PATH (or a model with a "
                          "bundled one)")
    ref = str(ref) if ref else resolve_transcoder(None, model_cfg.name)
    tc_cfg, params = load_transcoder(ref, dtype)
    if model_cfg is not None:
        tcm.check_model(tc_cfg, model_cfg)
    return record(ref), tc_cfg, params


# --- helpers -----------------------------------------------------------------------------------
def _read_meta(path: Path) -> dict[str, Any]:
    """config.yaml as a dict; missing file or keys fall back to circuit-tracer's defaults, with a
    warning naming the defaulted fields."""
    f = path / "config.yaml"
    meta: dict[str, Any] = {}
    if f.exists():
        try:
            meta = yaml.safe_load(f.read_text()) or {}
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{f} is not valid YAML ({str(e).splitlines()[0]}); fix or "
                              "re-export it") from None
        if not isinstance(meta, dict):
            raise ConfigError(f"{f} must be a mapping of keys (model_name, model_kind, ...)")
    if "transcoders" in meta:
        raise ConfigError(f"{f} lists its transcoders as external files (`transcoders:`), which "
                          "this loader does not fetch; convert them to layer_{i}.safetensors first")
    defaults = {"model_name": "", "feature_input_hook": "hook_resid_mid",
                "feature_output_hook": "hook_mlp_out"}
    missing = [k for k in defaults if k not in meta]
    if missing:
        where = "no config.yaml" if not f.exists() else "config.yaml lacks " + ", ".join(missing)
        warnings.warn(f"{path}: {where}; defaulted " + ", ".join(
            f"{k}={defaults[k]!r}" for k in missing), UserWarning, stacklevel=3)
    return {**{k: defaults[k] for k in missing}, **meta}


def _detect_layout(path: Path, meta: dict[str, Any]) -> tuple[str, int]:
    """('plt' | 'clt', n_layers) from the files present; names the first missing file."""
    found: dict[str, set[int]] = {"layer": set(), "W_enc": set(), "W_dec": set()}
    for f in path.iterdir():
        m = _LAYOUT.match(f.name)
        if m:
            found[m.group(1)].add(int(m.group(2)))
    declared = {"transcoder_set": "plt", "cross_layer_transcoder": "clt"}.get(
        meta.get("model_kind", ""))
    if "model_kind" in meta and declared is None:
        raise ConfigError(f"{path}/config.yaml: unknown model_kind {meta['model_kind']!r}; "
                          "expected transcoder_set or cross_layer_transcoder")
    if found["layer"] and (found["W_enc"] or found["W_dec"]):
        raise ConfigError(f"{path} mixes PLT files (layer_*.safetensors) and CLT files "
                          "(W_enc_*/W_dec_*.safetensors); keep one layout per directory")
    kind = "plt" if found["layer"] else "clt" if found["W_enc"] or found["W_dec"] else declared
    if kind is None:
        raise ConfigError(f"{path} holds no circuit-tracer transcoder files: expected layer_0"
                          ".safetensors, ... (PLT) or W_enc_0/W_dec_0.safetensors, ... (CLT)")
    if declared is not None and declared != kind:
        raise ConfigError(f"{path}/config.yaml says model_kind={meta['model_kind']} but the files "
                          f"are a {kind.upper()}; fix model_kind or the files")
    names = ["layer"] if kind == "plt" else ["W_enc", "W_dec"]
    indices = set().union(*(found[n] for n in names))
    declared_n = (meta.get("cltrace_config") or {}).get("n_layers")
    n_layers = int(declared_n or max(indices, default=0) + 1)
    if max(indices, default=-1) >= n_layers:
        raise ConfigError(f"{path}: {names[0]}_{max(indices)}.safetensors is beyond "
                          f"cltrace_config.n_layers={n_layers}; remove the stray file")
    for i in range(n_layers):
        for n in names:
            if i not in found[n]:
                raise ConfigError(f"{path}: {n}_{i}.safetensors is missing (a circuit-tracer "
                                  f"{kind.upper()} has one per layer, 0..{n_layers - 1}); "
                                  "re-export or re-download the transcoder")
    return kind, n_layers


def _read(file: Path) -> dict[str, Any]:
    from clt.io import read_safetensors

    try:
        return {k: jnp.asarray(v) for k, v in read_safetensors(file).items()}
    except (OSError, ValueError) as e:
        raise ConfigError(f"{file} is corrupt or unreadable ({str(e).splitlines()[0]}); "
                          "re-export or re-download it") from None


def _take(t: dict, key: str, file: Path, shape: tuple[int, ...] | None, optional=False):
    """Tensor `key` of a file, checked against `shape` (None: any 2-D shape)."""
    if key not in t:
        if optional:
            return None
        raise ConfigError(f"{file} lacks tensor '{key}'; re-export or re-download it")
    x = t[key]
    if shape is not None and len(shape) == 1 and x.shape == (1, *shape):
        x = x.reshape(shape)  # thresholds saved as [1, d_transcoder]
    if (shape is None and x.ndim != 2) or (shape is not None and x.shape != shape):
        want = "a 2-D shape" if shape is None else str(shape)
        raise ConfigError(f"{file}: tensor '{key}' has shape {tuple(x.shape)}, expected {want} "
                          "(inconsistent shapes); re-export the transcoder")
    return x


def _layers(path: Path, n_layers: int, read_layer, file: str) -> dict[str, Any]:
    """Per-layer dicts from `read_layer(i, F, D)` stacked over layers; F, D from layer 0."""
    F = D = None
    rows = []
    for i in range(n_layers):
        row = read_layer(i, F, D)
        D, F = row["W_enc"].shape
        rows.append(row)
    for name in ("threshold", "W_skip"):
        have = [r[name] is not None for r in rows]
        if any(have) and not all(have):
            j = have.index(not have[0])
            raise ConfigError(f"{path}/{file.format(j)} {'has' if have[j] else 'lacks'} {name} "
                              f"unlike {file.format(0)}; every layer must have it or none")
    out = {k: jnp.stack([r[k] for r in rows]) for k in ("W_enc", "b_enc", "b_dec")}
    for k in ("threshold", "W_skip"):
        out[k] = jnp.stack([r[k] for r in rows]).astype(jnp.float32) if rows[0][k] is not None \
            else None
    out["W_dec"] = [r["W_dec"] for r in rows]
    out["k"] = rows[0].get("k")
    return out


def _read_plt(path: Path, n_layers: int) -> dict[str, Any]:
    def read_layer(i: int, F, D):
        file = path / f"layer_{i}.safetensors"
        t = _read(file)
        W_enc = _take(t, "W_enc", file, None if F is None else (F, D))
        F, D = W_enc.shape
        th = _take(t, PLT_THRESHOLD, file, (F,), optional=True)
        th = _take(t, "threshold", file, (F,), optional=True) if th is None else th
        skip = _take(t, "W_skip", file, (D, D), optional=True)
        return {"W_enc": W_enc.T, "W_dec": _take(t, "W_dec", file, (F, D))[:, None],
                "b_enc": _take(t, "b_enc", file, (F,)), "b_dec": _take(t, "b_dec", file, (D,)),
                "threshold": th, "W_skip": None if skip is None else skip.T,
                "k": int(t["k"]) if "k" in t else None}
    return _layers(path, n_layers, read_layer, "layer_{}.safetensors")


def _read_clt(path: Path, n_layers: int) -> dict[str, Any]:
    def read_layer(i: int, F, D):
        file = path / f"W_enc_{i}.safetensors"
        t = _read(file)
        W_enc = _take(t, f"W_enc_{i}", file, None if F is None else (F, D))
        F, D = W_enc.shape
        dec_file = path / f"W_dec_{i}.safetensors"
        return {"W_enc": W_enc.T,
                "W_dec": _take(_read(dec_file), f"W_dec_{i}", dec_file, (F, n_layers - i, D)),
                "b_enc": _take(t, f"b_enc_{i}", file, (F,)),
                "b_dec": _take(t, f"b_dec_{i}", file, (D,)),
                "threshold": _take(t, f"threshold_{i}", file, (F,), optional=True),
                "W_skip": _take(t, f"W_skip_{i}", file, (D, D), optional=True)}
    return _layers(path, n_layers, read_layer, "W_enc_{}.safetensors")


def _config(path: Path, meta: dict[str, Any], kind: str, raw: dict) -> TranscoderConfig:
    """Our config: `cltrace_config` when present (checked against the tensors), else inferred."""
    L, D, F = raw["W_enc"].shape
    has_th, skip = raw["threshold"] is not None, raw["W_skip"] is not None
    hook, out_hook = meta["feature_input_hook"], meta["feature_output_hook"]
    if hook not in (*INPUT_HOOKS.values(), NORMALIZED_HOOK):
        raise ConfigError(f"{path}/config.yaml: feature_input_hook {hook!r} is not supported; "
                          f"use one of {[*INPUT_HOOKS.values(), NORMALIZED_HOOK]}")
    if out_hook not in OUTPUT_HOOKS:
        raise ConfigError(f"{path}/config.yaml: feature_output_hook {out_hook!r} is not "
                          f"supported; use one of {list(OUTPUT_HOOKS)}")
    point = "resid_mid" if hook == "hook_resid_mid" else "mlp_in"
    if meta.get("cltrace_config"):
        cfg = from_dict(TranscoderConfig, dict(meta["cltrace_config"])).replace(input_point=point)
        got = {"d_model": D, "n_layers": L, "n_features": F, "skip": skip}
        for k, v in got.items():
            if getattr(cfg, k) != v:
                raise ConfigError(f"{path}/config.yaml: cltrace_config.{k}={getattr(cfg, k)} but "
                                  f"the tensors say {v}; remove cltrace_config or re-export")
        if (cfg.kind == "plt") != (kind == "plt"):
            raise ConfigError(f"{path}/config.yaml: cltrace_config.max_reach={cfg.max_reach} "
                              f"disagrees with the {kind.upper()} files; remove it or re-export")
        if cfg.activation in ("jumprelu", "batchtopk") and not has_th:
            raise ConfigError(f"{path}: cltrace_config says {cfg.activation} but the files hold "
                              "no thresholds; re-export the transcoder")
        return cfg
    act, k = meta.get("activation"), meta.get("k", raw.get("k"))
    if act is None and k is not None and kind == "plt":
        act = "topk"  # circuit-tracer's TopK.to_safetensors stores k as a tensor
    if act == "topk":
        if k is None:
            raise ConfigError(f"{path}/config.yaml: activation topk needs k; add `k: <int>`")
        activation, extra = "topk", {"k": int(k)}
    elif act not in (None, "relu", "jump_relu", "jumprelu"):
        raise ConfigError(f"{path}/config.yaml: activation {act!r} is not supported; "
                          "use relu, topk, or thresholds for JumpReLU")
    else:
        activation, extra = ("jumprelu" if has_th and act != "relu" else "relu"), {}
    return TranscoderConfig(d_model=D, n_layers=L, n_features=F,
                            max_reach=1 if kind == "plt" else None, activation=activation,
                            skip=skip, input_point=point,
                            model_name=str(meta.get("model_name") or ""), **extra)


def _unpad(path: Path, s: int, w, n: int):
    """Cut the zero padding of a windowed CLT's decoder back to its `n` targets."""
    if w.shape[1] > n and bool(jnp.any(w[:, n:] != 0)):
        raise ConfigError(f"{path}/W_dec_{s}.safetensors writes beyond cltrace_config.max_reach "
                          "(non-zero decoders past the window); remove cltrace_config from "
                          "config.yaml to load it as a full CLT")
    return w[:, :n]


def _fold_input_norm(path: Path, params: TranscoderParams, input_norm) -> TranscoderParams:
    """Features reading n = (mlp_in - b) / w (TransformerLens `ln2.hook_normalized`) rewritten to
    read mlp_in: W_enc / w, b_enc - (b / w) @ W_enc; the skip likewise into b_dec."""
    if input_norm is None:
        raise ConfigError(f"{path}: features read {NORMALIZED_HOOK} (the pre-MLP norm's output "
                          "before its weight), which cltrace reads only as 'mlp_in'; pass "
                          "input_norm=(weight, bias) of the model's pre-MLP norms to fold it in")
    w, b = input_norm
    w = jnp.asarray(w, jnp.float32)
    L, D, _ = params.W_enc.shape
    if w.shape != (L, D) or (b is not None and jnp.shape(b) != (L, D)):
        raise ConfigError(f"input_norm must be [n_layers={L}, d_model={D}] arrays, got "
                          f"{w.shape} and {None if b is None else jnp.shape(b)}")
    if bool(jnp.any(w == 0)):
        raise ConfigError("input_norm weight has zeros; the norm cannot be folded into W_enc")
    shift = jnp.zeros((L, D)) if b is None else jnp.asarray(b, jnp.float32) / w
    W_enc = params.W_enc / w[:, :, None]
    b_enc = params.b_enc - jnp.einsum("ld,ldf->lf", shift, params.W_enc)
    W_skip, b_dec = params.W_skip, params.b_dec
    if W_skip is not None:
        b_dec = b_dec - jnp.einsum("ld,lde->le", shift, W_skip)
        W_skip = W_skip / w[:, :, None]
    return TranscoderParams(W_enc=W_enc, b_enc=b_enc, log_threshold=params.log_threshold,
                            W_dec=params.W_dec, b_dec=b_dec, W_skip=W_skip)


def _parse_hub_ref(ref: str) -> tuple[str, str | None, str | None] | None:
    """(repo_id, subfolder, revision) of `org/name[/sub][@rev]` or `hf://org/name[/sub]?revision=`;
    None when `ref` does not look like a hub reference."""
    if ref.startswith("hf://"):
        ref, _, query = ref[5:].partition("?")
        m = re.search(r"(?:^|&)revision=([^&]+)", query)
        ref = ref + (f"@{m.group(1)}" if m else "")
    body, _, rev = ref.partition("@")
    parts = body.strip("/").split("/")
    if ref.startswith((".", "/", "~")) or len(parts) < 2 or not all(
            re.fullmatch(r"[\w.-]+", p) for p in parts):
        return None
    return "/".join(parts[:2]), "/".join(parts[2:]) or None, rev or None


def _download(repo_id: str, subfolder: str | None, revision: str | None) -> Path:
    prefix = f"{subfolder}/" if subfolder else ""
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id, revision=revision,
                                  allow_patterns=[f"{prefix}config.yaml", f"{prefix}*.safetensors"])
    except Exception as e:  # network, auth, missing repo, offline mode
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"cannot fetch transcoder '{repo_id}' from the Hugging Face hub ({msg}); "
                          "check the id, your network and HF_TOKEN, or pass a local directory"
                          ) from None
    return Path(local) / subfolder if subfolder else Path(local)


__all__ = [
    "INPUT_HOOKS",
    "NORMALIZED_HOOK",
    "OUTPUT_HOOKS",
    "ExportConfig",
    "export_circuit_tracer",
    "load_circuit_tracer",
    "load_transcoder",
    "open_transcoder",
]
