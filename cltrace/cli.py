"""`cltrace <command>`: parse arguments into a stage's config dataclass and call the stage.

Each stage package owns its commands (`clt.cli`, `attribution.intervene_cli`, `viewer.cli`); the
pipeline command `trace` (trace -> prune -> JSON -> page) spans the stages and lives here
(`cltrace.pipeline`). This module collects them and turns expected errors into one-line messages.
"""

from __future__ import annotations

import argparse
import sys

from attribution import intervene_cli
from clt import cli as clt_cli
from clt.configs import ConfigError
from cltrace import pipeline
from viewer import cli as viewer_cli

STAGES = (clt_cli, pipeline, intervene_cli, viewer_cli)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cltrace",
        description="Train cross-layer transcoders, trace attribution graphs, view them.")
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument("--compile-cache", metavar="DIR", default=None,
                       help="Folder of JAX's persistent compilation cache (default: jax/ in "
                       "$CLTRACE_CACHE, else ~/.cache/cltrace): a second run with the same "
                       "shapes does not compile again.")
    cache.add_argument("--no-compile-cache", action="store_true",
                       help="Compile every program afresh (also CLTRACE_COMPILE_CACHE=0).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in STAGES:
        stage.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cltrace.compile_cache import enable, set_xla_flags

    set_xla_flags()  # before any backend starts: no Triton gemm autotuning on a GPU
    if not args.no_compile_cache:
        enable(args.compile_cache)
    try:
        return int(args.run(args) or 0)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        # Our errors are ValueErrors with a message that names the fix; show just that line.
        print(f"cltrace {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
