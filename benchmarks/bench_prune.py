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
    python benchmarks/bench_prune.py --model deit_small_patch16_224 --scorers random cls-attention \
        --keeps 0.5 0.25 --autocast bfloat16 --device cuda --dry-run   # the plan, then --smoke on the CPU

``--model`` takes a timm name with random weights (nothing is downloaded), e.g. ``deit_small_patch16_224``
for a 224 px DeiT-S-shaped model; the shipped student fits only ``cifar10-vit`` (its 8 x 8 grid).
``--autocast bfloat16`` times both models under ``torch.autocast`` (parameters stay float32). ``--json``,
``--budget-s`` and ``--dry-run`` are those of every script (bench_report.py).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_report  # noqa: E402

import rollout_fast  # noqa: E402
from rollout_fast.prune import SCORERS, measure_speedup, measure_throughput  # noqa: E402


def load(args) -> tuple[torch.nn.Module, torch.Tensor, object]:
    """(model, images, student or None) on ``args.device``."""
    if args.smoke:
        from timm.models import VisionTransformer

        torch.manual_seed(0)
        model = VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, num_classes=10)
        return model.eval().to(args.device), torch.randn(max(args.batches), 3, 32, 32), _student(args, args.device)
    model, data_config = rollout_fast.load_teacher(args.model, device=args.device)
    if args.data:
        from rollout_fast.data import load_eval_data

        images, _ = load_eval_data(args.data, data_config, args.images)
    else:
        images = torch.randn(args.images, *data_config["input_size"], generator=torch.Generator().manual_seed(0))
    return model.eval(), images, _student(args, args.device)


def _student(args, device: str):
    """The student for scorer 'student' (the model's pruning student unless ``--student``) on ``device``, or
    None."""
    if "student" not in args.scorers:
        return None
    from rollout_fast.students import load_student, pruning_student_name

    name = args.student or pruning_student_name("cifar10-vit" if args.smoke else args.model)
    return load_student(name, device=device)[0]


def _autocast(fn, args):
    """``fn`` under ``torch.autocast(device, --autocast)``, or ``fn`` itself."""
    if not args.autocast:
        return fn
    dtype = getattr(torch, args.autocast)

    def call(x):
        with torch.autocast(args.device, dtype=dtype):
            return fn(x)

    return call


def run(args, report: bench_report.Report | None = None) -> list[dict]:
    model, images, student = load(args)
    clock = bench_report.Budget(args.budget_s)
    full_fn = _autocast(model, args)
    rows = []
    for bsz in args.batches:
        xb = images.repeat(-(-bsz // images.shape[0]), 1, 1, 1)[:bsz].to(args.device)
        fulls, entries = [], []
        for name in args.scorers:
            for keep in args.keeps:
                if clock.spent():
                    break
                try:
                    pruned = rollout_fast.prune_tokens(model, keep, name, student=student)
                    full, ips = measure_speedup(full_fn, _autocast(pruned, args), xb, min_time=args.min_time)
                except Exception as e:  # noqa: BLE001 - recorded; the other scorers still run
                    if report is None:
                        raise
                    report.error(f"{name} keep {keep} batch {bsz}", e)
                    continue
                fulls.append(full)
                entries.append({"scorer": name, "keep_ratio": keep, "batch": bsz, "images_per_s": ips,
                                "speedup": ips / full})
        if clock.spent() and report and report.data["stopped"] is None:
            report.stop(f"--budget-s {args.budget_s} spent during batch {bsz}")
        if not entries and clock.spent():
            break
        fulls = sorted(fulls) or [measure_throughput(full_fn, xb, min_time=args.min_time)]
        group = [{"scorer": "full", "keep_ratio": 1.0, "batch": bsz, "images_per_s": fulls[len(fulls) // 2],
                  "speedup": 1.0}, *entries]
        for r in group:
            r.update(model="tiny-vit (smoke)" if args.smoke else args.model, autocast=args.autocast or "-",
                     device=args.device)
        rows += group
        if report:
            report.add(group)
    return rows


def plan(args) -> list[dict]:
    """What a run with these arguments measures (for ``--dry-run``); checks that the model and the student
    are there offline (a timm name is only looked up: its weights are random)."""
    import timm

    if args.model not in ("cifar10-vit",) and not args.model.endswith(".safetensors") and not timm.is_model(args.model):
        raise ValueError(f"--model {args.model!r}: not a timm model name")
    student = "-"
    if "student" in args.scorers and not args.smoke:
        from rollout_fast.students import pruning_student_name

        student = args.student or pruning_student_name(args.model)
        _student(args, "cpu")  # loads offline or raises
    return [{"model": args.model, "scorer": name, "keep": keep, "batch": bsz, "autocast": args.autocast or "-",
             "device": args.device, "min_time_s": args.min_time, "student": student if name == "student" else "-"}
            for bsz in args.batches for name in args.scorers for keep in args.keeps]


def table(rows: list[dict]) -> str:
    lines = ["| model | autocast | scorer | keep | batch | images/s | speed-up |", "|---|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r.get('model', '-')} | {r.get('autocast', '-')} | {r['scorer']} | {r['keep_ratio']} | {r['batch']} "
              f"| {r['images_per_s']:.1f} | {r['speedup']:.2f}x |" for r in rows]
    return "\n".join(lines)


def environment(device: str) -> dict:
    return {"device": torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available()
            else platform.processor() or platform.machine(),
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
    p.add_argument("--autocast", default=None, choices=["bfloat16", "float16"],
                   help="time both models under torch.autocast in this dtype (default: float32)")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny random 32 px ViT (8 x 8 patches: the shipped student fits), batches 1 and 4")
    bench_report.add_arguments(p)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available() and not args.dry_run:
        p.error("--device cuda: no CUDA device is available")
    the_plan = plan(args)
    if args.dry_run:
        bench_report.print_plan("bench_prune", the_plan)
        args.device, args.smoke = "cpu", True
    if args.smoke:
        args.batches, args.min_time = [1, 4], 0.0
    if args.threads:
        torch.set_num_threads(args.threads)
    report = bench_report.Report(args.json, "bench_prune.py", argv, dry_run=args.dry_run, plan=the_plan,
                                 env=environment(args.device), table=table)
    rows = run(args, report)
    report.finish()
    print(table(rows))
    code = report.exit_code()
    if args.csv and rows:
        env = environment(args.device)
        path = Path(args.csv)
        new = not path.exists()
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[*rows[0], *env])
            if new:
                w.writeheader()
            w.writerows({**r, **env} for r in rows)
    return code


if __name__ == "__main__":
    sys.exit(main())
