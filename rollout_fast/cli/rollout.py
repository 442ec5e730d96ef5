"""``rollout-fast rollout``: attention rollout maps, overlays and a grid for image files; ``--shards`` for big
runs (resumable, and across processes under ``torchrun --nproc-per-node G -m rollout_fast.cli rollout ...``).
``--model`` may also be a Learn to Pay Attention model (``cifar10-ltpa`` once installed, or an AttnVGG
``.safetensors`` with its card): the same files with its own attention maps (each level and their combination
on ``--grid``; :func:`rollout_fast.jobs.rollout_images`)."""

from __future__ import annotations

import argparse
import os
import sys

from .common import add_model_args, device, load_model

PROG = "rollout-fast rollout"


def register(subparsers) -> None:
    r = subparsers.add_parser("rollout", help="attention rollout maps, overlays and a grid for images")
    r.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders")
    r.add_argument("--out", required=True, help="output folder")
    add_model_args(r, default="imagenette-vit")  # real photos (issue 13); --model cifar10-vit stays
    r.add_argument("--method", choices=["attention", "grad"], default="attention",
                   help="attention rollout (default) or class-specific gradient rollout")
    r.add_argument("--target", type=int, default=None, metavar="CLASS",
                   help="class index explained by --method grad (default: each image's predicted class)")
    r.add_argument("--head-fusion", choices=["mean", "max", "min"], default="mean",
                   help="head fusion of --method attention (grad rollout fuses heads by mean(A * dA))")
    r.add_argument("--discard-ratio", type=float, default=0.0, help="in [0, 1)")
    r.add_argument("--grid", default=None, metavar="N|GHxGW",
                   help="Learn to Pay Attention models only: the grid of the combined map (default: the finest "
                        "level's, e.g. 16x16 for cifar10-ltpa; 8 gives the ViT teacher's patch grid)")
    r.add_argument("--student", nargs="?", const="auto", default=None, metavar="NAME_OR_PATH",
                   help="also draw a student's predicted map (default: the shipped student of --model)")
    r.add_argument("--overlays", choices=["none", "sample", "all"], default=None,
                   help="overlay PNGs: every image (default; with --shards: sample), the first 16, or none")
    r.add_argument("--no-overlays", action="store_true", help="the same as --overlays none")
    r.add_argument("--workers", type=int, default=0,
                   help="DataLoader processes decoding and transforming the images (default 0: in this one)")
    r.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="forward pass: autocast on CUDA; on the CPU bf16 runs a bf16 copy of the model, fp16 "
                        "is refused")
    g = r.add_argument_group("big runs", "maps in shards (see rollout_fast.shards; torchrun spreads them over "
                                         "processes)")
    g.add_argument("--shards", action="store_true",
                   help="write OUT/shards/*.npy (+ an index each), manifest.json and index.npz instead of "
                        "rollout.npz")
    g.add_argument("--shard-size", type=int, default=None, metavar="N", help="images per shard (default 4096)")
    g.add_argument("--dtype", choices=["float16", "float32"], default=None, help="shard maps (default float16)")
    g.add_argument("--resume", action="store_true",
                   help="continue the shards in --out (refused if they were made with another model or settings)")
    r.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in --out (its rollout.npz or shards, grid.png and overlays are "
                        "removed)")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=run)


