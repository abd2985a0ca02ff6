"""Commands of stage 1: `cltrace models`, `cltrace generate`."""

from __future__ import annotations

import json
from pathlib import Path

from clt.configs import add_arguments, from_arguments, to_dict


def register(sub) -> None:
    p = sub.add_parser("models", help="List the models available without a download.")
    p.set_defaults(run=_models)

    from clt.lm.generate import GenerateConfig

    p = sub.add_parser("generate", help="Continue a prompt with a model (greedy or sampled).",
                       description="Continue PROMPT with the model, using a KV cache.")
    p.add_argument("prompt", help=GenerateConfig.__dataclass_fields__["prompt"].metadata["help"])
    add_arguments(p, GenerateConfig, skip=("prompt",))
    p.add_argument("--out", default=None, help="Also write the result as JSON to this file.")
    p.set_defaults(run=_generate)


def _models(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from clt.lm.loading import list_models

    table = Table(title="Models available locally")
    for col in ("name", "status", "description"):
        table.add_column(col)
    for row in list_models():
        table.add_row(row["name"], row["status"], row["description"])
    Console().print(table)
    print("Also accepted: a .gguf file, a Hugging Face model directory, or a hub id (org/name).")
    return 0


def _generate(args) -> int:
    from rich.console import Console

    from clt.lm.generate import GenerateConfig, generate
    from clt.lm.loading import load_model

    gc = from_arguments(GenerateConfig, args)
    console = Console()
    with console.status(f"loading {gc.model}"):
        model = load_model(gc.model)
    with console.status("generating"):
        result = generate(model, gc)
    console.print("[bold]next-token top-k:[/bold] " + ", ".join(
        f"{t!r} {p:.3f}" for t, p in result.first_top))
    console.print(f"[bold]{gc.prompt}[/bold]", end="")
    print(result.text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "model": gc.model, "config": to_dict(gc),
            "prompt_ids": result.prompt_ids, "new_ids": result.new_ids,
            "completion": result.text, "first_top": result.first_top}, indent=2))
        print(f"wrote {args.out}")
    return 0

