"""The `minis` command line: `minis demo` and `minis plan` (also `python -m minis ...`).

Each subcommand is its module's `build_parser()` mounted as a subparser, run by its module's `run(args)`. Bad input
exits with code 2: argparse's own error (usage and `minis ...: error: ...`) or the subcommand's validation (the same
`error:` line), never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

__all__ = ["build_parser", "main"]


def _mount(subparsers, name: str, parent: argparse.ArgumentParser, summary: str,
           runner: Callable[[argparse.Namespace], int]) -> None:
    # The parent brings its options and its -h; the subparser adds no -h of its own (argparse would see two).
    command = subparsers.add_parser(name, parents=[parent], add_help=False, help=summary,
                                    description=parent.description, formatter_class=parent.formatter_class)
    command.set_defaults(run=runner)


def build_parser() -> argparse.ArgumentParser:
    """`minis` with its subcommands `demo` and `plan`; each parsed namespace carries its runner as `args.run`."""
    from . import demo
    from .planner import cli as plan_cli

    parser = argparse.ArgumentParser(prog="minis", description="Mini-Sequence Transformer for Hugging Face "
                                     "transformers.")
    subparsers = parser.add_subparsers(title="commands", dest="command", required=True, metavar="{demo,plan}")
    _mount(subparsers, "demo", demo.build_parser(), "train a small model with and without minis and compare "
           "losses, memory and speed", demo.run)
    _mount(subparsers, "plan", plan_cli.build_parser(), "predict the peak GPU memory of a training step and the "
           "longest sequence that fits", plan_cli.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (0 for --help, 2 for bad input)."""
    from .planner.cli import normalize_argv

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plan"]:
        argv = ["plan", *normalize_argv(argv[1:])]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_request:  # argparse's --help (0) or error (2, message printed)
        return int(exit_request.code or 0)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
