"""Bad inputs to `cltrace export`: one error line, exit 2, nothing written (harness:
`tests/bad_inputs/harness.py`). The output directory is checked by `ExportConfig` before the
transcoder loads (CHEAP cases name a transcoder that does not exist); the others need a
transcoder (tiny, random) and are refused before anything is written. Also: a failing write
leaves no partial export and keeps an earlier one whole."""

from __future__ import annotations

import jax
import pytest

from tests.bad_inputs.harness import Case, run_case


def _tc(**kw):
    from clt import transcoder as tcm

    cfg = tcm.TranscoderConfig(d_model=8, n_layers=3, n_features=16, model_name="tiny/model",
                               **kw)
    return cfg, tcm.init_params(cfg, jax.random.key(0))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from clt import transcoder as tcm
    from clt.circuit_tracer_io import export_circuit_tracer

    d = tmp_path_factory.mktemp("bad_export")
    cfg, p = _tc()
    tcm.save(d / "clt", cfg, p)
    tcm.save(d / "topk", *_tc(activation="topk", k=4))
    tcm.save(d / "noname", cfg.replace(model_name=""), p)
    export_circuit_tracer(d / "exported", cfg, p)
    (d / "empty").mkdir()
    return {"clt": d / "clt", "topk": d / "topk", "noname": d / "noname",
            "exported": d / "exported", "empty": d / "empty", "notc": d / "no_such_transcoder"}


def export(*args: str, tc: str = "{notc}") -> tuple[str, ...]:
    return ("export", "--transcoder", tc, *args)


X = "ExportConfig."
CHEAP = [
    Case(export("-o", "{file}"), "exists and is not a directory"),
    Case(export("-o", "{file}/sub"), "is a file"),
    Case(export("-o", "{exported}"), "already holds transcoder files"),
    Case(export("-o", ""), X + "out must be a non-empty string"),
    Case(export("-o", "{tmp}/x", tc=""), X + "transcoder must be a non-empty string"),
    Case(export("-o", "{tmp}/x", "--model-name", ""), X + "model_name must be a non-empty"),
    Case(export("-o", "{tmp}/x", "--dtype", "float8"), "invalid choice"),
    Case(export("-o", "{tmp}/x", "--overwrite=yes"), "ignored explicit argument"),
    Case(export(), "the following arguments are required: --out/-o"),
    Case(export("-o", "{tmp}/x"), "no transcoder at"),
]

LOADED = [
    Case(export("-o", "{tmp}/x", tc="{file}"), "is a file; pass the directory"),
    Case(export("-o", "{tmp}/x", tc="{empty}"), "holds no transcoder"),
    Case(export("-o", "{tmp}/x", tc="{topk}"), "topk CLT cannot be exported"),
    Case(export("-o", "{tmp}/x", tc="{noname}"), "needs the model's name"),
    Case(export("-o", "{exported}", tc="{clt}"), "already holds transcoder files"),
]


@pytest.mark.parametrize("case", CHEAP, ids=str)
def test_refused_before_the_transcoder_loads(case, files, tmp_path, capsys):
    run_case(case, tmp_path, capsys, **files)


@pytest.mark.parametrize("case", LOADED, ids=str)
def test_refused_before_writing(case, files, tmp_path, capsys):
    run_case(case, tmp_path, capsys, **files)


def test_a_failed_write_leaves_the_earlier_export_whole(files, tmp_path, monkeypatch):
    """A write that fails half way (a full disk, here the third file) leaves the directory as it
    was: the earlier export intact, no new or temporary files."""
    from clt import io as cio
    from clt.circuit_tracer_io import export_circuit_tracer, load_circuit_tracer
    from clt.configs import ConfigError
    from tests.bad_inputs.harness import snapshot

    cfg, p = _tc()
    export_circuit_tracer(tmp_path / "out", cfg, p)
    before = {f: (tmp_path / "out" / f).read_bytes() for f in snapshot(tmp_path / "out")}
    real, calls = cio.atomic_write, []

    def failing(path, data):
        calls.append(path)
        if len(calls) == 3:
            raise ConfigError(f"cannot write {path}: No space left on device")
        return real(path, data)

    monkeypatch.setattr("clt.circuit_tracer_io.atomic_write", failing)
    plt_cfg, plt_p = _tc(max_reach=1)
    with pytest.raises(ConfigError, match="No space left"):
        export_circuit_tracer(tmp_path / "out", plt_cfg, plt_p, overwrite=True)
    after = {f: (tmp_path / "out" / f).read_bytes() for f in snapshot(tmp_path / "out")}
    assert after == before
    assert load_circuit_tracer(tmp_path / "out")[0].kind == "clt"
    monkeypatch.undo()
    export_circuit_tracer(tmp_path / "out", plt_cfg, plt_p, overwrite=True)
    assert load_circuit_tracer(tmp_path / "out")[0].kind == "plt"
    assert not any(f.startswith(("W_enc", "W_dec", ".")) for f in snapshot(tmp_path / "out"))
