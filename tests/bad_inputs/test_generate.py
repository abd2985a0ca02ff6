"""`cltrace generate` refuses bad values in one line, before loading the model."""

from __future__ import annotations

import pytest

from tests.bad_inputs.harness import Case, run_case

G = "GenerateConfig."
BAD = [
    Case(("generate", ""), "prompt is empty"),
    Case(("generate", "  "), "prompt is empty"),
    *[Case(("generate", "Hi", "--max-new-tokens", v), G + "max_new_tokens must be at least 1")
      for v in ("0", "-4")],
    *[Case(("generate", "Hi", "--temperature", v), G + "temperature must be a finite number")
      for v in ("-1", "nan", "inf")],
    Case(("generate", "Hi", "--top-k", "-1"), G + "top_k must be >= 0"),
    *[Case(("generate", "Hi", "--show-top", v), G + "show_top must be in [0, 100]")
      for v in ("-2", "101")],
    Case(("generate", "Hi", "--max-new-tokens", "x"), G + "max_new_tokens must be an integer"),
    Case(("generate", "Hi", "--temperature", "hot"), G + "temperature must be a number"),
    Case(("generate",), "the following arguments are required"),
]


@pytest.mark.parametrize("case", BAD, ids=str)
def test_generate_refuses(case, tmp_path, capsys):
    run_case(case, tmp_path, capsys)
