"""The ``rollout-fast`` command line: parse arguments, call the package's API, print."""

from __future__ import annotations

import argparse
import sys


def _cmd_train_teacher(args) -> int:
    from .teacher import load_recipe, train_teacher

    arch = {k: v for k, v in (("img_size", args.img_size), ("patch_size", args.patch_size),
                              ("depth", args.depth), ("embed_dim", args.embed_dim),
                              ("num_heads", args.num_heads), ("drop_path_rate", args.drop_path))
            if v is not None}
    cfg = load_recipe(args.recipe, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, seed=args.seed,
                      workers=args.workers, init_from=args.init_from, augment=args.augment, name=args.name)
    cfg.arch.update(arch)
    card = train_teacher(args.data, args.out, cfg, device=args.device, resume=args.resume,
                         progress=not args.no_progress)
    print(f"{card['eval_split']} top-1 {card['test_top1']:.4f}; weights and card in {args.out}")
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="cifar10-vit",
                   help="'cifar10-vit' (embedded teacher, default), a timm model name, or a "
                        "rollout_fast .safetensors file with its .json card")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--pretrained", action="store_true", help="timm pretrained weights (needs internet)")
    g.add_argument("--checkpoint", help="local weights for a timm model (.safetensors or torch file)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--batch-size", type=int, default=64)


def _device(name: str | None) -> str:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("rollout-fast: --device cuda requested but CUDA is not available")
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _load(args):
    from .zoo import load_teacher

    return load_teacher(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint,
                        device=_device(args.device))


def _cmd_rollout(args) -> int:
    from .jobs import collect_images, rollout_images

    if args.target is not None and args.method != "grad":
        print("rollout-fast rollout: --target CLASS is used only with --method grad", file=sys.stderr)
        return 2
    files = collect_images(args.inputs)
    if not files:
        print("rollout-fast rollout: no image files found in the inputs", file=sys.stderr)
        return 1
    model, data_config = _load(args)
    try:
        student = None
        if args.student is not None:
            from .students import load_student

            student, _ = load_student(args.model if args.student == "auto" else args.student)
        res = rollout_images(files, args.out, model, data_config, head_fusion=args.head_fusion,
                             discard_ratio=args.discard_ratio, batch_size=args.batch_size,
                             device=_device(args.device), progress=not args.no_progress,
                             overlays=not args.no_overlays, method=args.method, target=args.target,
                             student=student)
    except (ValueError, FileNotFoundError) as e:
        print(f"rollout-fast rollout: {e}", file=sys.stderr)
        return 1
    what = "gradient rollout" if args.method == "grad" else "rollout"
    print(f"{what} of {len(res.files)} image(s) written to {res.out}/")
    print(f"  maps:     {res.npz}")
    print(f"  grid:     {res.grid}")
    if res.overlays:
        print(f"  overlays: {res.out / 'overlays'}/ ({len(res.overlays)} PNG)")
    if res.skipped:
        print(f"skipped {len(res.skipped)} unreadable file(s):")
        for f, why in res.skipped:
            print(f"  {f}: {why}")
    return 0


def _cmd_eval_teacher(args) -> int:
    from .data import resolve_split
    from .jobs import evaluate_folder

    model, data_config = _load(args)
    root = resolve_split(args.data, "test")
    acc = evaluate_folder(model, data_config, root, batch_size=args.batch_size,
                          device=_device(args.device), progress=not args.no_progress)
    print(f"top-1 {acc:.4f} on {root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rollout-fast", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train-teacher", help="train a ViT teacher on an ImageFolder dataset")
    t.add_argument("--data", required=True, help="ImageFolder root with train/ and test/ (or val/)")
    t.add_argument("--out", required=True, help="output folder (checkpoints, log, weights, card)")
    t.add_argument("--recipe", default="cifar10-vit",
                   help="cifar10-vit (default) | imagenette-vit | a JSON file of TeacherConfig fields; "
                        "the options below override it")
    t.add_argument("--name", default=None, help="model name recorded in the card")
    t.add_argument("--epochs", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--weight-decay", type=float, default=None)
    t.add_argument("--warmup-epochs", type=float, default=None)
    t.add_argument("--augment", choices=["crop-pad", "rrc"], default=None,
                   help="crop-pad: random crop with 4 px padding + flip; rrc: RandomResizedCrop + flip")
    t.add_argument("--img-size", type=int, default=None)
    t.add_argument("--patch-size", type=int, default=None)
    t.add_argument("--depth", type=int, default=None)
    t.add_argument("--embed-dim", type=int, default=None)
    t.add_argument("--num-heads", type=int, default=None)
    t.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate")
    t.add_argument("--init-from", default=None, metavar="WEIGHTS",
                   help="start from these teacher weights (.safetensors) instead of a random init")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--workers", type=int, default=None)
    t.add_argument("--device", choices=["cpu", "cuda"], default=None)
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_cmd_train_teacher)

    r = sub.add_parser("rollout", help="attention rollout maps, overlays and a grid for images")
    r.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders")
    r.add_argument("--out", required=True, help="output folder")
    _add_model_args(r)
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
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=_cmd_rollout)

    e = sub.add_parser("eval-teacher", help="top-1 accuracy of a teacher on an ImageFolder split")
    e.add_argument("--data", required=True, help="ImageFolder split (or a root holding test/)")
    _add_model_args(e)
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=_cmd_eval_teacher)

    from .distill import add_distill_parser
    from .prune import add_prune_eval_parser

    add_distill_parser(sub)  # distill: train a student to predict the teacher's rollout
    add_prune_eval_parser(sub)  # prune-eval: top-1 and throughput of token-pruned inference
    return p


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
