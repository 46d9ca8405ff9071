"""The `streaming-llm` command: one subcommand per user-facing verb.

Each verb lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`.
This module only wires them together and turns expected failures into a clear message and a
non-zero exit; it does no work of its own.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UserError

# subcommand -> (module, one-line help). Verb modules keep their top-level imports light (torch,
# transformers are imported inside `run`) so that building the parser stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "chat": ("streaming_llm.chat.repl", "endless multi-turn chat (interactive, or scripted from a file)"),
    "serve": ("streaming_llm.server.serve", "OpenAI-compatible HTTP server with persistent, endless sessions"),
    "ppl": ("streaming_llm.eval.ppl", "stream a text through a model and report perplexity"),
    "reproduce": ("streaming_llm.eval.experiments", "rerun one of the paper's experiments; results under docs/results/"),
    "plot": ("streaming_llm.eval.plots", "draw the plots of a reproduction from its result files"),
    "attention-map": ("streaming_llm.eval.attention_map", "average attention maps and the attention share of the first tokens"),
    "bench": ("streaming_llm.bench.runner", "decode latency and memory against cache size, per method"),
    "data": ("streaming_llm.eval.data", "build and inspect the offline text corpus"),
    "pretrain": ("streaming_llm.train.pretrain", "pre-train small models with and without an attention sink, then stream them"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streaming-llm",
        description="Endless, constant-memory streaming of Hugging Face causal LMs with attention sinks.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip().splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_module", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._module.run(args) or 0)
    except UserError as e:
        print(f"streaming-llm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
