"""The ``rollout-fast`` command line: parse arguments, call the package's API, print.

One module per command, ``rollout_fast/cli/<command>.py``, each defining ``register(subparsers)`` (adds its
sub-parser with ``set_defaults(func=run)``) and ``run(args) -> int`` (the exit status). :func:`build_parser`
adds them in the order of :data:`COMMANDS`; building the parser imports no timm. Nothing in the library
imports this package: the CLI calls the API and is the only part that prints.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import distill, eval_teacher, prune_eval, rollout, train_teacher

__all__ = ["COMMANDS", "build_parser", "main"]

DESCRIPTION = "The ``rollout-fast`` command line: parse arguments, call the package's API, print."
COMMANDS = (train_teacher, rollout, eval_teacher, distill, prune_eval)


def build_parser() -> argparse.ArgumentParser:
    """The ``rollout-fast`` parser with one sub-command per module of :data:`COMMANDS`."""
    p = argparse.ArgumentParser(prog="rollout-fast", description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``rollout-fast`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
