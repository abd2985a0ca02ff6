"""Case study: clamp a residual-stream SAE feature to N times its maximum activation and let the
model talk ("Golden Gate Claude", Templeton et al. 2024, "Scaling Monosemanticity", §Feature
steering), on SmolLM2-135M with an SAE trained by `cltrace train --kind sae --layers L`.

For each chosen feature F of the SAE at model layer L (`--layer`, `--features`):

* its card (`cltrace features`): density, maximum activation, the top activating examples (the
  token it fires on marked [[so]]) and the tokens its decoder row promotes through the unembedding;
* for each neutral prompt (`--prompts`), the greedy continuation of the plain model and of the
  model with F clamped to N x its card's maximum (`--multiples`, default 2 5 10): exactly
  `cltrace steer PROMPT --transcoder SAE --set L:F=Nx` (`attribution.interventions.free_logits`:
  the residual stream before layer L's MLP moves by (N x max - a_F) x F's decoder row at every
  position, BOS and generated tokens included (`--where all`; `--where 1+` spares the BOS), the
  SAE's error kept, everything downstream recomputed);
* the next-token distribution at the end of the prompt: its top tokens and KL(plain || clamped);
* two crude automatic readings of each continuation: *concept tokens*, the share of its tokens
  that are among the feature's concept words (the tokens its top examples fire on, plus any words
  given with the feature, `F:label:word,word`; words of at least 3 characters, case-folded; the
  promoted output tokens are not used: at a middle layer they are mostly word pieces), and
  *plain NLL*, the plain model's
  mean negative log-likelihood per token of the continuation given the prompt (a fluency proxy:
  the unsteered continuation's is the baseline), with its share of distinct tokens (loops).

The SAE's recipe and training metrics come from its `info.json`; its held-out metrics from
`cltrace eval ... --out FILE` (`--eval FILE`; default: eval.json in the SAE's directory or its
run directory).

Every call pads the tokens to one length (the longest prompt plus --max-new-tokens): the model is
causal, so the logits of the real positions are unchanged, and each edit compiles once for all
prompts (an edit's value is static in the compiled forward pass).

Usage:
    python scripts/cases/sae_clamp.py --sae out/train/sae_smollm2_L14/transcoder --layer 14 \
        --features 123 456 --prompts "I went for a walk and" "My favourite thing is" [--docs]
Writes out/cases/sae_clamp/report.md and results.json (`--docs`: copies them to
docs/cases/sae_clamp.md/.json).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from common import Study  # first: puts the repository on sys.path

from attribution import interventions as iv
from clt.lm.model import forward
from viewer.features import FeatureCards, card_maxima, default_path

ROOT = Path(__file__).resolve().parents[2]
NAME = "sae_clamp"
PROMPTS = ["I went for a walk and", "My favourite thing is", "Tell me about your day."]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sae", required=True, help="The SAE's directory (`cltrace train --kind "
                    "sae` writes RUN/transcoder).")
    ap.add_argument("--cards", default=None, help="Its feature cards (default: "
                    "feature_cards.npz beside the SAE).")
    ap.add_argument("--layer", type=int, required=True, help="The model layer of the features.")
    ap.add_argument("--features", nargs="+", required=True,
                    help="Features to clamp: F, F:label (a researcher's label for the card) or "
                    "F:label:word,word (also words that count as the concept).")
    ap.add_argument("--prompts", nargs="+", default=PROMPTS)
    ap.add_argument("--multiples", nargs="+", type=float, default=[2.0, 5.0, 10.0],
                    help="N in --set L:F=Nx.")
    ap.add_argument("--where", default="all", choices=["all", "1+"],
                    help="Positions clamped: all (as `cltrace steer --set L:F=Nx`), or 1+ (all "
                    "but the BOS).")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--examples", type=int, default=4, help="Top examples shown per card.")
    ap.add_argument("--eval", default=None, help="`cltrace eval --out` JSON of the SAE.")
    ap.add_argument("--out", default=None, help="Report directory (default out/cases/sae_clamp).")
    ap.add_argument("--docs", action="store_true",
                    help="Also copy the report to docs/cases/sae_clamp.md/.json.")
    return ap.parse_args(argv)


# --- cards -----------------------------------------------------------------------------------------
def _cell(s: str) -> str:
    """A string as one Markdown table cell / inline text."""
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "⏎").replace("`", "'")


def _inline(s: str) -> str:
    """A string inside a Markdown code span (outside a table)."""
    return s.replace("\n", "⏎").replace("`", "'")


def _norm(token: str) -> str | None:
    """A token as a concept word: stripped, case-folded; None unless it is letters (digits
    allowed after a letter) and at least 3 long."""
    s = token.strip().lower()
    return s if len(s) >= 3 and s.isalnum() and s[0].isalpha() else None


def feature_card(cards: FeatureCards, layer: int, feature: int, label: str, n_examples: int,
                 extra_words: tuple[str, ...] = ()) -> dict:
    """What the report shows of one card, and the feature's concept words (those its top
    examples fire on, and `extra_words`)."""
    card = cards.card(layer, feature, label)
    vocab = cards.vocab()
    examples = []
    for act, toks, _, at in card["top"][:n_examples]:
        text = "".join(("[[" + vocab.get(t, "?") + "]]") if i == at else vocab.get(t, "?")
                       for i, t in enumerate(toks))
        examples.append({"activation": act, "text": text, "token": vocab.get(toks[at], "?")})
    fired = [vocab.get(toks[at], "?") for _, toks, _, at in card["top"]]
    outputs = [vocab.get(t, "?") for t, v in card["pos"] if v > 0]
    words = sorted({w for w in map(_norm, fired) if w} | {w.strip().lower() for w in extra_words})
    return {"feature": feature, "label": card["label"], "auto_label": card["auto"],
            "density": card["d"], "max": card["max"], "examples": examples,
            "outputs": outputs, "negative_outputs": [vocab.get(t, "?") for t, _ in card["neg"]],
            "concept_words": words, "given_words": list(extra_words)}


# --- generation --------------------------------------------------------------------------------
class Clamp:
    """Greedy generation and next-token distributions of the model, plain or with SAE edits,
    every call padded to one length `T` (module docstring)."""

    def __init__(self, study: Study, T: int):
        self.s, self.T = study, T
        m = study.model
        self.eos = tuple(m.cfg.eos_token_ids)

        def plain(t):
            return forward(m.params, m.cfg, t[None])[0][0]

        self.plain = self._padded(plain)

    def _padded(self, fn):
        T = self.T

        def run(t):
            t = jnp.asarray(t, jnp.int32)
            n = t.shape[0]
            return fn(jnp.pad(t, (0, T - n)))[:n]
        return run

    def clamped(self, edits):
        s = self.s
        m = s.model
        return self._padded(lambda t: iv.free_logits(m.params, m.cfg, s.tc_cfg, s.tc_params,
                                                     None, tuple(edits), tokens=t))

    def run(self, ids: list[int], fn, n: int) -> dict:
        """Greedy continuation with `fn`; the next-token distribution after the prompt."""
        new = iv.greedy_continue(fn, ids, n, self.eos)
        logits = fn(ids)[-1].astype(jnp.float32)
        return {"new": new, "p_next": np.asarray(jax.nn.softmax(logits), np.float64)}

    def plain_nll(self, ids: list[int], new: list[int]) -> float:
        """Mean -log p of `new` given `ids` under the plain model (nats per token)."""
        if not new:
            return float("nan")
        toks = ids + new
        logp = jax.nn.log_softmax(self.plain(toks).astype(jnp.float32), -1)
        P = len(ids)
        return float(-np.mean([float(logp[P - 1 + i, t]) for i, t in enumerate(new)]))


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.sum(p * (np.log(p + 1e-30) - np.log(q + 1e-30))))


def continuation_row(study: Study, clamp: Clamp, ids: list[int], got: dict,
                     words: set[str] | None, base_p: np.ndarray | None) -> dict:
    """One continuation's numbers (`words` None: the plain run, no concept of its own)."""
    tok = study.tok
    new = got["new"]
    strings = tok.token_strings(new) if new else []
    hits = [s for s in strings if words is not None and _norm(s) in words]
    p = got["p_next"]
    top = [(tok.decode([int(i)]), round(float(p[i]), 4)) for i in np.argsort(-p)[:5]]
    return {"text": tok.decode(new), "tokens": [int(t) for t in new],
            "concept_share": None if words is None else round(len(hits) / max(len(new), 1), 4),
            "concept_hits": hits,
            "plain_nll": round(clamp.plain_nll(ids, new), 4),
            "distinct": round(len(set(new)) / max(len(new), 1), 4),
            "next_top": top, "kl_next": None if base_p is None else round(_kl(base_p, p), 4)}


