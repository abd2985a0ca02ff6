"""One name per feature, and the `cltrace steer` command line that tests a set of them.

A feature node is named `LAYER:FEATURE@POS` (e.g. `29:126@5`): the syntax `cltrace steer` reads
(`attribution.interventions.parse_edit`), so a name read off the page can be pasted into an
intervention unchanged. Positions count the BOS as 0, in the graph and in `cltrace steer` alike.
The page shows, searches and copies this name.

The Neuronpedia JSON the page exports keeps Neuronpedia's own node ids (`29_126_5` for a
feature, `attribution.export.node_ids`): that is the circuit-tracer / Neuronpedia schema, which
other tools read, so it is not ours to rename.
"""

from __future__ import annotations

import shlex

from attribution.graph import Graph, feature_name


def steer_parts(graph: Graph) -> tuple[str, str]:
    """(head, tail) of the `cltrace steer` command for this graph's prompt, model and
    transcoder: the edits go between them. Quoted for a POSIX shell (`shlex.quote`). A prompt that
    starts with '-' would read as an option, so it goes last, after `--`."""
    model = str(graph.config.get("model") or graph.info.get("model") or "")
    transcoder = str(graph.config.get("transcoder") or "")
    opts = (["--model", model] if model else []) + \
        (["--transcoder", transcoder] if transcoder else [])
    prompt = graph.prompt
    q = [shlex.quote(a) for a in opts]
    if prompt.startswith("-"):
        return " ".join(["cltrace", "steer", *q]), "-- " + shlex.quote(prompt)
    return " ".join(["cltrace", "steer", shlex.quote(prompt), *q]), ""


def steer_command(graph: Graph, names: list[str], op: str = "zero") -> str:
    """The command line that applies `--{op} NAME` for each feature name (the page's "copy
    intervention" joins the same parts)."""
    head, tail = steer_parts(graph)
    return " ".join([head, *(f"--{op} {n}" for n in names), *([tail] if tail else [])])


__all__ = ["feature_name", "steer_command", "steer_parts"]
