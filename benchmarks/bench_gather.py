"""Benchmark of the fused top-k token gather (rollout_fast.topk_gather): each backend against the reference.

Tokens shaped like DeiT-S / ViT-B at 224 px (N 197, D 384 / 768) and ViT-B at 384 px (N 577, D 768), keep
ratios 0.5 and 0.1; providers: ``reference`` (``torch.topk`` + ``torch.gather``), each gather backend
available on the device (``cpu``, ``cuda``, ``triton``; argument validation included) and ``floor`` (one
read of the tokens, ``tokens.sum()``). Median (25-75% quantiles) of ``--reps`` calls after ``--warmup``.

Usage::

    python benchmarks/bench_gather.py                    # CPU, float32, batch 1 and 32
    python benchmarks/bench_gather.py --device cuda --dtype float16 --batches 1 32 256
    python benchmarks/bench_gather.py --smoke --csv benchmarks/gather.csv
    python benchmarks/bench_gather.py --device cuda --batches 256 --dry-run     # the plan, then --smoke on CPU

``--json``, ``--budget-s`` and ``--dry-run`` are those of every script (bench_report.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_report  # noqa: E402
import bench_rollout as br  # noqa: E402

from rollout_fast.ops import available_gather_backends, topk_gather  # noqa: E402
from rollout_fast.reference import topk_gather_reference  # noqa: E402

SHAPES = {"DeiT-S": (197, 384), "ViT-B": (197, 768), "ViT-B/384": (577, 768)}  # name: (N, D)
SMOKE_SHAPES = {"tiny": (65, 32)}


def providers(device: str) -> dict:
    """name -> fn(tokens, scores, k) for every provider available on ``device``."""
    out = {"reference": lambda t, s, k: topk_gather_reference(t, s, k, 1)}
    for name in available_gather_backends(device):
        if name != "reference" and not (name == "triton" and device == "cpu"):  # the interpreter is for tests
            out[name] = (lambda n: lambda t, s, k: topk_gather(t, s, k, 1, backend=n))(name)
    out["floor"] = lambda t, s, k: t.sum()
    return out


def plan(args) -> list[dict]:
    """What a run with these arguments measures (for ``--dry-run``)."""
    itemsize = getattr(torch, args.dtype).itemsize
    provs = "reference/cuda/triton/floor" if args.device.startswith("cuda") else "reference/cpu/floor"
    return [{"model": model, "N": N, "D": D, "B": B, "keep": keep, "k": max(1, int(keep * (N - 1))),
             "dtype": args.dtype, "tokens_mib": round(B * N * D * itemsize / 2 ** 20, 1), "providers": provs,
             "reps": f"{args.reps} after {args.warmup}"}
            for model, (N, D) in (SMOKE_SHAPES if args.smoke else SHAPES).items()
            for B in args.batches for keep in args.keep]


def run(args, report: bench_report.Report | None = None) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    clock = bench_report.Budget(args.budget_s)
    rows = []
    for model, (N, D) in (SMOKE_SHAPES if args.smoke else SHAPES).items():
        for B in args.batches:
            if clock.spent():
                if report:
                    report.stop(f"--budget-s {args.budget_s} spent before {model} B={B}")
                return rows
            g = torch.Generator().manual_seed(0)
            tokens = torch.randn(B, N, D, generator=g).to(dtype).to(args.device)
            scores = torch.rand(B, N - 1, generator=g).to(args.device)
            group = []
            for keep in args.keep:
                k = max(1, int(keep * (N - 1)))
                for name, fn in providers(args.device).items():
                    try:
                        q1, med, q3 = br._quantiles(br.measure(lambda: fn(tokens, scores, k), args.device, args.reps,
                                                               args.warmup))
                    except Exception as e:  # noqa: BLE001 - recorded; the other providers still run
                        if report is None:
                            raise
                        report.error(f"{model} B={B} keep {keep} {name}", e)
                        continue
                    group.append(dict(model=model, N=N, D=D, B=B, keep=keep, dtype=args.dtype, device=args.device,
                                      provider=name, median_ms=med * 1e3, q25_ms=q1 * 1e3, q75_ms=q3 * 1e3))
            rows += group
            if report:
                report.add(group)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | B | keep | provider | median ms (q25-q75) |", "|---|---:|---:|---|---:|"]
    lines += [f"| {r['model']} | {r['B']} | {r['keep']} | {r['provider']} | {r['median_ms']:.3f} "
              f"({r['q25_ms']:.3f}-{r['q75_ms']:.3f}) |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--keep", nargs="+", type=float, default=[0.5, 0.1])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="a tiny shape, a quick check that it all runs")
    p.add_argument("--csv", default=None, metavar="PATH", help="append the rows to this CSV file")
    bench_report.add_arguments(p)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available() and not args.dry_run:
        p.error("--device cuda: no CUDA device is available")
    the_plan = plan(args)
    if args.dry_run:
        bench_report.print_plan("bench_gather", the_plan)
        args.device, args.smoke, args.batches = "cpu", True, [b for b in args.batches if b <= 8] or [1]
        args.reps, args.warmup = min(args.reps, 2), 1
    report = bench_report.Report(args.json, "bench_gather.py", argv, dry_run=args.dry_run, plan=the_plan,
                                 env=br.environment(argparse.Namespace(device=args.device)), table=table)
    rows = run(args, report)
    report.finish()
    print(table(rows))
    code = report.exit_code()
    if args.csv and rows:
        br.append_csv(Path(args.csv), rows, argparse.Namespace(device=args.device))
    return code


if __name__ == "__main__":
    sys.exit(main())