# --- the study -----------------------------------------------------------------------------------
def _feature_specs(specs: list[str]) -> list[tuple[int, str, tuple[str, ...]]]:
    """--features: (feature, label, extra concept words) of each F[:label[:word,word]]."""
    out = []
    for spec in specs:
        m = re.fullmatch(r"\s*(\d+)\s*(?::([^:]*)(?::(.*))?)?", spec)
        if not m:
            raise SystemExit(f"--features: {spec!r} is not F, F:label or F:label:word,word")
        words = tuple(w.strip() for w in (m.group(3) or "").split(",") if w.strip())
        out.append((int(m.group(1)), (m.group(2) or "").strip(), words))
    return out


def _eval_metrics(args, sae_dir: Path) -> dict | None:
    paths = [Path(args.eval)] if args.eval else [sae_dir / "eval.json",
                                                 sae_dir.parent / "eval.json"]
    for p in paths:
        if p.is_file():
            return {"file": str(p), **json.loads(p.read_text())}
    if args.eval:
        raise SystemExit(f"--eval {args.eval}: no such file")
    return None


def _recipe(sae_dir: Path) -> tuple[dict, dict]:
    info = sae_dir / "info.json"
    if not info.is_file():
        return {}, {}
    info = json.loads(info.read_text())
    # `cltrace train` writes final_metrics; the bundled transcoders' info.json final_train_metrics.
    return info.get("train_config", {}), (info.get("final_metrics")
                                          or info.get("final_train_metrics", {}))


