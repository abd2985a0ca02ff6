"""Tracing on a mesh (`TraceConfig.mesh_data` x `mesh_feature`): on 8 simulated CPU devices
(tests/conftest.py) the transcoder's features and the vocabulary are split over 'feature' and
each batch of rows over 'data'; every row equals the single-device trace's (<= 1e-5 of the
row's largest entry), dense, streamed and capped."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attribution.trace import TraceConfig, setup_trace, trace_tokens
from clt.configs import ConfigError
from clt.lm import load_model
from tests.attribution.helpers import random_transcoder

IDS = [5, 9, 3, 17, 22, 8, 40, 11]


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    m = load_model(tiny_dirs("llama"))
    cfg, p = random_transcoder(m.cfg, 16)  # a CLT: every layer writes to all later ones
    p = dataclasses.replace(p, log_threshold=jnp.full_like(p.log_threshold, np.log(0.05)))
    return m, cfg, p


def _rows_close(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b| of each row relative to the row's largest |b|, over rows."""
    scale = np.maximum(np.abs(b).max(axis=1, keepdims=True), 1e-30)
    return float((np.abs(a - b) / scale).max())


@pytest.mark.parametrize("fields", [{"adjacency": "dense"},
                                    {"adjacency": "stream", "stream_features": 24},
                                    {"max_feature_nodes": 30}], ids=["dense", "stream", "capped"])
@pytest.mark.parametrize("mesh", [(8, 1), (4, 2), (2, 4)], ids=["8x1", "4x2", "2x4"])
def test_mesh_trace_equals_one_device(tiny, fields, mesh):
    assert len(jax.devices()) >= 8
    m, cfg, p = tiny
    base = TraceConfig(prompt="x", batch_size=8, **fields)
    one = trace_tokens(m.params, m.cfg, cfg, p, IDS, base)
    sharded_cfg = dataclasses.replace(base, mesh_data=mesh[0], mesh_feature=mesh[1])
    st = setup_trace(m.params, m.cfg, cfg, p, IDS, sharded_cfg)
    W = st.make.tc_params.W_dec[0]
    assert len({str(s.index) for s in W.addressable_shards}) == mesh[1]  # features split
    assert st.make.batch % mesh[0] == 0
    many = trace_tokens(m.params, m.cfg, cfg, p, IDS, sharded_cfg)
    np.testing.assert_array_equal(many.feature_index, one.feature_index)
    np.testing.assert_array_equal(many.feature_layer, one.feature_layer)
    assert _rows_close(many.adjacency, one.adjacency) <= 1e-5
    assert many.scores.replacement == pytest.approx(one.scores.replacement, rel=1e-5)
    assert many.scores.completeness == pytest.approx(one.scores.completeness, rel=1e-5)


def test_mesh_settings_are_checked(tiny):
    m, cfg, p = tiny
    with pytest.raises(ConfigError, match="mesh_data must be a positive number"):
        TraceConfig(prompt="x", mesh_data=0)
    with pytest.raises(ConfigError, match="only one of mesh_data / mesh_feature"):
        TraceConfig(prompt="x", mesh_data=-1, mesh_feature=-1)
    with pytest.raises(ConfigError, match="needs 16 devices"):
        trace_tokens(m.params, m.cfg, cfg, p, IDS, TraceConfig(prompt="x", mesh_data=16))
    with pytest.raises(ConfigError, match="do not split over the mesh's feature axis"):
        odd, q = random_transcoder(m.cfg, 12)
        trace_tokens(m.params, m.cfg, odd, q, IDS, TraceConfig(prompt="x", mesh_feature=8,
                                                               mesh_data=1))
