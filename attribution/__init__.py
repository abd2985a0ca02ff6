"""Stage 2: attribution graphs of one prompt (local replacement model, batched VJPs, pruning)."""

from attribution.export import node_ids, to_neuronpedia, write_neuronpedia
from attribution.graph import GRAPH_SCHEMA_VERSION, Graph, NodeRanges, feature_name
from attribution.prune import PruneResult, graph_scores, node_influence, prune
from attribution.replacement import LocalReplacement, build, replacement_logits
from attribution.slim import slim
from attribution.trace import (
    Targets,
    TraceConfig,
    load_any_transcoder,
    select_logits,
    trace,
    trace_tokens,
)

__all__ = [
    "GRAPH_SCHEMA_VERSION", "Graph", "LocalReplacement", "NodeRanges", "PruneResult",
    "Targets", "TraceConfig", "build", "feature_name", "graph_scores", "load_any_transcoder", "node_ids", "node_influence",
    "prune", "replacement_logits", "select_logits", "slim", "to_neuronpedia", "trace", "trace_tokens",
    "write_neuronpedia",
]
