"""`apollo-fast` command line: one subcommand per feature module.

Each module listed in COMMANDS provides `register(subparsers)`, which adds its subcommand and sets
`func` (called with the parsed arguments, returning an exit code). Modules are imported lazily,
so `apollo-fast demo` does not import what `train` needs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = [
    "apollo_fast.demo",
    "apollo_fast.training.train_cli",
    "apollo_fast.vectors.cli",
    "apollo_fast.steering.cli",
    "apollo_fast.probe.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apollo-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command. Bad input (ValueError), file-system problems (OSError: a missing, existing,
    unwritable or busy path) and non-finite gradients (FloatingPointError: APOLLO's NonFiniteGradientError)
    end with exit code 2 and one message; Ctrl-C with 130."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, FloatingPointError) as err:
        print(f"apollo-fast {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\napollo-fast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
