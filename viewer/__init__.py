"""Stage 3: pictures of attribution graphs — a self-contained offline HTML viewer, feature cards,
and Neuronpedia JSON for pinned subgraphs."""

from viewer.embed import PAGE_SCHEMA_VERSION, ViewConfig, select
from viewer.features import CARDS_FILE, FeatureCards, FeaturesConfig, top_output_tokens
from viewer.html import ViewReport, load_graph, render_html, write_html
from viewer.layout import layout
from viewer.neuronpedia import from_neuronpedia, node_record, pinned_subgraph

__all__ = [
    "CARDS_FILE",
    "PAGE_SCHEMA_VERSION",
    "FeatureCards",
    "FeaturesConfig",
    "ViewConfig",
    "ViewReport",
    "from_neuronpedia",
    "layout",
    "load_graph",
    "node_record",
    "pinned_subgraph",
    "render_html",
    "select",
    "top_output_tokens",
    "write_html",
]
