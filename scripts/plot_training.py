"""Plot NMSE and spliced KL against training tokens, as one SVG with no dependencies.

Left panel: each run's training NMSE (its `metrics.jsonl`, tokens = step x batch_tokens) as a
line, and held-out NMSE points; right panel: held-out KL(original || spliced) points. Held-out
points come from `cltrace eval --out` JSON files, `scripts/compare_transcoders.py` JSON (the
first transcoder row) or a bundle's `info.json`, each given as LABEL=TOKENS:FILE. The x axis is
logarithmic, so the slope says what more tokens would buy.

Usage:
    python scripts/plot_training.py \
        --run smollm2=docs/results/train_smollm2_plt1024_skip_metrics.jsonl:1024 \
        --heldout smollm2=245760:docs/results/compare_smollm2_plt1024skip_240.json \
        -o docs/results/training_curves.svg
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def read_run(spec: str) -> tuple[str, list[tuple[float, float]]]:
    """LABEL=METRICS_JSONL:BATCH_TOKENS -> (label, [(tokens, train NMSE)])."""
    label, rest = spec.split("=", 1)
    path, batch = rest.rsplit(":", 1)
    rows = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    return label, [(r["step"] * int(batch), r["nmse"]) for r in rows if "nmse" in r]


def read_heldout(spec: str) -> tuple[str, float, dict]:
    """LABEL=TOKENS:FILE[#NAME] -> (label, tokens, {nmse, kl}). NAME picks a transcoder of a
    compare_transcoders.py file (default: its first)."""
    label, rest = spec.split("=", 1)
    tokens, path = rest.split(":", 1)
    path, _, name = path.partition("#")
    data = json.loads(Path(path).read_text())
    if "transcoders" in data:  # compare_transcoders.py output
        rows = data["transcoders"]
        data = next(r for r in rows if r["name"] == name)["eval"] if name else rows[0]["eval"]
    elif "eval" in data:  # a bundle's info.json
        data = data["eval"]
    return label, float(tokens), {"nmse": data["nmse_mean"], "kl": data["kl"]}


def _panel(x0: int, w: int, h: int, title: str, xr, yr, series, points, colours) -> list[str]:
    lx0, lx1 = math.log10(xr[0]), math.log10(xr[1])

    def px(x):
        return x0 + 50 + (math.log10(x) - lx0) / (lx1 - lx0) * (w - 70)

    def py(y):
        return 30 + (1 - (y - yr[0]) / (yr[1] - yr[0])) * (h - 80)

    out = [f'<text x="{x0 + w / 2}" y="18" text-anchor="middle" font-size="13">{title}</text>',
           f'<rect x="{x0 + 50}" y="30" width="{w - 70}" height="{h - 80}" fill="none" '
           'stroke="#999"/>']
    for e in range(math.floor(lx0), math.ceil(lx1) + 1):
        for m in (1, 2, 5):
            v = m * 10**e
            if xr[0] <= v <= xr[1]:
                out.append(f'<line x1="{px(v):.1f}" y1="30" x2="{px(v):.1f}" y2="{h - 50}" '
                           'stroke="#eee"/>')
                out.append(f'<text x="{px(v):.1f}" y="{h - 35}" text-anchor="middle" '
                           f'font-size="10">{v:.0e}</text>')
    for i in range(6):
        v = yr[0] + i * (yr[1] - yr[0]) / 5
        out.append(f'<text x="{x0 + 45}" y="{py(v) + 3:.1f}" text-anchor="end" '
                   f'font-size="10">{v:.2f}</text>')
    out.append(f'<text x="{x0 + w / 2}" y="{h - 15}" text-anchor="middle" font-size="11">'
               'training tokens (log)</text>')
    for label, pts in series:
        pts = [(x, y) for x, y in pts if x > 0]
        if pts:
            d = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            out.append(f'<polyline points="{d}" fill="none" stroke="{colours[label]}" '
                       'stroke-width="1.5" opacity="0.6"/>')
    for label, x, y in points:
        out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="4.5" fill="{colours[label]}"/>')
        out.append(f'<text x="{px(x) + 6:.1f}" y="{py(y) - 6:.1f}" font-size="10">{y:.2f}</text>')
    return out


def svg(runs, heldout, width: int = 900, height: int = 380) -> str:
    labels = list(dict.fromkeys([r[0] for r in runs] + [h[0] for h in heldout]))
    colours = {lab: COLOURS[i % len(COLOURS)] for i, lab in enumerate(labels)}
    xs = [x for _, pts in runs for x, _ in pts if x > 0] + [h[1] for h in heldout]
    xr = (min(xs) / 1.3, max(xs) * 1.3)
    nmse = [y for _, pts in runs for _, y in pts] + [h[2]["nmse"] for h in heldout]
    kl = [h[2]["kl"] for h in heldout] or [0.0, 1.0]
    half = width // 2
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 20}" '
           'font-family="sans-serif">', '<rect width="100%" height="100%" fill="white"/>']
    out += _panel(0, half, height, "NMSE (lines: training batches; dots: held-out)", xr,
                  (0.0, max(nmse) * 1.05), runs,
                  [(h[0], h[1], h[2]["nmse"]) for h in heldout], colours)
    out += _panel(half, half, height, "held-out KL(original || spliced), nats", xr,
                  (0.0, max(kl) * 1.15), [], [(h[0], h[1], h[2]["kl"]) for h in heldout], colours)
    x = 60
    for lab in labels:  # legend, each entry as wide as its label
        out.append(f'<rect x="{x}" y="{height + 2}" width="10" height="10" '
                   f'fill="{colours[lab]}"/><text x="{x + 14}" y="{height + 11}" '
                   f'font-size="11">{lab}</text>')
        x += 30 + 6 * len(lab)
    out.append("</svg>")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", default=[], help="LABEL=METRICS_JSONL:BATCH_TOKENS")
    ap.add_argument("--heldout", action="append", default=[], help="LABEL=TOKENS:EVAL_JSON")
    ap.add_argument("-o", "--out", type=Path, default=Path("training_curves.svg"))
    args = ap.parse_args()
    if not args.run and not args.heldout:
        ap.error("give at least one --run or --heldout")
    runs = [read_run(s) for s in args.run]
    heldout = [read_heldout(s) for s in args.heldout]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(svg(runs, heldout))
    print(f"wrote {args.out}")
    for label, tokens, m in heldout:
        print(f"  {label}: {tokens:.3g} tokens: held-out NMSE {m['nmse']:.3f}, KL {m['kl']:.2f}")


if __name__ == "__main__":
    main()
