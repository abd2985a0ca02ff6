"""The transcoders bundled for the embedded models (clt/bundled/smollm2-135m, gemma3-270m): within
the size limits (float16, files <= 16 MB, <= 100 MB in all), shipped as package data, for the model it
names, with its recipe, metrics and feature cards; the default of `trace` when none is given."""

from __future__ import annotations

import fnmatch
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from clt.bundled import ROOT, available, bundled_transcoder, resolve_transcoder
from clt.configs import ConfigError
from clt.lm.config import known_config
from clt.transcoder import check_model, load

MB = 2**20
REPO = Path(__file__).resolve().parents[1]


MODELS = ("smollm2-135m", "gemma3-270m")


@pytest.fixture(scope="module", params=MODELS)
def bundle(request) -> Path:
    d = bundled_transcoder(request.param)
    assert d is not None, f"no transcoder bundled for {request.param}"
    return d


def test_sizes_and_dtypes(bundle):
    files = [f for f in bundle.iterdir() if f.is_file()]
    assert all(f.stat().st_size <= 16 * MB for f in files), [(f.name, f.stat().st_size)
                                                             for f in files]
    assert sum(f.stat().st_size for f in files) <= 100 * MB
    tensors = [f for f in files if f.suffix == ".safetensors"]
    assert tensors
    for f in tensors:
        with safe_open(str(f), "np") as st:
            for k in st.keys():
                dtype = st.get_slice(k).get_dtype()
                assert dtype == ("F32" if k == "threshold" else "F16"), (k, dtype)


def test_package_data_ships_every_file(bundle):
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["clt.bundled"]
    for f in bundle.iterdir():
        rel = f.relative_to(ROOT).as_posix()
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), f"{rel} would not be packaged"


def test_loads_for_its_model_with_recipe_metrics_and_cards(bundle):
    cfg, params = load(bundle)
    check_model(cfg, known_config(bundle.name))
    assert cfg.model_name == bundle.name
    for leaf in (params.W_enc, *params.W_dec):
        assert np.isfinite(np.asarray(leaf, np.float32)).all()
    info = json.loads((bundle / "info.json").read_text())
    assert info["train_config"]["model"] == bundle.name  # the recipe
    tc = info["train_config"]
    # TrainConfig nests the transcoder's fields under "transcoder" since the SAE issue; bundles
    # trained before keep them at the top level.
    assert tc.get("transcoder", tc)["n_features"] == cfg.n_features
    ev = info["eval"]
    assert len(ev["nmse_per_layer"]) == cfg.n_layers and 0 < ev["nmse_mean"] < 1
    assert ev["kl"] > 0 and 0 < ev["top1_agreement"] <= 1
    from viewer.features import FeatureCards

    cards = FeatureCards.load(bundle)
    assert cards.meta["n_layers"] == cfg.n_layers


def test_resolution():
    assert set(MODELS) <= set(available())
    assert resolve_transcoder("some/dir", "smollm2-135m") == "some/dir"
    assert resolve_transcoder(None, "gemma3-270m") == str(bundled_transcoder("gemma3-270m"))
    with pytest.raises(ConfigError, match="none is bundled for 'tiny-llama'.*--transcoder"):
        resolve_transcoder("", "tiny-llama")
