"""Shared machinery of the case studies: trace a prompt, write its page, find the features that
matter for a token, and test them with interventions; each study writes a Markdown report.

Every study runs in one command, e.g. `python scripts/cases/capital_france.py`, with
`--model` / `--transcoder` to choose (default: the embedded SmolLM2-135M and the transcoder bundled
for it in `clt/bundled/`, or the one given by $CLTRACE_TRANSCODER).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from attribution import interventions as iv  # noqa: E402
from attribution import replacement as rep  # noqa: E402
from attribution.graph import feature_name  # noqa: E402
from attribution.prune import node_influence  # noqa: E402
from attribution.trace import TraceConfig, trace_tokens  # noqa: E402
from clt.circuit_tracer_io import open_transcoder  # noqa: E402
from clt.lm.loading import load_model  # noqa: E402

DEFAULT_TC = os.environ.get("CLTRACE_TRANSCODER", "")


def parser(doc: str, model: str = "smollm2-135m") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--model", default=model)
    ap.add_argument("--transcoder", default=DEFAULT_TC)
    ap.add_argument("--out", default=None, help="Report directory (default out/cases/NAME).")
    ap.add_argument("--top", type=int, default=8, help="Key features to test.")
    ap.add_argument("--max-feature-nodes", type=int, default=3000,
                    help="Cap on feature nodes (the dense adjacency grows with its square).")
    return ap


@dataclass
class Study:
    """One model + transcoder, and a report being written."""

    name: str
    args: argparse.Namespace

    def __post_init__(self):
        self.model = load_model(self.args.model)
        self.args.transcoder, self.tc_cfg, self.tc_params = open_transcoder(
            self.args.transcoder, self.model.cfg)
        self.tok = self.model.tokenizer
        self.out = Path(self.args.out or f"out/cases/{self.name}")
        self.out.mkdir(parents=True, exist_ok=True)
        self.lines: list[str] = []

    # --- tracing ---------------------------------------------------------------------------
    def trace(self, prompt: str, slug: str, neurons: int | None = None, cards=None, **config):
        """Trace with the study's transcoder, or with the model's own MLP neurons when `neurons`
        is given (that many units per layer and position as nodes: `TraceConfig.neuron_top_k`);
        `config`: further TraceConfig fields; `cards`: the page's feature cards (default: those
        next to the transcoder). Returns (graph, scores, page)."""
        ids = self.tok.encode(prompt, add_bos=False)
        what = ({"transcoder": self.args.transcoder} if neurons is None
                else {"neurons": True, "neuron_top_k": neurons})
        config = TraceConfig(prompt=prompt, model=self.args.model,
                             max_feature_nodes=self.args.max_feature_nodes, **what, **config)
        tc = (self.tc_cfg, self.tc_params) if neurons is None else (None, None)
        graph = trace_tokens(self.model.params, self.model.cfg, *tc, ids,
                             config, token_strings=self.tok.token_strings(ids, merge=True),
                             logit_strings=lambda t: self.tok.token_strings([int(i) for i in t]))
        s = graph.scores  # computed by the tracer (attribution.prune.score)
        scores = (s.replacement, s.completeness, s.pruned_replacement, s.pruned_completeness)
        graph.save(self.out / f"{slug}.npz")
        page = self.out / f"{slug}.html"
        try:
            from viewer import write_html

            write_html(graph, page, cards=cards)
        except Exception as e:  # the viewer is optional for the numbers of a study
            page = None
            self.say(f"(no HTML page: {type(e).__name__}: {e})")
        return graph, scores, page

    def key_features(self, graph, token: str | None = None, k: int | None = None):
        """The k features with the largest influence on the logits (on one logit's when `token`
        is given): rows of (node, layer, pos, index, activation, influence)."""
        k = k or self.args.top
        r = graph.ranges
        if token is not None and token in graph.logit_strings:
            from attribution.influence import influence

            w = np.zeros(graph.n_nodes)
            w[r.logit.start + graph.logit_strings.index(token)] = 1.0
            score = influence(graph.adjacency, w)
        else:
            score = node_influence(graph)
        feat = score[r.feature]
        top = np.argsort(-feat)[:k]
        return [(int(n), int(graph.feature_layer[n]), int(graph.feature_pos[n]),
                 int(graph.feature_index[n]), float(graph.activation[n]), float(feat[n]))
                for n in top]

    # --- interventions -------------------------------------------------------------------------
    def prompt_ids(self, prompt: str) -> list[int]:
        ids, _ = rep.prepend_bos(self.model.cfg, self.tok.encode(prompt, add_bos=False))
        return ids

    def next_probs(self, prompt: str, edits=()) -> np.ndarray:
        """Next-token probabilities with feature edits (free mode)."""
        ids = self.prompt_ids(prompt)
        m = self.model
        rm, _ = rep.build(m.params, m.cfg, self.tc_cfg, self.tc_params, np.asarray(ids))
        logits = iv.free_logits(m.params, m.cfg, self.tc_cfg, self.tc_params, rm, tuple(edits))
        p = np.asarray(jnp.exp(logits[-1] - logits[-1].max()))
        return p / p.sum()

    def generate(self, prompt: str, edits=(), n: int = 12) -> str:
        ids = self.prompt_ids(prompt)
        m = self.model
        rm, _ = rep.build(m.params, m.cfg, self.tc_cfg, self.tc_params, np.asarray(ids))
        new = iv.greedy_continue(lambda t: iv.free_logits(
            m.params, m.cfg, self.tc_cfg, self.tc_params, rm, tuple(edits), tokens=t), ids, n,
            tuple(m.cfg.eos_token_ids))
        return self.tok.decode(new)

    def token_id(self, s: str) -> int:
        ids = self.tok.encode(s, add_bos=False)
        return ids[0]

    def top_tokens(self, p: np.ndarray, k: int = 5) -> str:
        return ", ".join(f"{self.tok.decode([int(i)])!r} {p[i]:.3f}" for i in np.argsort(-p)[:k])

    # --- report --------------------------------------------------------------------------------
    def say(self, text: str = "") -> None:
        print(text)
        self.lines.append(text)

    def graph_summary(self, graph, scores, page) -> None:
        r = graph.ranges
        self.say(f"- graph: {r.feature.stop} feature nodes ({graph.n_active_total} active), "
                 f"{r.error.stop - r.error.start} error nodes, {graph.n_pos} tokens; "
                 f"replacement score {scores[0]:.3f}, completeness {scores[1]:.3f} (pruned: "
                 f"{scores[2]:.3f}, {scores[3]:.3f})")
        self.say("- top logits: " + ", ".join(f"{s!r} {p:.3f}" for s, p in zip(
            graph.logit_strings[:5], graph.logit_probs[:5])))
        if page is not None:
            self.say(f"- page: [{page.name}]({page.name})")

    def feature_table(self, graph, rows) -> None:
        self.say("| feature | token | activation | influence |")
        self.say("|---|---|---|---|")
        for _, layer, pos, idx, act, inf in rows:
            self.say(f"| {feature_name(layer, idx, pos)} | {graph.token_strings[pos]!r} | "
                     f"{act:.3f} | {inf:.4f} |")

    def write(self, title: str) -> Path:
        path = self.out / "report.md"
        meta = (f"model `{self.args.model}`, transcoder `{self.args.transcoder}` "
                f"({self.tc_cfg.kind.upper()}, {self.tc_cfg.n_features} features/layer)")
        path.write_text(f"# {title}\n\n{meta}\n\n" + "\n".join(self.lines) + "\n")
        print(f"\nreport: {path}")
        return path


def ablation_table(study: Study, prompt: str, graph, rows, target: str) -> None:
    """Zero each key feature (at its position) and then all of them together: the target
    token's probability before and after, and the new top tokens (free mode)."""
    tid = study.token_id(target)
    base = study.next_probs(prompt)
    study.say(f"\nAblations (free mode, errors kept), target {target!r}: "
              f"p = {base[tid]:.4f} unedited")
    study.say("| zeroed | p(target) | change | top tokens after |")
    study.say("|---|---|---|---|")
    edits = []
    for _, layer, pos, idx, _, _ in rows:
        e = iv.FeatureEdit(layer, idx, pos, "set", 0.0)
        edits.append(e)
        p = study.next_probs(prompt, [e])
        study.say(f"| {feature_name(layer, idx, pos)} | {p[tid]:.4f} | {p[tid] - base[tid]:+.4f} | "
                  f"{study.top_tokens(p, 3)} |")
    p = study.next_probs(prompt, edits)
    study.say(f"| all {len(edits)} | {p[tid]:.4f} | {p[tid] - base[tid]:+.4f} | "
              f"{study.top_tokens(p, 3)} |")


__all__ = ["Study", "ablation_table", "parser"]
