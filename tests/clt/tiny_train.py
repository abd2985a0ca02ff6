"""A tiny random language model with a word-level tokenizer, and a small synthetic corpus, for
training tests (no torch, no download)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from clt.lm import LoadedModel, ModelConfig, Tokenizer, random_params

WORDS = [f"w{i}" for i in range(60)]


def tiny_tokenizer() -> Tokenizer:
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Backend(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    return Tokenizer(backend, bos_token_id=1, eos_token_ids=(2,))


def tiny_model(n_layers: int = 3, d_model: int = 32, seed: int = 0) -> LoadedModel:
    cfg = ModelConfig(vocab_size=64, d_model=d_model, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                      head_dim=8, d_mlp=64, max_position=64, name="tiny-llama", bos_token_id=1,
                      eos_token_ids=(2,))
    params = random_params(cfg, jax.random.key(seed), scale=0.2)
    return LoadedModel(cfg, params, tiny_tokenizer(), "tiny")


def write_corpus(path: Path, n_docs: int = 200, seed: int = 0) -> Path:
    """Documents drawn from a sparse Markov chain over WORDS, so activations have structure."""
    rng = np.random.default_rng(seed)
    nxt = rng.integers(0, len(WORDS), size=(len(WORDS), 3))
    docs = []
    for _ in range(n_docs):
        w = int(rng.integers(len(WORDS)))
        words = []
        for _ in range(int(rng.integers(20, 60))):
            words.append(WORDS[w])
            w = int(nxt[w, rng.integers(3)])
        docs.append(" ".join(words))
    path.write_text("\n\n".join(docs) + "\n")
    return path
