"""Test setup: 8 simulated CPU devices (sharding tests), float32 matmuls at full precision."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Commands run in-process here: keep JAX's persistent compilation cache (on by default for the
# `cltrace` command, cltrace/compile_cache.py) out of the user's home; tests/viewer/test_compile_cache.py
# checks it in its own folder.
os.environ.setdefault("CLTRACE_COMPILE_CACHE", "0")
os.environ.setdefault("CLTRACE_MODEL_CACHE", "0")  # converted GGUF models (tests/clt/test_model_cache.py)

import jax

# Reference comparisons need true float32 matmuls (TPU/GPU default to lower precision).
jax.config.update("jax_default_matmul_precision", "highest")


import pytest


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops JAX's compiled programs after each test module. One pytest process compiles
    thousands of programs; kept all run long, a full-suite run here once crashed inside XLA's
    compiler (segfault) near its end, while the same test passed alone."""
    yield
    jax.clear_caches()


@pytest.fixture
def lowered():
    """A context manager counting the programs lowered inside it (jax.monitoring's lowering
    events): each eager op on a new shape or type lowers one, even with the compiled program
    cached on disk."""
    import contextlib

    @contextlib.contextmanager
    def count():
        seen = []

        def on(event: str, secs: float, **_):
            if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
                seen.append(secs)

        jax.monitoring.register_event_duration_secs_listener(on)
        try:
            yield seen
        finally:
            jax.monitoring.unregister_event_duration_listener(on)

    return count
