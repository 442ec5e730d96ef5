"""``python -m rollout_fast.distill ...``: the same arguments as ``rollout-fast distill``; the form to launch
with ``torchrun --nproc-per-node N -m rollout_fast.distill ...`` (DistributedDataParallel)."""

from __future__ import annotations

import argparse
import logging
import sys

from ..cli.distill import add_arguments, run

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run ``rollout-fast distill``; returns the exit status."""
    from . import __doc__ as doc

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(prog="python -m rollout_fast.distill", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
