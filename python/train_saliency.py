"""Recipe: seed 004's saliency distillation on OSIE (issue 15): a teacher, then model A (fixations only) and model B
(fixations + 2.5 x KLD to the teacher's map on a second head) for three seeds each at one identical budget; the
table, the two val-KLD curves, and every map scored against human fixations.

    python python/train_saliency.py --data ../shared/data/osie --out runs/saliency            # everything
    python python/train_saliency.py --out runs/saliency --only teacher                         # step by step
    python python/train_saliency.py --out runs/saliency --only A-s0,B-s0 ...                   # (after the teacher)
    python python/train_saliency.py --out runs/saliency --only none                            # table + plot only
    python python/train_saliency.py --out runs/saliency-smoke --smoke                          # time per epoch

Every run goes through the public API (:func:`rollout_fast.distill.distill_saliency`, the one distillation loop) and
is resumable: run the same command again after an interruption (finished runs are skipped). Budget (the same for A
and B; only the second head and its teacher term differ): ``--epochs`` (seed: 10), ``--input-size`` (240 x 320,
the seed's and MSI-Net's SALICON size), ``--batch-size`` 8, Adam at a constant 1e-3 (the seed's), bf16 autocast,
horizontal + vertical flips; the teacher (ResNet50 encoder, decoder 512-256-128-64, 34.5 M parameters against the
students' 12.7 M) trains on the same 600 images for ``--teacher-epochs``. Encoders start from scratch by default
(no ImageNet weights can be downloaded here; ``--pretrained`` for users online, ``--init-from`` for a local timm
ResNet classifier checkpoint). ``--smoke`` trains each kind of run for one epoch on ``--smoke-images`` training
images and 4 val images and prints the measured seconds and the per-epoch estimate for the full split.

Outputs in OUT: ``teacher/``, ``A-s<seed>/``, ``B-s<seed>/`` (each a distill_saliency run), ``eval/``
(``rollout-fast saliency-eval``'s files: every map on the 100 val images), ``val_kld.png`` (val KLD per epoch, A
and B, each seed thin and the mean bold), ``results.json`` and ``RESULTS.md`` (the table, the issue's targets).
``--install`` copies the best student (lowest val KLD) into rollout_fast/assets as ``osie-resnet18`` (float16
weights, about 26 MB) for :func:`rollout_fast.saliency.load_saliency_model`.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import statistics
import time
from pathlib import Path

from rollout_fast.distill import SaliencyConfig, distill_saliency
from rollout_fast.saliency.models import SALIENCY_MODELS, STUDENT_SPEC, TEACHER_SPEC

METRICS = ("kld", "cc", "nss", "auc_judd", "sauc", "sim", "ig")
HEADERS = {"kld": "KLD ↓", "cc": "CC ↑", "nss": "NSS ↑", "auc_judd": "AUC-Judd ↑", "sauc": "sAUC ↑", "sim": "SIM ↑",
           "ig": "IG (bits) ↑"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/osie")
    p.add_argument("--out", default="runs/saliency")
    p.add_argument("--epochs", type=int, default=10, help="epochs of models A and B (seed: 10)")
    p.add_argument("--teacher-epochs", type=int, default=20, help="epochs of the teacher")
    p.add_argument("--input-size", type=int, nargs=2, default=[240, 320], metavar=("H", "W"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--no-amp", action="store_true", help="float32 instead of bf16 autocast")
    p.add_argument("--pretrained", action="store_true", help="timm ImageNet encoders (needs internet)")
    p.add_argument("--init-from", default=None, help="student encoders from this timm resnet18 classifier checkpoint")
    p.add_argument("--only", default=None, help="comma-separated run names (teacher, A-s0, B-s0, ...) or 'none'")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"])
    p.add_argument("--smoke", action="store_true", help="time one short epoch of each kind of run, then stop")
    p.add_argument("--smoke-images", type=int, default=48)
    p.add_argument("--install", action="store_true", help="ship the best student as osie-resnet18")
    return p.parse_args(argv)


def configs(args) -> dict[str, SaliencyConfig]:
    """Every run's config, by name: the teacher, then A-s<seed>, B-s<seed>."""
    out = Path(args.out)
    common = {"input_size": list(args.input_size), "batch_size": args.batch_size, "lr": args.lr,
              "amp": not args.no_amp, "pretrained": args.pretrained}
    if args.smoke:
        common.update(train_images=args.smoke_images, val_images=4)
    runs = {"teacher": SaliencyConfig(**{**common, **_spec(TEACHER_SPEC)}, epochs=1 if args.smoke else args.teacher_epochs)}
    for seed in args.seeds[:1] if args.smoke else args.seeds:
        student = {**common, **_spec(STUDENT_SPEC), "epochs": 1 if args.smoke else args.epochs, "seed": seed,
                   "init_from": args.init_from}
        runs[f"A-s{seed}"] = SaliencyConfig(**student)
        runs[f"B-s{seed}"] = SaliencyConfig(**student, heads=2, teacher=str(out / "teacher" / "model.safetensors"))
    return runs


