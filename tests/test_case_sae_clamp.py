"""The SAE clamp case study (scripts/cases/sae_clamp.py) end to end on a tiny Llama: an SAE
trained in the test at one layer (`TrainConfig(kind="sae", layers=(1,))`), its feature cards,
then the script. References: the plain rows' continuations equal the plain model's own greedy
decode (`attribution.interventions.greedy_continue` on the unpadded forward pass, an independent
path: no padding, no SAE); a clamp at 10x the card's maximum changes the continuation, and the
clamped continuation equals `free_logits` with the edit `L:F=<10 x max>` decoded unpadded; the
next-token KL is that of those two distributions."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.clt.tiny_train import WORDS

CASES = Path(__file__).resolve().parents[1] / "scripts" / "cases"
PROMPTS = ["w1 w5 w9", "w7 w11 w3 w20"]
LAYER = 1


@pytest.fixture(scope="module")
def C():
    sys.path.insert(0, str(CASES))
    try:
        spec = importlib.util.spec_from_file_location("case_sae_clamp", CASES / "sae_clamp.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(CASES))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama (HF directory, word-level tokenizer), an SAE trained at layer 1 and its cards
    next to it."""
    from clt.data import open_contexts
    from clt.lm import load_model
    from clt.train import TrainConfig, train
    from clt.transcoder import load
    from tests.clt.hf_tiny import make_tiny
    from tests.clt.tiny_train import tiny_tokenizer, write_corpus
    from viewer.features import CARDS_FILE, FeaturesConfig, scan

    root = tmp_path_factory.mktemp("sae_clamp")
    model_dir = root / "tiny_llama"
    make_tiny("llama", model_dir)
    tiny_tokenizer().backend.save(str(model_dir / "tokenizer.json"))
    m = load_model(str(model_dir), dtype=jnp.float32)
    corpus = write_corpus(root / "c.txt")
    tc = TrainConfig.make(kind="sae", layers=(LAYER,), model=str(model_dir), data=str(corpus),
                          context_length=32, n_features=64, activation="topk", k=4, steps=60,
                          batch_tokens=256, round_contexts=32, lr=3e-3, warmup_steps=5,
                          out=str(root / "run"), checkpoint_every=60, log_every=20, mesh_data=1,
                          async_checkpoints=False)
    sae = train(tc, model=m, progress=False)
    cfg, params = load(sae)
    ctx = open_contexts(str(corpus), m.tokenizer, 16, cache_dir=root).take(0, 16)
    config = FeaturesConfig(transcoder=str(sae), n_contexts=16, context_length=16, batch_size=8,
                            top_k=4, n_samples=2, window=6, n_output_tokens=3)
    cards = scan(m, cfg, params, ctx, config)
    cards.save(Path(sae) / CARDS_FILE)
    (Path(sae).parent / "eval.json").write_text(json.dumps({"nmse_mean": 0.25, "l0_total": 4.0}))
    top = cards.arrays["top_act"][0, :, 0]
    feats = [int(f) for f in np.argsort(-top)[:2]]
    assert top[feats[1]] > 0
    return model_dir, Path(sae), m, cfg, params, feats, top


def test_the_script_on_a_tiny_model(C, tiny, tmp_path):
    from attribution import interventions as iv
    from clt.lm.model import forward

    model_dir, sae, m, cfg, params, feats, top = tiny
    out = tmp_path / "out"
    n_new = 6
    report = C.main(["--model", str(model_dir), "--sae", str(sae), "--layer", str(LAYER),
                     "--features", f"{feats[0]}:my label",
                     f"{feats[1]}::" + ",".join(WORDS), "--prompts", *PROMPTS,
                     "--multiples", "10", "--max-new-tokens", str(n_new), "--examples", "2",
                     "--out", str(out)])
    res = json.loads((out / "results.json").read_text())
    assert [f["feature"] for f in res["features"]] == feats
    assert res["features"][0]["label"] == "my label" and not res["features"][0]["given_words"]
    assert set(WORDS) <= set(res["features"][1]["concept_words"])  # every word counts
    assert res["features"][0]["max"] == pytest.approx(float(top[feats[0]]), abs=1e-4)
    assert res["eval"]["nmse_mean"] == 0.25 and res["recipe"]["layers"] == [LAYER]
    eos = tuple(m.cfg.eos_token_ids)

    def plain(t):
        return forward(m.params, m.cfg, jnp.asarray(t)[None])[0][0]

    changed, shares = 0, []
    for prompt in PROMPTS:
        ids = [m.cfg.bos_token_id] + m.tokenizer.encode(prompt, add_bos=False)
        rows = [r for r in res["runs"] if r["prompt"] == prompt]
        assert len(rows) == 1 + len(feats)
        ref = iv.greedy_continue(plain, ids, n_new, eos)
        assert rows[0]["feature"] is None and rows[0]["tokens"] == ref
        p0 = np.asarray(jax.nn.softmax(plain(ids)[-1]), np.float64)
        for f, row in zip(feats, rows[1:]):
            value = 10 * float(top[f])
            assert row["feature"] == f and row["value"] == pytest.approx(value, rel=1e-4)
            edit = iv.FeatureEdit(LAYER, f, None, "set", value)

            def clamped(t, edit=edit):
                return iv.free_logits(m.params, m.cfg, cfg, params, None, (edit,), tokens=t)

            assert row["tokens"] == iv.greedy_continue(clamped, ids, n_new, eos)
            p1 = np.asarray(jax.nn.softmax(clamped(jnp.asarray(ids))[-1]), np.float64)
            kl = float(np.sum(p0 * (np.log(p0) - np.log(p1))))
            assert row["kl_next"] == pytest.approx(kl, rel=1e-2, abs=1e-4)
            changed += row["tokens"] != ref
            # Concept share: the continuation's tokens among the card's words, counted again.
            words = set(res["features"][feats.index(f)]["concept_words"])
            strings = m.tokenizer.token_strings(row["tokens"])
            hits = [s for s in strings if s.strip().lower() in words]
            assert row["concept_hits"] == hits
            assert row["concept_share"] == pytest.approx(len(hits) / len(strings), abs=1e-4)
            if f == feats[1]:  # every word token is a concept word here
                assert len(hits) == sum(s.strip() in WORDS for s in strings)
                shares.append(row["concept_share"])
    assert changed >= 3  # 10x the maximum changes (nearly) every continuation
    assert max(shares) > 0
    text = report.read_text()
    assert "## Generations" in text and f"{LAYER}:{feats[0]}=10x" in text
    assert "held-out" in text and "my label" in text
