"""Bad inputs to `cltrace probe`: one error line, exit 2, nothing written (harness:
`tests/bad_inputs/harness.py`). CHEAP cases name a model that does not exist, so they pass only if
refused before any model loads (the last one is a good input: it reaches the model load); MODEL
cases need the tiny model's tokenizer or context length."""

from __future__ import annotations

import json

import pytest

from tests.bad_inputs.harness import Case, run_case


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from tests.clt.hf_tiny import make_tiny
    from tests.clt.tiny_train import tiny_tokenizer

    d = tmp_path_factory.mktemp("bad_probe")
    make_tiny("gemma2", d / "tiny")
    tiny_tokenizer().backend.save(str(d / "tiny" / "tokenizer.json"))
    make_tiny("gemma2", d / "no_tokenizer")
    four = "w1 w2\nw3 w4 w5\nw6\nw7 w8\n"
    (d / "pos.txt").write_text(four)
    (d / "neg.txt").write_text(four.replace("w", "w1"))
    (d / "three.txt").write_text("w1\n\nw2\nw3\n")
    (d / "blank.txt").write_text("\n   \n\t\n")
    (d / "latin1.txt").write_bytes("caf\u00e9\nna\u00efve\nw1\nw2\n".encode("latin-1"))
    (d / "long.txt").write_text(four + " ".join(["w1"] * 80) + "\n")

    def jsonl(name, rows):
        (d / f"{name}.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r)
                                                   for r in rows) + "\n")
        return d / f"{name}.jsonl"

    good = [{"text": f"w{i} w{i + 1}", "label": i % 2} for i in range(8)]
    rows = {
        "one_class": [{"text": f"w{i}", "label": 1} for i in range(8)],
        "three_of_one": good[:7],  # 4 of label 0, 3 of label 1
        "not_json": good[:3] + ["{text: w1}"],
        "no_label": good[:3] + [{"text": "w1"}],
        "label_two": good[:3] + [{"text": "w1", "label": 2}],
        "label_bool": good[:3] + [{"text": "w1", "label": True}],
        "label_str": good[:3] + [{"text": "w1", "label": "1"}],
        "text_empty": good[:3] + [{"text": "  ", "label": 1}],
        "text_number": good[:3] + [{"text": 5, "label": 1}],
        "list_row": good[:3] + [["w1", 1]],
        "blank_rows": ["", "  "],
    }
    return {"tiny": d / "tiny", "notok": d / "no_tokenizer", "nomodel": d / "no_such_model",
            **{n: d / f"{n}.txt" for n in ("pos", "neg", "three", "blank", "latin1", "long")},
            **{n: jsonl(n, r) for n, r in rows.items()}}


def probe(*args: str, model: str = "{nomodel}", out: str = "{tmp}/probe") -> tuple[str, ...]:
    return ("probe", "--model", model, "-o", out, *args)


def texts(*args: str, **kw) -> tuple[str, ...]:
    return probe("--positive", "{pos}", "--negative", "{neg}", *args, **kw)


C = "ProbeConfig."
CHEAP = [
    # Which examples: one source, both classes.
    Case(probe(), "nothing to probe"),
    Case(probe("--positive", "{pos}"), "--positive and --negative go together"),
    Case(probe("--negative", "{neg}"), "--positive and --negative go together"),
    Case(texts("--data", "{one_class}"), "give --data or --positive/--negative, not both"),
    Case(probe("--positive", "", "--negative", "{neg}"), C + "positive must be a non-empty"),
    Case(probe("--data", ""), C + "data must be a non-empty string"),
    # Text files.
    Case(probe("--positive", "{tmp}/missing.txt", "--negative", "{neg}"), "no such file"),
    Case(probe("--positive", "{pos}", "--negative", "{dir}"), "a directory, not a text file"),
    Case(probe("--positive", "{blank}", "--negative", "{neg}"), "holds no examples"),
    Case(probe("--positive", "{pos}", "--negative", "{three}"),
         "has 3 example(s); a probe needs at least 4 per class"),
    Case(probe("--positive", "{latin1}", "--negative", "{neg}"), "is not readable UTF-8 text"),
    # Labelled JSONL.
    Case(probe("--data", "{tmp}/missing.jsonl"), "no such file"),
    Case(probe("--data", "{dir}"), "a directory, not a JSONL file"),
    Case(probe("--data", "{one_class}"), "has 8 rows of label 1 and 0 of label 0"),
    Case(probe("--data", "{three_of_one}"), "needs both classes, at least 4 of each"),
    Case(probe("--data", "{blank_rows}"), "holds no rows"),
    Case(probe("--data", "{not_json}"), "line 4 is not JSON"),
    Case(probe("--data", "{no_label}"), 'line 4 must be an object with "text" and "label"'),
    Case(probe("--data", "{list_row}"), 'line 4 must be an object with "text" and "label"'),
    Case(probe("--data", "{label_two}"), '"label" must be 0 or 1, got 2'),
    Case(probe("--data", "{label_bool}"), '"label" must be 0 or 1, got True'),
    Case(probe("--data", "{label_str}"), "\"label\" must be 0 or 1, got '1'"),
    Case(probe("--data", "{text_empty}"), '"text" must be a non-empty string'),
    Case(probe("--data", "{text_number}"), '"text" must be a non-empty string'),
    # Numbers.
    Case(texts("--heldout", "0"), C + "heldout must be a fraction in (0, 1)"),
    Case(texts("--heldout", "1"), C + "heldout must be a fraction in (0, 1)"),
    Case(texts("--heldout", "-0.2"), C + "heldout must be a fraction in (0, 1)"),
    Case(texts("--heldout", "nan"), C + "heldout must be a fraction in (0, 1)"),
    Case(texts("--heldout", "half"), C + "heldout must be a number"),
    Case(texts("--l2=-1"), C + "l2 must be a finite number >= 0"),
    Case(texts("--l2", "nan"), C + "l2 must be a finite number >= 0"),
    Case(texts("--l2", "inf"), C + "l2 must be a finite number >= 0"),
    Case(texts("--seed", "-1"), C + "seed must be an integer >= 0"),
    Case(texts("--seed", "1.5"), C + "seed must be an integer"),
    Case(texts("--max-iter", "0"), C + "max_iter must be an integer >= 1"),
    Case(texts("--batch-size", "0"), C + "batch_size must be an integer >= 1"),
    Case(texts("--pool", "first"), "invalid choice"),
    # Output and model.
    Case(texts(out=""), C + "out must be a non-empty string"),
    Case(texts(out="{file}"), "exists and is not a directory"),
    Case(texts(out="{file}/sub"), "is not a directory"),
    Case(("probe", "--positive", "{pos}", "--negative", "{neg}"),
         "the following arguments are required: --out/-o"),
    Case(texts(model=""), C + "model must be a non-empty string"),
    Case(texts(), "unknown model"),  # every check above passed: only the model is missing
]

MODEL = [
    Case(probe("--positive", "{long}", "--negative", "{neg}", model="{tiny}"),
         "--positive: prompt 5: the prompt has 81 tokens but the model's context is 64"),
    Case(texts(model="{notok}"), "has no tokenizer"),
]


@pytest.mark.parametrize("case", CHEAP, ids=str)
def test_refused_before_the_model_loads(case, files, tmp_path, capsys):
    run_case(case, tmp_path, capsys, **files)


@pytest.mark.parametrize("case", MODEL, ids=str)
def test_refused_after_tokenising(case, files, tmp_path, capsys):
    run_case(case, tmp_path, capsys, **files)
