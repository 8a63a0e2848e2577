"""The `minis` command line: `minis demo` and `minis plan` (also `python -m minis ...`)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (2 for bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="minis", description="Mini-Sequence Transformer for Hugging Face transformers."
    )
    parser.add_argument("command", choices=("demo", "plan"), help="demo: train with and without minis and compare; "
                        "plan: predict peak memory and the longest trainable sequence")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    if argv[0] not in ("demo", "plan"):
        parser.print_usage(sys.stderr)
        print(f"minis: unknown command {argv[0]!r}; choose 'demo' or 'plan'", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    from .planner import main as plan_main

    return plan_main(rest)


if __name__ == "__main__":
    sys.exit(main())
