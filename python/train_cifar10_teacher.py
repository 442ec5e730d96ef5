"""Recipe: train the embedded CIFAR-10 teacher and install it as rollout_fast/assets/cifar10-vit.*

Runs the same code as ``rollout-fast train-teacher`` (rollout_fast.teacher.train_teacher) with the
shipped teacher's settings, then copies ``teacher.safetensors`` / ``teacher.json`` into the package's
assets. Resumable: run it again after an interruption and it continues from OUT/last.pt.

    python python/train_cifar10_teacher.py --data ../shared/data/cifar10 --out runs/teacher
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from rollout_fast.teacher import TeacherConfig, train_teacher
from rollout_fast.zoo import EMBEDDED_TEACHERS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/cifar10")
    p.add_argument("--out", default="runs/teacher")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--no-install", action="store_true", help="do not copy into rollout_fast/assets")
    args = p.parse_args()

    out = Path(args.out)
    cfg = TeacherConfig(epochs=args.epochs, workers=args.workers)
    command = (f"rollout-fast train-teacher --data {args.data} --out {args.out} --epochs {args.epochs} "
               f"--workers {args.workers}")
    resume = (out / "last.pt").is_file()
    card = train_teacher(args.data, out, cfg, resume=resume, command=command)
    print(json.dumps({k: card[k] for k in ("test_top1", "test_images")}))
    if not args.no_install:
        dest = EMBEDDED_TEACHERS["cifar10-vit"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "teacher.safetensors", dest.with_suffix(".safetensors"))
        shutil.copyfile(out / "teacher.json", dest.with_suffix(".json"))
        print(f"installed as {dest}.safetensors / .json")


if __name__ == "__main__":
    main()
