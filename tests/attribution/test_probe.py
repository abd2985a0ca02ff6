"""`cltrace probe`: logistic-regression probes per layer (attribution.probe).

The fit finds a direction planted from a known layer on (and nothing before it); it matches an
independent float64 Newton solver of the same objective (and scikit-learn when installed); the
batched residual reader equals one forward per prompt; the command's outputs agree with each
other and with the activations they came from.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import jax.numpy as jnp
import numpy as np
import pytest

from attribution import probe as pr
from attribution.interventions import residual_streams
from clt.configs import load_config
from clt.lm import load_model
from clt.lm.model import forward
from cltrace.cli import main
from tests.clt.hf_tiny import make_tiny
from tests.clt.tiny_train import tiny_tokenizer


# --- the fit --------------------------------------------------------------------------------------
def test_planted_direction_is_found_from_its_layer():
    """Streams 0..2 are noise; from stream 3 on the label moves each example 3 units along u.
    Held-out accuracy is chance before and ~1 from stream 3 on, and the weights point along u."""
    rng = np.random.default_rng(0)
    n, S, d, k = 400, 6, 20, 3
    labels = np.repeat([0, 1], n // 2)
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    acts = rng.normal(size=(n, S, d)) + rng.normal(size=d) * 10  # isotropic, unit, offset
    acts[:, k:] += 3.0 * (2 * labels - 1)[:, None, None] * u
    held = pr.heldout_split(labels, 0.25, seed=0)
    fit = pr.fit_probes(acts, labels, held, l2=1e-2)
    assert fit.chance == 0.5
    assert (fit.heldout_accuracy[:k] < 0.62).all(), fit.heldout_accuracy
    assert (fit.heldout_accuracy[k:] >= 0.97).all(), fit.heldout_accuracy
    assert (fit.train_accuracy[k:] >= 0.97).all()
    # Isotropic noise: the best direction is u itself (pointing to label 1).
    cos = fit.weights @ u / np.linalg.norm(fit.weights, axis=1)
    assert (cos[k:] > 0.9).all() and (np.abs(cos[:k]) < 0.5).all(), cos


def _newton_reference(X, y, l2):
    """Float64 Newton's method on mean log-loss + l2/2 |w|^2 (bias free) of standardised X;
    returns (raw-coordinate w, b)."""
    mu, sd = X.mean(0), X.std(0)
    Z = np.hstack([(X - mu) / sd, np.ones((len(X), 1))])
    theta = np.zeros(Z.shape[1])
    reg = np.full(Z.shape[1], l2)
    reg[-1] = 0.0
    for _ in range(100):
        p = 1 / (1 + np.exp(-Z @ theta))
        grad = Z.T @ (p - y) / len(y) + reg * theta
        hess = (Z * (p * (1 - p))[:, None]).T @ Z / len(y) + np.diag(reg)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-13:
            break
    w = theta[:-1] / sd
    return w, theta[-1] - mu @ w


@pytest.mark.parametrize("l2", [1e-2, 1e-3])
def test_fit_matches_a_float64_newton_reference(l2):
    """A well-posed problem (overlapping classes, features of different scales and offsets):
    the same weights (cosine >= 0.999), bias and accuracies as an independent solver."""
    rng = np.random.default_rng(1)
    n, d = 300, 12
    X = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * rng.uniform(0.1, 10, d) + 5
    w_true = rng.normal(size=d) / np.linalg.norm(X.std(0)) * 3
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-(X - X.mean(0)) @ w_true))).astype(np.int32)
    held = pr.heldout_split(y, 0.25, seed=3)
    fit = pr.fit_probes(X[:, None], y, held, l2=l2)
    w_ref, b_ref = _newton_reference(X[~held], y[~held].astype(float), l2)
    cos = np.dot(fit.weights[0], w_ref) / np.linalg.norm(fit.weights[0]) / np.linalg.norm(w_ref)
    assert cos >= 0.999, cos
    np.testing.assert_allclose(fit.weights[0], w_ref, rtol=0, atol=2e-3 * np.abs(w_ref).max())
    assert abs(fit.bias[0] - b_ref) < 1e-2 * max(1.0, abs(b_ref))
    correct = ((X @ w_ref + b_ref) > 0) == (y == 1)
    assert abs(fit.train_accuracy[0] - correct[~held].mean()) <= 1 / (~held).sum()
    assert abs(fit.heldout_accuracy[0] - correct[held].mean()) <= 1 / held.sum()
    assert 0.6 < fit.heldout_accuracy[0] < 1.0  # overlapping classes: neither trivial nor chance
    assert int(fit.iterations[0]) < 1000 and fit.grad_norm[0] < 2e-5  # converged
    try:  # a second, independent implementation when it is installed (not a dependency)
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        return
    Xs = (X[~held] - X[~held].mean(0)) / X[~held].std(0)
    sk = LogisticRegression(C=1 / (l2 * (~held).sum()), tol=1e-10, max_iter=10_000)
    sk.fit(Xs, y[~held])
    w_sk = sk.coef_[0] / X[~held].std(0)
    assert np.dot(w_sk, fit.weights[0]) / np.linalg.norm(w_sk) / np.linalg.norm(
        fit.weights[0]) >= 0.999


def test_split_and_fit_are_deterministic():
    labels = np.array([0] * 10 + [1] * 7)
    a, b = pr.heldout_split(labels, 0.3, 5), pr.heldout_split(labels, 0.3, 5)
    np.testing.assert_array_equal(a, b)
    assert a[labels == 0].sum() == 3 and a[labels == 1].sum() == 2  # stratified, rounded
    assert not np.array_equal(a, pr.heldout_split(labels, 0.3, 6))
    # At least one held out and one kept per class, whatever the fraction.
    small = np.array([0] * 4 + [1] * 4)
    for f in (0.01, 0.99):
        h = pr.heldout_split(small, f, 0)
        assert all(1 <= h[small == c].sum() <= 3 for c in (0, 1))
    rng = np.random.default_rng(2)
    acts = rng.normal(size=(17, 2, 5))
    f1, f2 = (pr.fit_probes(acts, labels, a, 1e-2) for _ in range(2))
    np.testing.assert_array_equal(f1.weights, f2.weights)
    np.testing.assert_array_equal(f1.heldout_accuracy, f2.heldout_accuracy)


def test_config_refuses_bad_values():
    from clt.configs import ConfigError

    ok = {"out": "o", "positive": "p", "negative": "n"}
    pr.ProbeConfig(**ok)
    pr.ProbeConfig(out="o", data="d.jsonl", heldout=0.5, l2=0.0)
    for bad, msg in (({"heldout": 1.0}, "heldout must be a fraction"),
                     ({"heldout": float("nan")}, "heldout must be a fraction"),
                     ({"l2": -1.0}, "l2 must be a finite number >= 0"),
                     ({"l2": float("inf")}, "l2 must be a finite number >= 0"),
                     ({"seed": -1}, "seed must be an integer >= 0"),
                     ({"max_iter": 0}, "max_iter must be an integer >= 1"),
                     ({"batch_size": True}, "batch_size must be an integer >= 1"),
                     ({"data": "d.jsonl"}, "not both"),
                     ({"negative": None}, "go together")):
        with pytest.raises(ConfigError, match=msg):
            pr.ProbeConfig(**{**ok, **bad})


# --- the residuals it reads ----------------------------------------------------------------------
def test_residual_streams_equal_one_forward_per_prompt(tiny_dirs):
    """Batched, right-padded, bucketed reading (lengths across the sliding window of 8, a partial
    last batch) = each prompt run alone; stream 0 = embeddings, stream l + 1 = after block l."""
    m = load_model(tiny_dirs("gemma3"), with_tokenizer=False)
    rng = np.random.default_rng(0)
    prompts = [[1] + rng.integers(3, 128, size=n).tolist() for n in (2, 19, 5, 11, 0, 7, 30)]
    for position in ("last", "mean"):
        got = residual_streams(m.params, m.cfg, prompts, position, batch_size=3)
        assert got.shape == (len(prompts), m.cfg.n_layers + 1, m.cfg.d_model)
        for i, ids in enumerate(prompts):
            _, cap = forward(m.params, m.cfg, jnp.asarray([ids]),
                             capture=("resid_pre", "resid_final"))
            streams = np.concatenate([np.asarray(cap.resid_pre[:, 0]),
                                      np.asarray(cap.resid_final)])  # [stream, pos, d]
            want = streams[:, -1] if position == "last" else (
                streams[:, 1:].mean(1) if len(ids) > 1 else streams[:, 0])
            np.testing.assert_allclose(got[i], want, atol=2e-5, rtol=1e-5)


# --- the command ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("probe_tiny")
    make_tiny("gemma2", d)
    tiny_tokenizer().backend.save(str(d / "tokenizer.json"))
    return d


def _texts(seed: int, last: str, n: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{i}" for i in rng.integers(10, 40, size=rng.integers(2, 9))) + f" {last}"
            for _ in range(n)]


def test_probe_command_outputs_are_consistent(tiny, tmp_path, capsys):
    pos, neg = _texts(0, "w5", 14), _texts(1, "w6", 10)
    (tmp_path / "pos.txt").write_text("\n".join(pos) + "\n\n")
    (tmp_path / "neg.txt").write_text("\n".join(neg) + "\n")
    out = tmp_path / "probe"
    assert main(["probe", "--model", str(tiny), "--positive", str(tmp_path / "pos.txt"),
                 "--negative", str(tmp_path / "neg.txt"), "-o", str(out), "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "probe accuracy per layer" in printed and "chance" in printed
    res = json.loads((out / "results.json").read_text())
    names = [r["stream"] for r in res["layers"]]
    assert names == ["emb", "0", "1", "2"]
    assert [r["steer_layer"] for r in res["layers"]] == [None, 0, 1, 2]
    assert res["examples"] == {"train": {"0": 7, "1": 10}, "heldout": {"0": 3, "1": 4}}
    assert res["chance"] == pytest.approx(4 / 7)
    # The last token names the class: the embeddings already separate it.
    assert res["layers"][0]["heldout_accuracy"] == 1.0
    cfg = load_config(pr.ProbeConfig, out / "config.json", "probe")
    assert cfg.seed == 3 and cfg.pool == "last" and cfg.out == str(out)
    # probe.npz applied to the residuals reproduces the reported accuracies; the direction files
    # are its weights.
    m = load_model(str(tiny))
    ids = [m.tokenizer.encode(t, add_bos=False) for t in pos + neg]
    acts = residual_streams(m.params, m.cfg, [[1] + i for i in ids], "last")
    labels = np.array([1] * len(pos) + [0] * len(neg))
    held = pr.heldout_split(labels, 0.25, 3)
    z = np.load(out / "probe.npz")
    assert list(z["streams"]) == names
    correct = (np.einsum("nsd,sd->ns", acts, z["weights"]) + z["bias"] > 0) == (labels == 1)[:, None]
    for s, r in enumerate(res["layers"]):
        assert r["train_accuracy"] == pytest.approx(correct[~held, s].mean())
        assert r["heldout_accuracy"] == pytest.approx(correct[held, s].mean())
        v = np.load(out / r["direction"])
        assert v.shape == (64,) and v.dtype == np.float32
        np.testing.assert_array_equal(v, z["weights"][s])
    assert res["best"]["stream"] in names
    svg = ET.fromstring((out / "accuracy.svg").read_text())
    assert svg.tag.endswith("svg") and len(svg.findall(".//{*}polyline")) == 2
    # A direction is what `cltrace steer --vector` takes, at the layer it was read after.
    assert main(["steer", "w11 w12", "--model", str(tiny), "--vector",
                 str(out / "directions/layer1.npy"), "--layer", "1", "--max-new-tokens",
                 "2"]) == 0
    # The same examples as labelled JSONL give the same probes.
    rows = [{"text": t, "label": 1} for t in pos] + [{"text": t, "label": 0} for t in neg]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["probe", "--model", str(tiny), "--data", str(tmp_path / "data.jsonl"), "-o",
                 str(tmp_path / "probe2"), "--seed", "3"]) == 0
    res2 = json.loads((tmp_path / "probe2" / "results.json").read_text())
    assert [r["heldout_accuracy"] for r in res2["layers"]] == [
        r["heldout_accuracy"] for r in res["layers"]]
    np.testing.assert_allclose(np.load(tmp_path / "probe2" / "probe.npz")["weights"],
                               z["weights"], rtol=1e-6, atol=1e-7)