def main(argv=None) -> Path:
    args = parse_args(argv)
    t0 = time.time()
    ns = argparse.Namespace(model=args.model, transcoder=args.sae, out=args.out)
    study = Study(NAME, ns)
    study.args.transcoder = args.sae  # the report names the SAE as given (not an absolute path)
    if not study.tc_cfg.is_sae:
        raise SystemExit(f"--sae {args.sae} is a {study.tc_cfg.kind.upper()}, not an SAE")
    sae_dir = Path(args.sae)
    cards_path = Path(args.cards) if args.cards else default_path(args.sae)
    cards = FeatureCards.load(cards_path)
    maxima, source = card_maxima(args.sae, str(cards_path), study.tc_cfg)
    L = args.layer
    specs = _feature_specs(args.features)
    feats = [feature_card(cards, L, f, label, args.examples, words) for f, label, words in specs]
    prompt_ids = [study.prompt_ids(p) for p in args.prompts]
    clamp = Clamp(study, max(len(i) for i in prompt_ids) + args.max_new_tokens)
    pos, onwards = (None, False) if args.where == "all" else (1, True)

    runs = []
    base = {}
    for prompt, ids in zip(args.prompts, prompt_ids):
        got = clamp.run(ids, clamp.plain, args.max_new_tokens)
        base[prompt] = got
        runs.append({"prompt": prompt, "feature": None, "multiple": 0.0, "value": None,
                     **continuation_row(study, clamp, ids, got, None, None)})
        print(f"[{time.time() - t0:.0f}s] {prompt!r} plain: {runs[-1]['text']!r}")
    for feat in feats:
        words = set(feat["concept_words"])
        for prompt, ids in zip(args.prompts, prompt_ids):  # plain runs' concept share per feature
            new = base[prompt]["new"]
            feat.setdefault("plain_concept_share", {})[prompt] = round(sum(
                _norm(s) in words for s in study.tok.token_strings(new)) / max(len(new), 1), 4)
        for N in args.multiples:
            (edit,) = iv.resolve_multiples(
                (iv.FeatureEdit(L, feat["feature"], pos, "set", N, onwards, of_max=True),),
                maxima, source, study.tc_cfg)
            fn = clamp.clamped((edit,))
            for prompt, ids in zip(args.prompts, prompt_ids):
                got = clamp.run(ids, fn, args.max_new_tokens)
                row = continuation_row(study, clamp, ids, got, words, base[prompt]["p_next"])
                runs.append({"prompt": prompt, "feature": feat["feature"], "multiple": N,
                             "value": round(edit.value, 4), "edit": iv.edit_spec(edit), **row})
                print(f"[{time.time() - t0:.0f}s] {prompt!r} {L}:{feat['feature']}={N:g}x: "
                      f"{row['text']!r}")

    results = {"model": args.model, "sae": args.sae, "cards": str(cards_path), "layer": L,
               "sae_config": {k: getattr(study.tc_cfg, k) for k in
                              ("n_features", "activation", "k", "d_model")},
               "recipe": _recipe(sae_dir)[0], "train_metrics": _recipe(sae_dir)[1],
               "eval": _eval_metrics(args, sae_dir), "where": args.where,
               "multiples": args.multiples, "max_new_tokens": args.max_new_tokens,
               "prompts": args.prompts, "features": feats, "runs": runs,
               "seconds": round(time.time() - t0, 1)}
    write_report(study, results)
    (study.out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    path = study.write(f"Clamping SAE features to N x their maximum (layer {L})")
    if args.docs:
        shutil.copy(path, ROOT / "docs" / "cases" / f"{NAME}.md")
        shutil.copy(study.out / "results.json", ROOT / "docs" / "cases" / f"{NAME}.json")
    return path


# --- the report ------------------------------------------------------------------------------------
def _fmt(x, spec=".4f") -> str:
    return "-" if x is None else format(x, spec)


def write_report(study: Study, r: dict) -> None:
    say = study.say
    L = r["layer"]
    rc, tm, ev = r["recipe"], r["train_metrics"], r["eval"]
    say("## The SAE")
    say()
    c = r["sae_config"]
    say(f"- dictionary at model layer {L} (`resid_mid`, the residual stream before layer {L}'s "
        f"MLP): {c['n_features']} features, {c['activation']}"
        + (f" k = {c['k']}" if c["activation"] in ("topk", "batchtopk") else ""))
    if rc:
        say(f"- recipe: {rc.get('steps')} steps x {rc.get('batch_tokens')} tokens, lr "
            f"{rc.get('lr')}, data reuse {rc.get('data_reuse')}, context {rc.get('context_length')}"
            f" tokens, data `{rc.get('data')}` (held-out fraction {rc.get('holdout')}); "
            f"`cltrace train --kind sae --layers {L}` (recipe in `info.json` beside the SAE)")
    if tm:
        say(f"- end of training (step {tm.get('step')}, one training batch; tokens over 10x the "
            f"median norm dropped): NMSE {_fmt(tm.get('nmse'))}, L0 {_fmt(tm.get('l0'), '.1f')}")
    if ev:
        say(f"- held-out (`cltrace eval`, {ev.get('n_tokens')} tokens (BOS dropped), {ev.get('n_predictions')}"
            f" predictions, layer {L} spliced: the residual replaced by the reconstruction): "
            f"NMSE {_fmt(ev.get('nmse_mean'))}, L0 {_fmt(ev.get('l0_total'), '.1f')}, dead "
            f"{_fmt(ev.get('dead_fraction'), '.1%')}, dense {_fmt(ev.get('dense_fraction'), '.1%')}"
            f"; KL {_fmt(ev.get('kl'))} nats/token, top-1 agreement "
            f"{_fmt(ev.get('top1_agreement'), '.1%')}, CE {_fmt(ev.get('ce_original'))} -> "
            f"{_fmt(ev.get('ce_spliced'))} ({_fmt(ev.get('delta_ce'), '+.4f')})")
    say(f"- cards: `{r['cards']}`")
    where = ("every position, BOS and generated tokens included" if r["where"] == "all"
             else "every position but the BOS, generated tokens included")
    say(f"- clamp: `--set {L}:F=Nx` (N x the card's maximum activation) at {where}; free mode "
        "(the SAE's error kept, everything downstream recomputed); greedy decoding, "
        f"{r['max_new_tokens']} new tokens")
    say()
    say("## The features")
    for f in r["features"]:
        say()
        say(f"### {L}:{f['feature']} — {_cell(f['label'])}")
        say()
        say(f"density {f['density']:.4%}, maximum activation {f['max']:.3g}; automatic label "
            f"'{_cell(f['auto_label'])}'; promotes: "
            + ", ".join(f"'{_cell(t)}'" for t in f["outputs"][:8])
            + "; suppresses: " + ", ".join(f"'{_cell(t)}'" for t in f["negative_outputs"][:5]))
        say()
        for ex in f["examples"]:
            say(f"- {ex['activation']:.3g}: `{_inline(ex['text'])}`")
        say()
        say("concept words (counted in continuations; from the top examples"
            + (", and given: " + ", ".join(f["given_words"]) if f["given_words"] else "") + "): "
            + (", ".join(f["concept_words"]) or "(none)"))
    say()
    say("## Generations")
    say()
    say("*concept*: share of the continuation's tokens among the feature's concept words; "
        "*NLL*: the plain model's mean negative log-likelihood per token of the continuation "
        "(nats; the plain continuation's is the baseline); *distinct*: share of distinct tokens; "
        "*KL*: KL(plain || clamped) of the next token after the prompt, whose top tokens follow.")
    for prompt in r["prompts"]:
        say()
        say(f"### \"{_cell(prompt)}\"")
        say()
        say("| clamp | continuation | concept | NLL | distinct | KL | next tokens |")
        say("|---|---|---|---|---|---|---|")
        for x in (x for x in r["runs"] if x["prompt"] == prompt):
            name = "plain" if x["feature"] is None else f"{L}:{x['feature']}={x['multiple']:g}x"
            nxt = ", ".join(f"'{_cell(t)}' {p:.2f}" for t, p in x["next_top"][:3])
            say(f"| {name} | {_cell(x['text'])} | {_fmt(x['concept_share'], '.2f')} | "
                f"{x['plain_nll']:.2f} | {x['distinct']:.2f} | {_fmt(x['kl_next'], '.3f')} | "
                f"{nxt} |")
    say()
    say("## Summary over prompts")
    say()
    say("| clamp | concept share (mean) | with a concept word | NLL (mean) | distinct (mean) | "
        "KL next (mean) | changed |")
    say("|---|---|---|---|---|---|---|")
    plain = {x["prompt"]: x for x in r["runs"] if x["feature"] is None}
    rows = [("plain", [plain[p] for p in r["prompts"]])]
    for f in r["features"]:
        for N in r["multiples"]:
            rows.append((f"{L}:{f['feature']}={N:g}x", [
                x for x in r["runs"] if x["feature"] == f["feature"] and x["multiple"] == N]))
    for name, xs in rows:
        kls = [x["kl_next"] for x in xs if x["kl_next"] is not None]
        shares = [x["concept_share"] for x in xs if x["concept_share"] is not None]
        say(f"| {name} | {_fmt(float(np.mean(shares)) if shares else None, '.2f')} | "
            f"{sum(bool(s) for s in shares) if shares else '-'}/{len(xs)} | "
            f"{np.mean([x['plain_nll'] for x in xs]):.2f} | "
            f"{np.mean([x['distinct'] for x in xs]):.2f} | "
            f"{_fmt(float(np.mean(kls)) if kls else None, '.3f')} | "
            f"{sum(x['tokens'] != plain[x['prompt']]['tokens'] for x in xs)}/{len(xs)} |")
    say()
    say("(the plain continuations' concept share, counted with each feature's words: " + "; ".join(
        f"{L}:{f['feature']} {np.mean(list(f['plain_concept_share'].values())):.2f}"
        for f in r["features"]) + f"; {r['seconds']:.0f} s)")


if __name__ == "__main__":
    main(sys.argv[1:])
