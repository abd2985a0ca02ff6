"""Case study (e): two-number addition, "36+59=" -> 95, on SmolLM2-135M and its transcoder.

"Biology of a Large Language Model" (§ addition) finds, in Claude 3.5 Haiku, lookup-table
features for the ones digit ("_6 + _9" -> ends in 5) and features for the sum's rough magnitude
("sum near 90"). SmolLM2's tokenizer writes every digit as its own token, so "95" is two answer
tokens: the tens digit "9" (which needs the magnitude and the carry) and then, after it, the ones
digit "5" (which needs only the operands' ones digits). Here:

1. accuracy: a grid of two-digit problems in a few prompt formats, each scored by greedy decoding
   (teacher-forced: greedy decoding returns the sum exactly when the argmax at every answer
   position is the next digit of the sum and, after the last one, not a digit); per format, with
   and without a carry from the ones digits;
2. tracing: a few problems the model gets right, each traced twice, once for the first answer
   digit and once for the ones digit (the prompt then ends with the digits before it);
3. what the top features respond to: their activation over a larger grid (all prompts of a
   format have the same token layout, so a feature at position p is read at p everywhere),
   and the share of its variance explained by the operands' ones digits, the sum's ones digit,
   the sum's magnitude (a+b)//10 and the carry;
4. interventions: zero each top feature (free mode, errors kept) and then all together, on the
   traced prompt and on every grid problem where it fires; p(correct digit), its logit, and the
   digit predicted.

Usage: python scripts/cases/addition.py [--problems 200] [--traces 4] [--out out/cases/addition]
Writes out/cases/addition/report.md and results.json (copied to docs/cases/addition.md/.json).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from common import Study, parser  # first: puts the repository on sys.path

from attribution import interventions as iv
from attribution import replacement as rep

_CHAT = "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{r}"
# Prompt formats tried (SmolLM2-135M-Instruct: the chat template helps; "{a} + {b} = " in the
# assistant turn, with or without one worked example before it).
FORMATS = {
    "plain": "{a}+{b}=",
    "fewshot": "14+23=37\n58+31=89\n{a}+{b}=",
    "qa": "Q: What is {a} + {b}?\nA: ",
    "chat": _CHAT.format(q="What is {a} + {b}?", r="{a} + {b} = "),
    "chat_fewshot": _CHAT.format(q="What is 14 + 23?", r="14 + 23 = 37<|im_end|>\n")
    + _CHAT.format(q="What is {a} + {b}?", r="{a} + {b} = "),
}


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def total(self) -> int:
        return self.a + self.b

    @property
    def carry(self) -> bool:
        """A carry from the ones digits into the tens."""
        return self.a % 10 + self.b % 10 >= 10

    def prompt(self, fmt: str) -> str:
        return FORMATS[fmt].format(a=self.a, b=self.b)


def grid(n: int, seed: int = 0, low: int = 10, high: int = 99) -> list[Problem]:
    """n distinct problems a + b with a, b in [low, high], drawn at random (or all of them)."""
    pairs = [(a, b) for a in range(low, high + 1) for b in range(low, high + 1)]
    if n < len(pairs):
        rng = np.random.default_rng(seed)
        pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), n, replace=False))]
    return [Problem(a, b) for a, b in pairs]


def digit_ids(tok) -> dict[int, int]:
    """Token id of each digit 0-9 (SmolLM2 writes one digit per token)."""
    out = {}
    for d in range(10):
        ids = tok.encode(str(d), add_bos=False)
        if len(ids) != 1:
            raise ValueError(f"digit {d} is not one token: {ids}")
        out[d] = ids[0]
    return out


def encode_problem(tok, model_cfg, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids with BOS, as the tracer prepends it; answer ids): the answer's tokens as they
    follow the prompt in the text prompt + answer (checked to extend the prompt's own tokens)."""
    p = tok.encode(prompt, add_bos=False)
    full = tok.encode(prompt + answer, add_bos=False)
    if full[:len(p)] != p:
        raise ValueError(f"{prompt + answer!r} does not tokenize as {prompt!r} + {answer!r}")
    ids, _ = rep.prepend_bos(model_cfg, p)
    return ids, full[len(p):]


def score(logits: np.ndarray, n_prompt: int, answer: list[int], digits: set[int]) -> dict:
    """Greedy decoding's verdict from teacher-forced logits [pos, vocab] of prompt + answer
    (n_prompt prompt tokens, BOS included): the first answer token is predicted at n_prompt - 1.
    correct: every answer token is the argmax and the token after is not a digit (so greedy
    decoding writes exactly the answer); first / per_token: argmax right at each answer position
    given the right tokens before it; predicted: the argmax at each answer position and after."""
    pred = [int(np.argmax(logits[n_prompt - 1 + i])) for i in range(len(answer) + 1)]
    per = [p == t for p, t in zip(pred, answer)]
    stops = pred[len(answer)] not in digits
    return {"correct": bool(all(per) and stops), "first": bool(per[0]), "per_token": per,
            "stops": bool(stops), "predicted": pred}


