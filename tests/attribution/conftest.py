"""Fixtures: tiny random models of each family (saved once per session), float64 mode."""

from __future__ import annotations

import jax
import pytest

from tests.clt.hf_tiny import make_tiny


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    made = {}

    def get(family: str):
        if family not in made:
            d = tmp_path_factory.mktemp(f"tiny_{family}")
            make_tiny(family, d)
            made[family] = d
        return str(made[family])

    return get


@pytest.fixture
def x64():
    """Float64 for the duration of a test, restored afterwards (`clt.lm.model.norm` computes in
    float64 for float64 inputs, so comparisons hold to ~1e-12)."""
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", before)
