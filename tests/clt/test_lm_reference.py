"""Our JAX models against transformers (PyTorch) on tiny random models of every family."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from clt.lm import forward, load_model
from tests.clt.hf_tiny import FAMILIES, SLIDING_WINDOW, make_tiny, torch_logits

TOL = 1e-4  # max abs logit difference, float32
SEQ = 3 * SLIDING_WINDOW  # longer than the Gemma test configs' sliding window


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    family = request.param
    d = tmp_path_factory.mktemp(family)
    # One family saved as a sharded checkpoint, to cover model.safetensors.index.json.
    torch_model = make_tiny(family, d, max_shard_size="100KB" if family == "qwen2" else None)
    return family, torch_model, load_model(str(d))


def test_logits_match_transformers(tiny):
    family, torch_model, ours = tiny
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 128, size=(3, SEQ))
    ref = torch_logits(torch_model, tokens)
    got, _ = forward(ours.params, ours.cfg, jnp.asarray(tokens))
    diff = np.abs(np.asarray(got) - ref).max()
    assert diff <= TOL, f"{family}: max abs logit diff {diff:.2e}"
    assert np.abs(ref).max() > 0.5, "reference logits are degenerate; the comparison would be weak"


def test_padded_batch_matches_transformers(tiny):
    family, torch_model, ours = tiny
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, 128, size=(2, SEQ))
    mask = np.ones((2, SEQ), np.int64)
    mask[1, SEQ - 7:] = 0  # right padding on the second row
    tokens[1, SEQ - 7:] = 0
    ref = torch_logits(torch_model, tokens, mask)
    got, _ = forward(ours.params, ours.cfg, jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    valid = mask.astype(bool)
    diff = np.abs(np.asarray(got)[valid] - ref[valid]).max()
    assert diff <= TOL, f"{family}: padded batch max abs diff {diff:.2e}"


def test_sliding_window_matters(tiny):
    """The window must change results, else the long-sequence test would not cover it."""
    family, _, ours = tiny
    if not ours.cfg.sliding_window:
        pytest.skip("no sliding layers in this family")
    tokens = jnp.asarray(np.random.default_rng(2).integers(3, 128, size=(1, SEQ)))
    full = ours.cfg.replace(sliding_window=10**6)  # same RoPE per layer, window never binds
    a, _ = forward(ours.params, ours.cfg, tokens)
    b, _ = forward(ours.params, full, tokens)
    assert np.abs(np.asarray(a - b))[:, SLIDING_WINDOW:].max() > 1e-3
    np.testing.assert_allclose(np.asarray(a)[:, :SLIDING_WINDOW], np.asarray(b)[:, :SLIDING_WINDOW],
                               atol=1e-5)