def evaluate(model, problems: list[Problem], fmt: str, batch: int = 50) -> list[dict]:
    """Score every problem in one format (teacher-forced, batched; prompts right-padded)."""
    from clt.lm.model import forward

    tok = model.tokenizer
    digits = set(digit_ids(tok).values())
    encoded = [encode_problem(tok, model.cfg, p.prompt(fmt), str(p.total))
               for p in problems]
    out = []
    for i in range(0, len(encoded), batch):
        chunk = encoded[i:i + batch]
        seqs = [p + a for p, a in chunk]
        width = max(len(s) for s in seqs) + 1  # room to read the token after the answer
        toks = np.zeros((len(seqs), width), np.int32)
        for j, s in enumerate(seqs):
            toks[j, :len(s)] = s
        logits, _ = forward(model.params, model.cfg, jnp.asarray(toks))
        logits = np.asarray(logits)
        for j, (p, a) in enumerate(chunk):
            out.append(score(logits[j], len(p), a, digits))
    return out


def accuracy(problems: list[Problem], results: list[dict]) -> dict:
    """Accuracy overall, by carry, by the sum's digit count; first-token and ones-digit rates."""
    def rate(rows):
        rows = list(rows)
        return {"n": len(rows), "acc": float(np.mean([r["correct"] for r in rows])) if rows else 0.0}

    both = list(zip(problems, results))
    ones = [r["per_token"][-1] for _, r in both]
    return {
        "all": rate(r for _, r in both),
        "carry": rate(r for p, r in both if p.carry),
        "no_carry": rate(r for p, r in both if not p.carry),
        "sum<100": rate(r for p, r in both if p.total < 100),
        "sum>=100": rate(r for p, r in both if p.total >= 100),
        "first_token": float(np.mean([r["first"] for _, r in both])),
        "ones_digit_given_rest": float(np.mean(ones)),
    }


# --- what a feature responds to --------------------------------------------------------------------
GROUPINGS = {
    "a ones": lambda p: p.a % 10,
    "b ones": lambda p: p.b % 10,
    "sum ones": lambda p: p.total % 10,
    "sum // 10": lambda p: p.total // 10,
    "carry": lambda p: int(p.carry),
}


