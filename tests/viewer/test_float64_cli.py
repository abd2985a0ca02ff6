"""`cltrace trace --dtype float64` works without JAX_ENABLE_X64 (issue 19: it used to fail)."""

from __future__ import annotations


def test_float64_enables_x64_itself(pipeline, tmp_path):
    """`--dtype float64` is offered by --help: the command turns on jax_enable_x64 itself."""
    import jax

    from attribution.graph import Graph
    from cltrace.cli import main
    from tests.viewer.conftest import PROMPT

    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    try:
        assert main(["trace", PROMPT, "--model", str(pipeline.model_dir), "--transcoder",
                     str(pipeline.transcoder_dir), "--dtype", "float64", "--no-progress",
                     "--out", str(tmp_path / "run")]) == 0
        g = Graph.load(tmp_path / "run" / "graph.npz")
        assert g.config["dtype"] == "float64" and g.ranges.feature.stop > 0
    finally:
        jax.config.update("jax_enable_x64", before)
