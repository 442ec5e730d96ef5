"""How much of a teacher's rollout map a thumbnail carries: the teacher's own rollout of the image
down-sampled to the students' thumbnail and up-sampled back, scored against its rollout of the full image
with the students' metrics (KLD, CC, SIM, top-k recall, Spearman). A reference point for the students'
table: the teacher itself, shown only what a student sees.

    python python/student_ceiling.py --teacher imagenette-vit --data ../shared/data/imagenette/val \
        --sizes 28,56 --limit 1000

Prints one row per thumbnail size (and the full image, which scores 1 by construction).
"""

from __future__ import annotations

import argparse

import torch

from rollout_fast import AttentionRollout, load_teacher
from rollout_fast.data import load_eval_data
from rollout_fast.metrics import MapMetrics
from rollout_fast.students.inputs import resize


def thumbnail_round_trip(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) -> the same shape, through a (size x size) thumbnail (bilinear, antialiased when shrinking: the
    students' ``lowres`` input)."""
    return resize(resize(images, (size, size)), tuple(images.shape[-2:]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="imagenette-vit")
    p.add_argument("--data", default="../shared/data/imagenette/val")
    p.add_argument("--sizes", default="28,56", help="thumbnail sides in pixels")
    p.add_argument("--limit", type=int, default=1000, help="images (evenly spread over the folder)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, cfg = load_teacher(args.teacher)
    images, _ = load_eval_data(args.data, cfg, args.limit)
    explainer = AttentionRollout(model, head_fusion="mean", discard_ratio=0.0)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    metrics = {s: MapMetrics() for s in sizes}
    with torch.inference_mode():
        for i in range(0, images.shape[0], args.batch_size):
            x = images[i:i + args.batch_size]
            target = explainer(x)
            for s in sizes:
                metrics[s].update(explainer(thumbnail_round_trip(x, s)), target)
    print(f"{args.teacher}: rollout of a thumbnail (up-sampled back) vs rollout of the image, "
          f"{images.shape[0]} images of {args.data}")
    for s in sizes:
        row = metrics[s].compute()
        print(f"{s:4d} px  " + "  ".join(f"{k} {v:.4f}" for k, v in row.items() if not k.startswith("images")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
