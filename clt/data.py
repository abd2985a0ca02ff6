"""Training data for transcoders: text -> token contexts -> shuffled activation batches.

Text comes from local files (`.txt`: documents separated by blank lines; `.jsonl`: one document
per line under `text_field`), given as paths, directories or globs (comma-separated), or from a
Hugging Face dataset streamed with `datasets` (`hf:NAME[:CONFIG][:SPLIT]`, for real users). Text is
packed into fixed-length contexts that start with BOS (documents joined by EOS).

Activations are generated online by the JAX model in *rounds*: round r takes `round_contexts`
contexts, runs the model once over them (capturing each layer's transcoder input and MLP output),
marks the BOS position and outlier-norm tokens invalid, shuffles the valid tokens with a key
derived from (seed, r), and serves them as batches. A data position is (round, batch in round):
a resumed run regenerates its round (deterministic) and skips the batches already used, so it
continues exactly where it stopped. Rounds can be cached to disk (`cache_dir`) and replayed.

Data parallelism (`shares`): with n shares, round r's contexts are cut into n contiguous blocks
and each block is a *share*, generated, masked (outlier medians over the share) and shuffled on
its own (key from (seed, r, share)); batch j of the round is the concatenation, in share order,
of slice j of every share's valid tokens (batch_tokens / n each), and a round has as many
batches as its poorest share allows. So each process of a data-parallel run generates only its
own share (`share=i`) and supplies its own rows of the global batch, and one process given the
same n (`share=None`) builds the same global batch: the n-process step equals that one-process
step. (A batch that mixed tokens of every share at random, as n = 1 does, would put a varying
number of each process's tokens in every batch: processes would have to exchange activations.)
n = 1 is the layout of a single process, unchanged.

Nothing is read silently wrong: local files must be valid text in their encoding (UTF-8 unless
told otherwise; `check_text_source` refuses a binary or mis-encoded file before any model is
loaded, naming it). Cache files (tokenized contexts, activation rounds) are written atomically
(`clt.io.atomic_write`); one that cannot be read back (a run killed by an older version) is
discarded with a note and made again, and an activation cache made with other settings (its
`cache.json`) is refused.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import re
import sys
import zipfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from clt.configs import ConfigError
from clt.io import atomic_write
from clt.lm.loading import LoadedModel
from clt.lm.model import activations


# --- text ----------------------------------------------------------------------------------------
def _expand(source: str) -> list[Path]:
    files: list[Path] = []
    for part in (s.strip() for s in source.split(",") if s.strip()):
        p = Path(part).expanduser()
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.suffix in (".txt", ".jsonl"))
        elif p.is_file():
            files.append(p)
        else:
            hits = sorted(Path(h) for h in glob.glob(str(p), recursive=True))
            if not hits:
                raise ConfigError(f"no text found at '{part}': give .txt/.jsonl files, a "
                                  "directory, a glob, or hf:DATASET")
            files += [h for h in hits if h.is_file()]
    if not files:
        raise ConfigError(f"no .txt or .jsonl files in '{source}'")
    return files


def _note(msg: str) -> None:
    print(f"cltrace: note: {msg}", file=sys.stderr)


def _not_text(path: Path, encoding: str, why: str) -> ConfigError:
    return ConfigError(f"{path} is not {encoding} text ({why}); convert it, or set encoding "
                       "(--encoding, e.g. latin-1) or text_errors = replace (--text-errors)")


def _binary(path: Path, offset: int) -> ConfigError:
    return ConfigError(f"{path} looks binary, not text (a NUL character at offset {offset}); "
                       "give .txt / .jsonl text files (UTF-16 text: set encoding)")


SNIFF_BYTES = 1 << 16


def check_text_source(source: str, text_field: str = "text", encoding: str = "utf-8",
                      errors: str = "strict") -> None:
    """Refuse, before any model is loaded, a text source that cannot be trained on: no files,
    only empty files, or a file whose first 64 KiB are not text in `encoding` (binary, or
    Latin-1 read as UTF-8), or a .jsonl whose first row lacks `text_field`. (The rest of each
    file is checked as it is read: `iter_documents`.) Streamed `hf:` sources are not checked."""
    if source.startswith("hf:"):
        return
    files = _expand(source)
    if not any(f.stat().st_size for f in files):
        raise ConfigError(f"'{source}' holds no text: its files are empty")
    for path in files:
        try:
            with path.open("rb") as f:
                head = f.read(SNIFF_BYTES)
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
        try:
            text = codecs.getincrementaldecoder(encoding)(errors).decode(head, final=False)
        except UnicodeDecodeError as e:
            raise _not_text(path, encoding, f"byte 0x{head[e.start]:02x} at offset {e.start}"
                            ) from None
        if "\x00" in text:
            raise _binary(path, text.index("\x00"))
        if path.suffix == ".jsonl":  # the rows the sniffed bytes hold whole
            for n, row in enumerate(text.splitlines(keepends=True), 1):
                if row.strip() and row.endswith("\n"):
                    _json_text(row, path, n, text_field)


def _json_text(line: str, path: Path, n: int, text_field: str):
    try:
        text = json.loads(line)[text_field]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ConfigError(f"{path}:{n}: not a JSON object with a '{text_field}' field; set "
                          "text_field") from None
    if text is not None and not isinstance(text, str):
        raise ConfigError(f"{path}:{n}: '{text_field}' is not a string; set text_field")
    return text


def iter_documents(source: str, text_field: str = "text", encoding: str = "utf-8",
                   errors: str = "strict") -> Iterator[str]:
    """Documents from local files/globs or a streamed Hugging Face dataset (`hf:...`).

    Local files are decoded with `encoding`; bytes not valid in it are refused (`errors`
    "strict", naming the file and line) or replaced by U+FFFD ("replace"). A NUL character
    (a binary file) is always refused."""
    if source.startswith("hf:"):
        yield from _hf_documents(source[3:], text_field)
        return
    for path in _expand(source):
        n = 0
        try:
            with path.open(encoding=encoding, errors=errors) as f:
                if path.suffix == ".jsonl":
                    for n, line in enumerate(f, 1):
                        if not line.strip():
                            continue
                        text = _json_text(line, path, n, text_field)
                        if text:
                            yield text
                    continue
                doc: list[str] = []
                for n, line in enumerate(f, 1):
                    if "\x00" in line:
                        raise _binary(path, line.index("\x00"))
                    if line.strip():
                        doc.append(line)
                    elif doc:
                        yield "".join(doc).strip()
                        doc = []
                if doc:
                    yield "".join(doc).strip()
        except UnicodeDecodeError as e:
            raise _not_text(path, encoding, f"byte 0x{e.object[e.start]:02x} after line {n}"
                            ) from None


def _hf_documents(spec: str, text_field: str) -> Iterator[str]:
    name, config, split = (spec.split(":") + [None, None])[:3]
    try:
        import datasets
    except ImportError:
        raise ConfigError("hf: sources need the `datasets` package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, config, split=split or "train", streaming=True)
    except Exception as e:  # network, unknown dataset
        raise ConfigError(f"cannot stream Hugging Face dataset '{name}': "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    for row in ds:
        if text_field not in row:
            raise ConfigError(f"dataset '{name}' has no '{text_field}' column; set text_field "
                              f"(columns: {sorted(row)})")
        if row[text_field]:
            yield row[text_field]


# --- token contexts ------------------------------------------------------------------------------
def _token_stream(docs: Iterator[str], tokenizer, eos: int | None, chunk: int = 256
                  ) -> Iterator[np.ndarray]:
    batch: list[str] = []
    for d in docs:
        batch.append(d)
        if len(batch) == chunk:
            yield from _encode_batch(batch, tokenizer, eos)
            batch = []
    if batch:
        yield from _encode_batch(batch, tokenizer, eos)


def _encode_batch(batch, tokenizer, eos):
    for enc in tokenizer.backend.encode_batch(batch, add_special_tokens=False):
        ids = enc.ids + ([eos] if eos is not None else [])
        yield np.asarray(ids, np.int32)


def pack_contexts(stream: Iterator[np.ndarray], context_length: int, bos: int | None
                  ) -> Iterator[np.ndarray]:
    """Fixed-length contexts [context_length] from a token stream, each starting with BOS."""
    body = context_length - (bos is not None)
    if body < 1:  # no context could ever be full: the loop below would never end
        raise ConfigError(f"context_length must be at least {2 if bos is not None else 1} "
                          f"(BOS and one token), got {context_length}")
    buf = np.zeros(0, np.int32)
    for ids in stream:
        buf = np.concatenate([buf, ids])
        while len(buf) >= body:
            ctx, buf = buf[:body], buf[body:]
            yield ctx if bos is None else np.concatenate([[bos], ctx]).astype(np.int32)


class LocalContexts:
    """All contexts of local files, tokenized once (cached as .npy) and read in a shuffled order
    that is a pure function of (seed, epoch): any round can be produced again on resume."""

    def __init__(self, source: str, tokenizer, context_length: int, seed: int = 0,
                 text_field: str = "text", cache_dir: str | Path | None = None,
                 holdout: float = 0.0, split: str = "train", encoding: str = "utf-8",
                 text_errors: str = "strict"):
        self.context_length, self.seed = context_length, seed
        bos = tokenizer.bos_token_id
        eos = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None
        files = _expand(source)
        key = hashlib.sha256(json.dumps(
            [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
            + [tokenizer.vocab_size, bos, eos, context_length, text_field, encoding,
               text_errors]).encode()).hexdigest()
        self.identity = {"texts": key[:16], "holdout": holdout, "split": split, "seed": seed}
        cache = Path(cache_dir or _default_cache()) / f"contexts-{key[:16]}.npy"
        contexts = _load_npy(cache, context_length)
        if contexts is None:
            docs = iter_documents(source, text_field, encoding, text_errors)
            ctx = list(pack_contexts(_token_stream(docs, tokenizer, eos), context_length, bos))
            if not ctx:
                raise ConfigError(f"'{source}' holds fewer than {context_length} tokens; give "
                                  "more text or a shorter context_length")
            contexts = np.stack(ctx)
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(cache, lambda f: np.save(f, contexts))
            except (OSError, ConfigError) as e:  # a cache is an optimisation: go on without
                _note(f"tokenized contexts not cached ({e})")
        n_hold = int(round(len(contexts) * holdout))
        # Held-out contexts are the last ones in file order (never seen in training).
        self.contexts = contexts[len(contexts) - n_hold:] if split == "heldout" \
            else contexts[:len(contexts) - n_hold]
        if len(self.contexts) == 0:
            raise ConfigError(f"no {split} contexts in '{source}' (holdout={holdout})")

    def __len__(self) -> int:
        return len(self.contexts)

    def take(self, start: int, count: int) -> np.ndarray:
        """Contexts start..start+count of the endless shuffled sequence (epoch after epoch)."""
        n = len(self.contexts)
        idx = np.arange(start, start + count)
        epochs = idx // n
        out = np.empty((count, self.context_length), np.int32)
        for e in np.unique(epochs):
            order = np.random.default_rng([self.seed, int(e)]).permutation(n)
            sel = epochs == e
            out[sel] = self.contexts[order[idx[sel] % n]]
        return out


class StreamingContexts:
    """Contexts from a streamed dataset, in stream order; resuming re-reads and skips."""

    def __init__(self, source: str, tokenizer, context_length: int, text_field: str = "text"):
        self.source, self.tokenizer, self.text_field = source, tokenizer, text_field
        self.context_length = context_length
        self.identity = {"source": source, "text_field": text_field}
        self._it, self._pos = None, 0

    def _restart(self):
        tok = self.tokenizer
        eos = tok.eos_token_ids[0] if tok.eos_token_ids else None
        self._it = pack_contexts(_token_stream(iter_documents(self.source, self.text_field), tok,
                                               eos), self.context_length, tok.bos_token_id)
        self._pos = 0

    def take(self, start: int, count: int) -> np.ndarray:
        if self._it is None or start < self._pos:
            self._restart()
        for _ in range(start - self._pos):
            next(self._it)
        out = []
        for _ in range(count):
            try:
                out.append(next(self._it))
            except StopIteration:
                self._restart()  # another epoch over the stream
                out.append(next(self._it))
        self._pos = start + count
        return np.stack(out)


def _load_npy(path: Path, context_length: int) -> np.ndarray | None:
    """A cached contexts array, or None when absent; an unreadable one (truncated by a kill) is
    discarded with a note."""
    if not path.exists():
        return None
    try:
        a = np.load(path, allow_pickle=False)
        if a.ndim == 2 and a.shape[1] == context_length and len(a):
            return a
        why = f"shape {a.shape}"
    except (OSError, ValueError, EOFError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
    _note(f"discarded the unreadable cache file {path} ({why}); tokenizing again")
    path.unlink(missing_ok=True)
    return None


def open_contexts(source: str, tokenizer, context_length: int, seed: int = 0,
                  text_field: str = "text", holdout: float = 0.0, split: str = "train",
                  cache_dir: str | Path | None = None, encoding: str = "utf-8",
                  text_errors: str = "strict"):
    if tokenizer is None:
        raise ConfigError("this model has no tokenizer; give a model directory with "
                          "tokenizer.json or a GGUF file")
    if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)) \
            or context_length < 2:
        raise ConfigError(f"context_length must be an integer >= 2, got {context_length!r}")
    if not 0 <= holdout < 1:
        raise ConfigError(f"holdout must be in [0, 1), got {holdout!r}")
    if split not in ("train", "heldout"):
        raise ConfigError(f"split must be 'train' or 'heldout', got {split!r}")
    if text_errors not in ("strict", "replace"):
        raise ConfigError(f"text_errors must be 'strict' or 'replace', got {text_errors!r}")
    if source.startswith("hf:"):
        return StreamingContexts(source, tokenizer, context_length, text_field)
    return LocalContexts(source, tokenizer, context_length, seed, text_field, cache_dir, holdout,
                         split, encoding, text_errors)


def _default_cache() -> Path:
    from clt.io import cache_root

    return cache_root() / "data"


# --- activations ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataPosition:
    """Where a run is in its data: round index and batches of that round already used."""

    round: int = 0
    batch: int = 0
    shares: int = 1  # the data-parallel layout the batch index counts in (`ActivationStream`)

    def to_dict(self) -> dict:
        return {"round": self.round, "batch": self.batch, "shares": self.shares}


@partial(jax.jit, static_argnames=("cfg", "input_point", "layers", "output_point"))
def _capture(params, cfg, tokens, input_point, layers: tuple[int, ...], output_point="mlp_out"):
    # Only the blocks up to the last layer the transcoder reads: no later block, no final norm,
    # no unembedding.
    cap = activations(params, cfg, tokens, (input_point, output_point), layers[-1] + 1)
    x, y = getattr(cap, input_point), getattr(cap, output_point)
    if layers != tuple(range(len(layers))):  # some layers only (an SAE's `layers`)
        x, y = x[jnp.asarray(layers)], y[jnp.asarray(layers)]
    # [layer, b, pos, d] -> [b * pos, layer, d]: one training example per token.
    L, B, T, D = x.shape
    return (jnp.moveaxis(x, 0, 2).reshape(B * T, L, D),
            jnp.moveaxis(y, 0, 2).reshape(B * T, L, D))


@partial(jax.jit, static_argnames=("context_length", "drop_first"))
def _valid_and_order(x, key, context_length: int, drop_first: bool, outlier_factor):
    """Valid-token mask (not the first position, no layer's input norm above outlier_factor x its
    median) and a random order that puts valid tokens first."""
    n = x.shape[0]
    valid = jnp.ones((n,), bool)
    if drop_first:
        valid &= (jnp.arange(n) % context_length) != 0
    norms = jnp.linalg.norm(x.astype(jnp.float32), axis=-1)  # [tokens, layer]
    med = jnp.nanmedian(jnp.where(valid[:, None], norms, jnp.nan), axis=0)
    med = jnp.where(jnp.isnan(med), jnp.inf, med)
    valid &= jnp.all(norms <= outlier_factor * med, axis=-1)
    noise = jax.random.uniform(key, (n,))
    order = jnp.argsort(jnp.where(valid, noise, 2.0))
    return order, valid.sum()


class ActivationStream:
    """Shuffled batches of (transcoder input x, MLP output y), each [batch_tokens, layer, d_model]
    (`output_point`: what y is; an SAE's y is its input, `output_point` = `input_point`).

    Arrays stay on the default device; the trainer lays each batch out over its mesh.

    shares, share: the data-parallel layout (module docstring). With `shares` n > 1 a batch is n
    slices of batch_tokens / n tokens, slice i from share i of the round. `share` None serves
    whole batches (every share generated here); `share` i serves slice i only: the rows that
    process i of n supplies, generating 1/n of every round. Processes that serve one share each
    agree on every round's number of batches (an all-gather of one integer, made by the thread
    that iterates `batches`, never the prefetching one).
    """

    def __init__(self, model: LoadedModel, contexts, *, input_point: str, batch_tokens: int,
                 round_contexts: int, model_batch: int = 8, seed: int = 0,
                 drop_bos: bool = True, outlier_factor: float = 10.0, dtype=jnp.float32,
                 cache_dir: str | Path | None = None, n_layers: int | None = None,
                 shares: int = 1, share: int | None = None, output_point: str = "mlp_out",
                 layers: tuple[int, ...] | None = None):
        self.model, self.contexts = model, contexts
        # The model layers captured, in order: `layers` (an SAE's, `TranscoderConfig.
        # model_layers`), else the first n_layers (default all); x[:, l] is model layer
        # layers[l]. The model runs only up to the last of them.
        from clt.transcoder import check_layers

        self.layers = tuple(layers) if layers else tuple(range(n_layers or model.cfg.n_layers))
        self.n_layers = len(self.layers)
        check_layers("layers", self.layers)
        if self.layers[-1] >= model.cfg.n_layers:
            raise ConfigError(f"layers {list(self.layers)}: the model has layers 0.."
                              f"{model.cfg.n_layers - 1}")
        self.input_point, self.batch_tokens = input_point, batch_tokens
        self.output_point = output_point
        self.round_contexts, self.model_batch = round_contexts, model_batch
        self.seed, self.drop_bos, self.outlier_factor = seed, drop_bos, outlier_factor
        self.dtype = dtype
        self.shares, self.share = shares, share
        self.cache_dir = Path(cache_dir) if cache_dir else None
        for name in ("batch_tokens", "round_contexts", "model_batch", "shares"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        if share is not None and (isinstance(share, bool) or not isinstance(
                share, (int, np.integer)) or not 0 <= share < shares):
            raise ConfigError(f"share must be None or in [0, {shares}), got {share!r}")
        if self._one_of_processes() and jax.process_count() != shares:
            raise ConfigError(f"{jax.process_count()} processes cannot serve {shares} shares: "
                              "each process serves one")
        if not outlier_factor >= 1:  # NaN too
            raise ConfigError(f"outlier_factor must be >= 1 (or inf), got {outlier_factor!r}")
        T = contexts.context_length
        if T > model.cfg.max_position:
            raise ConfigError(f"context_length {T} exceeds the model's context "
                              f"{model.cfg.max_position}")
        if batch_tokens % shares:
            raise ConfigError(f"batch_tokens={batch_tokens} is not divisible by the {shares} "
                              "data shares (processes that generate activations)")
        if round_contexts < shares:
            raise ConfigError(f"round_contexts={round_contexts} is fewer than the {shares} data "
                              "shares (processes that generate activations); raise "
                              "round_contexts")
        if shares == 1 and round_contexts * (T - 1) < batch_tokens:
            raise ConfigError(f"a round of {round_contexts} contexts x {T} tokens is smaller than "
                              f"one batch of {batch_tokens}; raise round_contexts")
        if shares > 1 and (round_contexts // shares) * (T - 1) < batch_tokens // shares:
            raise ConfigError(f"a share of {round_contexts // shares} contexts x {T} tokens (a "
                              f"round of {round_contexts} in {shares} shares) is smaller than its "
                              f"{batch_tokens // shares} tokens of each batch; raise "
                              "round_contexts")
        self.tokens_generated = 0
        if self.cache_dir is not None:
            self._open_cache()

    # --- the data-parallel layout ---------------------------------------------------------------
    @property
    def local_shares(self) -> list[int]:
        """The shares this stream generates and serves, in batch order."""
        return list(range(self.shares)) if self.share is None else [self.share]

    def share_span(self, share: int) -> tuple[int, int]:
        """The contexts [lo, hi) of every round (offsets in it) that share `share` holds."""
        R, n = self.round_contexts, self.shares
        return share * R // n, (share + 1) * R // n

    def share_contexts(self, r: int, share: int) -> np.ndarray:
        """The token contexts [count, pos] of share `share` of round r."""
        lo, hi = self.share_span(share)
        return self.contexts.take(r * self.round_contexts + lo, hi - lo)

    def _one_of_processes(self) -> bool:
        """Whether this stream serves one share and the other processes the others."""
        return self.share is not None and self.shares > 1 and jax.process_count() > 1

    def _agree(self, n_batches: int) -> int:
        """A round's number of batches: what the poorest share allows, over every process."""
        if not self._one_of_processes():
            return n_batches
        from jax.experimental import multihost_utils

        every = multihost_utils.process_allgather(np.asarray(n_batches, np.int32))
        return int(np.min(np.asarray(every)))

    # --- the activation cache: round_NNNNNN.npz files and cache.json (the settings) ---------
    def _cache_settings(self) -> dict:
        cfg = self.model.cfg
        return {"model": cfg.name, "source": str(self.model.source), "d_model": cfg.d_model, "vocab_size": cfg.vocab_size,
                "n_layers": self.n_layers, "input_point": self.input_point,
                # only when not the first n_layers: caches written before SAE layers stay valid
                **({} if self.layers == tuple(range(self.n_layers)) else
                   {"layers": list(self.layers)}),
                # only when not the MLP output: caches written before SAEs stay valid
                **({} if self.output_point == "mlp_out" else
                   {"output_point": self.output_point}),
                "dtype": str(jnp.dtype(self.dtype)),
                "context_length": self.contexts.context_length,
                "round_contexts": self.round_contexts,
                **getattr(self.contexts, "identity", {})}

    def _cache_name(self, r: int, share: int) -> str:
        """round_NNNNNN.npz (one share), round_NNNNNN.shareIofN.npz (share I of N)."""
        tail = "" if self.shares == 1 else f".share{share}of{self.shares}"
        return f"round_{r:06d}{tail}.npz"

    def _open_cache(self) -> None:
        """Check the cache directory's settings (refuse another run's activations), write them
        if new, and remove the temporary files of writers that were killed (of the shares this
        stream writes: another process's are its own to clean)."""
        d = self.cache_dir
        if d.exists() and not d.is_dir():
            raise ConfigError(f"cache_activations {d} exists and is not a directory")
        d.mkdir(parents=True, exist_ok=True)
        for tmp in d.glob(".round_*.npz.*.tmp"):
            m = re.fullmatch(r"\.round_\d+(?:\.share(\d+)of(\d+))?\.npz\.(\d+)\.tmp", tmp.name)
            if m is not None and m.group(1) is not None and (
                    int(m.group(2)) != self.shares or int(m.group(1)) not in self.local_shares):
                continue
            if m is None or not process_alive(int(m.group(3))):
                _note(f"removed {tmp}, a cache file left unfinished by a killed run")
                tmp.unlink(missing_ok=True)
        want = json.loads(json.dumps(self._cache_settings()))
        manifest = d / "cache.json"
        if manifest.exists():
            try:
                have = json.loads(manifest.read_text())
            except (OSError, ValueError):
                have = None
            if isinstance(have, dict) and have != want:
                diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
                raise ConfigError(f"cache_activations {d} holds activations made with other "
                                  f"settings ({', '.join(diff)} differ); choose another "
                                  "directory, or delete it")
            if have == want:
                return
        if any(d.glob("round_*.npz")):
            _note(f"{d} has no readable cache.json (an older cltrace wrote it): assuming its "
                  "rounds were made with these settings")
        atomic_write(manifest, json.dumps(want, indent=1))

    def _cached_round(self, r: int, share: int):
        """Share `share` of round r from the cache, or None (absent, or unreadable: then
        discarded)."""
        path = self.cache_dir / self._cache_name(r, share)
        if not path.exists():
            return None
        T = self.contexts.context_length
        lo, hi = self.share_span(share)
        try:
            with np.load(path, allow_pickle=False) as z:
                x, y = np.asarray(z["x"]), np.asarray(z["y"])
            if x.shape != y.shape or x.shape[:2] != ((hi - lo) * T, self.n_layers):
                raise ValueError(f"shape {x.shape}")
            return jnp.asarray(x), jnp.asarray(y)
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            _note(f"discarded the unreadable activation cache file {path} ({why}); "
                  f"generating round {r} again")
            path.unlink(missing_ok=True)
            return None

    def _round_arrays(self, r: int, share: int):
        T = self.contexts.context_length
        if self.cache_dir is not None and (got := self._cached_round(r, share)) is not None:
            return got
        ctx = self.share_contexts(r, share)
        xs, ys = [], []
        for i in range(0, len(ctx), self.model_batch):
            x, y = _capture(self.model.params, self.model.cfg,
                            jnp.asarray(ctx[i:i + self.model_batch]), self.input_point,
                            self.layers, self.output_point)
            xs.append(x.astype(self.dtype))
            ys.append(y.astype(self.dtype))
        x, y = jnp.concatenate(xs), jnp.concatenate(ys)
        self.tokens_generated += ctx.size
        if self.cache_dir is not None:  # atomic: a kill leaves the old file or none, never half
            xh, yh = np.asarray(x), np.asarray(y)
            atomic_write(self.cache_dir / self._cache_name(r, share),
                         lambda f: np.savez(f, x=xh, y=yh, context_length=T))
        return x, y

    def round(self, r: int, share: int | None = None):
        """(x, y, order, n_valid) of share `share` of round r (default: the one this stream
        serves; with one share, the whole round); order lists valid tokens first, shuffled."""
        if share is None:
            if self.share is None and self.shares > 1:
                raise ValueError("this stream serves every share: say which")
            share = self.share or 0
        x, y = self._round_arrays(r, share)
        key = jax.random.fold_in(jax.random.key(self.seed), r)
        if self.shares > 1:  # each share shuffled on its own (one share: the key of old)
            key = jax.random.fold_in(key, share)
        order, n_valid = _valid_and_order(x, key, self.contexts.context_length, self.drop_bos,
                                          self.outlier_factor)
        return x, y, order, int(n_valid)

    def _pass_order(self, r: int, p: int, share: int, order, n_valid: int):
        """The valid tokens of a share in the order of pass p (p > 0) over round r."""
        seed = [self.seed, r, p] if self.shares == 1 else [self.seed, r, p, share]
        return order[np.random.default_rng(seed).permutation(n_valid)]

    def batches(self, start: DataPosition = DataPosition(), reuse: int = 1,
                prefetch: bool = False
                ) -> Iterator[tuple[DataPosition, jax.Array, jax.Array]]:
        """Endless (position after this batch, x, y) from `start` on (x, y: this stream's
        shares of the batch, batch_tokens * len(local_shares) / shares tokens).

        reuse: passes over each round (each pass in its own shuffled order; a position's batch
        index counts over all passes). prefetch: generate the next round in a background thread
        while this one is served (overlaps the model with training steps where the device
        runs them concurrently)."""
        r, b = start.round, start.batch
        local, per = self.local_shares, self.batch_tokens // self.shares
        pool = ThreadPoolExecutor(1) if prefetch else None
        ahead: tuple[int, Future] | None = None

        def generate(r: int) -> list:
            return [self.round(r, s) for s in local]

        try:
            while True:
                got = ahead[1].result() if ahead is not None and ahead[0] == r else generate(r)
                if pool is not None:
                    ahead = (r + 1, pool.submit(generate, r + 1))
                n_valid = min(g[3] for g in got)
                n_batches = self._agree(n_valid // per)
                if n_batches == 0 and self.shares == 1:
                    raise ConfigError(f"round {r} has only {n_valid} valid tokens for batches of "
                                      f"{self.batch_tokens}; raise round_contexts")
                if n_batches == 0:
                    raise ConfigError(f"round {r} has a share with fewer than {per} valid "
                                      f"tokens, its part of each batch of {self.batch_tokens}; "
                                      "raise round_contexts")
                total = n_batches * reuse
                orders = [(0, g[2]) for g in got]
                for i in range(b, total):
                    p, j = divmod(i, n_batches)
                    xs, ys = [], []
                    for k, (x, y, order, nv) in enumerate(got):
                        if p != orders[k][0]:  # a later pass: the valid tokens in another order
                            orders[k] = (p, self._pass_order(r, p, local[k], order, nv))
                        sel = orders[k][1][j * per:(j + 1) * per]
                        xs.append(x[sel])
                        ys.append(y[sel])
                    nxt = DataPosition(r, i + 1, self.shares) if i + 1 < total else \
                        DataPosition(r + 1, 0, self.shares)
                    yield nxt, _concat(xs), _concat(ys)
                r, b = r + 1, 0
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)


