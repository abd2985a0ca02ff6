"""The logit-lens page: a self-contained heatmap of the top token decoded from every layer and
position (`attribution.interventions.logit_lens`), rendered from `lens_template.html`."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def render_lens(names: list[str], strings: list[str], top, probs, decode, model: str = "") -> str:
    """HTML of the lens: rows `names` (top row last layer), columns the prompt's token
    `strings`; top / probs [row, pos, k] from `logit_lens`; `decode(id) -> str`. Cell shade =
    top-1 probability, tooltip = the top-k."""
    import jinja2

    rows = []
    for i in reversed(range(len(names))):
        cells = [{"top": decode(int(top[i, p, 0])), "p": float(probs[i, p, 0]),
                  "tip": ", ".join(f"{decode(int(t))!r} {float(q):.2f}"
                                   for t, q in zip(top[i, p], probs[i, p]))}
                 for p in range(len(strings))]
        rows.append({"name": names[i], "cells": cells})
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(_HERE)), autoescape=True)
    return env.get_template("lens_template.html").render(model=model, positions=strings,
                                                         rows=rows)


__all__ = ["render_lens"]
