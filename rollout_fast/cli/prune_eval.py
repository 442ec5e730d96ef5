"""``rollout-fast prune-eval``: top-1 and throughput of token-pruned inference (:func:`rollout_fast.prune.prune_eval`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import key_values

__all__ = ["register", "run"]


def register(subparsers) -> None:
    from ..prune import SCORERS

    p = subparsers.add_parser(
        "prune-eval", help="top-1 and throughput of token-pruned inference against the fraction of tokens dropped",
        description="Prune patch tokens before the blocks with several scorers and keep ratios; write "
                    "results.csv/json, prune_top1.png and throughput.csv to --out.")
    p.add_argument("--model", default="cifar10-vit",
                   help="'cifar10-vit' (embedded teacher), a timm model name, or a rollout_fast .safetensors")
    p.add_argument("--checkpoint", default=None, help="local weights for a timm model")
    p.add_argument("--timm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model argument for a timm name (JSON value), e.g. img_size=64")
    p.add_argument("--data", required=True, help="ImageFolder split, or a folder with labels.csv + images/")
    p.add_argument("--scorers", default="random,rollout,cls-attention,student",
                   help=f"comma-separated, from {', '.join(SCORERS)} (grad-rollout: a second oracle, "
                        "the model's gradient rollout for its predicted class)")
    p.add_argument("--keep", default="1.0,0.9,0.75,0.5,0.4,0.25,0.1", help="keep ratios in (0, 1]")
    p.add_argument("--out", required=True, help="output folder (checked before any compute)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in --out (its results and plot are removed first)")
    p.add_argument("--seeds", type=int, default=3, help="random-scorer seeds averaged (0 .. n-1)")
    p.add_argument("--limit", type=int, default=None, help="evaluate on this many images only")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch and the large throughput batch")
    p.add_argument("--throughput-batches", default="1,256", help="batch sizes timed ('' to skip timing)")
    p.add_argument("--throughput-time", type=float, default=1.0, help="seconds per timing (median of runs)")
    p.add_argument("--student", default=None,
                   help="student name or path for scorer 'student' (default: MODEL's shipped pruning student, "
                        "e.g. cifar10-vit-prune, else MODEL's student)")
    p.add_argument("--student-thumbnail", type=int, default=None, help="resize images to this side for the student")
    p.add_argument("--cls-block", type=int, default=0, help="block whose class-token attention 'cls-attention' uses")
    p.add_argument("--rollout-discard", type=float, default=0.9, help="discard ratio of the 'rollout' scorer")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--throughput-only", action="store_true", help="only time the models (no top-1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (torch.set_num_threads); 1 gives stable timings on a shared machine")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate the arguments (exit status 2 with a message when one is bad), load, evaluate, time, write."""
    try:
        opts = _options(args)
    except ValueError as e:
        print(f"rollout-fast prune-eval: {e}", file=sys.stderr)
        return 2
    import torch

    from ..checkpoint import check_output_dir
    from ..data import load_eval_data
    from ..prune import format_table, prune_eval, write_prune_eval
    from ..prune.report import PRUNE_OUTPUTS
    from ..zoo import load_teacher

    if not Path(args.data).is_dir():  # before any compute, like the output folder
        raise FileNotFoundError(f"data: folder {str(args.data)!r} does not exist")
    check_output_dir(args.out, PRUNE_OUTPUTS, overwrite=args.overwrite, hint="--overwrite")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, data_config = load_teacher(args.model, checkpoint=args.checkpoint, device=device, **opts["timm_kwargs"])
    images, labels = load_eval_data(args.data, data_config, args.limit)
    result = prune_eval(model, images, labels, scorers=opts["scorers"], keeps=opts["keeps"], seeds=args.seeds,
                        batch_size=args.batch_size, throughput_batches=opts["batches"],
                        throughput_time=args.throughput_time, device=device, student=opts["student"],
                        thumbnail=args.student_thumbnail, block=args.cls_block,
                        rollout_discard_ratio=args.rollout_discard, progress=not args.no_progress,
                        accuracy=not args.throughput_only)
    result["meta"].update(model=args.model, checkpoint=args.checkpoint, data=str(args.data),
                          student=opts["student_name"])
    paths = write_prune_eval(result, args.out, overwrite=args.overwrite)
    print(format_table(result))
    print("written: " + ", ".join(str(p) for p in paths))
    return 0


def _options(args: argparse.Namespace) -> dict:
    """The parsed lists and the student of ``args``; ValueError naming the option at fault."""
    from ..prune import SCORERS, check_keep_ratio

    keeps = [check_keep_ratio(v) for v in _parse_floats(args.keep, "--keep")]
    batches = [int(v) for v in _parse_floats(args.throughput_batches, "--throughput-batches")] \
        if args.throughput_batches.strip() else []
    scorers = [s.strip() for s in args.scorers.split(",") if s.strip()]
    bad = [s for s in scorers if s not in SCORERS]
    if bad or not scorers:
        raise ValueError(f"--scorers: expected names from {SCORERS}, got {args.scorers!r}")
    timm_kwargs = key_values(args.timm_arg, "--timm-arg")
    if args.seeds < 1:
        raise ValueError("--seeds: expected >= 1")
    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads: expected >= 1")
    student, student_name = _student(args) if "student" in scorers else (None, None)
    return {"keeps": keeps, "batches": batches, "scorers": scorers, "timm_kwargs": timm_kwargs,
            "student": student, "student_name": student_name}


def _parse_floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated numbers, got {text!r}") from None
    if not vals:
        raise ValueError(f"{what}: empty list")
    return vals


def _student(args: argparse.Namespace):
    """``(student module, its name)`` for scorer 'student', resolved first: a missing student fails before
    any work."""
    from ..prune import StudentScorer, make_scorer
    from ..students import pruning_student_name

    name = args.student or pruning_student_name(args.model)
    try:
        student = make_scorer("student", student=name).student
    except (ValueError, OSError) as e:
        raise ValueError(f"--scorers student: no student for {name!r} ({e}); "
                         "pass --student NAME_OR_PATH or leave 'student' out") from None
    try:
        StudentScorer(student, thumbnail=args.student_thumbnail)
    except ValueError as e:
        raise ValueError(f"--student-thumbnail: {e}") from None
    return student, name
