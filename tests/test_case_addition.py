"""The addition case study's core (scripts/cases/addition.py) on a tiny configuration: carry
classification, greedy-answer scoring and accuracy on hand-made cases, the feature profiles on a
planted feature, and the model-facing functions on three problems against independent references
(the local replacement's own activations, the model's own logits)."""

from __future__ import annotations

import importlib.util
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

CASES = Path(__file__).resolve().parents[1] / "scripts" / "cases"


@pytest.fixture(scope="module")
def A():
    sys.path.insert(0, str(CASES))
    try:
        spec = importlib.util.spec_from_file_location("case_addition", CASES / "addition.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up while it loads
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(CASES))


def test_problems_and_carry(A):
    assert A.Problem(36, 59).carry and A.Problem(36, 59).total == 95
    assert A.Problem(55, 45).carry  # 5 + 5 = 10 carries
    assert not A.Problem(31, 42).carry and not A.Problem(10, 99).carry
    g = A.grid(3, seed=0)
    assert len(set(g)) == 3 and g == A.grid(3, seed=0)
    assert all(10 <= p.a <= 99 and 10 <= p.b <= 99 for p in g)
    assert len(A.grid(10_000, low=0, high=9)) == 100  # n above the grid: all of it
    assert A.Problem(7, 8).prompt("plain") == "7+8="


def _logits(tokens, vocab=20):
    """One-hot logits whose argmax at each position is the given token."""
    z = np.zeros((len(tokens), vocab))
    z[np.arange(len(tokens)), tokens] = 5.0
    return z


def test_score_hand_made(A):
    digits = set(range(10))  # token id d = digit d here; 15 = a newline, say
    n_prompt = 4  # answer predicted at positions 3, 4; the token after at 5
    ok = A.score(_logits([0, 0, 0, 9, 5, 15]), n_prompt, [9, 5], digits)
    assert ok["correct"] and ok["first"] and ok["per_token"] == [True, True] and ok["stops"]
    wrong_ones = A.score(_logits([0, 0, 0, 9, 4, 15]), n_prompt, [9, 5], digits)
    assert not wrong_ones["correct"] and wrong_ones["first"] and wrong_ones["per_token"] == [
        True, False]
    longer = A.score(_logits([0, 0, 0, 9, 5, 3]), n_prompt, [9, 5], digits)  # writes 953
    assert not longer["correct"] and not longer["stops"] and longer["predicted"] == [9, 5, 3]
    three = A.score(_logits([0, 0, 0, 1, 2, 5, 15]), n_prompt, [1, 2, 5], digits)
    assert three["correct"]

    probs = [A.Problem(36, 59), A.Problem(31, 42), A.Problem(67, 58)]
    res = [ok, wrong_ones, three]
    acc = A.accuracy(probs, res)
    assert acc["all"] == {"n": 3, "acc": pytest.approx(2 / 3)}
    assert acc["carry"] == {"n": 2, "acc": 1.0} and acc["no_carry"] == {"n": 1, "acc": 0.0}
    assert acc["sum>=100"]["n"] == 1 and acc["first_token"] == 1.0
    assert acc["ones_digit_given_rest"] == pytest.approx(2 / 3)


def test_profiles_find_planted_features(A):
    assert A.eta_squared(np.array([1.0, 1, 2, 2]), np.array([0, 0, 1, 1])) == pytest.approx(1.0)
    assert A.eta_squared(np.array([1.0, 2, 1, 2]), np.array([0, 0, 1, 1])) == pytest.approx(0.0)
    assert np.isnan(A.eta_squared(np.ones(4), np.array([0, 0, 1, 1])))
    probs = A.grid(300, seed=1)
    ones = np.array([float(p.total % 10 == 5) * 3.0 for p in probs])  # "sum ends in 5"
    mag = np.array([max(0.0, 1.0 - abs(p.total - 90) / 20) for p in probs])  # "sum near 90"
    assert A.kind_of(A.profile(ones, probs)) == "sum ones"
    assert A.kind_of(A.profile(mag, probs)) == "sum // 10"
    assert A.kind_of(A.profile(np.full(len(probs), 2.0), probs)) == "constant"
    noise = np.random.default_rng(0).random(len(probs))
    assert A.kind_of(A.profile(noise, probs)) == "mixed"
    top = A.profile(ones, probs)["top"]
    assert all(int(a) + int(b) in range(5, 200, 10) for a, b in (t.split("+") for t in top))


