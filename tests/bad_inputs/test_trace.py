"""`cltrace trace` refuses bad input in one line, before loading any model, and writes nothing.

Every case here is refused before the model loads (config validation, target syntax, output
paths), so the table runs in seconds; `--dtype float64` (once an error unless the user set
JAX_ENABLE_X64) is checked to work on a tiny model.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bad_inputs.harness import Case, run_case

P = "The capital of France is"
BAD = [
    Case(("trace", "",), "the prompt is empty"),
    Case(("trace", "   ",), "the prompt is empty"),
    *[Case(("trace", P, f"--{flag}", v), f"TraceConfig.{flag.replace('-', '_')} must be")
      for flag in ("max-n-logits", "update-interval", "stream-features")
      for v in ("0", "-3")],
    Case(("trace", P, "--batch-size", "-3"), "TraceConfig.batch_size must be >= 0 (0: automatic)"),
    Case(("trace", P, "--max-feature-nodes", "-1"), "max_feature_nodes must be >= 0"),
    *[Case(("trace", P, f"--{flag}", v), f"TraceConfig.{flag.replace('-', '_')} must be in (0, 1]")
      for flag in ("desired-logit-prob", "node-threshold", "edge-threshold")
      for v in ("0", "1.5", "-0.2", "nan", "inf")],
    Case(("trace", P, "--position-bucket", "-1"), "position_bucket must be >= 0"),
    *[Case(("trace", P, f"--{flag}", v), f"TraceConfig.{flag.replace('-', '_')} must be a "
           "positive number of GB")
      for flag in ("batch-memory-gb", "max-adjacency-gb") for v in ("0", "-1", "nan", "inf")],
    *[Case(("trace", P, f"--{flag}", v), "invalid choice")
      for flag, v in (("dtype", "float16"), ("adjacency", "sparse"))],
    *[Case(("trace", P, f"--{flag}", v), f"TraceConfig.{flag.replace('-', '_')} must be {what}")
      for flag, v, what in (("batch-size", "abc", "an integer"), ("max-n-logits", "1.5",
                                                                 "an integer"),
                            ("node-threshold", "x", "a number"),
                            ("stream-features", "1e3", "an integer"))],
    Case(("trace", P, "--no-such-flag"), "unrecognized arguments"),
    *[Case(("trace", P, f"--mesh-{axis}", v), f"TraceConfig.mesh_{axis} must be a positive "
           "number of devices or -1") for axis in ("data", "feature") for v in ("0", "-2")],
    Case(("trace", P, "--mesh-data", "-1", "--mesh-feature", "-1"), "only one of mesh_data"),
    Case(("trace", P, "--neurons", "--transcoder", "{dir}"), "give --neurons or --transcoder"),
    Case(("trace", P, "--neurons", "--neuron-top-k", "-1"), "neuron_top_k must be >= 0"),
    Case(("trace", P, "--plan", "--prompts", "{tmp}/p.txt"), "give a PROMPT or --prompts"),
    Case(("trace", P, "--minus", " Paris"), "minus needs a target"),
    Case(("trace", P, "--target", " a", "--target", " a"), "a token is repeated"),
    Case(("trace", P, "--target", ""), "an empty string is no token"),
    Case(("trace", P, "--target", " a", "--minus", ""), "an empty string is no token"),
    Case(("trace", P, "--target", " a", "--target-vector", "v.npy"), "not both"),
    Case(("trace", P, "--target-vector", "v.txt"), "must be a .npy file"),
    Case(("trace", P, "--target-vector", "{tmp}/none.npy"), "--target-vector: no file at"),
    Case(("trace", P, "--target", " a", "--target", " b", "--target", " c", "--minus", " x",
          "--minus", " y"), "one per target (3), got 2"),
    Case(("trace", P, "--out", "{file}"), "is an existing file"),
    Case(("trace", P, "--out", "{file}/run"), "Not a directory"),
    Case(("trace", P, "--out", "{file}/g.npz"), "exists and is not a directory"),
    Case(("trace", P, "--out", "{tmp}/npzdir.npz"), "is a directory"),
    Case(("trace", P, "--out", "/proc/cltrace-no/run"), "cannot create"),
]


# --prompts FILE: every line checked before the model loads; files made by `prompt_files`.
PROMPTS = [
    Case(("trace", P, "--prompts", "{good}"), "give a PROMPT or --prompts FILE"),
    Case(("trace",), "give a PROMPT or --prompts FILE"),
    Case(("trace", P, "--distributed"), "--distributed splits --prompts over processes"),
    Case(("trace", "--prompts", "{good}", "--num-processes", "2"), "need --distributed"),
    Case(("trace", "--prompts", "{good}", "--distributed", "--coordinator", "nohost"),
         "--coordinator must be host:port"),
    Case(("trace", "--prompts", "{good}", "--distributed", "--num-processes", "2",
          "--process-id", "2"), "--process-id must be in [0, num_processes)"),
    Case(("trace", "--prompts", "{tmp}/none.txt"), "--prompts: no file at"),
    Case(("trace", "--prompts", "{blank}"), "holds no prompt (only blank lines)"),
    Case(("trace", "--prompts", "{binary}"), "looks binary"),
    Case(("trace", "--prompts", "{latin}"), "is not UTF-8 text"),
    Case(("trace", "--prompts", "{notjson}"), "notjson.jsonl:2: not JSON"),
    Case(("trace", "--prompts", "{noprompt}"), 'must be an object with a "prompt" string'),
    Case(("trace", "--prompts", "{unknown}"), "unknown field(s) ['targte']"),
    Case(("trace", "--prompts", "{badtarget}"), '"target" must be a string or a list'),
    Case(("trace", "--prompts", "{minusonly}"), "minusonly.jsonl:1: TraceConfig.minus needs"),
    Case(("trace", "--prompts", "{emptyprompt}"), "emptyprompt.jsonl:2: the prompt is empty"),
    Case(("trace", "--prompts", "{novector}"), "--target-vector: no file at"),
    Case(("trace", "--prompts", "{good}", "--out", "{tmp}/x.npz"), "give --out a directory"),
    Case(("trace", "--prompts", "{good}", "--out", "{file}"), "exists and is not a directory"),
]


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("prompt_files")
    files = {
        "good.txt": "The capital of France is\n",
        "blank.txt": "\n  \n\n",
        "notjson.jsonl": '{"prompt": "a"}\n{prompt: b}\n',
        "noprompt.jsonl": '{"text": "a"}\n',
        "unknown.jsonl": '{"prompt": "a", "targte": " b"}\n',
        "badtarget.jsonl": '{"prompt": "a", "target": 3}\n',
        "minusonly.jsonl": '{"prompt": "a", "minus": " b"}\n',
        "emptyprompt.jsonl": '{"prompt": "a"}\n{"prompt": "  "}\n',
        "novector.jsonl": '{"prompt": "a", "target_vector": "missing.npy"}\n',
    }
    for name, text in files.items():
        (d / name).write_text(text)
    (d / "binary.txt").write_bytes(b"abc\x00def\n")
    (d / "latin.txt").write_bytes("caf\u00e9\n".encode("latin-1"))
    return {Path(n).stem: d / n for n in [*files, "binary.txt", "latin.txt"]}


@pytest.mark.parametrize("case", BAD, ids=str)
def test_trace_refuses(case, tmp_path, capsys):
    (tmp_path / "npzdir.npz").mkdir()
    run_case(case, tmp_path, capsys)


@pytest.mark.parametrize("case", PROMPTS, ids=str)
def test_trace_prompts_refuses(case, tmp_path, capsys, prompt_files, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out (out/trace) must not be made either
    run_case(case, tmp_path, capsys, **prompt_files)
