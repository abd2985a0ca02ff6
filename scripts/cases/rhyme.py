"""Case study (c): rhyme planning, with a suppression and an injection experiment.

"Circuit Tracing"/"Biology" show Claude planning the rhyme word at the end of the first line.
Here: trace a couplet's second line, find the features driving the top rhyme candidate, suppress
them (zero at the newline and after) and report the new continuation; then inject features that
drive another word (taken from a graph of a prompt that ends in that word's context) and report
whether the continuation follows. Usage: python scripts/cases/rhyme.py
"""

from attribution import interventions as iv
from common import Study, ablation_table, parser

PROMPT = "He saw a carrot and had to grab it,\nHis hunger was like a starving"
TARGET = " rabbit"
DONOR = "The colour of fresh grass is"  # features that write " green"
INJECT = " green"


def main() -> None:
    s = Study("rhyme", parser(__doc__).parse_args())
    graph, scores, page = s.trace(PROMPT, "graph")
    s.say(f"## {PROMPT!r}\n")
    s.graph_summary(graph, scores, page)
    target = TARGET if TARGET in graph.logit_strings else graph.logit_strings[0]
    if target != TARGET:
        s.say(f"\nThe model does not put {TARGET!r} among its top tokens; testing its top "
              f"token {target!r} instead.")
    rows = s.key_features(graph, target)
    s.say(f"\nKey features for {target!r}:\n")
    s.feature_table(graph, rows)
    ablation_table(s, PROMPT, graph, rows, target)
    s.say(f"\nContinuation: {s.generate(PROMPT)!r}")
    sup = [iv.FeatureEdit(lay, i, p, "set", 0.0, onwards=True) for _, lay, p, i, _, _ in rows]
    s.say(f"Suppressed (key features zeroed from their positions on): "
          f"{s.generate(PROMPT, sup)!r}")
    donor, _, _ = s.trace(DONOR, "donor")
    # Features at the donor's last position (where " green" is predicted), not the generic
    # first-token features that dominate influence everywhere.
    last_d = donor.n_pos - 1
    drows = [r for r in s.key_features(donor, INJECT if INJECT in donor.logit_strings else None,
                                       k=donor.ranges.feature.stop) if r[2] == last_d][:4]
    last = s.prompt_ids(PROMPT).__len__() - 1
    inj = [iv.FeatureEdit(lay, i, last, "set", 3 * act, onwards=True)
           for _, lay, _, i, act, _ in drows]
    s.say(f"\nInjection: the {len(inj)} features that drive {INJECT!r} in {DONOR!r}, set to 3x "
          f"their activation there, from the last position on: " + ", ".join(
              f"L{e.layer}:F{e.feature}" for e in inj))
    p0, p1 = s.next_probs(PROMPT), s.next_probs(PROMPT, inj)
    tid = s.token_id(INJECT)
    s.say(f"- p({INJECT!r}) {p0[tid]:.4f} -> {p1[tid]:.4f}; top after: {s.top_tokens(p1, 5)}")
    s.say(f"- continuation with the injection: {s.generate(PROMPT, inj)!r}")
    s.write("Case study: rhyme planning")


if __name__ == "__main__":
    main()
