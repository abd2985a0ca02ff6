"""Plot NMSE against L0 for trained transcoders (e.g. CLT vs PLT), as an SVG with no dependencies.

Each input is a JSON file written by `cltrace eval --out` (or a run directory, whose
`metrics.jsonl` is read: its last line, or every line with --trajectory to draw the training
path). Points are coloured by transcoder kind (CLT / PLT / windowed) and labelled by file name.

Usage: python scripts/plot_nmse_l0.py out/eval_plt.json out/eval_clt.json -o docs/nmse_l0.svg
       python scripts/plot_nmse_l0.py out/train_plt out/train_clt --trajectory -o nmse_l0.svg
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLOURS = {"clt": "#d62728", "plt": "#1f77b4", "windowed": "#2ca02c", "?": "#7f7f7f"}


def _kind(max_reach) -> str:
    return "clt" if max_reach is None else "plt" if max_reach == 1 else "windowed"


def load_points(path: Path, trajectory: bool) -> tuple[str, str, list[tuple[float, float]]]:
    """(label, kind, [(L0 per layer, NMSE), ...]) from an eval JSON or a run directory."""
    if path.is_dir():
        cfg = json.loads((path / "config.json").read_text())["config"]
        rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines() if x]
        n_layers = len(rows[-1]["l0_per_layer"])
        rows = rows if trajectory else rows[-1:]
        pts = [(r["l0"] / n_layers, r["nmse"]) for r in rows]
        arch = cfg.get("transcoder", cfg)  # nested since 2026-12-02, flat before
        return path.name, _kind(arch.get("max_reach")), pts
    data = json.loads(path.read_text())
    kind = "?"
    tc = Path(data.get("transcoder", "")) / "config.json"
    if tc.exists():
        kind = _kind(json.loads(tc.read_text())["config"].get("max_reach"))
    l0 = data["l0_total"] / len(data["l0_per_layer"])
    return path.stem, kind, [(l0, data["nmse_mean"])]


def svg(series, title: str, width: int = 640, height: int = 440) -> str:
    xs = [x for _, _, pts in series for x, _ in pts]
    ys = [y for _, _, pts in series for _, y in pts]
    x0, x1 = 0.0, max(xs) * 1.1 or 1.0
    y0, y1 = 0.0, max(ys) * 1.1 or 1.0
    L, R, T, B = 70, 20, 40, 60

    def px(x):
        return L + (x - x0) / (x1 - x0) * (width - L - R)

    def py(y):
        return height - B - (y - y0) / (y1 - y0) * (height - T - B)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           'font-family="sans-serif" font-size="12">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15">{title}</text>',
           f'<line x1="{L}" y1="{height - B}" x2="{width - R}" y2="{height - B}" stroke="black"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{height - B}" stroke="black"/>',
           f'<text x="{(width + L - R) / 2}" y="{height - 18}" text-anchor="middle">'
           'L0 (active features per token, per layer)</text>',
           f'<text x="18" y="{(height - B + T) / 2}" text-anchor="middle" '
           f'transform="rotate(-90 18 {(height - B + T) / 2})">NMSE (mean over layers)</text>']
    for i in range(6):
        xv, yv = x0 + (x1 - x0) * i / 5, y0 + (y1 - y0) * i / 5
        out.append(f'<text x="{px(xv)}" y="{height - B + 16}" text-anchor="middle">{xv:.3g}</text>')
        out.append(f'<text x="{L - 6}" y="{py(yv) + 4}" text-anchor="end">{yv:.3g}</text>')
        out.append(f'<line x1="{L}" y1="{py(yv)}" x2="{width - R}" y2="{py(yv)}" '
                   'stroke="#eee"/>')
    for k, (label, kind, pts) in enumerate(series):
        c = COLOURS.get(kind, COLOURS["?"])
        if len(pts) > 1:
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            out.append(f'<polyline points="{path}" fill="none" stroke="{c}" opacity="0.5"/>')
        x, y = pts[-1]
        out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="5" fill="{c}"/>')
        # Legend in the bottom-left corner, where good transcoders would be (labels beside the
        # points would overlap).
        ly = height - B - 12 - 18 * (len(series) - 1 - k)
        out.append(f'<circle cx="{L + 16}" cy="{ly - 4}" r="5" fill="{c}"/>')
        out.append(f'<text x="{L + 26}" y="{ly}" fill="{c}">{label} '
                   f'({kind.upper()}): L0 {x:.1f}, NMSE {y:.3f}</text>')
    out.append("</svg>")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+", type=Path, help="eval JSON files or run directories")
    ap.add_argument("-o", "--out", type=Path, default=Path("nmse_vs_l0.svg"))
    ap.add_argument("--trajectory", action="store_true", help="draw each run's training path")
    ap.add_argument("--title", default="NMSE vs L0: CLT and PLT")
    args = ap.parse_args()
    series = [load_points(p, args.trajectory) for p in args.inputs]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(svg(series, args.title))
    for label, kind, pts in series:
        print(f"{label:30s} {kind:9s} L0/layer {pts[-1][0]:8.2f}  NMSE {pts[-1][1]:.4f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
