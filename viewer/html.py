"""One self-contained, offline HTML page per attribution graph (vis-network, via pyvis).

The page is a single file: vis-network's script (the build pyvis ships), our script and styles,
and the graph data are all inlined, and nothing refers to a CDN (pyvis's own `in_line` template
still links Bootstrap and tom-select from jsDelivr, so we use our own template, `template.html`).
It opens from `file://` with the network off.

Data travel gzip-compressed and base64-encoded inside the page and are decompressed by the
browser's `DecompressionStream` (Chrome 80, Firefox 113, Safari 16.4): a 5,000-node graph with
100,000 edges and its feature cards is a few MB instead of tens. Which nodes and edges go in, and
the size caps, are `viewer.embed`'s (with the top paths of `viewer.paths` and the suggested
supernodes of `viewer.supernodes`); the layout is `viewer.layout`'s; the interaction (the first
view at a node budget with its edges and labels drawn, edges of hovered, clicked and pinned
nodes, pruning slider, search by `LAYER:FEATURE@POS`, side panel with feature cards, top paths,
pinning, supernodes and suggestions, Neuronpedia export, the `cltrace steer` command of the
pinned features) is `static/viewer.js`'s.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from attribution.graph import Graph
from clt.configs import ConfigError
from viewer.embed import ViewConfig, page_data, select
from viewer.features import FeatureCards, cards_for, default_path

_HERE = Path(__file__).parent
_VIS_VERSION = "9.1.2"


@dataclass(frozen=True)
class ViewReport:
    """What a written page holds and what it left out (also shown in the page)."""

    path: Path
    bytes: int
    nodes_held: int
    edges_held: int
    cards: int
    details: dict  # viewer.embed.select's report

    @property
    def _note(self) -> str:
        note = self.details.get("cards_note", "")
        return f" ({note})" if note and not self.cards else ""

    def summary(self) -> str:
        d = self.details
        return (f"{self.path} ({self.bytes / 2**20:.1f} MB): {self.nodes_held} of "
                f"{d['nodes_in_graph']} nodes, {self.edges_held} of {d['edges_in_graph']} edges, "
                f"{self.cards} feature cards{self._note}; left out {d['nodes_left_out']} nodes "
                f"({d['left_out_below_influence']} below max_influence, "
                f"{d['left_out_over_node_cap']} over max_nodes) and {d['edges_left_out']} edges "
                f"({d['left_out_edge_per_node_cap']} over max_edges_per_node, "
                f"{d['left_out_edge_total_cap']} over max_edges, "
                f"{d['left_out_edges_of_left_out_nodes']} of nodes left out)"
                + (f"; full graph {d['full_graph']['nodes']} nodes, {d['full_graph']['edges']} "
                   "edges (streamed)" if "full_graph" in d else ""))


def load_graph(path: str | Path) -> Graph:
    """`Graph.load` with one-line errors for truncated or foreign files too."""
    try:
        return Graph.load(path)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise ConfigError(f"{path} is not a readable cltrace graph (truncated or corrupt? "
                          f"{type(e).__name__}: {str(e)[:80]}); re-run the trace") from None


def vis_network_js() -> str:
    """vis-network's standalone build, as shipped in the pyvis package (no source-map link:
    the page must not ask for any other file). The file is found without importing pyvis (0.4 s
    with networkx, at every command that writes a page)."""
    import importlib.util

    spec = importlib.util.find_spec("pyvis")
    if spec is None or spec.origin is None:
        raise ConfigError("pyvis is not installed: pip install 'pyvis>=0.3,<0.4'")
    path = Path(spec.origin).parent / "lib" / f"vis-{_VIS_VERSION}" / "vis-network.min.js"
    if not path.exists():
        raise ConfigError(f"pyvis does not ship vis-network {_VIS_VERSION} at {path}; "
                          "install pyvis 0.3.x")
    text = path.read_text(encoding="utf-8")
    # Only the trailing comment: the minified code holds characters that str.splitlines would
    # take for line breaks inside string literals.
    return re.sub(r"//# sourceMappingURL=\S*", "", text)


# vis-network options: pyvis 0.3's Network defaults with physics and node dragging off (the
# layout is ours), then what a fixed, large graph needs: no layout pass, straight edges, no
# drag. Written out, so that a page needs no pyvis import; tests/viewer/test_html.py checks it
# against pyvis's own defaults.
VIS_OPTIONS = {
    "edges": {"smooth": False, "chosen": False, "selectionWidth": 0, "hoverWidth": 0,
              "arrows": {"to": {"enabled": True, "scaleFactor": 0.35}}},
    "interaction": {"dragNodes": False, "hideEdgesOnDrag": False, "hideNodesOnDrag": False,
                    "hover": True, "tooltipDelay": 250, "selectConnectedEdges": False,
                    "multiselect": False, "navigationButtons": False, "keyboard": False},
    "physics": {"enabled": False, "stabilization": {
        "enabled": True, "fit": True, "iterations": 1000, "onlyDynamicEdges": False,
        "updateInterval": 50}},
    "layout": {"improvedLayout": False, "hierarchical": False},
    "nodes": {"chosen": False, "borderWidth": 1, "font": {"size": 11}},
}


def vis_options() -> dict:
    """The page's vis-network options (`VIS_OPTIONS`), a fresh copy."""
    return json.loads(json.dumps(VIS_OPTIONS))


