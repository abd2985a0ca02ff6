"""Graphs record their transcoder so that it resolves from any folder (`clt.bundled.record`):
a bundled one by name, a local directory by its absolute path; `cltrace view` finds the feature
cards from a graph file or its Neuronpedia JSON, wherever it is run."""

from __future__ import annotations

import json

import pytest

from clt.bundled import ROOT, available, locate, record
from clt.configs import ConfigError
from viewer.features import CARDS_FILE, default_path


def test_record_and_locate(tmp_path, monkeypatch):
    name = available()[0]
    assert record(str(ROOT / name)) == f"bundled:{name}"
    assert locate(f"bundled:{name}") == str(ROOT / name)
    assert default_path(f"bundled:{name}") == ROOT / name / CARDS_FILE
    (tmp_path / "tc").mkdir()
    monkeypatch.chdir(tmp_path)
    assert record("tc") == str(tmp_path / "tc")  # absolute
    assert record("org/repo@main") == "org/repo@main"  # a hub id, as given
    with pytest.raises(ConfigError, match="bundles no such transcoder"):
        locate("bundled:no-such-model")
    assert default_path("bundled:no-such-model") is None


def test_view_finds_cards_from_any_folder(pipeline, tmp_path, monkeypatch, capsys):
    from cltrace.cli import main

    config = json.loads((pipeline.graph.parent / "config.json").read_text())["config"]
    assert config["transcoder"] == str(pipeline.transcoder_dir.resolve())
    data = json.loads(pipeline.graph.with_suffix(".json").read_text())
    assert data["metadata"]["transcoder_list"] == [config["transcoder"]]
    monkeypatch.chdir(tmp_path)
    for src in (pipeline.graph, pipeline.graph.with_suffix(".json")):
        out = tmp_path / f"{src.suffix[1:]}.html"
        assert main(["view", str(src), "-o", str(out)]) == 0
        text = capsys.readouterr().out
        cards = int(text.split(" feature cards")[0].rsplit(" ", 1)[1])
        assert cards > 0, text
