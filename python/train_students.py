"""Recipe: distil rollout-predicting students from the embedded CIFAR-10 teacher, tabulate, ship the best.

Trains the students below on CIFAR-10 train against ``cifar10-vit``'s attention rollout (``--target
grad-rollout``: its gradient rollout for the predicted class, the pruning student's target; one shared
cache of teacher maps), evaluates each on the 10,000 test images (centred and shifted for the
object-placement test) next to the centre-prior, mean-map and uniform baselines, writes
``OUT/results.json`` and the README table ``OUT/RESULTS.md``, draws ``OUT/grid.png`` (input | teacher
rollout | student prediction), and installs the best student within 10% of the teacher's multiply-adds
as ``rollout_fast/assets/cifar10-vit-student.safetensors`` + ``.json`` (loaded by
``rollout_fast.load_student("cifar10-vit")``), or as the shipped student named by
``--install-as`` (the second command: the pruning student ``cifar10-vit-prune``). Resumable: run it
again after an interruption.

    python python/train_students.py --data ../shared/data/cifar10 --out runs/students
    python python/train_students.py --data ../shared/data/cifar10 --out runs/students-prune \
        --target grad-rollout --only resnet-cifar-lowres-f2 --install-as cifar10-vit-prune

Every run goes through the public API (``rollout_fast.distill.distill``, the code behind
``rollout-fast distill``). Backbones are trained from scratch (timm's pretrained weights cannot be
downloaded here), so each run is one phase at lr 2e-3 (``head_epochs=0``, ``finetune_lr_scale=1``);
``rollout-fast distill``'s default two-phase schedule (frozen backbone, then lr/10) is for
``--pretrained`` backbones. Sized for a 2-core CPU (about 30 minutes, 1 thread per run; runs can be
split over processes with ``--only`` and a final ``--only none`` call tabulates and installs); on a
GPU raise ``--epochs-scale``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from rollout_fast.distill import DistillConfig, distill
from rollout_fast.zoo import EMBEDDED_STUDENTS

# name, student, strategy, factor, epochs (phase 2), extra config
RUNS = [
    ("resnet-cifar-lowres-f2", "resnet-cifar", "lowres", 2, 15, {}),
    ("resnet-cifar-lowres-f4", "resnet-cifar", "lowres", 4, 8, {}),
    ("vit-tiny-lowres-f2", "vit-tiny", "lowres", 2, 4, {}),
    ("resnet18-lowres-f4", "resnet", "lowres", 4, 1, {}),
    ("resnet-cifar-downsize-f2", "resnet-cifar", "downsize", 2, 1, {}),
    ("vit-tiny-mask-f2", "vit-tiny", "mask", 2, 1, {}),
]
MAX_RELATIVE_MACS = 0.10


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def table(rows: list[dict]) -> str:
    """The README table (markdown) from the runs' metrics.json contents."""
    head = ("| student | strategy | factor | train images × epochs | KLD ↓ | CC | SIM | top-25% recall | top-50% recall | "
            "top-75% recall | Spearman | CC shifted (drop) | params | MACs/image (vs teacher) | "
            "latency b=1 (vs teacher rollout) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        c, s, cost = r["centred"], r["object_placement"], r["cost"]
        st = cost["student"]
        tr = r.get("training", {})
        data = f"{(tr.get('train_images') or 50000) // 1000}k × {tr.get('epochs', '?')}"
        lines.append(
            f"| {r['name']}{r.get('mark', '')} | {r['student']['strategy']} | {r['student']['factor']} | {data} | "
            f"{c['kld']:.3f} | "
            f"{c['cc']:.3f} | {c['sim']:.3f} | {c['recall@0.25']:.3f} | {c['recall@0.5']:.3f} | "
            f"{c['recall@0.75']:.3f} | {c['spearman']:.3f} | {s['cc_shifted']:.3f} ({s['cc_drop']:+.3f}) | "
            f"{st['params'] / 1e6:.2f} M | {st['macs_per_image'] / 1e6:.1f} M "
            f"({_pct(cost['macs_relative_to_teacher_forward'])}) | {st['latency_ms_batch1']:.2f} ms "
            f"({_pct(cost['latency_relative_to_teacher_rollout_batch1'])}) |")
    base = rows[0]["baselines"]
    for name, label in (("centre_prior", "centre prior (fitted Gaussian)"), ("mean_map", "mean teacher map"),
                        ("uniform", "uniform")):
        c, sh = base[name]["centred"], base[name]["shifted"]
        lines.append(f"| *{label}* | - | - | - | {c['kld']:.3f} | {c['cc']:.3f} | {c['sim']:.3f} | "
                     f"{c['recall@0.25']:.3f} | {c['recall@0.5']:.3f} | {c['recall@0.75']:.3f} | "
                     f"{c['spearman']:.3f} | {sh['cc']:.3f} ({c['cc'] - sh['cc']:+.3f}) | 0 | 0 | - |")
    t = rows[0]["cost"]["teacher_rollout"]
    lines.append(f"| *teacher rollout (cifar10-vit)* | - | - | - | 0 | 1 | 1 | 1 | 1 | 1 | 1 | 1 | "
                 f"{t['params'] / 1e6:.2f} M | {t['forward_macs_per_image'] / 1e6:.1f} M (100%) | "
                 f"{t['latency_ms_batch1']:.2f} ms (100%) |")
    return "\n".join(lines)


def targets(best: dict) -> list[str]:
    """The issue's targets for the shipped student, checked against its metrics."""
    c, base = best["centred"], best["baselines"]
    out = [f"top-50% recall >= 0.80: {c['recall@0.5']:.3f} -> {'met' if c['recall@0.5'] >= 0.80 else 'NOT met'}"]
    worse = []
    for name, b in base.items():
        bc = b["centred"]
        for k in ("cc", "sim", "recall@0.25", "recall@0.5", "recall@0.75", "spearman"):
            if not c[k] > bc[k]:
                worse.append(f"{k} vs {name} ({c[k]:.3f} <= {bc[k]:.3f})")
        if not c["kld"] < bc["kld"]:
            worse.append(f"kld vs {name} ({c['kld']:.3f} >= {bc['kld']:.3f})")
    out.append("better than every baseline on every metric: " + ("met" if not worse else "NOT met: " + "; ".join(worse)))
    rel = best["cost"]["macs_relative_to_teacher_forward"]
    out.append(f"<= 10% of the teacher's MACs: {_pct(rel)} -> {'met' if rel <= MAX_RELATIVE_MACS else 'NOT met'}")
    op = best["object_placement"]
    out.append(f"object placement (CC drop <= 0.05): {op['cc_centred']:.3f} -> {op['cc_shifted']:.3f} "
               f"(drop {op['cc_drop']:+.3f}) -> {'met' if op['passed'] else 'NOT met'}")
    return out


def _row(name: str, folder: Path, mark: str = "") -> dict:
    card = json.loads((folder / "student.json").read_text())
    return {"name": name, **json.loads((folder / "metrics.json").read_text()), "training": card["training"],
            "mark": mark}


def figure(best_dir: Path, data: str, path: Path, n: int = 8) -> None:
    """input | teacher rollout | student prediction for the first test image of each of n classes."""
    import torch
    from timm.data import create_transform

    from rollout_fast import AttentionRollout, load_student, load_teacher
    from rollout_fast.data import image_folder, resolve_split
    from rollout_fast.viz import denormalize, save_grid

    student, card = load_student(str(best_dir / "student.safetensors"))
    teacher, dc = load_teacher("cifar10-vit")
    ds = image_folder(resolve_split(data, "test"), create_transform(**dc))
    per_class = {}
    for i, (_, y) in enumerate(ds.samples):
        per_class.setdefault(y, i)
    idx = list(per_class.values())[:n]
    x = torch.stack([ds[i][0] for i in idx])
    r = card["rollout"]
    if r.get("target", "rollout") == "rollout":
        t_maps = AttentionRollout(teacher, head_fusion=r["head_fusion"], discard_ratio=r["discard_ratio"])(x)
    else:
        t_maps = AttentionRollout(teacher, discard_ratio=r["discard_ratio"]).grad_rollout(x)
    s_maps = student.maps(x)
    save_grid(list(denormalize(x, dc["mean"], dc["std"])), [m.numpy() for m in t_maps], path,
              titles=[ds.classes[ds.samples[i][1]] for i in idx],
              extra=[("student", [m.numpy() for m in s_maps])])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/cifar10")
    p.add_argument("--out", default="runs/students")
    p.add_argument("--train-images", type=int, default=None,
                   help="train on a seeded subset of CIFAR-10 train (default: all 50,000)")
    p.add_argument("--views", type=int, default=2, help="cached teacher-map views (view 0 unaugmented)")
    p.add_argument("--epochs-scale", type=float, default=1.0)
    p.add_argument("--target", default="rollout", choices=["rollout", "grad-rollout"],
                   help="teacher maps: attention rollout, or gradient rollout of the predicted class")
    p.add_argument("--head-fusion", default="mean")
    p.add_argument("--discard-ratio", type=float, default=0.0)
    p.add_argument("--max-shift", type=int, default=8, help="augmentation: max translation (px)")
    p.add_argument("--only", nargs="*", default=None, help="run only these names")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-install", action="store_true")
    p.add_argument("--install-as", default="cifar10-vit", choices=sorted(EMBEDDED_STUDENTS),
                   help="the shipped student to replace (cifar10-vit-prune: the pruning student, trained with "
                        "--target grad-rollout --only resnet-cifar-lowres-f2)")
    p.add_argument("--fallback", type=Path, default=None,
                   help="with --only: take runs missing from OUT from this earlier output folder (marked †)")
    return p.parse_args(argv)


def train_runs(args: argparse.Namespace, out: Path) -> list[dict]:
    """Distil every run of RUNS (or those of --only; the others are read from OUT or --fallback); their rows."""
    cache = out / "cache"
    rows = []
    for name, student, strategy, factor, epochs, extra in RUNS:
        if args.only and name not in args.only:
            if (out / name / "metrics.json").is_file():
                rows.append(_row(name, out / name))
            elif args.fallback and (args.fallback / name / "metrics.json").is_file():
                rows.append(_row(name, args.fallback / name, " †"))
            continue
        cfg = DistillConfig(teacher="cifar10-vit", student=student, strategy=strategy, factor=factor,
                            loss="kld", target=args.target, head_fusion=args.head_fusion,
                            discard_ratio=args.discard_ratio,
                            head_epochs=0, epochs=max(1, round(epochs * args.epochs_scale)), batch_size=128,
                            lr=2e-3, finetune_lr_scale=1.0, warmup_epochs=0.3, cache_targets=True,
                            views=args.views, max_shift=args.max_shift, train_images=args.train_images, val_images=2000,
                            workers=args.workers, **extra)
        command = (f"rollout-fast distill --teacher cifar10-vit --student {student} --strategy {strategy} "
                   f"--factor {factor} --data {args.data} --out {out / name} --target {args.target} "
                   f"--head-fusion {args.head_fusion} "
                   f"--discard-ratio {args.discard_ratio} --head-epochs 0 --epochs {cfg.epochs} "
                   f"--finetune-lr-scale 1 --warmup-epochs 0.3 --cache-targets --views {args.views} "
                   f"--max-shift {args.max_shift} "
                   + (f"--train-images {args.train_images} " if args.train_images else "")
                   + f"--cache-dir {cache}")
        resume = (out / name / "last.pt").is_file()
        print(f"== {name}: {command}", flush=True)
        distill(args.data, out / name, cfg, resume=resume, cache_dir=cache, command=command)
        rows.append(_row(name, out / name))
    return rows


def results_md(args: argparse.Namespace, rows: list[dict], best: dict) -> list[str]:
    """OUT/RESULTS.md: the table, the recipe, the shipped student and its targets."""
    what = (f"rollout: head fusion {args.head_fusion}" if args.target == "rollout" else
            "gradient rollout of the predicted class")
    md = [f"Students of `cifar10-vit` ({what}, discard ratio "
          f"{args.discard_ratio}), CIFAR-10 test (10,000 images); *CC shifted*: every test image moved "
          f"{best['object_placement']['shift_pixels']} px diagonally (object-placement test).", "",
          table(rows), "",
          f"Teacher maps cached for {args.views} views of the training set (view 0 as is, the others randomly "
          f"shifted by up to {args.max_shift} px and flipped); backbones from scratch, one phase of AdamW at "
          "lr 2e-3 with warm-up + cosine, batch 128, KLD loss; MACs counted with torch.utils.flop_counter "
          "(FLOPs / 2), latency at batch 1 with torch's CPU threads. Baseline recall breaks the constant map's ties "
          "at random (chance level)."]
    if any(r.get("mark") for r in rows):
        md += ["", f"† from an earlier, shorter pass of this recipe ({args.fallback}: 25,000-image subset, "
               "fewer epochs); the other rows are from the full training set."]
    return md + ["", f"Shipped: **{best['name']}**.", ""] + [f"- {t}" for t in targets(best)]


def install(best: dict, best_dir: Path, as_name: str) -> None:
    """Copy the best run's weights and card into rollout_fast/assets as the shipped student ``as_name``."""
    dest = EMBEDDED_STUDENTS[as_name]
    size = (best_dir / "student.safetensors").stat().st_size
    if size > 5 * 2 ** 20:
        raise SystemExit(f"{best['name']} is {size / 2 ** 20:.1f} MB > 5 MB: not installed")
    card = json.loads((best_dir / "student.json").read_text())
    card.update(name=dest.name, teacher="cifar10-vit", run=best["name"])
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(best_dir / "student.safetensors", dest.with_suffix(".safetensors"))
    dest.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"installed {best['name']} as {dest}.safetensors / .json ({size / 1e6:.2f} MB)")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # distill's line per epoch
    args = parse_args()
    out = Path(args.out)
    rows = train_runs(args, out)
    if not rows:
        raise SystemExit("no runs")
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    eligible = [r for r in rows if r["cost"]["macs_relative_to_teacher_forward"] <= MAX_RELATIVE_MACS]
    best = max(eligible or rows, key=lambda r: r["centred"]["recall@0.5"])
    md = results_md(args, rows, best)
    (out / "RESULTS.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    best_dir = out / best["name"]
    try:
        figure(best_dir, args.data, out / "grid.png")
    except Exception as e:  # the table matters more than the figure
        print(f"figure skipped: {type(e).__name__}: {e}")
    if not args.no_install:
        install(best, best_dir, args.install_as)

if __name__ == "__main__":
    main()
