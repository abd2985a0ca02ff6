"""circuit-tracer layout: exact round trips, an independent torch reference, clear errors.

The torch reference re-implements circuit-tracer's forward passes from the layout facts recorded in
clt/circuit_tracer_io.py (PLT: F.linear(x, W_enc, b_enc), JumpReLU x * (x > threshold), acts @ W_dec
+ b_dec + x @ W_skip.T; CLT: einsum('bd,fd->bf'), decoders W_dec_s[:, t - s], + x @ W_skip_t),
reading the raw safetensors files, so it shares no code with our loader.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file as torch_load
from safetensors.torch import save_file as torch_save

from clt import transcoder as tc
from clt.circuit_tracer_io import (
    NORMALIZED_HOOK,
    _parse_hub_ref,
    export_circuit_tracer,
    load_circuit_tracer,
    load_transcoder,
)
from clt.configs import ConfigError

D, L, F = 8, 3, 16
ATOL = 1e-6  # float32 forward of identical weights; thresholds may differ by 1 ulp (log/exp)

KINDS = {
    "plt": {"max_reach": 1},
    "plt_skip": {"max_reach": 1, "skip": True},
    "plt_relu": {"max_reach": 1, "activation": "relu"},
    "plt_topk": {"max_reach": 1, "activation": "topk", "k": 4},
    "clt": {"max_reach": None},
    "clt_skip": {"max_reach": None, "skip": True, "input_point": "mlp_in"},
    "clt_relu": {"max_reach": None, "activation": "relu"},
    "windowed": {"max_reach": 2, "skip": True},
    "clt_batchtopk": {"max_reach": None, "activation": "batchtopk", "k": 4},
}


def make(name: str, seed: int = 0):
    """A transcoder with every tensor random (biases and skip too) and ~half the features active."""
    cfg = tc.TranscoderConfig(d_model=D, n_layers=L, n_features=F, model_name="tiny/model",
                              **KINDS[name])
    p = tc.init_params(cfg, jax.random.key(seed))
    ks = jax.random.split(jax.random.key(seed + 1), 5)
    p = tc.TranscoderParams(
        W_enc=p.W_enc, b_enc=0.1 * jax.random.normal(ks[0], (L, F)),
        log_threshold=jnp.log(jax.random.uniform(ks[1], (L, F), minval=0.01, maxval=0.3)),
        W_dec=p.W_dec, b_dec=0.1 * jax.random.normal(ks[2], (L, D)),
        W_skip=0.1 * jax.random.normal(ks[3], (L, D, D)) if cfg.skip else None)
    return cfg, p


def inputs(seed: int = 7, batch: int = 5):
    return jax.random.normal(jax.random.key(seed), (batch, L, D))


@pytest.mark.parametrize("name", list(KINDS))
def test_round_trip_is_exact(tmp_path, name):
    cfg, p = make(name)
    export_circuit_tracer(tmp_path, cfg, p)
    cfg2, p2 = load_circuit_tracer(tmp_path)
    assert cfg2 == cfg
    for a, b in [(p.W_enc, p2.W_enc), (p.b_enc, p2.b_enc), (p.b_dec, p2.b_dec),
                 *zip(p.W_dec, p2.W_dec)]:
        assert a.shape == b.shape and a.dtype == b.dtype == jnp.float32
        np.testing.assert_array_equal(a, b)
    assert (p2.W_skip is None) == (p.W_skip is None)
    if p.W_skip is not None:
        np.testing.assert_array_equal(p.W_skip, p2.W_skip)
    if cfg.activation != "relu" and cfg.activation != "topk":
        np.testing.assert_allclose(p2.threshold, p.threshold, rtol=1e-6)
    x = inputs()
    y, a = tc.forward(cfg, p, x)
    y2, a2 = tc.forward(cfg2, p2, x)
    assert float(jnp.mean(a > 0)) > 0.1  # the comparison exercises active features
    np.testing.assert_allclose(a2, a, atol=ATOL)
    np.testing.assert_allclose(y2, y, atol=ATOL)


def test_files_and_config_yaml(tmp_path):
    cfg, p = make("windowed")
    export_circuit_tracer(tmp_path, cfg, p, model_name="org/model")
    names = sorted(f.name for f in tmp_path.iterdir())
    assert names == ["W_dec_0.safetensors", "W_dec_1.safetensors", "W_dec_2.safetensors",
                     "W_enc_0.safetensors", "W_enc_1.safetensors", "W_enc_2.safetensors",
                     "config.yaml"]
    meta = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert meta["model_name"] == "org/model" and meta["model_kind"] == "cross_layer_transcoder"
    assert meta["feature_input_hook"] == "hook_resid_mid"
    assert meta["feature_output_hook"] == "hook_mlp_out"
    assert meta["cltrace_config"]["max_reach"] == 2
    enc = torch_load(str(tmp_path / "W_enc_1.safetensors"))
    assert sorted(enc) == ["W_enc_1", "W_skip_1", "b_dec_1", "b_enc_1", "threshold_1"]
    assert tuple(enc["W_enc_1"].shape) == (F, D) and tuple(enc["threshold_1"].shape) == (F,)
    # Windowed: layer 0 reaches 2 layers, padded with zeros to circuit-tracer's L - 0 = 3.
    dec0 = torch_load(str(tmp_path / "W_dec_0.safetensors"))["W_dec_0"]
    assert tuple(dec0.shape) == (F, L, D) and not dec0[:, 2].any()
    plt_dir = tmp_path / "plt"
    cfg, p = make("plt_skip")
    export_circuit_tracer(plt_dir, cfg, p)
    layer = torch_load(str(plt_dir / "layer_0.safetensors"))
    assert sorted(layer) == ["W_dec", "W_enc", "W_skip", "activation_function.threshold",
                             "b_dec", "b_enc"]
    assert yaml.safe_load((plt_dir / "config.yaml").read_text())["model_kind"] == "transcoder_set"


def _t(x):
    return torch.from_numpy(np.asarray(x, np.float64))


def _jump(pre, th):
    return pre * (pre > th) if th is not None else torch.relu(pre)


@pytest.mark.parametrize("name", ["plt", "plt_skip", "plt_relu"])
def test_plt_matches_independent_reference(tmp_path, name):
    cfg, p = make(name)
    export_circuit_tracer(tmp_path, cfg, p)
    x = inputs()
    y, _ = tc.forward(cfg, p, x)
    for i in range(L):
        t = {k: v.double() for k, v in torch_load(str(tmp_path / f"layer_{i}.safetensors")).items()}
        xi = _t(x[:, i])
        acts = _jump(torch.nn.functional.linear(xi, t["W_enc"], t["b_enc"]),
                     t.get("activation_function.threshold"))
        ref = acts @ t["W_dec"] + t["b_dec"]
        if "W_skip" in t:
            ref = ref + xi @ t["W_skip"].T
        np.testing.assert_allclose(y[:, i], ref.numpy(), atol=1e-5)


@pytest.mark.parametrize("name", ["clt", "clt_skip", "windowed"])
def test_clt_matches_independent_reference(tmp_path, name):
    cfg, p = make(name)
    export_circuit_tracer(tmp_path, cfg, p)
    x = inputs()
    y, _ = tc.forward(cfg, p, x)
    enc = [{k: v.double() for k, v in torch_load(str(tmp_path / f"W_enc_{i}.safetensors")).items()}
           for i in range(L)]
    dec = [torch_load(str(tmp_path / f"W_dec_{i}.safetensors"))[f"W_dec_{i}"].double()
           for i in range(L)]
    ref = torch.stack([enc[t][f"b_dec_{t}"] for t in range(L)])[None].repeat(x.shape[0], 1, 1)
    for s in range(L):
        xs = _t(x[:, s])
        acts = _jump(torch.einsum("bd,fd->bf", xs, enc[s][f"W_enc_{s}"]) + enc[s][f"b_enc_{s}"],
                     enc[s].get(f"threshold_{s}"))
        for t in range(s, L):
            ref[:, t] += acts @ dec[s][:, t - s]
        if f"W_skip_{s}" in enc[s]:
            ref[:, s] += xs @ enc[s][f"W_skip_{s}"]
    np.testing.assert_allclose(y, ref.numpy(), atol=1e-5)


def test_bfloat16_export(tmp_path):
    cfg, p = make("clt")
    export_circuit_tracer(tmp_path, cfg, p, dtype="bfloat16")
    assert torch_load(str(tmp_path / "W_dec_0.safetensors"))["W_dec_0"].dtype == torch.bfloat16
    _, p2 = load_circuit_tracer(tmp_path)
    np.testing.assert_array_equal(p2.W_dec[0], p.W_dec[0].astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(p2.threshold, p.threshold, rtol=1e-6)  # thresholds stay float32


# --- errors ------------------------------------------------------------------------------------
def test_missing_files_are_named(tmp_path):
    cfg, p = make("plt")
    export_circuit_tracer(tmp_path / "a", cfg, p)
    (tmp_path / "a" / "layer_1.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"layer_1\.safetensors is missing"):
        load_circuit_tracer(tmp_path / "a")
    (tmp_path / "a" / "layer_2.safetensors").unlink()  # the last one: known from cltrace_config
    with pytest.raises(ConfigError, match=r"layer_1\.safetensors is missing"):
        load_circuit_tracer(tmp_path / "a")
    cfg, p = make("clt")
    export_circuit_tracer(tmp_path / "b", cfg, p)
    (tmp_path / "b" / "W_dec_2.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"W_dec_2\.safetensors is missing"):
        load_circuit_tracer(tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.yaml").write_text("model_kind: transcoder_set\n")
    with pytest.warns(UserWarning, match="config.yaml lacks model_name"), \
            pytest.raises(ConfigError, match=r"layer_0\.safetensors is missing"):
        load_circuit_tracer(tmp_path / "c")
    (tmp_path / "c" / "config.yaml").unlink()
    with pytest.warns(UserWarning), pytest.raises(ConfigError, match="no circuit-tracer"):
        load_circuit_tracer(tmp_path / "c")


def test_corrupt_file_is_named(tmp_path):
    cfg, p = make("clt")
    export_circuit_tracer(tmp_path, cfg, p)
    (tmp_path / "W_enc_1.safetensors").write_bytes(b"\x10\x00\x00\x00not a header at all")
    with pytest.raises(ConfigError, match=r"W_enc_1\.safetensors is corrupt.*re-export"):
        load_circuit_tracer(tmp_path)
    (tmp_path / "config.yaml").write_text("model_name: [unclosed\n")
    with pytest.raises(ConfigError, match="config.yaml is not valid YAML"):
        load_circuit_tracer(tmp_path)


def test_shape_mismatch_is_named(tmp_path):
    cfg, p = make("plt")
    export_circuit_tracer(tmp_path, cfg, p)
    f = tmp_path / "layer_1.safetensors"
    t = torch_load(str(f))
    t["W_enc"] = torch.zeros(F, D + 1)
    torch_save(t, str(f))
    with pytest.raises(ConfigError, match=r"layer_1\.safetensors: tensor 'W_enc' has shape "
                                          r"\(16, 9\), expected \(16, 8\)"):
        load_circuit_tracer(tmp_path)
    t["W_enc"] = torch.zeros(F, D)
    del t["b_dec"]
    torch_save(t, str(f))
    with pytest.raises(ConfigError, match=r"layer_1\.safetensors lacks tensor 'b_dec'"):
        load_circuit_tracer(tmp_path)
    t["b_dec"] = torch.zeros(D)
    del t["activation_function.threshold"]
    torch_save(t, str(f))
    with pytest.raises(ConfigError, match=r"layer_1\.safetensors lacks threshold unlike layer_0"):
        load_circuit_tracer(tmp_path)


def test_clt_decoder_width_mismatch(tmp_path):
    cfg, p = make("clt")
    export_circuit_tracer(tmp_path, cfg, p)
    torch_save({"W_dec_1": torch.zeros(F, 1, D)}, str(tmp_path / "W_dec_1.safetensors"))
    with pytest.raises(ConfigError, match=r"W_dec_1\.safetensors: tensor 'W_dec_1' has shape "
                                          r"\(16, 1, 8\), expected \(16, 2, 8\)"):
        load_circuit_tracer(tmp_path)


def test_windowed_padding_must_be_zero(tmp_path):
    cfg, p = make("windowed")
    export_circuit_tracer(tmp_path, cfg, p)
    f = tmp_path / "W_dec_0.safetensors"
    w = torch_load(str(f))["W_dec_0"]
    w[:, 2] = 1.0
    torch_save({"W_dec_0": w}, str(f))
    with pytest.raises(ConfigError, match=r"W_dec_0\.safetensors writes beyond .*max_reach"):
        load_circuit_tracer(tmp_path)


def test_negative_thresholds_are_refused(tmp_path):
    cfg, p = make("clt")
    export_circuit_tracer(tmp_path, cfg, p)
    f = tmp_path / "W_enc_1.safetensors"
    t = torch_load(str(f))
    t["threshold_1"][3] = -0.5
    torch_save(t, str(f))
    with pytest.raises(ConfigError, match="layer 1 has negative JumpReLU thresholds"):
        load_circuit_tracer(tmp_path)


def test_without_config_yaml_defaults_are_reported(tmp_path):
    cfg, p = make("clt_relu")
    export_circuit_tracer(tmp_path, cfg, p)
    (tmp_path / "config.yaml").unlink()
    with pytest.warns(UserWarning, match="no config.yaml; defaulted model_name='', "
                                         "feature_input_hook='hook_resid_mid'"):
        cfg2, p2 = load_circuit_tracer(tmp_path)
    assert cfg2 == cfg.replace(model_name="")
    np.testing.assert_allclose(tc.forward(cfg2, p2, inputs())[0], tc.forward(cfg, p, inputs())[0],
                               atol=ATOL)


def test_plain_circuit_tracer_config_is_inferred(tmp_path):
    """Without our cltrace_config (a transcoder made by circuit-tracer) everything is inferred."""
    cfg, p = make("plt_skip")
    export_circuit_tracer(tmp_path, cfg, p)
    meta = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del meta["cltrace_config"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(meta))
    cfg2, _ = load_circuit_tracer(tmp_path)
    assert (cfg2.kind, cfg2.activation, cfg2.skip, cfg2.model_name) == (
        "plt", "jumprelu", True, "tiny/model")
    meta["feature_input_hook"] = "blocks.0.hook_resid_pre"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(ConfigError, match="feature_input_hook 'blocks.0.hook_resid_pre' is not "
                                          "supported"):
        load_circuit_tracer(tmp_path)


def test_export_refusals(tmp_path):
    cfg, p = make("clt")
    with pytest.raises(ConfigError, match="model_name"):
        export_circuit_tracer(tmp_path, cfg.replace(model_name=""), p)
    topk = cfg.replace(activation="topk", k=4)
    with pytest.raises(ConfigError, match="topk CLT cannot be exported"):
        export_circuit_tracer(tmp_path, topk, p)
    export_circuit_tracer(tmp_path, cfg, p)
    with pytest.raises(ConfigError, match="already holds transcoder files"):
        export_circuit_tracer(tmp_path, *make("plt"))
    export_circuit_tracer(tmp_path, *make("plt"), overwrite=True)
    assert load_circuit_tracer(tmp_path)[0].kind == "plt"
    with pytest.raises(ConfigError, match="tensor"):
        export_circuit_tracer(tmp_path / "x", cfg.replace(n_features=F + 1), p)


def test_normalized_input_is_folded_into_the_encoder(tmp_path):
    """`ln2.hook_normalized` features read n = (m - b) / w; folded, they read m (our mlp_in)."""
    cfg, p = make("clt_skip")
    export_circuit_tracer(tmp_path, cfg, p)
    meta = yaml.safe_load((tmp_path / "config.yaml").read_text())
    meta["feature_input_hook"] = NORMALIZED_HOOK
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(ConfigError, match="pass input_norm="):
        load_circuit_tracer(tmp_path)
    kw, kb = jax.random.split(jax.random.key(3))
    w = 1 + 0.5 * jax.random.uniform(kw, (L, D))
    b = 0.2 * jax.random.normal(kb, (L, D))
    cfg2, p2 = load_circuit_tracer(tmp_path, input_norm=(w, b))
    assert cfg2.input_point == "mlp_in"
    m = inputs()
    y, a = tc.forward(cfg, p, (m - b) / w)
    y2, a2 = tc.forward(cfg2, p2, m)
    np.testing.assert_allclose(a2, a, atol=1e-5)
    np.testing.assert_allclose(y2, y, atol=1e-5)


# --- load_transcoder -----------------------------------------------------------------------------
def test_load_transcoder_dispatches_on_layout(tmp_path, monkeypatch):
    cfg, p = make("clt_skip")
    tc.save(tmp_path / "ours", cfg, p)
    export_circuit_tracer(tmp_path / "theirs", cfg, p)
    for d in ("ours", "theirs"):
        cfg2, p2 = load_transcoder(str(tmp_path / d))
        assert cfg2 == cfg
        np.testing.assert_array_equal(p2.W_dec[1], p.W_dec[1])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no transcoder"):
        load_transcoder(tmp_path / "empty")
    with pytest.raises(ConfigError, match="not a directory, nor a Hugging Face repo id"):
        load_transcoder(str(tmp_path / "no" / "such" / "dir"))

    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("offline mode is enabled")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ConfigError, match="cannot fetch transcoder 'org/clt' from the Hugging "
                                          "Face hub \\(offline mode is enabled\\)"):
        load_transcoder("org/clt")

    seen = {}

    def fake(repo_id, revision=None, allow_patterns=None):
        seen.update(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns)
        return str(tmp_path)

    (tmp_path / "sub").mkdir()
    export_circuit_tracer(tmp_path / "sub" / "clt", cfg, p)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    cfg2, _ = load_transcoder("org/repo/sub/clt@v1")
    assert cfg2 == cfg
    assert seen == {"repo_id": "org/repo", "revision": "v1",
                    "allow_patterns": ["sub/clt/config.yaml", "sub/clt/*.safetensors"]}


def test_parse_hub_ref():
    assert _parse_hub_ref("org/name") == ("org/name", None, None)
    assert _parse_hub_ref("org/name/a/b@main") == ("org/name", "a/b", "main")
    assert _parse_hub_ref("hf://org/name/a?revision=r1") == ("org/name", "a", "r1")
    for bad in ("name", "./org/name", "/abs/path", "~/x/y", "org/na me"):
        assert _parse_hub_ref(bad) is None
