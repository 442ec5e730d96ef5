"""Recipe: distil rollout-predicting students from an embedded teacher, tabulate, ship the best.

``--teacher cifar10-vit`` (the default): trains the students of :data:`RUNS` on CIFAR-10 train against
``cifar10-vit``'s attention rollout (``--target grad-rollout``: its gradient rollout for the predicted class,
the pruning student's target; one shared cache of teacher maps), evaluates each on the 10,000 test images
(centred and shifted for the object-placement test) next to the centre-prior, mean-map and uniform baselines,
writes ``OUT/results.json`` and the README table ``OUT/RESULTS.md``, draws ``OUT/grid.png`` (input | teacher
rollout | student prediction), and installs the best student within 10% of the teacher's multiply-adds as
``rollout_fast/assets/cifar10-vit-student.safetensors`` + ``.json`` (loaded by
``rollout_fast.load_student("cifar10-vit")``), or as the shipped student named by ``--install-as`` (the second
command: the pruning student ``cifar10-vit-prune``). Resumable: run it again after an interruption.

    python python/train_students.py --data ../shared/data/cifar10 --out runs/students
    python python/train_students.py --data ../shared/data/cifar10 --out runs/students-prune \
        --target grad-rollout --only resnet-cifar-lowres-f2 --install-as cifar10-vit-prune

``--teacher imagenette-vit`` (issue 13): the same against the Imagenette teacher (112 px, 14 x 14 patches + class
token) with :data:`IMAGENETTE_RUNS` (28 and 56 px thumbnails, resnet-cifar-style and vit-tiny students sized to
at most 10% of the teacher's multiply-adds, plus the default-width resnet-cifar at 56 px as an over-budget
reference), trained on the 9,469 train photos and evaluated on the 3,925 val photos (``val/``, decoded as the
teacher's eval transform: resize to 128, centre 112); installs ``imagenette-vit`` (rollout) or
``imagenette-vit-prune`` (gradient rollout, ``--install-as``). ``--teacher-weights`` reads the teacher from a
``.safetensors`` with its card instead of the installed one (before installation; the tests' tiny teacher).

    python python/train_students.py --teacher imagenette-vit --out runs/students-imagenette
    python python/train_students.py --teacher imagenette-vit --out runs/students-imagenette-prune \
        --target grad-rollout --only resnet-cifar-lowres-f4 resnet-cifar-w16-lowres-f2 \
        --install-as imagenette-vit-prune

Every run goes through the public API (``rollout_fast.distill.distill``, the code behind
``rollout-fast distill``). Backbones are trained from scratch (timm's pretrained weights cannot be
downloaded here), so each run is one phase at lr 2e-3 (``head_epochs=0``, ``finetune_lr_scale=1``);
``rollout-fast distill``'s default two-phase schedule (frozen backbone, then lr/10) is for
``--pretrained`` backbones. Sized for a 2-core CPU (CIFAR: about 30 minutes, 1 thread per run; Imagenette:
see :data:`IMAGENETTE_RUNS`; runs can be split over processes with ``--only`` and a final ``--only none``
call tabulates and installs); on a GPU raise ``--epochs-scale``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from rollout_fast.distill import DistillConfig, distill
from rollout_fast.zoo import EMBEDDED_STUDENTS

# name, student, strategy, factor, epochs (phase 2), extra config (DistillConfig fields)
RUNS = [
    ("resnet-cifar-lowres-f2", "resnet-cifar", "lowres", 2, 15, {}),
    ("resnet-cifar-lowres-f4", "resnet-cifar", "lowres", 4, 8, {}),
    ("vit-tiny-lowres-f2", "vit-tiny", "lowres", 2, 4, {}),
    ("resnet18-lowres-f4", "resnet", "lowres", 4, 1, {}),
    ("resnet-cifar-downsize-f2", "resnet-cifar", "downsize", 2, 1, {}),
    ("vit-tiny-mask-f2", "vit-tiny", "mask", 2, 1, {}),
]
# Imagenette (112 px, 14 x 14 grid): thumbnails of 28 px (factor 4) and 56 px (factor 2). Multiply-adds per image
# against the teacher's forward (593.6 M): resnet-cifar 28 px 34.1 M (5.7%); at 56 px 114.9 M (19.4%, over the
# 10% budget: the reference row) or 52.5 M at widths 16-128 (8.9%); vit-tiny at depth 2, 7 x 7 tokens (patch 4 at
# 28 px, patch 8 at 56 px) 44.7 M / 46.1 M (7.5% / 7.8%; at the default depth 4: 15%). Epochs sized from a 1-thread
# smoke run on this 2-core CPU while two trainings ran (520 images, batch 128; minutes per epoch of the 9,469 photos):
# resnet-cifar f4 1.3, w16 f2 1.5, vit-tiny d2 f4 4.1, d2p8 f2 2.3 -- about 1.5 h of training for the five runs, plus
# the teacher's maps once per target (2 views of train + val centred and shifted, 26,788 images: attention rollout
# 51 ms/image, about 23 min; gradient rollout 142 ms/image, about 63 min) and about 1.5 min of evaluation per run.
IMAGENETTE_RUNS = [
    ("resnet-cifar-lowres-f4", "resnet-cifar", "lowres", 4, 12, {}),
    ("resnet-cifar-w16-lowres-f2", "resnet-cifar", "lowres", 2, 10,
     {"student_options": {"channels": [16, 32, 64, 128]}}),
    ("vit-tiny-d2-lowres-f4", "vit-tiny", "lowres", 4, 5, {"student_options": {"depth": 2}}),
    ("vit-tiny-d2p8-lowres-f2", "vit-tiny", "lowres", 2, 8, {"student_options": {"depth": 2, "patch_size": 8}}),
    ("resnet-cifar-lowres-f2", "resnet-cifar", "lowres", 2, 3, {}),
    # the cheapest: widths 16-128 at 28 px (about 2% of the teacher's MACs), for pruning's throughput target
    ("resnet-cifar-w16-lowres-f4", "resnet-cifar", "lowres", 4, 12,
     {"student_options": {"channels": [16, 32, 64, 128]}}),
    # the same, twice the epochs (its training is cheap once the maps are cached: about 30 s per epoch)
    ("resnet-cifar-w16-lowres-f4-e24", "resnet-cifar", "lowres", 4, 24,
     {"student_options": {"channels": [16, 32, 64, 128]}}),
]
MAX_RELATIVE_MACS = 0.10


@dataclass(frozen=True)
class TeacherRecipe:
    """What the recipe does for one embedded teacher: its data folder and evaluation split, the runs, the
    shipped students it installs, the translation augmentation and the recall target of the issue."""

    name: str                 # the embedded teacher (rollout_fast.zoo.EMBEDDED_TEACHERS once installed)
    data: str                 # default --data: an ImageFolder root with train/ and test_split/
    test_split: str           # its evaluation split (DistillConfig.test_split)
    test_label: str           # how RESULTS.md names the evaluation images
    train_images: int         # the training split's size (the table's "train images" when not subsampled)
    runs: tuple               # (name, student, strategy, factor, epochs, extra) as RUNS
    install: tuple            # the shipped students it may install: (rollout student, pruning student)
    max_shift: int            # default --max-shift (px): a quarter of the input side, as the placement test
    recall_target: float      # the shipped rollout student's top-50% recall target
    figure_images: int        # grid.png: the first evaluation image of this many classes


RECIPES = {
    "cifar10-vit": TeacherRecipe("cifar10-vit", "../shared/data/cifar10", "test", "CIFAR-10 test (10,000 images)",
                                 50000, tuple(RUNS), ("cifar10-vit", "cifar10-vit-prune"), 8, 0.80, 8),
    "imagenette-vit": TeacherRecipe("imagenette-vit", "../shared/data/imagenette", "val",
                                    "Imagenette val (3,925 photographs)", 9469, tuple(IMAGENETTE_RUNS),
                                    ("imagenette-vit", "imagenette-vit-prune"), 28, 0.75, 10),
}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _thousands(n: int) -> str:
    """A training-set size in the table: 50000 -> '50k', 9469 -> '9.5k'."""
    return f"{n // 1000}k" if n % 1000 == 0 or n >= 20000 else f"{n / 1000:.1f}k"


def table(rows: list[dict], teacher: str = "cifar10-vit") -> str:
    """The README table (markdown) from the runs' metrics.json contents (``teacher``: a key of :data:`RECIPES`)."""
    full = RECIPES[teacher].train_images
    head = ("| student | strategy | factor | train images × epochs | KLD ↓ | CC | SIM | top-25% recall | top-50% recall | "
            "top-75% recall | Spearman | CC shifted (drop) | params | MACs/image (vs teacher) | "
            "latency b=1 (vs teacher rollout) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        c, s, cost = r["centred"], r["object_placement"], r["cost"]
        st = cost["student"]
        tr = r.get("training", {})
        data = f"{_thousands(tr.get('train_images') or full)} × {tr.get('epochs', '?')}"
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
    lines.append(f"| *teacher rollout ({teacher})* | - | - | - | 0 | 1 | 1 | 1 | 1 | 1 | 1 | 1 | "
                 f"{t['params'] / 1e6:.2f} M | {t['forward_macs_per_image'] / 1e6:.1f} M (100%) | "
                 f"{t['latency_ms_batch1']:.2f} ms (100%) |")
    return "\n".join(lines)


def targets(best: dict, recall: float = 0.80) -> list[str]:
    """The issue's targets for the shipped student (top-50% ``recall`` at least this), checked against its
    metrics."""
    c, base = best["centred"], best["baselines"]
    out = [f"top-50% recall >= {recall:.2f}: {c['recall@0.5']:.3f} -> "
           f"{'met' if c['recall@0.5'] >= recall else 'NOT met'}"]
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


def figure(best_dir: Path, data: str, path: Path, n: int = 8, teacher_name: str = "cifar10-vit",
           test_split: str = "test") -> None:
    """input | teacher rollout | student prediction for the first ``test_split`` image of each of n classes,
    titled with the teacher card's class names (``teacher_name``: an embedded teacher or a .safetensors path)."""
    import torch
    from timm.data import create_transform

    from rollout_fast import AttentionRollout, load_student, load_teacher
    from rollout_fast.data import image_folder, resolve_split
    from rollout_fast.viz import denormalize, save_grid

    student, card = load_student(str(best_dir / "student.safetensors"))
    teacher, dc = load_teacher(teacher_name)
    ds = image_folder(resolve_split(data, test_split), create_transform(**dc))
    labels = teacher.pretrained_cfg.get("label_names") or []
    names = list(labels) if len(labels) == len(ds.classes) else ds.classes  # Imagenette: names, not wnids
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
              titles=[names[ds.samples[i][1]] for i in idx],
              extra=[("student", [m.numpy() for m in s_maps])])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="cifar10-vit", choices=sorted(RECIPES),
                   help="the embedded teacher whose students (and runs, data, shipped names) to train")
    p.add_argument("--teacher-weights", type=Path, default=None, metavar="PATH",
                   help="read the teacher from this .safetensors (its .json card beside it) instead of the "
                        "installed one; the runs, data and shipped names stay --teacher's")
    p.add_argument("--data", default=None, help="default: ../shared/data/cifar10 or ../shared/data/imagenette")
    p.add_argument("--out", default="runs/students")
    p.add_argument("--train-images", type=int, default=None,
                   help="train on a seeded subset of the training split (default: all of it)")
    p.add_argument("--views", type=int, default=2, help="cached teacher-map views (view 0 unaugmented)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs-scale", type=float, default=1.0)
    p.add_argument("--target", default="rollout", choices=["rollout", "grad-rollout"],
                   help="teacher maps: attention rollout, or gradient rollout of the predicted class")
    p.add_argument("--head-fusion", default="mean")
    p.add_argument("--discard-ratio", type=float, default=0.0)
    p.add_argument("--max-shift", type=int, default=None,
                   help="augmentation: max translation (px; default a quarter of the input side: 8, or 28 at 112 px)")
    p.add_argument("--only", nargs="*", default=None, help="run only these names")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-install", action="store_true")
    p.add_argument("--install-as", default=None, choices=sorted(EMBEDDED_STUDENTS),
                   help="the shipped student to replace (default: the teacher's rollout student, cifar10-vit or "
                        "imagenette-vit; cifar10-vit-prune / imagenette-vit-prune: the pruning student, trained "
                        "with --target grad-rollout)")
    p.add_argument("--fallback", type=Path, default=None,
                   help="with --only: take runs missing from OUT from this earlier output folder (marked †)")
    args = p.parse_args(argv)
    recipe = RECIPES[args.teacher]
    args.data = args.data or recipe.data
    args.max_shift = recipe.max_shift if args.max_shift is None else args.max_shift
    args.install_as = args.install_as or recipe.install[0]
    if args.install_as not in recipe.install:
        p.error(f"--install-as: {args.install_as!r} is not a student of {args.teacher} (expected one of "
                f"{', '.join(recipe.install)})")
    if args.teacher_weights is not None and not args.teacher_weights.is_file():
        p.error(f"--teacher-weights: no file at {str(args.teacher_weights)!r}")
    known = {r[0] for r in recipe.runs}
    unknown = [n for n in args.only or () if n not in known and n != "none"]
    if unknown:
        p.error(f"--only: {', '.join(unknown)} not among the runs of {args.teacher} ({', '.join(sorted(known))})")
    return args


