"""Benchmark of the main job, ``rollout-fast rollout``: images/s of the whole job and of each of its stages on real
images.

Stages, each timed alone on the same N files: **decode + transform** (the DataLoader pipeline,
:mod:`rollout_fast.pipeline`, ``--workers``), **forward + rollout** (:class:`rollout_fast.AttentionRollout` on the
decoded batches), **write** (the maps as ``rollout.npz``; as float16 shards + index; the overlay PNGs of every
image through the writer threads). Whole jobs: :func:`rollout_fast.jobs.rollout_images` with ``--overlays none``
and ``all``, and :func:`rollout_fast.shard_job.rollout_shards` (float16, ``--overlays none`` and ``sample``).
The ``vs d+f`` column is the job's time over decode + forward + rollout alone (issue 19's targets: <= 1.3 without
overlays, <= 2 with every overlay). A small job runs first (imports, matplotlib, the overlay frame), so every
figure is warm; the jobs' fixed costs (the grid figure, the manifest's weight hash) remain in theirs.

Data (each when present, else skipped with a note): ``../shared/data/cifar10/test`` with the embedded teacher
``cifar10-vit``, ``../shared/data/imagenette/val`` with ``--imagenette-model`` (default: the embedded teacher
``imagenette-vit``). The N files are spread evenly over each sorted folder (all classes).

Usage::

    python benchmarks/bench_main_job.py --images 2000                 # the issue's sizes: 2,000 CIFAR-10 images,
    python benchmarks/bench_main_job.py --images 1000 --only imagenette   # ... and 1,000 Imagenette photos
    python benchmarks/bench_main_job.py --images 32 --threads 2       # a quick check
    python benchmarks/bench_main_job.py --device cuda --workers 8 --batch-size 256 --precision bf16
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spread(files: list, n: int) -> list:
    """``n`` of the sorted ``files``, evenly spread (every class of an ImageFolder)."""
    return files if n >= len(files) else [files[int(i * len(files) / n)] for i in range(n)]


def datasets(args) -> list[tuple[str, Path, str | None]]:
    """``(name, folder, model)`` of each data set to time (model None: skipped, with the reason printed)."""
    out = []
    if args.only in (None, "cifar10"):
        out.append(("cifar10", Path(args.cifar10), "cifar10-vit"))
    if args.only in (None, "imagenette"):
        out.append(("imagenette", Path(args.imagenette), args.imagenette_model))
    return out


def _timed(fn, device) -> tuple[float, object]:
    _sync(device)
    t = time.perf_counter()
    res = fn()
    _sync(device)
    return time.perf_counter() - t, res


def stages(files, model, data_config, args, device, tmp: Path) -> list[tuple[str, float]]:
    """(stage, seconds) of decode + transform, forward + rollout and the writes, each on all of ``files``."""
    from timm.data import create_transform

    from rollout_fast.explain import AttentionRollout
    from rollout_fast.overlay_queue import OverlayQueue
    from rollout_fast.pipeline import explain_batch, image_batches, plan_batches, precision_setup
    from rollout_fast.shards import write_shard
    from rollout_fast.viz import denormalize

    plan = plan_batches(len(files), args.batch_size)
    t_decode, batches = _timed(lambda: [b for b in image_batches(files, create_transform(**data_config), plan,
                                                                   device=device, workers=args.workers, warn=False)],
                               device)
    run_model, autocast, input_dtype = precision_setup(model, device, args.precision)
    explainer = AttentionRollout(run_model)
    explain_batch(explainer, batches[0].images[:1], "attention", None, autocast, input_dtype)  # warm-up
    t_forward, out = _timed(lambda: [explain_batch(explainer, b.images, "attention", None, autocast, input_dtype)
                                     for b in batches if b.images is not None], device)
    maps = torch.cat([m for m, _ in out]).cpu().numpy()
    t_npz, _ = _timed(lambda: np.savez(tmp / "maps.npz", maps=maps, files=np.array([str(f) for f in files])), device)

    def shards():
        manifest = {"num_shards": 0, "shard_size": args.shard_size, "grid": list(maps.shape[1:]), "dtype": "float16",
                    "method": "attention"}
        for k, s in enumerate(range(0, len(maps), args.shard_size)):
            rows = list(range(min(args.shard_size, len(maps) - s)))
            write_shard(tmp / "shards", k, {"files": [str(f) for f in files[s:s + len(rows)]], "row": rows,
                                            "reason": [None] * len(rows), "predicted_class": [0] * len(rows),
                                            "probability": [1.0] * len(rows)}, maps[s:s + len(rows)], "float16")
            manifest["num_shards"] = k + 1
        return manifest

    t_shards, _ = _timed(shards, device)

    def overlays():
        queue, i = OverlayQueue(), 0
        for b in batches:
            if b.images is None:
                continue
            imgs = denormalize(b.images, data_config["mean"], data_config["std"])
            for img in imgs:
                queue.submit(img, maps[i], tmp / "overlays" / f"{i:05d}.png", f"{i}")
                i += 1
            queue.collect()
        queue.collect(wait=True)
        queue.close()

    t_overlays, _ = _timed(overlays, device)
    return [("decode + transform", t_decode), ("forward + rollout", t_forward), ("write rollout.npz", t_npz),
            ("write float16 shards", t_shards), ("write overlays (all)", t_overlays)]


def warm_up(files, model, data_config, args, device, tmp: Path) -> None:
    """One small job first (imports, matplotlib, the overlay frame, the grid), so every timing below is warm."""
    from rollout_fast.jobs import rollout_images

    rollout_images(files[:2], tmp / "warm-up", model, data_config, batch_size=2, device=device, progress=False,
                   precision=args.precision)


def jobs(files, model, data_config, args, device, tmp: Path) -> list[tuple[str, float]]:
    """(job, seconds) of the whole jobs on ``files``."""
    from rollout_fast.jobs import rollout_images
    from rollout_fast.shard_job import rollout_shards

    common = {"batch_size": args.batch_size, "device": device, "progress": False, "workers": args.workers,
              "precision": args.precision}
    rows = []
    for mode in ("none", "all"):
        t, _ = _timed(lambda m=mode: rollout_images(files, tmp / f"npz-{m}", model, data_config, overlays=m,
                                                    **common), device)
        rows.append((f"job: rollout.npz, overlays {mode}", t))
    for mode in ("none", "sample"):
        t, _ = _timed(lambda m=mode: rollout_shards(files, tmp / f"shards-{m}", model, data_config, overlays=m,
                                                    shard_size=args.shard_size, dtype="float16", **common), device)
        rows.append((f"job: --shards float16, overlays {mode}", t))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000, help="images per data set (spread over the folder)")
    p.add_argument("--only", choices=["cifar10", "imagenette"], default=None)
    p.add_argument("--cifar10", default=str(SHARED / "cifar10" / "test"))
    p.add_argument("--imagenette", default=str(SHARED / "imagenette" / "val"))
    p.add_argument("--imagenette-model", default="imagenette-vit",
                   help="teacher for Imagenette (an embedded name, .safetensors + card, timm name)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=4096)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--keep", default=None, help="write the outputs here (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from rollout_fast.jobs import collect_images
    from rollout_fast.zoo import load_teacher

    print(f"# bench_main_job: {platform.node()} {platform.processor() or platform.machine()}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, device {device}, batch {args.batch_size}, "
          f"workers {args.workers}, {args.precision}")
    print("| data | model | images | what | seconds | images/s | vs d+f |")
    print("|---|---|---:|---|---:|---:|---:|")
    for name, folder, model_name in datasets(args):
        if not folder.is_dir() or model_name is None:
            why = f"no folder {folder}" if not folder.is_dir() else "no model"
            print(f"| {name} | - | - | skipped: {why} | | | |")
            continue
        files = spread(collect_images([folder]), args.images)
        model, data_config = load_teacher(model_name, device=device)
        tmp = Path(args.keep or tempfile.mkdtemp(prefix="bench_main_job.")) / name
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            warm_up(files, model, data_config, args, device, tmp)
            rows = stages(files, model, data_config, args, device, tmp)
            base = rows[0][1] + rows[1][1]
            rows += [("decode + forward + rollout (sum)", base)] + jobs(files, model, data_config, args, device, tmp)
        finally:
            if not args.keep:
                shutil.rmtree(tmp.parent, ignore_errors=True)
        for what, t in rows:
            ratio = f"{t / base:.2f}" if what.startswith("job") else ""
            print(f"| {name} | {Path(model_name).name} | {len(files)} | {what} | {t:.2f} | {len(files) / t:.1f} | "
                  f"{ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
