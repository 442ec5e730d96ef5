"""Recipe: train an embedded teacher and install it as rollout_fast/assets/NAME.*

Runs the same code as ``rollout-fast train-teacher`` (rollout_fast.teacher.train_teacher) with a named
recipe of rollout_fast.teacher.RECIPES, then copies ``teacher.safetensors`` / ``teacher.json`` into the
package's assets. Resumable: run it again after an interruption and it continues from OUT/last.pt.

    python python/train_teacher.py --recipe cifar10-vit --data ../shared/data/cifar10 --out runs/teacher
    python python/train_teacher.py --recipe imagenette-vit --data ../shared/data/imagenette \
        --out runs/teacher-imagenette
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from rollout_fast.teacher import RECIPES, load_recipe, train_teacher
from rollout_fast.zoo import ASSETS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=sorted(RECIPES), default="cifar10-vit")
    p.add_argument("--data", default=None, help="default: ../shared/data/cifar10 or ../shared/data/imagenette")
    p.add_argument("--out", default=None, help="default: runs/teacher-RECIPE")
    p.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--no-install", action="store_true", help="do not copy into rollout_fast/assets")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    data = args.data or ("../shared/data/imagenette" if args.recipe.startswith("imagenette")
                         else "../shared/data/cifar10")
    out = Path(args.out or f"runs/teacher-{args.recipe}")
    cfg = load_recipe(args.recipe, epochs=args.epochs, workers=args.workers)
    command = (f"rollout-fast train-teacher --recipe {args.recipe} --data {data} --out {out} "
               f"--epochs {cfg.epochs} --workers {cfg.workers}")
    resume = (out / "last.pt").is_file()
    card = train_teacher(data, out, cfg, resume=resume, command=command)
    print(json.dumps({k: card[k] for k in ("test_top1", "test_images")}))
    if not args.no_install:
        dest = ASSETS / cfg.name
        shutil.copyfile(out / "teacher.safetensors", dest.with_suffix(".safetensors"))
        shutil.copyfile(out / "teacher.json", dest.with_suffix(".json"))
        print(f"installed as {dest}.safetensors / .json")


if __name__ == "__main__":
    main()
