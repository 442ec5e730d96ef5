"""Recipe: Learn to Pay Attention (Jetley et al., ICLR 2018) variants and the plain VGG baseline at an equal
budget, through the one classifier trainer (``rollout-fast train-teacher``'s code), then a results table.

Every variant trains with the same recipe (rollout_fast.teacher.RECIPES["cifar10-ltpa"] or
["imagenette-ltpa"]: SGD 0.1, momentum 0.9, weight decay 5e-4, step decay, crop + flip), only
``arch["variant"]`` differs. Each run is resumable (run the script again after an interruption). With
``--install`` the best attention variant is copied into rollout_fast/assets as the recipe's name.

    python python/train_ltpa.py --recipe cifar10-ltpa --out runs/ltpa-cifar10
    python python/train_ltpa.py --recipe cifar10-ltpa --out runs/ltpa-cifar10 --only vgg,pc-softmax-after
    python python/train_ltpa.py --recipe cifar100-ltpa --download --out runs/ltpa-cifar100   # online
    python python/train_ltpa.py --recipe cifar10-ltpa-thumb --out runs/ltpa-cifar10-thumb --only pc-softmax-after \
        --install   # the teacher-free token scorer (prune-eval --scorers ltpa --scorer-model cifar10-ltpa-thumb)
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from rollout_fast.data import download_cifar100
from rollout_fast.ltpa import LTPA_VARIANTS
from rollout_fast.models import create_model
from rollout_fast.students import count_macs
from rollout_fast.teacher import load_recipe, train_teacher
from rollout_fast.zoo import ASSETS

DEFAULT_DATA = {"cifar10": "../shared/data/cifar10", "imagenette": "../shared/data/imagenette",
                "cifar100": "data/cifar100"}
VARIANTS = ("vgg", "pc-softmax-after", "pc-sigmoid-after", "dp-softmax-after", "dp-sigmoid-after",
            "pc-softmax-before")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="cifar10-ltpa",
                   choices=["cifar10-ltpa", "cifar100-ltpa", "imagenette-ltpa", "cifar10-ltpa-thumb",
                            "imagenette-ltpa-thumb"],
                   help="the -thumb recipes train on the pruning students' thumbnail (16 / 28 px)")
    p.add_argument("--data", default=None,
                   help="default: ../shared/data/cifar10, ../shared/data/imagenette or data/cifar100")
    p.add_argument("--download", action="store_true",
                   help="cifar100-ltpa: download CIFAR-100 with torchvision into --data first (internet)")
    p.add_argument("--out", default=None, help="default: runs/RECIPE")
    p.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants")
    p.add_argument("--epochs", type=int, default=None,
                   help="default: the recipe's; the step-decay epochs scale with it (15 -> 30: x0.1 at 16 and 24)")
    p.add_argument("--width", type=float, default=None, help="default: the recipe's")
    p.add_argument("--install", action="store_true", help="copy the best attention variant into assets/")
    args = p.parse_args()
    args.variants = [v for v in args.only.split(",") if v]
    unknown = [v for v in args.variants if v not in LTPA_VARIANTS]
    if unknown:
        p.error(f"--only: unknown variants {unknown}; known: {LTPA_VARIANTS}")
    return args


def train_variants(args, data: str, out: Path) -> list[dict]:
    """Train (or resume, or skip when finished) every requested variant; then one result row for every finished
    variant in ``out`` (those of earlier ``--only`` calls too), in :data:`VARIANTS` order."""
    for variant in args.variants:
        cfg = with_epochs(load_recipe(args.recipe), args.epochs)
        cfg.arch.update(variant=variant, **({"width": args.width} if args.width else {}))
        run = out / variant
        if not (run / "teacher.json").is_file():
            command = (f"python python/train_ltpa.py --recipe {args.recipe} --data {data} --out {out} "
                       f"--only {variant} --epochs {cfg.epochs}" + (f" --width {args.width}" if args.width else ""))
            train_teacher(data, run, cfg, resume=(run / "last.pt").is_file(), command=command)
    return [_result_row(out / v, v) for v in VARIANTS if (out / v / "teacher.json").is_file()]


def with_epochs(cfg, epochs: int | None):
    """``cfg`` trained for ``epochs`` (None: unchanged), its step-decay epochs scaled in proportion."""
    if epochs is None or epochs == cfg.epochs:
        return cfg
    if epochs < 1:
        raise ValueError(f"--epochs: expected a positive number of epochs, got {epochs}")
    steps = tuple(max(1, round(e * epochs / cfg.epochs)) for e in cfg.step_epochs)
    return replace(cfg, epochs=epochs, step_epochs=steps)


def _result_row(run: Path, variant: str) -> dict:
    card = json.loads((run / "teacher.json").read_text())
    with open(run / "log.csv") as f:
        log = list(csv.DictReader(f))
    model = create_model(card["arch"]).eval()
    size = card["arch"]["img_size"]
    return {"variant": variant, "top1": card["test_top1"], "images": card["test_images"],
            "params": sum(p.numel() for p in model.parameters()),
            "macs": count_macs(model, torch.zeros(1, 3, size, size)),
            "train_minutes": round(sum(float(r["seconds"]) for r in log) / 60, 1), "epochs": len(log),
            "run": str(run)}


def results_md(rows: list[dict]) -> str:
    lines = ["| variant | top-1 | params | MACs/image | epochs | training time |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['top1']:.4f} | {r['params'] / 1e6:.2f} M | {r['macs'] / 1e6:.1f} M | "
                     f"{r['epochs']} | {r['train_minutes']} min |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data = args.data or DEFAULT_DATA[args.recipe.split("-")[0]]
    if args.download:
        if args.recipe != "cifar100-ltpa":
            raise SystemExit(f"--download: only for --recipe cifar100-ltpa (got {args.recipe})")
        download_cifar100(data)
    out = Path(args.out or f"runs/{args.recipe}")
    rows = train_variants(args, data, out)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "results.md").write_text(results_md(rows))
    print(results_md(rows))
    attention = [r for r in rows if r["variant"] != "vgg"]
    if args.install and attention:
        best = max(attention, key=lambda r: r["top1"])
        dest = ASSETS / load_recipe(args.recipe).name
        shutil.copyfile(Path(best["run"]) / "teacher.safetensors", dest.with_suffix(".safetensors"))
        shutil.copyfile(Path(best["run"]) / "teacher.json", dest.with_suffix(".json"))
        print(f"installed {best['variant']} as {dest}.safetensors / .json")


if __name__ == "__main__":
    main()
