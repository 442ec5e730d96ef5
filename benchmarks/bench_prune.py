"""Benchmark of token-pruned inference: images/s of a ViT pruned by each scorer, against the full model.

For each scorer, keep ratio and batch size the pruned model (:func:`rollout_fast.prune_tokens`, the scorer's
cost included) is timed in alternation with the full model (:func:`rollout_fast.prune.measure_speedup`: A B A
B ..., medians), so the speed-up compares runs made under the same machine load; the 'full' row is the median
of those full-model timings. The model is the embedded teacher ``cifar10-vit`` by default and the scorer
``student`` its shipped pruning student (``cifar10-vit-prune``); the images are the first ``--images`` of
``--data`` (an ImageFolder split or a labels.csv folder) or, without it, standard-normal inputs (the speed of
every scorer but the oracles' does not depend on the pixels). ``prune-eval`` measures the same throughput
beside top-1 (benchmarks/RESULTS.md, "Token-pruned inference throughput").

Usage::

    python benchmarks/bench_prune.py                                   # CPU, keep 0.5 and 0.1, batch 1 and 256
    python benchmarks/bench_prune.py --data ../shared/data/cifar10/test --threads 2 --csv benchmarks/prune.csv
    python benchmarks/bench_prune.py --device cuda --batches 1 256 1024
    python benchmarks/bench_prune.py --smoke                            # a tiny random ViT, a few runs
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import sys
from pathlib import Path

import torch

import rollout_fast
from rollout_fast.prune import SCORERS, measure_speedup, measure_throughput


def load(args) -> tuple[torch.nn.Module, torch.Tensor, object]:
    """(model, images, student or None) on ``args.device``."""
    if args.smoke:
        from timm.models import VisionTransformer

        torch.manual_seed(0)
        model = VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, num_classes=10)
        return model.eval().to(args.device), torch.randn(max(args.batches), 3, 32, 32), None
    model, data_config = rollout_fast.load_teacher(args.model, device=args.device)
    if args.data:
        from rollout_fast.data import load_eval_data

        images, _ = load_eval_data(args.data, data_config, args.images)
    else:
        images = torch.randn(args.images, *data_config["input_size"], generator=torch.Generator().manual_seed(0))
    student = None
    if "student" in args.scorers:
        from rollout_fast.students import load_student, pruning_student_name

        student = load_student(args.student or pruning_student_name(args.model))[0]
    return model.eval(), images, student


def run(args) -> list[dict]:
    model, images, student = load(args)
    rows = []
    for bsz in args.batches:
        xb = images.repeat(-(-bsz // images.shape[0]), 1, 1, 1)[:bsz].to(args.device)
        fulls, entries = [], []
        for name in args.scorers:
            for keep in args.keeps:
                pruned = rollout_fast.prune_tokens(model, keep, name, student=student)
                full, ips = measure_speedup(model, pruned, xb, min_time=args.min_time)
                fulls.append(full)
                entries.append({"scorer": name, "keep_ratio": keep, "batch": bsz, "images_per_s": ips,
                                "speedup": ips / full})
        fulls = sorted(fulls) or [measure_throughput(model, xb, min_time=args.min_time)]
        rows += [{"scorer": "full", "keep_ratio": 1.0, "batch": bsz, "images_per_s": fulls[len(fulls) // 2],
                  "speedup": 1.0}, *entries]
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| scorer | keep | batch | images/s | speed-up |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['scorer']} | {r['keep_ratio']} | {r['batch']} | {r['images_per_s']:.1f} | {r['speedup']:.2f}x |"
              for r in rows]
    return "\n".join(lines)


def environment(device: str) -> dict:
    return {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "rollout_fast": rollout_fast.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar10-vit", help="'cifar10-vit', a timm name or a .safetensors")
    p.add_argument("--data", default=None, help="images to time on (default: random inputs)")
    p.add_argument("--images", type=int, default=256, help="images loaded (repeated up to the batch size)")
    p.add_argument("--scorers", nargs="+", default=["random", "cls-attention", "student"], choices=SCORERS)
    p.add_argument("--student", default=None, help="student for scorer 'student' (default: MODEL's pruning student)")
    p.add_argument("--keeps", nargs="+", type=float, default=[0.5, 0.1])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 256])
    p.add_argument("--min-time", type=float, default=1.0, help="seconds per timing (medians of the runs)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--csv", default=None, help="append the rows, with the environment, to this CSV")
    p.add_argument("--smoke", action="store_true", help="a tiny random ViT, batches 1 and 4, no student")
    args = p.parse_args(argv)
    if args.smoke:
        args.batches, args.min_time = [1, 4], 0.0
        args.scorers = [s for s in args.scorers if s != "student"]
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args)
    print(table(rows))
    if args.csv:
        env = environment(args.device)
        path = Path(args.csv)
        new = not path.exists()
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[*rows[0], *env])
            if new:
                w.writeheader()
            w.writerows({**r, **env} for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
