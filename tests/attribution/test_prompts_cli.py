"""`cltrace trace --prompts FILE`: many prompts in one process (or split over processes) give
the same graphs as one command per prompt; every prompt is checked before the first is traced."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from attribution.graph import Graph
from clt.lm import load_model
from clt.transcoder import save
from cltrace.cli import main
from tests.attribution.helpers import random_transcoder

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [
    {"prompt": "The capital of France is"},
    {"prompt": "The opposite of hot is", "name": "opposite", "target": " cold",
     "minus": " warm"},
    {"prompt": "One, two, three,", "target": [" four", " five"]},
]


@pytest.fixture(scope="module")
def smol_plt(tmp_path_factory):
    """A random 8-feature PLT for SmolLM2 with a few active features per position."""
    m = load_model("smollm2-135m")
    cfg, p = random_transcoder(m.cfg, 8, max_reach=1)
    p = dataclasses.replace(p, log_threshold=jnp.full_like(p.log_threshold, np.log(0.5)))
    d = tmp_path_factory.mktemp("smol_plt")
    save(d, cfg, p)
    return d


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _flags(row: dict) -> list[str]:
    out = [row["prompt"]]
    for key in ("target", "minus"):
        vals = row.get(key, [])
        for v in [vals] if isinstance(vals, str) else vals:
            out += [f"--{key}", v]
    return out


def _same_graph(a: Graph, b: Graph) -> None:
    assert a.token_strings == b.token_strings and a.logit_strings == b.logit_strings
    for name in ("feature_layer", "feature_pos", "feature_index", "logit_tokens"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    np.testing.assert_allclose(a.activation, b.activation, rtol=1e-6)
    scale = float(np.abs(b.adjacency).max())
    np.testing.assert_allclose(a.adjacency, b.adjacency, rtol=1e-5, atol=1e-6 * scale)
    for f in ("replacement", "completeness", "pruned_replacement", "pruned_completeness"):
        assert getattr(a.scores, f) == pytest.approx(getattr(b.scores, f), rel=1e-5, abs=1e-7)


def test_prompts_give_the_graphs_of_separate_runs(smol_plt, tmp_path, capsys):
    common = ["--model", "smollm2-135m", "--transcoder", str(smol_plt), "--no-progress"]
    f = _jsonl(tmp_path / "p.jsonl", PROMPTS)
    assert main(["trace", "--prompts", str(f), "--out", str(tmp_path / "many"), *common]) == 0
    out = capsys.readouterr().out
    assert "[3/3]" in out and "summary:" in out
    summary = json.loads((tmp_path / "many" / "summary.json").read_text())
    rows = summary["prompts"]
    assert [r["name"] for r in rows] == [PROMPTS[0]["prompt"], "opposite", PROMPTS[2]["prompt"]]
    assert [r["folder"] for r in rows] == ["000-the-capital-of-france-is", "001-opposite",
                                          "002-one-two-three"]
    for i, row in enumerate(PROMPTS):
        alone = tmp_path / f"alone{i}"
        assert main(["trace", *_flags(row), "--out", str(alone), *common]) == 0
        g_many = Graph.load(tmp_path / "many" / rows[i]["folder"] / "graph.npz")
        g_alone = Graph.load(alone / "graph.npz")
        _same_graph(g_many, g_alone)
        assert g_many.config == g_alone.config  # the same TraceConfig, saved beside it
        assert (tmp_path / "many" / rows[i]["folder"] / "graph.html").exists()
        assert rows[i]["replacement"] == pytest.approx(g_alone.scores.replacement, abs=1e-5)
    # Per-prompt targets: the difference, the two tokens.
    assert rows[1]["targets"][0]["kind"] == "logit difference"
    assert [t["name"] for t in rows[2]["targets"]] == [" four", " five"]
    # The summary's top features are the graph's most influential, named L:F@P.
    top = rows[0]["top_features"]
    assert top and all(":" in t["name"] and "@" in t["name"] for t in top)
    shares = [t["influence_share"] for t in top]
    assert shares == sorted(shares, reverse=True) and 0 < shares[0] <= 1
    md = (tmp_path / "many" / "summary.md").read_text()
    assert md.count("\n| ") == 1 + 3 + 0 and "001-opposite/graph.html" in md


def test_every_prompt_is_checked_before_the_first_is_traced(smol_plt, tmp_path, capsys):
    rows = [{"prompt": "The capital of France is"},
            {"prompt": "I like to play", "target": " basketballs"}]  # two tokens
    f = _jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "many"
    rc = main(["trace", "--prompts", str(f), "--out", str(out), "--model", "smollm2-135m",
               "--transcoder", str(smol_plt), "--no-progress"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert rc == 2 and len(err) == 1
    assert f"{f}:2: --target ' basketballs' is 2 tokens" in err[0]
    assert not list(out.rglob("*.npz")) and not (out / "summary.json").exists()


def test_plain_text_prompts_keep_their_spaces(tmp_path):
    from attribution.prompts import read_prompts
    from attribution.trace import TraceConfig

    f = tmp_path / "p.txt"
    f.write_bytes(b"The capital of France is \r\n\n  indented\nlast")
    items = read_prompts(f, TraceConfig(prompt="", target=(" x",)))
    assert [i.config.prompt for i in items] == ["The capital of France is ", "  indented", "last"]
    assert [i.line for i in items] == [1, 3, 4] and [i.index for i in items] == [0, 1, 2]
    assert all(i.config.target == (" x",) for i in items)  # the flags' targets apply


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_prompts_split_over_two_processes(smol_plt, tmp_path, capsys):
    """Two processes on localhost (jax.distributed, gloo) split the prompts: each traces every
    second one; process 0 writes the summary of all; the graphs equal a single process's."""
    f = _jsonl(tmp_path / "p.jsonl", PROMPTS)
    common = ["--model", "smollm2-135m", "--transcoder", str(smol_plt), "--no-progress"]
    assert main(["trace", "--prompts", str(f), "--out", str(tmp_path / "one"), *common]) == 0
    capsys.readouterr()
    port = str(_free_port())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen(
        [sys.executable, "-m", "cltrace", "trace", "--prompts", str(f), "--out",
         str(tmp_path / "two"), *common, "--distributed", "--coordinator", f"127.0.0.1:{port}",
         "--num-processes", "2", "--process-id", str(i)], env=env, cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    logs = [p.communicate(timeout=600)[0].decode() for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    assert "process 0 of 2: 2 of 3 prompts" in logs[0]
    assert "process 1 of 2: 1 of 3 prompts" in logs[1] and "summary:" not in logs[1]
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["processes"] == 2 and len(two["seconds_tracing"]) == 2
    for a, b in zip(one["prompts"], two["prompts"]):
        a, b = dict(a), dict(b)
        a.pop("seconds"), b.pop("seconds")
        assert a.keys() == b.keys()
        for k in a:
            if k not in ("replacement", "completeness", "pruned_replacement",
                         "pruned_completeness", "top_features"):
                assert a[k] == b[k], k
        _same_graph(Graph.load(tmp_path / "two" / b["folder"] / "graph.npz"),
                    Graph.load(tmp_path / "one" / a["folder"] / "graph.npz"))
