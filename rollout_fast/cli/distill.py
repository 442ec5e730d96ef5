"""``rollout-fast distill``: train a student to predict the teacher's rollout (:func:`rollout_fast.distill.distill`).

``python -m rollout_fast.distill`` (the ``torchrun`` form) takes the same arguments (:func:`add_arguments`).
"""

from __future__ import annotations

import argparse
import sys

from .. import distill as _distill
from ..distill import LOSSES, TARGETS, DistillConfig
from ..students import STRATEGIES, student_archs
from .common import key_values

__all__ = ["add_arguments", "config_from_args", "register", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``distill`` options (defaults from :class:`DistillConfig`)."""
    d = DistillConfig()
    p.add_argument("--teacher", default=d.teacher,
                   help="'cifar10-vit' (embedded), a timm name, or a rollout_fast .safetensors with its card")
    p.add_argument("--student", choices=student_archs(), default=d.student)
    p.add_argument("--strategy", choices=STRATEGIES, default=d.strategy)
    p.add_argument("--factor", type=int, default=d.factor, help="the student sees 1/F^2 of the pixels")
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and test/ (or --test-split)")
    p.add_argument("--test-split", default=d.test_split,
                   help="the evaluation split's folder in --data (e.g. val for ../shared/data/imagenette)")
    p.add_argument("--out", required=True, help="output folder (checkpoints, log, weights, card, metrics)")
    p.add_argument("--loss", choices=LOSSES, default=d.loss)
    p.add_argument("--target", choices=TARGETS, default=d.target,
                   help="teacher maps to predict: attention rollout, or gradient rollout of the teacher's "
                        "predicted class (the better token selector for pruning)")
    p.add_argument("--head-fusion", choices=["mean", "max", "min"], default=d.head_fusion,
                   help="head fusion of --target rollout")
    p.add_argument("--discard-ratio", type=float, default=d.discard_ratio)
    p.add_argument("--head-epochs", type=int, default=d.head_epochs, help="phase 1: frozen backbone")
    p.add_argument("--epochs", type=int, default=d.epochs, help="phase 2: all weights")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch (all processes)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--finetune-lr-scale", type=float, default=d.finetune_lr_scale,
                   help="phase-2 learning rate = lr * this (seeds: 0.1)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--cache-targets", action="store_true",
                   help="precompute teacher maps for --views augmented copies once and reuse them")
    p.add_argument("--targets-from", default=None, metavar="SHARD_DIR",
                   help="with --cache-targets: read the unaugmented view's teacher maps from the shards of "
                        "'rollout-fast rollout DATA/train --shards' with this teacher and settings")
    p.add_argument("--views", type=int, default=d.views)
    p.add_argument("--max-shift", type=int, default=d.max_shift, help="augmentation: max translation (px)")
    p.add_argument("--no-flip", action="store_true", help="augmentation: no horizontal flips")
    p.add_argument("--train-images", type=int, default=None, help="train on a seeded subset")
    p.add_argument("--val-images", type=int, default=d.val_images, help="per-epoch validation subset")
    p.add_argument("--placement-shift", type=int, default=None,
                   help="object-placement test shift in pixels (default H/4)")
    p.add_argument("--pretrained", action="store_true", help="timm ImageNet weights for the backbone")
    p.add_argument("--student-option", action="append", default=[], metavar="KEY=JSON",
                   help="student architecture option, e.g. channels=[32,64,128,256] or depth=2")
    p.add_argument("--cache-dir", default=None, help="decoded images and teacher maps (default OUT/cache)")
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--no-amp", action="store_true", help="float32 instead of bf16 autocast")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--no-progress", action="store_true")


def register(subparsers) -> None:
    """Add the ``distill`` sub-command (``func`` = :func:`run`)."""
    p = subparsers.add_parser("distill", help="train a student to predict the teacher's rollout",
                              description=_distill.__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    """:class:`DistillConfig` from parsed ``distill`` arguments.

    Raises:
        ValueError: a malformed ``--student-option`` (not KEY=JSON).
    """
    options = key_values(args.student_option, "--student-option")
    return DistillConfig(
        teacher=args.teacher, student=args.student, strategy=args.strategy, factor=args.factor,
        loss=args.loss, target=args.target, head_fusion=args.head_fusion, discard_ratio=args.discard_ratio,
        head_epochs=args.head_epochs, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        finetune_lr_scale=args.finetune_lr_scale, weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs, seed=args.seed, cache_targets=args.cache_targets,
        views=args.views, max_shift=args.max_shift, flip=not args.no_flip, train_images=args.train_images,
        val_images=args.val_images, placement_shift=args.placement_shift, amp=not args.no_amp,
        pretrained=args.pretrained, workers=args.workers, student_options=options,
        test_split=args.test_split)


def run(args: argparse.Namespace) -> int:
    """Train, then print the headline metrics (rank 0). Returns the exit status (errors about the user's
    input print one line and return 1)."""
    try:
        cfg = config_from_args(args)
        metrics = _distill.distill(args.data, args.out, cfg, device=args.device, resume=args.resume,
                                   cache_dir=args.cache_dir, progress=not args.no_progress,
                                   targets_from=args.targets_from)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"rollout-fast distill: {e}", file=sys.stderr)
        return 1
    finally:
        _distill.shutdown_distributed()
    if metrics:
        c, op = metrics["centred"], metrics["object_placement"]
        print(f"student {cfg.student}/{cfg.strategy} x{cfg.factor}: KLD {c['kld']:.4f} CC {c['cc']:.4f} "
              f"recall@0.5 {c['recall@0.5']:.4f} Spearman {c['spearman']:.4f}; shifted CC "
              f"{op['cc_shifted']:.4f} (placement test {'passed' if op['passed'] else 'FAILED'}); "
              f"{100 * metrics['cost']['macs_relative_to_teacher_forward']:.1f}% of the teacher's MACs")
        print(f"weights, card and metrics in {args.out}")
    return 0