def eta_squared_all(x: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Per column of x [n, F]: the share of its variance explained by the group means (the
    correlation ratio eta^2); nan for a column that does not vary."""
    x = np.asarray(x, np.float64)
    centred = x - x.mean(0)
    total = (centred ** 2).sum(0)
    between = np.zeros(x.shape[1])
    for g in np.unique(groups):
        sel = groups == g
        between += sel.sum() * centred[sel].mean(0) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 1e-12, between / total, np.nan)


def eta_squared(values: np.ndarray, groups: np.ndarray) -> float:
    return float(eta_squared_all(np.asarray(values)[:, None], groups)[0])


def null_level(groups: np.ndarray) -> float:
    """What eta^2 reaches on average for values unrelated to k groups of n: (k - 1) / (n - 1)."""
    return (len(np.unique(groups)) - 1) / max(len(groups) - 1, 1)


def profile(values: np.ndarray, problems: list[Problem]) -> dict:
    """How a feature's activation over the grid (nan: not comparable there) depends on each
    grouping: eta^2 and its null level; how often it fires; its top problems."""
    keep = ~np.isnan(values)
    vals = values[keep]
    probs = [p for p, k in zip(problems, keep) if k]
    out = {"n": len(vals), "active": float((vals > 0).mean()) if len(vals) else 0.0,
           "mean": float(vals.mean()) if len(vals) else 0.0, "eta2": {}, "null": {}}
    for name, f in GROUPINGS.items():
        g = np.array([f(p) for p in probs])
        out["eta2"][name] = eta_squared(vals, g) if len(vals) > 1 else float("nan")
        out["null"][name] = null_level(g)
    order = np.argsort(-vals)[:5]
    out["top"] = [f"{probs[i].a}+{probs[i].b}" for i in order if vals[i] > 0]
    return out


def kind_of(prof: dict, margin: float = 0.25) -> str:
    """The grouping that explains most of the feature's variance beyond its null level, when it
    explains at least `margin` more than that; "constant" / "mixed" otherwise."""
    eta = {k: v - prof["null"][k] for k, v in prof["eta2"].items() if not np.isnan(v)}
    if not eta:
        return "constant"
    best = max(eta, key=eta.get)
    return best if eta[best] >= margin else "mixed"


@dataclass
class GridActs:
    """Every feature's activation at some positions of the teacher-forced prompt + answer of
    each grid problem (causal: a position sees only what precedes it). All prompts of a format
    have the same tokens up to the answer; a position inside the answer means the same thing
    only for answers of equal length (`valid`)."""

    problems: list[Problem]
    acts: dict[int, np.ndarray]  # pos -> [problem, layer, feature]
    n_prompt: int  # prompt tokens, BOS included (the same for every problem)
    n_answer: np.ndarray  # [problem] answer digits

    def valid(self, pos: int, n_answer: int | None) -> np.ndarray:
        """Problems where position `pos` holds what it holds for an answer of n_answer digits."""
        if pos < self.n_prompt or n_answer is None:
            return np.ones(len(self.problems), bool)
        return self.n_answer == n_answer

    def site(self, pos: int, layer: int, feature: int, n_answer: int | None) -> np.ndarray:
        """One feature's activations [problem], nan where the position is not comparable."""
        return np.where(self.valid(pos, n_answer), self.acts[pos][:, layer, feature], np.nan)


def grid_activations(model, tc_cfg, tc_params, problems: list[Problem], fmt: str,
                     positions: list[int], batch: int = 25) -> GridActs:
    from clt import transcoder as tcm
    from clt.lm.model import activations

    enc = [encode_problem(model.tokenizer, model.cfg, p.prompt(fmt), str(p.total))
           for p in problems]
    if len({len(p) for p, _ in enc}) != 1:
        raise ValueError(f"format {fmt!r}: prompts of different lengths")
    point = "resid_mid" if tc_cfg.input_point == "resid_mid" else "mlp_in"
    positions = sorted(set(positions))
    shape = (len(problems), tc_cfg.n_layers, tc_cfg.n_features)
    acts = {pos: np.zeros(shape, np.float32) for pos in positions}
    for i in range(0, len(enc), batch):
        seqs = [p + a for p, a in enc[i:i + batch]]
        toks = np.zeros((len(seqs), max(positions[-1] + 1, max(map(len, seqs)))), np.int32)
        for j, seq in enumerate(seqs):
            toks[j, :len(seq)] = seq
        x = getattr(activations(model.params, model.cfg, jnp.asarray(toks), (point,)), point)
        for pos in positions:  # x: [layer, batch, pos, d_model]
            acts[pos][i:i + len(seqs)] = tcm.encode(tc_cfg, tc_params,
                                                    jnp.swapaxes(x[:, :, pos], 0, 1))
    return GridActs(problems, acts, len(enc[0][0]), np.array([len(a) for _, a in enc]))


def first_varying(model, fmt: str) -> int:
    """The first prompt position (BOS = 0) that differs between problems: the first operand's."""
    ids = [encode_problem(model.tokenizer, model.cfg, p.prompt(fmt), "0")[0]
           for p in (Problem(10, 10), Problem(99, 99))]
    return next(i for i, (x, y) in enumerate(zip(*ids)) if x != y)


def search(ga: GridActs, pos: int, n_answer: int | None, min_active: float = 0.05,
           k: int = 3) -> dict:
    """At one position, every feature ranked by eta^2 above its null level, for each grouping:
    the k best among the features that fire on at least `min_active` of the grid."""
    keep = ga.valid(pos, n_answer)
    x = ga.acts[pos][keep].reshape(keep.sum(), -1)
    probs = [p for p, k_ in zip(ga.problems, keep) if k_]
    active = (x > 0).mean(0)
    out = {}
    for name, f in GROUPINGS.items():
        g = np.array([f(p) for p in probs])
        score = eta_squared_all(x, g) - null_level(g)
        score = np.where((active >= min_active) & ~np.isnan(score), score, -np.inf)
        top = np.argsort(-score)[:k]
        out[name] = [{"layer": int(i // ga.acts[pos].shape[2]),
                      "feature": int(i % ga.acts[pos].shape[2]), "pos": pos,
                      "eta2_above_null": float(score[i]), "active": float(active[i]),
                      "top": [f"{probs[j].a}+{probs[j].b}" for j in np.argsort(-x[:, i])[:3]]}
                     for i in top if np.isfinite(score[i])]
    return out


# --- tracing and interventions ---------------------------------------------------------------------
@dataclass(frozen=True)
class Site:
    """One traced answer digit: the problem, the ids up to it, the digit and where it is."""

    problem: Problem
    ids: list[int]  # BOS + prompt + the answer digits before this one
    digit: int
    which: str  # "first" (the first answer digit) or "ones"
    n_answer: int  # digits in the answer


def sites_of(model, p: Problem, fmt: str) -> list[Site]:
    """The first answer digit and the ones digit of p (one site when the answer has one digit)."""
    ids, ans = encode_problem(model.tokenizer, model.cfg, p.prompt(fmt), str(p.total))
    out = [Site(p, ids, int(str(p.total)[0]), "first", len(ans))]
    if len(ans) > 1:
        out.append(Site(p, ids + ans[:-1], p.total % 10, "ones", len(ans)))
    return out


def site_of(model, p: Problem, fmt: str, which: str) -> Site:
    return next(x for x in sites_of(model, p, fmt) if x.which == which)


def trace_site(s: Study, site: Site, slug: str):
    """The attribution graph of one answer digit, with that digit as the only target."""
    from attribution.trace import Targets, TraceConfig, trace_tokens

    tok = s.tok
    ids = site.ids[1:] if site.ids[0] == s.model.cfg.bos_token_id else site.ids
    config = TraceConfig(prompt=tok.decode(ids), model=s.args.model,
                         transcoder=s.args.transcoder, max_feature_nodes=s.args.max_feature_nodes)
    graph = trace_tokens(s.model.params, s.model.cfg, s.tc_cfg, s.tc_params, ids, config,
                         token_strings=tok.token_strings(ids, merge=True),
                         logit_strings=lambda t: tok.token_strings([int(i) for i in t]),
                         targets=Targets(tokens=(digit_ids(tok)[site.digit],)))
    g = graph.scores
    graph.save(s.out / f"{slug}.npz")
    page = s.out / f"{slug}.html"
    try:
        from viewer import write_html

        write_html(graph, page)
    except Exception as e:  # noqa: BLE001 (the page is optional for the numbers of a study)
        page = None
        s.say(f"(no HTML page: {type(e).__name__}: {e})")
    return graph, (g.replacement, g.completeness, g.pruned_replacement, g.pruned_completeness), page


def direct_shares(graph) -> dict:
    """The target logit's direct inputs (sum of |edge|) by node kind, as shares (the features
    kept in the graph only, under max_feature_nodes)."""
    r = graph.ranges
    row = np.abs(graph.adjacency[r.logit.start])
    sums = {k: float(row[getattr(r, k)].sum()) for k in ("feature", "error", "token")}
    total = max(sum(sums.values()), 1e-30)
    return {k: v / total for k, v in sums.items()}


def digit_readout(logits: np.ndarray, digit_tok: dict[int, int], digit: int, tok) -> dict:
    """From one position's logits: p of the correct digit, its margin (its logit minus the best
    other digit's: > 0 when it wins among digits), and the argmax token."""
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    others = max(z[t] for d, t in digit_tok.items() if d != digit)
    return {"p": float(p[digit_tok[digit]]), "margin": float(z[digit_tok[digit]] - others),
            "argmax": tok.decode([int(np.argmax(z))])}


def edited(s: Study, ids: list[int], edits=(), rm=None) -> np.ndarray:
    """Free-mode logits at the last position with feature edits (errors kept)."""
    m = s.model
    if rm is None:
        rm, _ = rep.build(m.params, m.cfg, s.tc_cfg, s.tc_params, np.asarray(ids))
    return np.asarray(iv.free_logits(m.params, m.cfg, s.tc_cfg, s.tc_params, rm, tuple(edits))[-1])


def _release() -> None:
    """Drop JAX's compiled programs: every distinct set of edits compiles the spliced model anew
    (the edits are static), ~60 MB each, which a study's hundreds of ablations would pile up."""
    jax.clear_caches()


def zero(rows) -> list:
    """Zero edits for feature rows (node, layer, pos, index, ...) at their positions."""
    return [iv.FeatureEdit(r[1], r[3], r[2], "set", 0.0) for r in rows]


def ablate_on_prompt(s: Study, site: Site, rows, each: bool = True) -> list[dict]:
    """Zero each key feature at its position (when `each`), then all of them: the correct digit's
    p, margin and the argmax, after the unedited run."""
    dt = digit_ids(s.tok)
    m = s.model
    rm, _ = rep.build(m.params, m.cfg, s.tc_cfg, s.tc_params, np.asarray(site.ids))

    def read(edits):
        return digit_readout(edited(s, site.ids, edits, rm), dt, site.digit, s.tok)

    out = [{"edit": "none", **read(())}]
    if each:
        out += [{"edit": f"{r[1]}:{r[3]}@{r[2]}", **read(zero([r]))} for r in rows]
    out.append({"edit": f"all {len(rows)}", **read(zero(rows))})
    _release()
    return out


def ablate_on_grid(s: Study, fmt: str, which: str, edits, problems: list[Problem]) -> dict:
    """Apply the same edits on each problem, read at its `which` digit: mean p(correct) before
    and after, mean margin change, and how many problems had the digit right before / after."""
    dt = digit_ids(s.tok)
    m = s.model
    before, after = [], []
    for p in problems:
        site = site_of(m, p, fmt, which)
        rm, _ = rep.build(m.params, m.cfg, s.tc_cfg, s.tc_params, np.asarray(site.ids))
        before.append(digit_readout(edited(s, site.ids, (), rm), dt, site.digit, s.tok))
        after.append(digit_readout(edited(s, site.ids, edits, rm), dt, site.digit, s.tok))
    _release()

    def mean(rows, key):
        return float(np.mean([r[key] for r in rows])) if rows else 0.0

    return {"n": len(problems), "p_before": mean(before, "p"), "p_after": mean(after, "p"),
            "dmargin": mean(after, "margin") - mean(before, "margin"),
            "right_before": sum(r["margin"] > 0 for r in before),
            "right_after": sum(r["margin"] > 0 for r in after)}


def pick(problems: list[Problem], mask: np.ndarray, n: int, seed: int) -> list[Problem]:
    """Up to n problems where `mask` holds, in a seeded random order (the grid is sorted)."""
    idx = np.random.default_rng(seed).permutation(np.flatnonzero(mask))[:n]
    return [problems[i] for i in idx]


# --- the study -------------------------------------------------------------------------------------
def choose(problems: list[Problem], results: list[dict], k: int) -> list[Problem]:
    """k problems the model gets right, spread over carry / no carry and two / three digit sums
    (the first of each kind in grid order, in turn)."""
    kinds = [(True, False), (False, False), (True, True), (False, True)]
    pools = [[p for p, r in zip(problems, results)
              if r["correct"] and p.carry == c and (p.total >= 100) == big] for c, big in kinds]
    out = []
    while len(out) < k and any(pools):
        for pool in pools:
            if pool and len(out) < k:
                out.append(pool.pop(0))
    return out


def accuracy_section(s: Study, problems: list[Problem], formats: list[str]) -> tuple[dict, dict]:
    s.say(f"## Accuracy: {len(problems)} problems a + b, a and b drawn from 10..99\n")
    s.say("Scored by greedy decoding (teacher-forced, which gives the same verdict): right when "
          "every digit of the sum is the argmax in turn and the token after it is not a digit. "
          "*first digit*: the first answer digit right; *ones digit*: the last digit right given "
          "the right digits before it.\n")
    s.say("| format | prompt (36 + 59) | all | carry | no carry | sum < 100 | sum >= 100 | "
          "first digit | ones digit |")
    s.say("|---|---|---|---|---|---|---|---|---|")
    acc, res = {}, {}
    for fmt in formats:
        res[fmt] = evaluate(s.model, problems, fmt)
        a = acc[fmt] = accuracy(problems, res[fmt])
        shown = repr(Problem(36, 59).prompt(fmt)).replace("|", "\\|")  # a table cell
        s.say(f"| {fmt} | `{shown}` | {a['all']['acc']:.3f} | "
              f"{a['carry']['acc']:.3f} ({a['carry']['n']}) | "
              f"{a['no_carry']['acc']:.3f} ({a['no_carry']['n']}) | "
              f"{a['sum<100']['acc']:.3f} ({a['sum<100']['n']}) | "
              f"{a['sum>=100']['acc']:.3f} ({a['sum>=100']['n']}) | "
              f"{a['first_token']:.3f} | {a['ones_digit_given_rest']:.3f} |")
    return acc, res


def study_site(s: Study, site: Site, slug: str, first_var: int) -> dict:
    """Trace one answer digit: the graph, where its direct input comes from, its most influential
    features (all, and those from the first operand on) and their ablations on the prompt."""
    digit = str(site.digit)
    graph, scores, page = trace_site(s, site, slug)
    shares = direct_shares(graph)
    k = s.args.top
    ranked = s.key_features(graph, digit, k=graph.ranges.feature.stop)
    top_all = ranked[:k]
    rows = [r for r in ranked if r[2] >= first_var][:k]
    p = site.problem
    s.say(f"\n### {p.a} + {p.b} = {p.total}: the {site.which} digit {digit!r}\n")
    s.say(f"prompt ends `{s.tok.decode(site.ids[-8:])!r}`")
    s.graph_summary(graph, scores, page)
    s.say(f"- direct inputs of {digit!r} (sum of |edge|, features kept): features "
          f"{shares['feature']:.2f}, error nodes {shares['error']:.2f}, tokens "
          f"{shares['token']:.2f}")
    ab_all = ablate_on_prompt(s, site, top_all, each=False)
    before = sum(r[2] < first_var for r in top_all)
    s.say(f"- its {k} most influential features: {before} before the operands (position < "
          f"{first_var}: the same on every problem); all {k} zeroed: p {ab_all[0]['p']:.3f} -> "
          f"{ab_all[-1]['p']:.3f}, argmax {ab_all[-1]['argmax']!r}")
    return {"problem": f"{p.a}+{p.b}", "total": p.total, "which": site.which,
            "digit": site.digit, "p_target": float(graph.logit_probs[0]),
            "scores": dict(zip(("replacement", "completeness", "pruned_replacement",
                                "pruned_completeness"), scores)),
            "direct_shares": shares, "top_all": [f"{r[1]}:{r[3]}@{r[2]}" for r in top_all],
            "top_all_zeroed": ab_all,
            "features": [{"name": f"{lay}:{idx}@{pos}", "token": graph.token_strings[pos],
                          "activation": act, "influence": inf}
                         for _, lay, pos, idx, act, inf in rows],
            "ablations": ablate_on_prompt(s, site, rows), "_rows": rows, "_site": site}


def feature_section(s: Study, fmt: str, record: dict, ga: GridActs, right: dict, n_grid: int,
                    k_grid: int, seed: int) -> None:
    """Key features of one traced digit from the first operand on: what they respond to over the
    grid, their ablations on the prompt and, for the first k_grid, on grid problems where they
    fire and the model has that digit right (`right[which]`: a mask over the grid)."""
    site = record["_site"]
    p = site.problem
    s.say(f"\n#### {p.a} + {p.b}, {record['which']} digit {str(record['digit'])!r}: the "
          f"features with most influence on it from the first operand on\n")
    names = list(GROUPINGS)
    s.say("| feature | token | act. | influence | active on grid | "
          + " | ".join(names) + " | kind | top problems |")
    s.say("|---|---|---|---|---|" + "---|" * len(names) + "---|---|")
    for f, r in zip(record["features"], record["_rows"]):
        prof = profile(ga.site(r[2], r[1], r[3], site.n_answer), ga.problems)
        f["profile"], f["kind"] = prof, kind_of(prof)
        eta = " | ".join("-" if np.isnan(prof["eta2"][k]) else
                         f"{prof['eta2'][k]:.2f} ({prof['null'][k]:.2f})" for k in names)
        s.say(f"| {f['name']} | {f['token']!r} | {f['activation']:.2f} | {f['influence']:.4f} | "
              f"{prof['active']:.2f} | {eta} | {f['kind']} | {', '.join(prof['top'][:3])} |")
    ab = record["ablations"]
    base = ab[0]
    s.say(f"\nZeroed on the prompt (free mode, errors kept): p({str(record['digit'])!r}) = "
          f"{base['p']:.3f}, margin over the next digit {base['margin']:.2f}, argmax "
          f"{base['argmax']!r} unedited\n")
    s.say("| zeroed | p | change | margin change | argmax |")
    s.say("|---|---|---|---|---|")
    for a in ab[1:]:
        s.say(f"| {a['edit']} | {a['p']:.3f} | {a['p'] - base['p']:+.3f} | "
              f"{a['margin'] - base['margin']:+.2f} | {a['argmax']!r} |")
    lines = []
    for f, r in list(zip(record["features"], record["_rows"]))[:k_grid]:
        v = ga.site(r[2], r[1], r[3], site.n_answer)
        fires = pick(ga.problems, (np.nan_to_num(v) > 0) & right[site.which], n_grid, seed)
        g = f["grid_ablation"] = ablate_on_grid(s, fmt, site.which, zero([r]), fires)
        lines.append(f"| {f['name']} | {f['kind']} | {g['n']} | {g['p_before']:.3f} -> "
                     f"{g['p_after']:.3f} | {g['dmargin']:+.2f} | {g['right_before']} -> "
                     f"{g['right_after']} |")
    if lines:
        s.say(f"\nZeroed on grid problems where it fires and the model has the "
              f"{record['which']} digit right (up to {n_grid}, drawn at random):\n")
        s.say("| feature | kind | problems | mean p(correct) | mean margin change | "
              "digit right (of n) |")
        s.say("|---|---|---|---|---|---|")
        for line in lines:
            s.say(line)


def search_section(s: Study, fmt: str, ga: GridActs, right: dict, n_grid: int, k: int,
                   seed: int) -> dict:
    """Look for the paper's two kinds of features directly, without a graph: at the last prompt
    position and at the first answer digit (two-digit sums), the features whose activation the
    sum's ones digit, or its magnitude, explains best; zero the best k (and 4k) together on grid
    problems and compare with as many random features that fire often."""
    last = ga.n_prompt - 1
    found = {"last": search(ga, last, None), "tens": search(ga, last + 1, 2)}
    s.say("\n## Searching for ones-digit and magnitude features directly\n")
    s.say(f"Every feature at the last prompt position ({last}, where the first digit is "
          f"predicted) and at the first answer digit ({last + 1}, where a two-digit sum's ones "
          f"digit is predicted), over the {len(ga.problems)}-problem grid: the 3 best by eta^2 "
          f"above its null level, for each grouping (features firing on >= 5% of the grid).\n")
    s.say("| position | grouping | feature | eta^2 - null | active | top problems |")
    s.say("|---|---|---|---|---|---|")
    for where, res in found.items():
        for name, rows in res.items():
            for r in rows:
                s.say(f"| {where} | {name} | {r['layer']}:{r['feature']}@{r['pos']} | "
                      f"{r['eta2_above_null']:.2f} | {r['active']:.2f} | "
                      f"{', '.join(r['top'])} |")
    rng = np.random.default_rng(seed)
    tests = [("last", "sum // 10", "first"), ("last", "sum ones", "ones"),
             ("tens", "sum ones", "ones")]
    s.say(f"\nThe best {k} (then {4 * k}) of a grouping zeroed together, read at the digit they "
          f"should matter for, on up to {n_grid} grid problems with two-digit sums where one of "
          "them fires and the model has that digit right (drawn at random); control: as many "
          "random features at "
          "the same position, among those firing on >= 50% of the grid. (At the first answer "
          "digit the token itself is a two-digit sum's tens digit: 'sum // 10' there is the "
          "token's identity.)\n")
    s.say("| features zeroed | read at | problems | mean p(correct) | mean margin change | "
          "digit right (of n) |")
    s.say("|---|---|---|---|---|---|")
    out = {"found": found, "ablations": []}
    for (where, name, which), n_feat in itertools.product(tests, (k, 4 * k)):
        pos, n_answer = (last, None) if where == "last" else (last + 1, 2)
        rows = search(ga, pos, n_answer, k=n_feat)[name]
        acts = ga.acts[pos][ga.valid(pos, n_answer)]
        common = np.flatnonzero(((acts > 0).mean(0) >= 0.5).ravel())
        rand = rng.choice(common, min(n_feat, len(common)), replace=False)
        F = acts.shape[2]
        fires = np.zeros(len(ga.problems), bool)
        for r in rows:
            fires |= ga.acts[pos][:, r["layer"], r["feature"]] > 0
        problems = pick(ga.problems, (ga.n_answer == 2) & right[which] & fires, n_grid, seed)
        for label, edits in ((f"{name} @{where}", [iv.FeatureEdit(r["layer"], r["feature"], pos)
                                                    for r in rows]),
                             (f"random @{where}", [iv.FeatureEdit(int(i // F), int(i % F), pos)
                                                   for i in rand])):
            g = ablate_on_grid(s, fmt, which, edits, problems)
            g.update(features=[f"{e.layer}:{e.feature}@{e.pos}" for e in edits], label=label,
                     read_at=which)
            out["ablations"].append(g)
            shown = ", ".join(g["features"][:3]) + (", ..." if len(edits) > 3 else "")
            s.say(f"| {label}, {len(edits)}: {shown} | {which} digit | {g['n']} | "
                  f"{g['p_before']:.3f} -> {g['p_after']:.3f} | {g['dmargin']:+.2f} | "
                  f"{g['right_before']} -> {g['right_after']} |")
    return out


def summary(s: Study, records: list[dict], searched: dict) -> dict:
    feats = [f for r in records for f in r["features"]]
    kinds = {k: sum(f["kind"] == k for f in feats) for k in
             list(GROUPINGS) + ["mixed", "constant"]}
    err = [r["direct_shares"]["error"] for r in records]
    drop = [r["ablations"][-1]["p"] - r["ablations"][0]["p"] for r in records]
    flips = sum(r["ablations"][-1]["argmax"] != r["ablations"][0]["argmax"] for r in records)
    out = {"kinds": kinds, "error_share_mean": float(np.mean(err)),
           "replacement_mean": float(np.mean([r["scores"]["replacement"] for r in records])),
           "all_zeroed_dp_mean": float(np.mean(drop)), "all_zeroed_argmax_changed": int(flips),
           "n_traces": len(records)}
    s.say("\n## Summary\n")
    s.say(f"- {len(records)} traced digits; error nodes hold {np.mean(err):.2f} of the target's "
          f"direct input on average (range {min(err):.2f}-{max(err):.2f}); mean replacement score "
          f"{out['replacement_mean']:.3f}")
    s.say(f"- their {len(feats)} key features from the first operand on, by kind: "
          + ", ".join(f"{k} {v}" for k, v in kinds.items() if v))
    s.say(f"- zeroing those of a digit together on its prompt: mean change of p(correct) "
          f"{np.mean(drop):+.3f}; the argmax changed in {flips} of {len(records)}")
    ab = searched["ablations"]
    for g, c in zip(ab[::2], ab[1::2]):  # each grouping's features, then its random control
        s.say(f"- {g['label']}, {len(g['features'])} zeroed, {g['read_at']} digit: p "
              f"{g['p_before']:.3f} -> {g['p_after']:.3f}, right {g['right_before']} -> "
              f"{g['right_after']} of {g['n']} (random control: p {c['p_after']:.3f}, right "
              f"{c['right_after']})")
    return out


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--problems", type=int, default=200, help="Problems per format (accuracy).")
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--traces", type=int, default=4, help="Correct problems to trace.")
    ap.add_argument("--profile-problems", type=int, default=400,
                    help="Grid for what the features respond to.")
    ap.add_argument("--grid-ablate", type=int, default=3,
                    help="Key features per digit also zeroed across the grid.")
    ap.add_argument("--grid-n", type=int, default=12, help="Grid problems per grid ablation.")
    ap.add_argument("--search-k", type=int, default=5, help="Features zeroed together (search).")
    ap.add_argument("--seed", type=int, default=0)
    ap.set_defaults(max_feature_nodes=1500)
    s = Study("addition", ap.parse_args())
    a = s.args
    problems = grid(a.problems, a.seed)
    acc, res = accuracy_section(s, problems, a.formats)
    fmt = max(a.formats, key=lambda f: acc[f]["all"]["acc"])
    s.say(f"\nMost accurate format: **{fmt}**. The paper's 36 + 59 in it: "
          f"{'right' if evaluate(s.model, [Problem(36, 59)], fmt)[0]['correct'] else 'wrong'}.")
    chosen = choose(problems, res[fmt], a.traces)
    first_var = first_varying(s.model, fmt)
    records = []
    if chosen:
        s.say(f"\n## Traced: {', '.join(f'{p.a}+{p.b}' for p in chosen)} (right in format "
              f"{fmt})\n")
        s.say("Each problem traced twice: its first answer digit, and its ones digit after the "
              "digits before it (the only target each time; max_feature_nodes "
              f"{a.max_feature_nodes}). Position {first_var} holds the first operand's first "
              "digit.")
    for p in chosen:
        for site in sites_of(s.model, p, fmt):
            records.append(study_site(s, site, f"graph_{p.a}_{p.b}_{site.which}", first_var))
    # One pass over the profile grid reads every feature at every position needed.
    pgrid = grid(a.profile_problems, a.seed + 1)
    n_prompt = len(sites_of(s.model, pgrid[0], fmt)[0].ids)
    positions = {n_prompt - 1, n_prompt} | {r[2] for rec in records for r in rec["_rows"]}
    ga = grid_activations(s.model, s.tc_cfg, s.tc_params, pgrid, fmt, sorted(positions))
    pres = evaluate(s.model, pgrid, fmt)
    right = {"first": np.array([r["per_token"][0] for r in pres]),
             "ones": np.array([r["per_token"][-1] for r in pres])}
    if records:
        s.say(f"\n## What the traced features respond to, and ablations\n\nProfile grid: "
              f"{len(pgrid)} problems (another draw from 10..99), format {fmt}. eta^2: the "
              "share of a feature's variance over the grid explained by each grouping (in "
              "brackets: its null level, what unrelated values reach on average); *kind*: the "
              "grouping that explains most beyond its null level (by >= 0.25), else mixed. "
              "*margin*: the correct digit's logit minus the best other digit's. On this grid the "
              f"model has {right['first'].mean():.2f} of the first digits and "
              f"{right['ones'].mean():.2f} of the ones digits right (each given the digits "
              "before it).")
    for r in records:
        feature_section(s, fmt, r, ga, right, a.grid_n, a.grid_ablate, a.seed)
    searched = search_section(s, fmt, ga, right, a.grid_n, a.search_k, a.seed)
    summ = summary(s, records, searched) if records else {}
    s.write("Case study: two-number addition")
    out = {"model": a.model, "transcoder": a.transcoder, "format": fmt,
           "formats": {k: FORMATS[k] for k in a.formats}, "accuracy": acc,
           "problems": a.problems, "seed": a.seed, "profile_problems": len(pgrid),
           "max_feature_nodes": a.max_feature_nodes, "summary": summ, "search": searched,
           "traces": [{k: v for k, v in r.items() if not k.startswith("_")} for r in records]}
    (s.out / "results.json").write_text(json.dumps(out, indent=1, default=float) + "\n")
    print(f"results: {s.out / 'results.json'}")


if __name__ == "__main__":
    main()