def _usage(args) -> str | None:
    """The first misuse of the options, as a one-line message, or None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.target is not None and args.method != "grad":
        return "--target CLASS is used only with --method grad"
    if args.no_overlays and args.overlays not in (None, "none"):
        return f"--no-overlays contradicts --overlays {args.overlays}"
    if args.workers < 0:
        return f"--workers: expected an int >= 0, got {args.workers}"
    if not args.shards:
        given = [o for o, v in (("--shard-size", args.shard_size), ("--dtype", args.dtype),
                                ("--resume", args.resume or None)) if v is not None]
        if given:
            return f"{', '.join(given)}: used only with --shards"
        if world > 1:
            return f"{world} processes (torchrun) write shards: pass --shards"
        return None
    if args.student is not None:
        return "--student is not used with --shards (the shards hold the teacher's maps)"
    if args.grid is not None:
        return "--grid is not used with --shards (a Learn to Pay Attention model's maps go to rollout.npz)"
    if args.shard_size is not None and args.shard_size < 1:
        return f"--shard-size: expected an int >= 1, got {args.shard_size}"
    if args.resume and args.overwrite:
        return "--resume, --overwrite: pass one of them (--resume continues the shards, --overwrite replaces them)"
    return None


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import check_output_dir
    from ..jobs import ROLLOUT_OUTPUTS, collect_images

    why = _usage(args)
    if why:
        print(f"{PROG}: {why}", file=sys.stderr)
        return 2
    files = collect_images(args.inputs)
    if not args.resume:  # before the model is loaded (--resume: the shards are checked against the model)
        check_output_dir(args.out, ROLLOUT_OUTPUTS, overwrite=args.overwrite,
                         hint="--resume to continue its shards, or --overwrite" if args.shards else "--overwrite")
    if not files:
        print(f"{PROG}: no image files found in the inputs", file=sys.stderr)
        return 1
    overlays = "none" if args.no_overlays else args.overlays
    dev = device(args.device)
    if args.precision == "fp16" and dev != "cuda":  # before the model is loaded
        print(f"{PROG}: --precision fp16 needs a CUDA device (here {dev}); use bf16 or fp32", file=sys.stderr)
        return 2
    if args.shards:
        return _run_shards(args, files, overlays or "sample", dev)
    from ..jobs import rollout_images

    grid = _grid(args.grid)
    model, data_config = load_model(args)
    why = _ltpa_usage(args, model)
    if why:
        print(f"{PROG}: {why}", file=sys.stderr)
        return 2
    try:
        student = None
        if args.student is not None:
            from ..students import load_student

            student, _ = load_student(args.model if args.student == "auto" else args.student)
        res = rollout_images(files, args.out, model, data_config, head_fusion=args.head_fusion,
                             discard_ratio=args.discard_ratio, batch_size=args.batch_size, device=dev,
                             progress=not args.no_progress, overlays=overlays or "all", method=args.method,
                             target=args.target, student=student, overwrite=args.overwrite, workers=args.workers,
                             precision=args.precision, grid=grid)
    except (ValueError, FileNotFoundError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    _report(res, "ltpa" if _is_ltpa(model) else args.method)
    return 0


def _grid(text: str | None):
    """``--grid`` as None, an int or (gh, gw); ValueError naming the option."""
    if text is None:
        return None
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        raise ValueError(f"--grid: expected N or GHxGW (positive ints, e.g. 8 or 8x8), got {text!r}")
    return values[0] if len(values) == 1 else tuple(values)


def _is_ltpa(model) -> bool:
    from ..ltpa import AttnVGG

    return isinstance(model, AttnVGG)


def _ltpa_usage(args, model) -> str | None:
    """Options a Learn to Pay Attention model cannot take (or --grid without one), as a one-line message."""
    if not _is_ltpa(model):
        return None if args.grid is None else ("--grid is used only with a Learn to Pay Attention model (a ViT's "
                                               "maps are on its patch grid)")
    if not model.attention:
        return f"--model {args.model}: the plain VGG baseline (variant 'vgg') has no attention maps"
    if args.method != "attention":
        return ("--method grad needs a ViT (gradient rollout); a Learn to Pay Attention model gives its own "
                "attention maps")
    if args.student is not None:
        return "--student predicts a ViT's rollout; not used with a Learn to Pay Attention model"
    return None


def _run_shards(args, files, overlays: str, dev: str) -> int:
    """``--shards``: one process, or one of torchrun's (cuda:LOCAL_RANK on CUDA; gloo on the CPU, NCCL on CUDA).
    Exit status 1 when no file could be read (the shards and index list them all as skipped)."""
    from ..distill.ddp import setup_distributed, shutdown_distributed
    from ..shard_job import rollout_shards
    from ..zoo import load_teacher

    env = setup_distributed(dev)
    try:
        model, data_config = load_teacher(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint,
                                          device=env.device)
        if _is_ltpa(model):
            raise ValueError("--shards: a Learn to Pay Attention model's maps are written to rollout.npz; leave "
                             "out --shards")
        res = rollout_shards(files, args.out, model, data_config, model_name=args.model,
                             checkpoint=args.checkpoint, head_fusion=args.head_fusion,
                             discard_ratio=args.discard_ratio, method=args.method, target=args.target,
                             batch_size=args.batch_size, precision=args.precision, workers=args.workers,
                             shard_size=args.shard_size or 4096, dtype=args.dtype or "float16", overlays=overlays,
                             resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress, env=env)
    finally:
        shutdown_distributed()
    if env.rank != 0:
        return 0
    _report_shards(res, args.method)
    if not res.files:
        print(f"{PROG}: images: none of the {res.num_files} inputs could be read", file=sys.stderr)
        return 1
    return 0


def _report(res, method: str) -> None:
    what = {"grad": "gradient rollout", "ltpa": "Learn to Pay Attention maps"}.get(method, "rollout")
    print(f"{what} of {len(res.files)} image(s) written to {res.out}/")
    print(f"  maps:     {res.npz}")
    print(f"  grid:     {res.grid}")
    if res.overlays:
        print(f"  overlays: {res.out / 'overlays'}/ ({len(res.overlays)} PNG)")
    _report_skipped(res.skipped)


def _report_shards(res, method: str) -> None:
    what = "gradient rollout" if method == "grad" else "rollout"
    resumed = f", {len(res.resumed)} finished before (resumed)" if res.resumed else ""
    print(f"{what} of {len(res.files)} image(s) in {res.num_shards} shard(s){resumed} written to {res.out}/")
    print(f"  maps:     {res.out / 'shards'}/ (read with rollout_fast.shards.open_maps({str(res.out)!r}))")
    print(f"  index:    {res.index}")
    if res.grid:
        print(f"  grid:     {res.grid}")
    if (res.out / "overlays").is_dir():
        print(f"  overlays: {res.out / 'overlays'}/")
    _report_skipped(res.skipped)


def _report_skipped(skipped) -> None:
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s):")
        for f, why in skipped:
            print(f"  {f}: {why}")
