"""``rollout-fast train-teacher``: train a classifier (a ViT teacher, or a Learn to Pay Attention model) on an
ImageFolder dataset."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    t = subparsers.add_parser("train-teacher", help="train a ViT teacher (or an LTPA classifier) on an ImageFolder")
    t.add_argument("--data", required=True, help="ImageFolder root with train/ and test/ (or val/)")
    t.add_argument("--out", required=True, help="output folder (checkpoints, log, weights, card)")
    t.add_argument("--recipe", default="cifar10-vit",
                   help="cifar10-vit (default) | imagenette-vit | cifar10-ltpa | cifar100-ltpa | imagenette-ltpa "
                        "| cifar10-ltpa-thumb | imagenette-ltpa-thumb | imagenette-resnet18 | a JSON file of "
                        "TeacherConfig fields; the options below override it")
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
    t.add_argument("--arch", action="append", default=[], metavar="KEY=VALUE",
                   help="any other architecture argument (VALUE read as JSON, else a string), e.g. "
                        "--arch variant=dp-sigmoid-after --arch width=0.25; repeatable")
    t.add_argument("--init-from", default=None, metavar="WEIGHTS",
                   help="start from these teacher weights (.safetensors) instead of a random init")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--workers", type=int, default=None)
    t.add_argument("--device", choices=["cpu", "cuda"], default=None)
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..teacher import load_recipe, train_teacher
    from .common import key_values

    arch = {k: v for k, v in (("img_size", args.img_size), ("patch_size", args.patch_size),
                              ("depth", args.depth), ("embed_dim", args.embed_dim),
                              ("num_heads", args.num_heads), ("drop_path_rate", args.drop_path))
            if v is not None}
    arch.update(key_values(args.arch, "--arch"))
    cfg = load_recipe(args.recipe, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, seed=args.seed,
                      workers=args.workers, init_from=args.init_from, augment=args.augment, name=args.name)
    cfg.arch.update(arch)
    card = train_teacher(args.data, args.out, cfg, device=args.device, resume=args.resume,
                         progress=not args.no_progress)
    print(f"{card['eval_split']} top-1 {card['test_top1']:.4f}; weights and card in {args.out}")
    return 0

