"""`cltrace models` and `cltrace generate` end to end on the embedded SmolLM2."""

from __future__ import annotations

import json

from cltrace.cli import main


def test_models_lists_embedded(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "gemma3-270m" in out


def test_generate_greedy_writes_json(tmp_path, capsys):
    out = tmp_path / "g.json"
    rc = main(["generate", "The capital of France is", "--model", "smollm2-135m",
               "--max-new-tokens", "4", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["completion"].startswith(" Paris")
    assert data["first_top"][0][0] == " Paris"
    assert len(data["new_ids"]) <= 4


def test_generate_with_chat_template(tmp_path):
    from clt.lm import load_model

    tok = load_model("smollm2-135m").tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "Hi?"}])
    assert "<|im_start|>user\nHi?<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    ids = tok.encode(text, add_bos=False)
    assert tok.token_to_id("<|im_start|>") in ids  # special tokens parsed, not spelled out
    out = tmp_path / "chat.json"
    rc = main(["generate", "What is the capital of France?", "--model", "smollm2-135m",
               "--chat", "--max-new-tokens", "8", "--temperature", "0.7", "--top-k", "20",
               "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    preamble = tok.encode(text.split("<|im_start|>user")[0], add_bos=False)
    assert data["prompt_ids"][: len(preamble)] == preamble  # the template was applied
    assert 1 <= len(data["new_ids"]) <= 8


def test_generate_help_documents_every_field(capsys):
    import dataclasses

    from clt.lm.generate import GenerateConfig

    try:
        main(["generate", "--help"])
    except SystemExit:
        pass
    help_text = capsys.readouterr().out
    for f in dataclasses.fields(GenerateConfig):
        if f.name not in ("prompt",):
            assert "--" + f.name.replace("_", "-") in help_text


def test_the_parser_leaves_the_trainer_unimported():
    """Every command's parser is built at start (`cltrace.cli.build_parser`): `train`'s from its
    config alone, so a `cltrace trace` does not import the trainer and optax (~0.15 s)."""
    import subprocess
    import sys

    code = ("import sys; from cltrace.cli import build_parser; build_parser(); "
            "print(sorted({'optax', 'clt.train'} & set(sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=False, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"
