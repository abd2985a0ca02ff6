"""A GGUF model converted once, read fast afterwards.

Reading a GGUF file costs ~13 s for SmolLM2-135M on a 2-core CPU before any work: the `gguf`
reader parses every metadata field in Python (the 49k-token vocabulary alone is ~10 s),
dequantizes every tensor, and the tokenizer is rebuilt through transformers' converters. The
first load writes what it produced, as a cltrace command needs it, to
`<cache root>/models/<file name>-<size>-<mtime>/` (`clt.io.cache_root`): the model config
(JSON), its parameters as the model runs them (float32, stacked over layers and transposed:
`params.safetensors`, `clt.lm.params.flatten_params`, read back through a memory map; assembling
them from the GGUF layout took another ~1-2 s per load) and the tokenizer
(`tokenizer.json` plus BOS / EOS / chat template). Later loads read those (memory-mapped
safetensors, the `tokenizers` JSON) in well under a second. The key holds the file's size and
modification time, so an edited or replaced file is converted again; the folder is written
under a temporary name and renamed into place, so a killed conversion leaves nothing half
written. `CLTRACE_MODEL_CACHE=0` turns it off; deleting the folder is always safe.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from clt.configs import from_dict, to_dict
from clt.io import cache_root, read_safetensors

OFF_VAR = "CLTRACE_MODEL_CACHE"
_VERSION = 2  # bump when what is stored, or how it is made, changes


def entry_dir(path: Path) -> Path | None:
    """Where the converted copy of the GGUF file `path` lives (None: the cache is off)."""
    if os.environ.get(OFF_VAR) == "0":
        return None
    st = path.stat()
    return cache_root() / "models" / f"v{_VERSION}-{path.name}-{st.st_size}-{st.st_mtime_ns}"


def read(path: Path, name: str, with_tokenizer: bool):
    """(config, LMParams, tokenizer or None) from the cache, or None when not cached."""
    d = entry_dir(path)
    if d is None or not (d / "done").exists():
        return None
    from clt.lm.config import ModelConfig
    from clt.lm.tokenizer import Tokenizer

    try:
        cfg = from_dict(ModelConfig, {**json.loads((d / "config.json").read_text()),
                                      "name": name})
        from clt.lm.params import unflatten_params

        params = unflatten_params(read_safetensors(d / "params.safetensors"))
        tok = None
        if with_tokenizer and (d / "tokenizer.json").exists():
            from tokenizers import Tokenizer as Backend

            meta = json.loads((d / "tokenizer_meta.json").read_text())
            tok = Tokenizer(Backend.from_file(str(d / "tokenizer.json")),
                            meta["bos_token_id"], tuple(meta["eos_token_ids"]),
                            meta["add_bos"], meta["chat_template"])
    except Exception:  # noqa: BLE001 - damaged in any way (safetensors has its own errors)
        shutil.rmtree(d, ignore_errors=True)  # convert again
        return None
    return cfg, params, tok


def write(path: Path, cfg, params, tok) -> None:
    """Store a conversion (best effort: a cache that cannot be written changes nothing)."""
    d = entry_dir(path)
    if d is None or (d / "done").exists():
        return
    from safetensors.numpy import save_file

    tmp = d.with_name(f".{d.name}.{os.getpid()}.tmp")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "config.json").write_text(json.dumps(to_dict(cfg)))
        from clt.lm.params import flatten_params

        save_file({k: np.ascontiguousarray(v) for k, v in flatten_params(params).items()},
                  str(tmp / "params.safetensors"))
        if tok is not None:
            (tmp / "tokenizer.json").write_text(tok.backend.to_str())
            (tmp / "tokenizer_meta.json").write_text(json.dumps(
                {"bos_token_id": tok.bos_token_id, "eos_token_ids": list(tok.eos_token_ids),
                 "add_bos": tok.add_bos, "chat_template": tok.chat_template}))
        (tmp / "done").write_text("")
        for old in d.parent.glob(f"v*-{path.name}-*"):  # earlier versions of this file
            if old != d and not old.name.startswith("."):
                shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, d)
    except OSError:
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["OFF_VAR", "entry_dir", "read", "write"]