def test_search_finds_planted_feature(A):
    probs = A.grid(300, seed=2)
    acts = np.random.default_rng(0).random((len(probs), 2, 3)).astype(np.float32) * 0.1
    acts[:, 1, 2] = [3.0 * (p.total % 10 == 5) for p in probs]  # "sum ends in 5"
    acts[:, 0, 1] = [max(0.0, 1.0 - abs(p.total - 90) / 20) for p in probs]  # "sum near 90"
    ga = A.GridActs(probs, {7: acts}, 8, np.array([len(str(p.total)) for p in probs]))
    found = A.search(ga, 7, None)
    assert (found["sum ones"][0]["layer"], found["sum ones"][0]["feature"]) == (1, 2)
    assert (found["sum // 10"][0]["layer"], found["sum // 10"][0]["feature"]) == (0, 1)
    assert ga.valid(8, 2).sum() == sum(p.total < 100 for p in probs)


def test_real_model_three_problems(A, tmp_path):
    """Teacher-forced scoring agrees with step-by-step greedy decoding; grid activations equal
    the local replacement's; free mode without edits is the model."""
    from attribution import replacement as rep
    from attribution.interventions import greedy_continue
    from clt.lm.model import forward

    s = A.Study("addition", Namespace(model="smollm2-135m", transcoder="", out=str(tmp_path),
                                      top=2, max_feature_nodes=10))
    probs = [A.Problem(36, 59), A.Problem(12, 34), A.Problem(67, 58)]
    res = A.evaluate(s.model, probs, "plain")
    assert len(res) == 3 and all(len(r["per_token"]) == len(str(p.total))
                                 for p, r in zip(probs, res))
    # Greedy decoding, one token at a time, writes what the teacher-forced argmaxes say.
    ids, ans = A.encode_problem(s.tok, s.model.cfg, probs[0].prompt("plain"), "95")
    assert s.tok.token_strings(ans) == ["9", "5"] and ids[0] == s.model.cfg.bos_token_id
    new = greedy_continue(lambda t: forward(s.model.params, s.model.cfg, t[None])[0][0], ids, 3)
    for i, (g, t) in enumerate(zip(new, res[0]["predicted"])):
        assert g == t  # the same token as long as the digits before it were right
        if i < len(ans) and g != ans[i]:
            break
    digits = set(A.digit_ids(s.tok).values())
    assert res[0]["correct"] == (new[:2] == ans and new[2] not in digits)
    # Activations read over the grid = the replacement model's own, at 67 + 58's ones digit.
    site = A.sites_of(s.model, probs[2], "plain")[1]
    assert site.which == "ones" and site.digit == 5 and s.tok.decode(site.ids[-2:]) == "12"
    rm, acts = rep.build(s.model.params, s.model.cfg, s.tc_cfg, s.tc_params, np.asarray(site.ids))
    pos = len(site.ids) - 1
    ga = A.grid_activations(s.model, s.tc_cfg, s.tc_params, probs, "plain", [pos, 2], batch=2)
    np.testing.assert_allclose(ga.acts[pos][2], np.asarray(acts[pos]), rtol=1e-4, atol=1e-4)
    f = int(np.argmax(np.asarray(acts[pos, 3])))
    got = ga.site(pos, 3, f, site.n_answer)
    assert np.isnan(got[1])  # 12 + 34 = 46: a two-digit answer, `pos` holds another digit
    assert not np.isnan(ga.site(2, 3, f, site.n_answer)).any()  # before the answer: every problem
    assert A.first_varying(s.model, "plain") == 1 and ga.n_prompt == 7  # BOS 3 6 + 5 9 =
    # Free mode without edits reproduces the model.
    np.testing.assert_allclose(A.edited(s, site.ids, (), rm), np.asarray(rm.last_logits),
                               atol=1e-3)