def teacher_source(args: argparse.Namespace) -> str:
    """What ``load_teacher`` reads: the --teacher-weights file, else the embedded teacher's name."""
    return str(args.teacher_weights) if args.teacher_weights is not None else args.teacher


def run_config(args: argparse.Namespace, run: tuple) -> tuple[DistillConfig, str]:
    """The :class:`DistillConfig` of one run of :data:`RUNS` / :data:`IMAGENETTE_RUNS` and the equivalent
    ``rollout-fast distill`` command (recorded in the student's card)."""
    name, student, strategy, factor, epochs, extra = run
    recipe = RECIPES[args.teacher]
    out = Path(args.out)
    split = {} if recipe.test_split == "test" else {"test_split": recipe.test_split}
    cfg = DistillConfig(teacher=teacher_source(args), student=student, strategy=strategy, factor=factor,
                        loss="kld", target=args.target, head_fusion=args.head_fusion,
                        discard_ratio=args.discard_ratio,
                        head_epochs=0, epochs=max(1, round(epochs * args.epochs_scale)), batch_size=args.batch_size,
                        lr=2e-3, finetune_lr_scale=1.0, warmup_epochs=0.3, cache_targets=True,
                        views=args.views, max_shift=args.max_shift, train_images=args.train_images, val_images=2000,
                        workers=args.workers, **split, **extra)
    options = "".join(f"--student-option {k}={json.dumps(v, separators=(',', ':'))} "
                      for k, v in cfg.student_options.items())
    command = (f"rollout-fast distill --teacher {cfg.teacher} --student {student} --strategy {strategy} "
               f"--factor {factor} --data {args.data} --out {out / name} --target {args.target} "
               f"--head-fusion {args.head_fusion} "
               f"--discard-ratio {args.discard_ratio} --head-epochs 0 --epochs {cfg.epochs} "
               f"--finetune-lr-scale 1 --warmup-epochs 0.3 --cache-targets --views {args.views} "
               + (f"--batch-size {args.batch_size} " if args.batch_size != 128 else "") +
               f"--max-shift {args.max_shift} "
               + (f"--test-split {recipe.test_split} " if split else "") + options
               + (f"--train-images {args.train_images} " if args.train_images else "")
               + f"--cache-dir {out / 'cache'}")
    return cfg, command


