"""Case study (d): a two-hop fact, "the capital of the state containing Dallas" -> Austin.

"Biology of a Large Language Model" finds Dallas -> Texas -> Austin as an internal two-step path.
Here: trace the prompt, report the answer, read the logit lens at the "Dallas" position for
" Texas" (the intermediate hop), list the features at that position with most influence on the
answer, and zero them to see whether the answer depends on them.
Usage: python scripts/cases/two_hop.py
"""

from attribution.interventions import logit_lens
from common import Study, ablation_table, parser

PROMPT = "Fact: the capital of the state containing Dallas is"


def main() -> None:
    s = Study("two_hop", parser(__doc__).parse_args())
    graph, scores, page = s.trace(PROMPT, "graph")
    s.say(f"## {PROMPT!r}\n")
    s.graph_summary(graph, scores, page)
    if " Austin" in graph.logit_strings:
        answer = " Austin"
    else:
        # Without the second hop, the first one (Dallas -> Texas) may still show as an output.
        answer = " Texas" if " Texas" in graph.logit_strings else graph.logit_strings[0]
        s.say(f"\nThe model does not rank ' Austin' among its top tokens: it cannot do this "
              f"two-hop fact. The analysis below follows {answer!r} instead"
              + (" (the first hop)." if answer == " Texas" else "."))
    ids = s.prompt_ids(PROMPT)
    strings = s.tok.token_strings(ids)
    dallas = max(i for i, t in enumerate(strings) if "Dallas" in t)
    top, probs = logit_lens(s.model.params, s.model.cfg, ids, k=20)
    tex = s.token_id(" Texas")
    hits = [(layer, float(probs[layer, dallas][list(top[layer, dallas]).index(tex)]))
            for layer in range(top.shape[0]) if tex in top[layer, dallas]]
    s.say(f"\nLogit lens at {strings[dallas]!r} (pos {dallas}): ' Texas' in the top 20 at "
          f"layers {[h[0] for h in hits]}" + (f" (best p={max(h[1] for h in hits):.3f})"
                                               if hits else " (never)"))
    rows = [r for r in s.key_features(graph, answer, k=graph.ranges.feature.stop)
            if r[2] == dallas][:s.args.top]
    s.say(f"\nFeatures at {strings[dallas]!r} with the most influence on {answer!r}:\n")
    s.feature_table(graph, rows)
    if rows:
        ablation_table(s, PROMPT, graph, rows, answer)
    s.say(f"\nContinuation: {s.generate(PROMPT)!r}")
    s.write("Case study: a two-hop fact")


if __name__ == "__main__":
    main()