def _spec(spec: dict) -> dict:
    return {"encoder": spec["encoder"], "decoder": list(spec["decoder"])}


def train_runs(args, runs: dict[str, SaliencyConfig]) -> None:
    out = Path(args.out)
    only = None if args.only is None else set(args.only.split(","))
    for name, cfg in runs.items():
        if (only is not None and name not in only) or (out / name / "metrics.json").is_file():
            continue
        if cfg.teacher is not None and not Path(cfg.teacher).is_file():
            raise SystemExit(f"{name}: the teacher is not trained yet ({cfg.teacher} missing); run --only teacher first")
        command = f"python python/train_saliency.py --data {args.data} --out {args.out} --only {name}"
        print(f"== {name}: {cfg}", flush=True)
        t0 = time.time()
        distill_saliency(args.data, out / name, cfg, device=args.device, resume=(out / name / "last.pt").is_file(),
                         cache_dir=out / "cache", command=command)
        print(f"== {name}: {time.time() - t0:.0f} s", flush=True)


def _log(folder: Path) -> list[dict]:
    with open(folder / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def smoke_report(args, runs: dict[str, SaliencyConfig]) -> None:
    """Seconds of each smoke epoch and the estimate for one full-split epoch (600 train, 100 val images)."""
    out = Path(args.out)
    print(f"smoke: one epoch on {args.smoke_images} train + 4 val images at {args.input_size[0]} x "
          f"{args.input_size[1]}, batch {args.batch_size}, {'float32' if args.no_amp else 'bf16 autocast'}")
    for name in ("teacher", f"A-s{args.seeds[0]}", f"B-s{args.seeds[0]}"):
        seconds = float(_log(out / name)[0]["seconds"])
        per_image = seconds / args.smoke_images  # the 4 val images' forward passes are counted in, a small excess
        print(f"  {name}: {seconds:.1f} s -> {per_image:.2f} s per training image -> about "
              f"{per_image * 600 / 60:.0f} min per 600-image epoch (+ validation of 100 images, about "
              f"{per_image * 100 / 3 / 60:.1f} min: forward only)")


def evaluate_all(args, names: list[str]) -> list[dict]:
    """Every trained model and the baselines on the val split (saliency-eval's protocol and files)."""
    from rollout_fast.checkpoint import check_output_dir, remove_outputs
    from rollout_fast.saliency.data import OSIE_SIGMA_PX, load_split
    from rollout_fast.saliency.evaluate import OUTPUTS, evaluate_saliency, write_results
    from rollout_fast.saliency.sources import parse_map_specs

    out = Path(args.out)
    maps = ",".join(["centre-prior", "mean-map", "uniform", *(f"{n}:{out / n / 'model.safetensors'}" for n in names)])
    earlier = check_output_dir(out / "eval", OUTPUTS, overwrite=True)
    val, train = load_split("val"), load_split("train")
    result = evaluate_saliency(args.data, val, parse_map_specs(maps), split_names=val, train_names=train,
                               sigma=OSIE_SIGMA_PX, device=args.device or "cpu", progress=True)
    remove_outputs(out / "eval", earlier)
    write_results(out / "eval", result, {"data": args.data, "split": "val", "maps": maps, "images": len(val)})
    return result.rows


def plot_curves(args, path: Path, rows: list[dict]) -> None:
    """Val KLD per epoch of models A and B (each seed thin, the mean bold), the centre prior's as a reference."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for model, colour in (("A", "tab:blue"), ("B", "tab:orange")):
        curves = [[float(r["val_kld"]) for r in _log(Path(args.out) / f"{model}-s{s}")] for s in args.seeds
                  if (Path(args.out) / f"{model}-s{s}" / "log.csv").is_file()]
        for c in curves:
            ax.plot(range(1, len(c) + 1), c, color=colour, alpha=0.3, lw=1)
        if curves:
            n = min(len(c) for c in curves)
            ax.plot(range(1, n + 1), [statistics.mean(c[i] for c in curves) for i in range(n)], color=colour, lw=2,
                    label=f"model {model} ({'+ teacher head' if model == 'B' else 'fixations only'}), "
                          f"mean of {len(curves)} seeds")
    prior = [r["kld"] for r in rows if r["map"] == "centre-prior"]
    if prior:
        ax.axhline(prior[0], color="grey", ls="--", lw=1, label="centre prior")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val KLD (100 OSIE val images, lower is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _mean_std(values: list[float]) -> str:
    m = f"{statistics.mean(values):.3f}".replace("-0.000", "0.000")
    return f"{m} ± {statistics.stdev(values):.3f}" if len(values) > 1 else m


def results_md(args, rows: list[dict]) -> list[str]:
    """The A-vs-B table (mean ± std over seeds), the full table, and the issue's targets, checked."""
    by = {r["map"]: r for r in rows}
    cols = [k for k in METRICS if k in rows[0]]
    md = ["| model | " + " | ".join(HEADERS[k] for k in cols) + " |", "|---|" + "---:|" * len(cols)]
    groups = {"teacher": ["teacher"], **{m: [f"{m}-s{s}" for s in args.seeds if f"{m}-s{s}" in by] for m in "AB"},
              "centre prior": ["centre-prior"], "mean map": ["mean-map"], "uniform": ["uniform"]}
    summary = {}
    for label, names in groups.items():
        names = [n for n in names if n in by]
        if names:
            summary[label] = {k: statistics.mean(by[n][k] for n in names) for k in cols}
            md.append(f"| {label} | " + " | ".join(_mean_std([by[n][k] for n in names]) for k in cols) + " |")
    budget = (f"Budget: models A and B {args.epochs} epochs, teacher {args.teacher_epochs}, input "
              f"{args.input_size[0]} x {args.input_size[1]}, batch {args.batch_size}, Adam {args.lr:g} constant, "
              f"flips; seeds {args.seeds}.")
    md += ["", budget, ""]
    t, c = summary.get("teacher"), summary.get("centre prior")
    if t and c:
        beats = [k for k in ("nss", "cc", "auc_judd") if t[k] > c[k]]
        md.append(f"- teacher beats the centre prior on NSS, CC and AUC-Judd: {'met' if len(beats) == 3 else 'NOT met'} ("
                  + ", ".join(f"{HEADERS[k][:-2]} {t[k]:.3f} vs {c[k]:.3f}" for k in ("nss", "cc", "auc_judd")) + ")")
    a, b = summary.get("A"), summary.get("B")
    if a and b:
        ok = b["kld"] < a["kld"] and b["nss"] > a["nss"]
        spread = {k: max(_std([by[n][k] for n in groups[m] if n in by]) for m in "AB") for k in ("kld", "nss")}
        within = [k.upper() for k in ("kld", "nss") if abs(b[k] - a[k]) <= spread[k]]
        md.append(f"- model B beats model A on val KLD and NSS: {'met' if ok else 'NOT met'} (KLD {b['kld']:.4f} vs "
                  f"{a['kld']:.4f}, NSS {b['nss']:.4f} vs {a['nss']:.4f}; means over seeds"
                  + (f"; the {' and '.join(within)} difference is within one standard deviation across seeds)"
                     if within else ")"))
    return md


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def install(args, rows: list[dict]) -> None:
    """The student with the lowest val KLD -> rollout_fast/assets/osie-resnet18 (float16 weights + card)."""
    import torch

    from rollout_fast.checkpoint import save_weights, write_json
    from rollout_fast.saliency import load_saliency_model

    best = min((r for r in rows if r["map"][:2] in ("A-", "B-")), key=lambda r: r["kld"])
    model, card = load_saliency_model(str(Path(args.out) / best["map"] / "model.safetensors"))
    dest = SALIENCY_MODELS["osie-resnet18"]
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_weights(dest.with_suffix(".safetensors"), state, {"card": dest.with_suffix(".json").name})
    packaged = Path(__file__).resolve().parents[1] / "rollout_fast" / "saliency" / "osie_split.json"
    if Path(card.get("data", {}).get("split_file") or "").resolve() == packaged:  # no path of this machine
        card["data"]["split_file"] = "rollout_fast/saliency/osie_split.json (packaged)"
    write_json(dest.with_suffix(".json"), {**card, "name": "osie-resnet18", "run": best["map"], "eval": best,
                                           "weights": "float16 (loaded into float32)", "torch": torch.__version__})
    print(f"installed {best['map']} as {dest}.safetensors / .json")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the loop's line per epoch
    args = parse_args()
    runs = configs(args)
    train_runs(args, runs)
    if args.smoke:
        return smoke_report(args, runs)
    out = Path(args.out)
    done = [n for n in runs if (out / n / "metrics.json").is_file()]
    if not done:
        raise SystemExit("no finished runs")
    rows = evaluate_all(args, done)
    plot_curves(args, out / "val_kld.png", rows)
    md = results_md(args, rows)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "RESULTS.md").write_text("\n".join(md) + "\n\n" + (out / "eval" / "table.md").read_text())
    print("\n".join(md))
    if args.install:
        install(args, rows)


if __name__ == "__main__":
    main()
