"""The ``rollout-fast`` command line: parse arguments, call the package's API, print.

One module per command, ``rollout_fast/cli/<command>.py``, each defining ``register(subparsers)`` (adds its
sub-parser with ``set_defaults(func=run)``) and ``run(args) -> int`` (the exit status). :func:`build_parser`
adds them in the order of :data:`COMMANDS`; building the parser imports no timm. Nothing in the library
imports this package: the CLI calls the API and is the only part that prints.

Errors: :func:`main` turns the package's errors about the user's input (missing paths, bad checkpoints and
refused pickles, bad data folders, unusable output folders, bad values) into one line on stderr,
``rollout-fast COMMAND: <message naming the argument>``, with exit status 2 (usage errors, like argparse's) or
1 (other OS errors: the run failed); ``--debug`` (before or after the command) shows the traceback instead.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from . import distill, eval_teacher, prune_eval, rollout, saliency_eval, train_teacher

__all__ = ["COMMANDS", "build_parser", "main"]

DESCRIPTION = "The ``rollout-fast`` command line: parse arguments, call the package's API, print."
COMMANDS = (train_teacher, rollout, eval_teacher, distill, prune_eval, saliency_eval)


USAGE_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
                ValueError)
MAX_MESSAGE = 2000  # characters of an error shown on its one line (--debug shows all)


def build_parser() -> argparse.ArgumentParser:
    """The ``rollout-fast`` parser with one sub-command per module of :data:`COMMANDS`."""
    p = argparse.ArgumentParser(prog="rollout-fast", description=DESCRIPTION)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    for command_parser in sub.choices.values():  # also after the command; SUPPRESS keeps a --debug given before
        command_parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                    help="show the traceback of an error")
    return p


def _user_error(e: BaseException) -> bool:
    """Whether ``e`` is one of the package's errors about the input (shown as one line), not a bug."""
    if isinstance(e, (OSError, ValueError)):
        return True
    capture = sys.modules.get("rollout_fast.capture")  # UnsupportedModelError (a TypeError): a model we cannot read
    return capture is not None and isinstance(e, getattr(capture, "UnsupportedModelError", ()))


def one_line(e: BaseException) -> str:
    """``e``'s message on one line (whitespace collapsed, at most :data:`MAX_MESSAGE` characters)."""
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in text:
        text += f": {e.filename}"
    if len(text) > MAX_MESSAGE:
        text = text[:MAX_MESSAGE - 30].rstrip() + " ... (--debug shows all)"
    return text


def main(argv: list[str] | None = None) -> int:
    """Run ``rollout-fast`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    The package's errors about the input become one line on stderr: status 2 for usage errors
    (:data:`USAGE_ERRORS`, and a model the capture cannot handle), 1 for other OS errors; ``--debug`` prints
    the traceback too. Other exceptions propagate.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:
        if not _user_error(e):
            raise
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"rollout-fast {args.command}: {one_line(e)}", file=sys.stderr)
        return 1 if isinstance(e, OSError) and not isinstance(e, USAGE_ERRORS) else 2


if __name__ == "__main__":
    sys.exit(main())