def train_runs(args: argparse.Namespace, out: Path) -> list[dict]:
    """Distil every run of the teacher's runs (or those of --only; the others are read from OUT or --fallback);
    their rows."""
    cache = out / "cache"
    rows = []
    for run in RECIPES[args.teacher].runs:
        name = run[0]
        if args.only and name not in args.only:
            if (out / name / "metrics.json").is_file():
                rows.append(_row(name, out / name))
            elif args.fallback and (args.fallback / name / "metrics.json").is_file():
                rows.append(_row(name, args.fallback / name, " †"))
            continue
        cfg, command = run_config(args, run)
        resume = (out / name / "last.pt").is_file()
        print(f"== {name}: {command}", flush=True)
        distill(args.data, out / name, cfg, resume=resume, cache_dir=cache, command=command)
        rows.append(_row(name, out / name))
    return rows


def results_md(args: argparse.Namespace, rows: list[dict], best: dict) -> list[str]:
    """OUT/RESULTS.md: the table, the recipe, the shipped student and its targets."""
    what = (f"rollout: head fusion {args.head_fusion}" if args.target == "rollout" else
            "gradient rollout of the predicted class")
    recipe = RECIPES[args.teacher]
    md = [f"Students of `{args.teacher}` ({what}, discard ratio "
          f"{args.discard_ratio}), {recipe.test_label}; *CC shifted*: every test image moved "
          f"{best['object_placement']['shift_pixels']} px diagonally (object-placement test).", "",
          table(rows, args.teacher), "",
          f"Teacher maps cached for {args.views} views of the training set (view 0 as is, the others randomly "
          f"shifted by up to {args.max_shift} px and flipped); backbones from scratch, one phase of AdamW at "
          f"lr 2e-3 with warm-up + cosine, batch {args.batch_size}, KLD loss; MACs counted with torch.utils.flop_counter "
          "(FLOPs / 2), latency at batch 1 with torch's CPU threads. Baseline recall breaks the constant map's ties "
          "at random (chance level)."]
    if any(r.get("mark") for r in rows):
        md += ["", f"† from an earlier, shorter pass of this recipe ({args.fallback}: 25,000-image subset, "
               "fewer epochs); the other rows are from the full training set."]
    return md + ["", f"Shipped: **{best['name']}**.", ""] + [f"- {t}" for t in targets(best, recipe.recall_target)]


