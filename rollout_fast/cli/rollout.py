"""``rollout-fast rollout``: attention rollout maps, overlays and a grid for image files."""

from __future__ import annotations

import argparse
import sys

from .common import add_model_args, device, load_model


def register(subparsers) -> None:
    r = subparsers.add_parser("rollout", help="attention rollout maps, overlays and a grid for images")
    r.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders")
    r.add_argument("--out", required=True, help="output folder")
    add_model_args(r)
    r.add_argument("--method", choices=["attention", "grad"], default="attention",
                   help="attention rollout (default) or class-specific gradient rollout")
    r.add_argument("--target", type=int, default=None, metavar="CLASS",
                   help="class index explained by --method grad (default: each image's predicted class)")
    r.add_argument("--head-fusion", choices=["mean", "max", "min"], default="mean",
                   help="head fusion of --method attention (grad rollout fuses heads by mean(A * dA))")
    r.add_argument("--discard-ratio", type=float, default=0.0, help="in [0, 1)")
    r.add_argument("--student", nargs="?", const="auto", default=None, metavar="NAME_OR_PATH",
                   help="also draw a student's predicted map (default: the shipped student of --model)")
    r.add_argument("--no-overlays", action="store_true", help="write only rollout.npz and grid.png")
    r.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in --out (its rollout.npz, grid.png and overlays are removed)")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import check_output_dir
    from ..jobs import ROLLOUT_OUTPUTS, collect_images, rollout_images

    if args.target is not None and args.method != "grad":
        print("rollout-fast rollout: --target CLASS is used only with --method grad", file=sys.stderr)
        return 2
    files = collect_images(args.inputs)
    check_output_dir(args.out, ROLLOUT_OUTPUTS, overwrite=args.overwrite, hint="--overwrite")
    if not files:
        print("rollout-fast rollout: no image files found in the inputs", file=sys.stderr)
        return 1
    model, data_config = load_model(args)
    try:
        student = None
        if args.student is not None:
            from ..students import load_student

            student, _ = load_student(args.model if args.student == "auto" else args.student)
        res = rollout_images(files, args.out, model, data_config, head_fusion=args.head_fusion,
                             discard_ratio=args.discard_ratio, batch_size=args.batch_size,
                             device=device(args.device), progress=not args.no_progress,
                             overlays=not args.no_overlays, method=args.method, target=args.target,
                             student=student, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as e:
        print(f"rollout-fast rollout: {e}", file=sys.stderr)
        return 1
    _report(res, args.method)
    return 0


def _report(res, method: str) -> None:
    what = "gradient rollout" if method == "grad" else "rollout"
    print(f"{what} of {len(res.files)} image(s) written to {res.out}/")
    print(f"  maps:     {res.npz}")
    print(f"  grid:     {res.grid}")
    if res.overlays:
        print(f"  overlays: {res.out / 'overlays'}/ ({len(res.overlays)} PNG)")
    if res.skipped:
        print(f"skipped {len(res.skipped)} unreadable file(s):")
        for f, why in res.skipped:
            print(f"  {f}: {why}")
