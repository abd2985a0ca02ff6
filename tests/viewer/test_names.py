"""One name per feature: `LAYER:FEATURE@POS` is what `cltrace steer` parses, and the page's
"copy intervention" command line, parsed by a POSIX shell's rules (shlex) and by the steer
command's own argument parser and config (no model load), gives back exactly its edits, prompt,
model and transcoder, whatever the prompt holds."""

from __future__ import annotations

import shlex

import numpy as np
import pytest

from attribution.interventions import FeatureEdit, SteerConfig, parse_edit
from clt.configs import from_arguments
from cltrace.cli import build_parser
from tests.viewer.helpers import random_graph
from tests.viewer.test_html import page_blob
from viewer.html import render_html
from viewer.names import feature_name, steer_command


def parse_steer(text: str) -> SteerConfig:
    """A copied command line through the shell's word splitting and `cltrace steer`'s parser."""
    argv = shlex.split(text)
    assert argv[:2] == ["cltrace", "steer"]
    return from_arguments(SteerConfig, build_parser().parse_args(argv[1:]))


def test_feature_name_is_steer_syntax():
    assert feature_name(29, 126, 5) == "29:126@5"
    rng = np.random.default_rng(0)
    for layer, f, pos in rng.integers(0, 100_000, (50, 3)):
        edit = parse_edit(feature_name(int(layer), int(f), int(pos)) + "=0")
        assert edit == FeatureEdit(int(layer), int(f), int(pos), "set", 0.0)


@pytest.mark.parametrize("prompt", [
    "The capital of France is", "It's \"quoted\" and $HOME `ls` \\ back; rm -rf / &",
    "-starts with a dash", "--model x", "line one\nline two\t tab", "über 東京 🙂", " ", "'"])
def test_steer_command_round_trips(prompt):
    g = random_graph(n_layers=4, n_pos=6, n_features=20, seed=1)
    g.prompt = prompt
    g.config.update(model="my models/tiny llama", transcoder="/tmp/a b/it's")
    names = ["3:17@5", "0:4@1", "2:9999@0"]
    sc = parse_steer(steer_command(g, names))
    assert sc.prompt == prompt and sc.model == "my models/tiny llama"
    assert sc.transcoder == "/tmp/a b/it's" and sc.zero == tuple(names)
    edits = tuple(parse_edit(s) for s in sc.edit_specs())
    assert edits == (FeatureEdit(3, 17, 5), FeatureEdit(0, 4, 1), FeatureEdit(2, 9999, 0))


def test_page_names_features_and_keeps_neuronpedia_ids():
    g = random_graph(n_layers=4, n_pos=6, n_features=40, seed=2, connected=True)
    data = page_blob(render_html(g, cards=False)[0], "graph-data")
    n_feat = 0
    for k, name, nid, a, f, p in zip(data["kind"], data["name"], data["id"], data["layer"],
                                     data["ref"], data["pos"]):
        if k == 0:
            n_feat += 1
            assert name == f"{a}:{f}@{p}" and nid == f"{a}_{f}_{p}"  # Neuronpedia's id kept
        else:
            assert name == ""
    assert n_feat > 10
    head, tail = data["meta"]["steer"]["head"], data["meta"]["steer"]["tail"]
    assert head.startswith("cltrace steer ") and tail == ""