def install(best: dict, best_dir: Path, as_name: str, teacher: str = "cifar10-vit") -> None:
    """Copy the best run's weights and card into rollout_fast/assets as the shipped student ``as_name`` of the
    embedded ``teacher``."""
    dest = EMBEDDED_STUDENTS[as_name]
    size = (best_dir / "student.safetensors").stat().st_size
    if size > 5 * 2 ** 20:
        raise SystemExit(f"{best['name']} is {size / 2 ** 20:.1f} MB > 5 MB: not installed")
    card = json.loads((best_dir / "student.json").read_text())
    card.update(name=dest.name, teacher=teacher, run=best["name"])
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(best_dir / "student.safetensors", dest.with_suffix(".safetensors"))
    dest.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"installed {best['name']} as {dest}.safetensors / .json ({size / 1e6:.2f} MB)")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # distill's line per epoch
    args = parse_args(argv)
    recipe = RECIPES[args.teacher]
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
        figure(best_dir, args.data, out / "grid.png", recipe.figure_images, teacher_source(args), recipe.test_split)
    except Exception as e:  # the table matters more than the figure
        print(f"figure skipped: {type(e).__name__}: {e}")
    if not args.no_install:
        install(best, best_dir, args.install_as, args.teacher)


if __name__ == "__main__":
    main()