def _concat(parts: list) -> jax.Array:
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def process_alive(pid: int) -> bool:
    """Whether a process `pid` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def estimate_norms(stream: ActivationStream, rounds: int = 1):
    """Per-layer mean and scale (RMS distance to the mean, per dimension) of inputs and outputs,
    from the valid tokens of the first rounds, as `clt.transcoder.Norms`.

    With data shares, the sums of every share of a round are added in share order; processes
    that serve one share each all-gather their shares' sums (not their tokens), so every
    process gets the same norms, bit for bit those of one process given the same shares."""
    from clt.transcoder import Norms

    sums = None
    for r in range(rounds):
        shares = _every_share([_norm_sums(stream.round(r, s)) for s in stream.local_shares],
                              stream)
        parts = shares[0]
        for more in shares[1:]:
            parts = [a + b for a, b in zip(parts, more)]
        sums = parts if sums is None else [s + p for s, p in zip(sums, parts)]
    out = []
    for s, sq, n in (sums[:3], sums[3:]):
        mean = s / n
        var = jnp.maximum(sq / n - jnp.square(mean), 0.0).mean(-1)  # [layer]
        out += [mean, jnp.sqrt(var) + 1e-6]
    return Norms(in_mean=out[0], in_scale=out[1], out_mean=out[2], out_scale=out[3])


def _norm_sums(got) -> list:
    """[sum x, sum x^2, n, sum y, sum y^2, n] over the valid tokens of one share of a round."""
    x, y, order, n_valid = got
    sel = order[:n_valid]
    parts = []
    for a in (x, y):
        a = a[sel].astype(jnp.float32)
        parts += [a.sum(0), jnp.square(a).sum(0), n_valid]
    return parts


def _every_share(local: list, stream: ActivationStream) -> list:
    """The norm sums of every share of a round, in share order: this stream's, and where each
    process serves one share, every process's (all-gathered)."""
    if not stream._one_of_processes():
        return local
    from jax.experimental import multihost_utils

    (xs, xq, n, ys, yq, _), = local
    flat = np.concatenate([np.asarray(a, np.float32).ravel() for a in (xs, xq, ys, yq)])
    every = np.asarray(multihost_utils.process_allgather(flat))  # [process, 4 * layer * d]
    ids = np.asarray(multihost_utils.process_allgather(np.asarray([stream.share, n], np.int32)))
    out: list = [None] * stream.shares
    for row, (share, n_valid) in zip(every, ids):
        a = [jnp.asarray(part.reshape(xs.shape)) for part in np.split(row, 4)]
        out[int(share)] = [a[0], a[1], int(n_valid), a[2], a[3], int(n_valid)]
    return out


__all__ = [
    "ActivationStream", "DataPosition", "LocalContexts", "StreamingContexts",
    "check_text_source", "estimate_norms", "iter_documents", "open_contexts", "pack_contexts",
]
