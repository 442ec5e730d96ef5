"""``rollout-fast eval-teacher``: top-1 accuracy of a teacher on an ImageFolder split."""

from __future__ import annotations

import argparse

from .common import add_model_args, device, load_model


def register(subparsers) -> None:
    e = subparsers.add_parser("eval-teacher", help="top-1 accuracy of a teacher on an ImageFolder split")
    e.add_argument("--data", required=True, help="ImageFolder split (or a root holding test/)")
    add_model_args(e)
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data import resolve_split
    from ..jobs import evaluate_folder

    root = resolve_split(args.data, "test")  # a missing folder fails before the model loads
    model, data_config = load_model(args)
    acc = evaluate_folder(model, data_config, root, batch_size=args.batch_size,
                          device=device(args.device), progress=not args.no_progress)
    print(f"top-1 {acc:.4f} on {root}")
    return 0
