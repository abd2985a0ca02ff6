"""Text sources, context packing, and the activation stream: validity masks, determinism, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clt.configs import ConfigError
from clt.data import (
    ActivationStream, DataPosition, estimate_norms, iter_documents, open_contexts, pack_contexts,
)
from tests.clt.tiny_train import tiny_model, write_corpus


def test_documents_from_txt_jsonl_globs(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nline two\n\n\nsecond doc\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "third"}) + "\n\n"
                                      + json.dumps({"text": "fourth"}) + "\n")
    assert list(iter_documents(str(tmp_path / "a.txt"))) == ["first doc\nline two", "second doc"]
    assert list(iter_documents(str(tmp_path))) == ["first doc\nline two", "second doc", "third",
                                                   "fourth"]
    assert len(list(iter_documents(str(tmp_path / "*.jsonl")))) == 2
    with pytest.raises(ConfigError, match="no text found"):
        list(iter_documents(str(tmp_path / "missing*.txt")))
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:1.*'text' field"):
        list(iter_documents(str(tmp_path / "bad.jsonl")))


def test_packing_starts_each_context_with_bos():
    stream = iter([np.arange(10, 15), np.arange(20, 27)])
    ctx = list(pack_contexts(stream, context_length=5, bos=1))
    assert [c.tolist() for c in ctx] == [[1, 10, 11, 12, 13], [1, 14, 20, 21, 22],
                                         [1, 23, 24, 25, 26]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    model = tiny_model()
    corpus = write_corpus(d / "c.txt", n_docs=80)
    contexts = open_contexts(str(corpus), model.tokenizer, 16, seed=1, holdout=0.1,
                             cache_dir=d / "cache")
    return model, corpus, contexts, d


def test_contexts_are_a_deterministic_shuffle_with_holdout(setup):
    model, corpus, contexts, d = setup
    again = open_contexts(str(corpus), model.tokenizer, 16, seed=1, holdout=0.1,
                          cache_dir=d / "cache")
    np.testing.assert_array_equal(contexts.take(5, 30), again.take(5, 30))
    n = len(contexts)
    epoch = contexts.take(0, n)  # one epoch: every training context exactly once
    assert sorted(map(tuple, epoch)) == sorted(map(tuple, contexts.contexts))
    held = open_contexts(str(corpus), model.tokenizer, 16, holdout=0.1, split="heldout",
                         cache_dir=d / "cache")
    train_rows = set(map(tuple, contexts.contexts))
    assert not any(tuple(r) in train_rows for r in held.contexts)
    assert (contexts.contexts[:, 0] == 1).all()


def test_stream_resumes_exactly_and_masks_bos_and_outliers(setup):
    model, _, contexts, _ = setup
    kw = dict(input_point="resid_mid", batch_tokens=32, round_contexts=6)
    s = ActivationStream(model, contexts, **kw)
    it = s.batches()
    seen = [next(it) for _ in range(5)]
    # A fresh stream started at the position after batch 2 yields batches 3 and 4 again.
    pos = seen[2][0]
    s2 = ActivationStream(model, contexts, **kw)
    it2 = s2.batches(pos)
    for want in seen[3:5]:
        got = next(it2)
        assert got[0] == want[0]
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[2], want[2])
    # Rounds roll over: 6 contexts x 15 usable tokens = 90 valid -> 2 batches of 32 per round.
    assert [p for p, _, _ in seen[:3]] == [DataPosition(0, 1), DataPosition(1, 0),
                                          DataPosition(1, 1)]
    x, y, order, n_valid = s.round(0)
    valid = np.asarray(order[:n_valid])
    assert not np.any(valid % 16 == 0), "BOS positions must be excluded"
    assert n_valid == 6 * 15
    # An outlier token (huge norm at one layer) is excluded.
    tight = ActivationStream(model, contexts, outlier_factor=1.0, **kw)
    _, _, _, n_tight = tight.round(0)
    assert n_tight < n_valid


def test_reuse_serves_each_round_again_reshuffled_and_prefetch_changes_nothing(setup):
    model, _, contexts, _ = setup
    kw = dict(input_point="resid_mid", batch_tokens=30, round_contexts=6)
    s = ActivationStream(model, contexts, **kw)
    it = s.batches(reuse=2)
    seen = [next(it) for _ in range(7)]  # 90 valid tokens: 3 batches per pass, 2 passes
    assert [p for p, _, _ in seen[:6]] == [DataPosition(0, i) for i in range(1, 6)] + [
        DataPosition(1, 0)]
    first = np.concatenate([np.asarray(b[1]) for b in seen[:3]]).reshape(90, -1)
    second = np.concatenate([np.asarray(b[1]) for b in seen[3:6]]).reshape(90, -1)
    # The same 90 tokens in another order.
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(np.unique(first, axis=0), np.unique(second, axis=0))
    assert s.tokens_generated == 2 * 6 * 16  # rounds 0 and 1, each generated once
    # Resuming inside the second pass, with the next round generated in a background thread.
    again = ActivationStream(model, contexts, **kw).batches(seen[3][0], reuse=2, prefetch=True)
    for want in seen[4:7]:
        got = next(again)
        assert got[0] == want[0]
        np.testing.assert_array_equal(got[1], want[1])


def test_rounds_replay_from_disk_cache(setup, tmp_path):
    model, _, contexts, _ = setup
    kw = dict(input_point="mlp_in", batch_tokens=32, round_contexts=6, cache_dir=tmp_path)
    first = ActivationStream(model, contexts, **kw).round(1)
    assert (tmp_path / "round_000001.npz").exists()
    second = ActivationStream(model, contexts, **kw)
    replay = second.round(1)
    assert second.tokens_generated == 0  # read back, not recomputed
    np.testing.assert_array_equal(first[0], replay[0])


def test_norm_estimates_match_numpy(setup):
    model, _, contexts, _ = setup
    s = ActivationStream(model, contexts, input_point="resid_mid", batch_tokens=32,
                         round_contexts=6)
    norms = estimate_norms(s)
    x, y, order, n = s.round(0)
    xv = np.asarray(x, np.float64)[np.asarray(order[:n])]
    np.testing.assert_allclose(norms.in_mean, xv.mean(0), rtol=1e-4, atol=1e-5)
    want = np.sqrt(((xv - xv.mean(0)) ** 2).mean((0, 2)))
    np.testing.assert_allclose(norms.in_scale, want, rtol=1e-3)


def test_bad_stream_settings(setup):
    model, _, contexts, _ = setup
    with pytest.raises(ConfigError, match="raise round_contexts"):
        ActivationStream(model, contexts, input_point="resid_mid", batch_tokens=10_000,
                         round_contexts=2)
    with pytest.raises(ConfigError, match="no tokenizer"):
        open_contexts("x.txt", None, 16)


def test_shares_split_each_round_and_serve_slices_of_every_batch(setup, tmp_path):
    """Data-parallel layout in one process: 2 shares of a round's 6 contexts (3 each), batch j
    = slice j of share 0's valid tokens + slice j of share 1's; a stream serving one share
    gives that share's rows; positions resume exactly (reuse, prefetch); rounds cache per
    share. (Two real processes: tests/clt/test_data_parallel.py.)"""
    model, _, contexts, _ = setup
    kw = {"input_point": "resid_mid", "batch_tokens": 30, "round_contexts": 6,
          "cache_dir": tmp_path}
    both = ActivationStream(model, contexts, shares=2, **kw)
    assert [both.share_span(s) for s in (0, 1)] == [(0, 3), (3, 6)]
    np.testing.assert_array_equal(
        np.concatenate([both.share_contexts(1, s) for s in (0, 1)]), contexts.take(6, 6))
    it = both.batches(reuse=2)
    seen = [next(it) for _ in range(7)]  # 45 valid tokens a share: 3 slices of 15, 2 passes
    assert [p for p, _, _ in seen] == [DataPosition(0, i, 2) for i in range(1, 6)] + [
        DataPosition(1, 0, 2), DataPosition(1, 1, 2)]
    assert sorted(p.name for p in tmp_path.glob("round_*")) == [
        "round_000000.share0of2.npz", "round_000000.share1of2.npz",
        "round_000001.share0of2.npz", "round_000001.share1of2.npz"]
    for s in (0, 1):
        x, _, order, n = both.round(0, s)
        assert n == 3 * 15
        rows = np.asarray(x)[np.asarray(order[:n])]
        # Slice s of every batch of the first pass is share s's valid tokens, in its order.
        got = np.concatenate([np.asarray(b)[15 * s:15 * (s + 1)] for _, b, _ in seen[:3]])
        np.testing.assert_array_equal(got, rows)
    # A stream of one share serves its rows of the same batches, from the cache.
    one = ActivationStream(model, contexts, shares=2, share=1, **kw)
    for want, got in zip(seen, one.batches(reuse=2)):
        assert got[0] == want[0]
        np.testing.assert_array_equal(got[1], np.asarray(want[1])[15:])
    assert one.tokens_generated == 0
    # Resuming inside the second pass, with prefetch, continues exactly.
    again = ActivationStream(model, contexts, shares=2, **kw).batches(seen[3][0], reuse=2,
                                                                       prefetch=True)
    for want in seen[4:7]:
        got = next(again)
        assert got[0] == want[0]
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[2], want[2])


def test_norms_over_shares_and_bad_share_settings(setup):
    model, _, contexts, _ = setup
    kw = {"input_point": "resid_mid", "batch_tokens": 32, "round_contexts": 6}
    s = ActivationStream(model, contexts, shares=2, **kw)
    norms = estimate_norms(s)
    xv = np.concatenate([np.asarray(x, np.float64)[np.asarray(o[:n])]
                         for x, _, o, n in (s.round(0, 0), s.round(0, 1))])
    np.testing.assert_allclose(norms.in_mean, xv.mean(0), rtol=1e-4, atol=1e-5)
    # A checkpoint of an older version has no shares: one share, the layout it was made with.
    old = json.loads('{"round": 3, "batch": 1}')  # its checkpoint's data_position
    assert DataPosition(**old) == DataPosition(3, 1, 1)
    with pytest.raises(ConfigError, match="not divisible by the 4 data shares"):
        ActivationStream(model, contexts, shares=4, **(kw | {"batch_tokens": 30}))
    with pytest.raises(ConfigError, match="fewer than the 8 data shares"):
        ActivationStream(model, contexts, shares=8, **kw)
    with pytest.raises(ConfigError, match="share must be None or in"):
        ActivationStream(model, contexts, shares=2, share=2, **kw)
    with pytest.raises(ConfigError, match="a share of 1 contexts.*raise round_contexts"):
        ActivationStream(model, contexts, shares=6, **(kw | {"batch_tokens": 96}))
    with pytest.raises(ValueError, match="say which"):
        s.round(0)