def _blob(text: str) -> str:
    # mtime=0: the same graph gives the same bytes (reproducible pages).
    return base64.b64encode(gzip.compress(text.encode("utf-8"), 6, mtime=0)).decode("ascii")


def resolve_cards(graph: Graph, cards) -> tuple[FeatureCards | None, str]:
    """(cards, note): cards given as an object or a path (refused, with a one-line error, if
    unreadable or for another transcoder shape), or found as `feature_cards.npz` next to the
    graph's transcoder (skipped, with a note, if unusable: a page without cards beats no page),
    or none (`cards=False`, or nothing found)."""
    if cards is False:
        return None, "feature cards off"
    found = cards is None
    if found:
        path = default_path(str(graph.config.get("transcoder", "")))
        if path is None or not path.exists():
            return None, "no feature cards given or found next to the transcoder"
        cards = path
    try:
        if not isinstance(cards, FeatureCards):
            cards = FeatureCards.load(cards)
        tc = graph.info.get("transcoder")
        cards.check(graph.n_layers, tc.get("n_features") if isinstance(tc, dict) else None)
    except ConfigError as e:
        if not found:
            raise
        return None, f"feature cards skipped: {e}"
    return cards, ""


def render_html(graph: Graph, config: ViewConfig | None = None, cards=None,
                labels: dict[tuple[int, int], str] | None = None) -> tuple[str, dict]:
    """(the page's HTML text, select's report plus the number of cards embedded)."""
    import jinja2
    from markupsafe import Markup

    config = config or ViewConfig()
    cards, note = resolve_cards(graph, cards)
    sel = select(graph, config)
    sel.report["cards_note"] = note  # shown in the page's "left out" details too
    card_blob, n_cards, payload = None, 0, None
    with ThreadPoolExecutor(1) as pool:
        if cards is not None:
            r = graph.ranges
            feats = sel.nodes[sel.kind == 0] - r.feature.start
            payload = cards_for(cards, graph.feature_layer[feats], graph.feature_index[feats],
                                labels)
            n_cards = len(payload["cards"])
            # Compressed beside page_data: zlib lets go of the GIL (0.4 s of the demo's page).
            card_blob = pool.submit(lambda: _blob(json.dumps(payload, separators=(",", ":"))))
        data, meta = page_data(graph, sel, config, labels, payload)
        card_blob = "" if card_blob is None else card_blob.result()
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(_HERE)), autoescape=True,
                             keep_trailing_newline=True)
    page = env.get_template("template.html").render(
        title=meta["title"] or "attribution graph",
        css=Markup(_static("viewer.css")), vis_js=Markup(vis_network_js()),
        # One script: the viewer, then its panels (which register with it before it starts).
        app_js=Markup(_static("viewer.js") + "\n" + _static("panels.js")), options=Markup(json.dumps(vis_options())),
        graph_blob=_blob(data), cards_blob=card_blob, error_name=graph.error_name,
        errors_label=graph.error_name if graph.neurons else "errors")
    return page, {**sel.report, "cards": n_cards}


def _static(name: str) -> str:
    return (_HERE / "static" / name).read_text(encoding="utf-8")


def write_html(graph: Graph, path: str | Path, cards=None, config: ViewConfig | None = None,
               labels: dict[tuple[int, int], str] | None = None) -> ViewReport:
    """Write the graph's page to `path`; returns what it holds and left out.

    cards: a FeatureCards, a cards file, None (use `feature_cards.npz` next to the graph's
    transcoder when there is one) or False (none). labels: (layer, feature) -> label."""
    from clt.io import atomic_write, check_output_file

    path = check_output_file(path, "output page")
    page, report = render_html(graph, config, cards, labels)
    atomic_write(path, page)
    return ViewReport(path, path.stat().st_size, report["nodes_held"], report["edges_held"],
                      report["cards"], report)


def read_labels(path: str | Path) -> dict[tuple[int, int], str]:
    """Feature labels from a JSON object {"layer_feature": "label", ...} (e.g. "3_1207")."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        return {tuple(int(v) for v in k.split("_")): str(lab) for k, lab in raw.items()}
    except FileNotFoundError:
        raise ConfigError(f"no labels file at {path}") from None
    except (json.JSONDecodeError, ValueError, AttributeError, TypeError):
        raise ConfigError(f"{path}: labels must be a JSON object "
                          '{"layer_feature": "label"}, e.g. {"3_1207": "capital cities"}') from None


__all__ = ["VIS_OPTIONS", "ViewReport", "load_graph", "read_labels", "render_html",
           "resolve_cards", "vis_network_js", "vis_options", "write_html"]
