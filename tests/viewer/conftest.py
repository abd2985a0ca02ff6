"""Fixtures: one small real graph end to end (tiny random Llama saved as a Hugging Face directory,
random calibrated transcoder, `cltrace trace`, `cltrace features`, `cltrace view`), and a headless
Chromium with the network cut."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from tests.viewer.helpers import chromium_paths, start_chromium

PROMPT = "w1 w5 w9 w13 w2 w7 w11"


@dataclass(frozen=True)
class Pipeline:
    model_dir: Path
    transcoder_dir: Path
    corpus: Path
    graph: Path
    cards: Path
    page: Path


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> Pipeline:
    from attribution.graph import Graph
    from clt import transcoder as tcm
    from clt.lm import load_model
    from cltrace.cli import main
    from tests.attribution.helpers import calibrate, random_transcoder
    from tests.clt.hf_tiny import make_tiny
    from tests.clt.tiny_train import tiny_tokenizer, write_corpus

    root = tmp_path_factory.mktemp("viewer_pipeline")
    model_dir = root / "tiny_llama"
    make_tiny("llama", model_dir)
    tiny_tokenizer().backend.save(str(model_dir / "tokenizer.json"))
    m = load_model(str(model_dir), dtype=jnp.float32)
    tc_cfg, tc_params = random_transcoder(m.cfg, 24)
    ids = [m.cfg.bos_token_id] + m.tokenizer.encode(PROMPT, add_bos=False)
    tc_params = calibrate(m.params, m.cfg, tc_cfg, tc_params, ids, per_layer_pos=3.0)
    tc_dir = tcm.save(root / "transcoder", tc_cfg.replace(model_name=str(model_dir)), tc_params)
    corpus = write_corpus(root / "corpus.txt", n_docs=80)
    out = root / "trace"
    assert main(["trace", PROMPT, "--model", str(model_dir), "--transcoder", str(tc_dir),
                 "--out", str(out), "--no-progress", "--batch-size", "16", "--save-full"]) == 0
    assert main(["features", "--transcoder", str(tc_dir), "--model", str(model_dir), "--data",
                 str(corpus), "--n-contexts", "48", "--context-length", "32", "--window", "10",
                 "--no-progress"]) == 0
    page = out / "graph.html"
    assert main(["view", str(out / "graph.npz"), "-o", str(page)]) == 0
    Graph.load(out / "graph.npz")  # readable
    return Pipeline(model_dir, tc_dir, corpus, out / "graph.npz", tc_dir / "feature_cards.npz",
                    page)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium, or a skip naming the fix (a failure under CLTRACE_REQUIRE_BROWSER=1,
    which CI sets: there the browser is installed, and a skip would hide a broken viewer)."""
    if chromium_paths() is None:
        msg = ("headless Chromium not found (Debian: apt-get install chromium chromium-driver; "
               "`make test` installs them when it can)")
        if os.environ.get("CLTRACE_REQUIRE_BROWSER") == "1":
            pytest.fail(msg + "; CLTRACE_REQUIRE_BROWSER=1")
        pytest.skip(msg)
    pytest.importorskip("selenium", reason="selenium is in the test extra: pip install -e .[test]")
    driver = start_chromium()
    try:
        yield driver
    finally:
        driver.quit()


def shown_mask(data: dict, threshold: float, errors: bool = True,
               budget: int | None = None) -> np.ndarray:
    """Which nodes the page shows at a slider position and node budget (default: the page's
    own), the page's rule restated: tokens and logits always; of the feature (and, shown, error)
    nodes, the first `budget` by influence rank that the pruning slider keeps."""
    kind, before, rank = (np.asarray(data[k]) for k in ("kind", "before", "rank"))
    budget = data["meta"]["config"]["node_budget"] if budget is None else budget
    eligible = (kind == 0) | ((kind == 1) & errors)
    order = np.argsort(np.where(rank >= 0, rank, len(rank)), kind="stable")[:int((rank >= 0).sum())]
    in_budget = np.zeros(len(kind), bool)
    in_budget[order[eligible[order]][:budget]] = True
    return (kind >= 2) | (((before < threshold) | (threshold >= 1)) & eligible & in_budget)


def visible_nodes(data: dict, threshold: float, errors: bool = True,
                  budget: int | None = None) -> int:
    """How many nodes the page shows at a slider position and node budget."""
    return int(shown_mask(data, threshold, errors, budget).sum())
