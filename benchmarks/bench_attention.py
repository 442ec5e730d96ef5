"""Benchmark of the fused attention (rollout_fast.ops.fused_attention): attention output + head-fused
probabilities, each kernel against SDPA and the explicit reference.

q, k, v shaped like a DeiT-S / ViT-B block at 224 px (H 6 / 12, N 197, D 64) and ViT-B at 384 px (N 577);
providers: ``sdpa`` (``F.scaled_dot_product_attention`` alone: the cost without the fused matrix),
``reference`` (:func:`rollout_fast.reference.fused_attention_reference`, per-head probabilities for the whole
batch), ``chunked`` and ``triton`` (where it runs compiled). Median (25-75% quantiles) of ``--reps`` calls.

Usage::

    python benchmarks/bench_attention.py                 # CPU, float32, batch 1 and 32
    python benchmarks/bench_attention.py --device cuda --dtype bfloat16 --batches 1 32 256
    python benchmarks/bench_attention.py --smoke --csv benchmarks/attention.csv
    python benchmarks/bench_attention.py --device cuda --batches 256 --dry-run   # the plan, then --smoke on CPU

``--json``, ``--budget-s`` and ``--dry-run`` are those of every script (bench_report.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_report  # noqa: E402
import bench_rollout as br  # noqa: E402

from rollout_fast.ops import fused_attention  # noqa: E402
from rollout_fast.ops.registry import triton_usable  # noqa: E402
from rollout_fast.reference import fused_attention_reference  # noqa: E402

SHAPES = {"DeiT-S": (6, 197, 64), "ViT-B": (12, 197, 64), "ViT-B/384": (12, 577, 64)}  # name: (H, N, D)
SMOKE_SHAPES = {"tiny": (3, 65, 16)}


def providers(device: str) -> dict:
    """name -> fn(q, k, v) for every provider available on ``device``."""
    out = {"sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
           "reference": lambda q, k, v: fused_attention_reference(q, k, v),
           "chunked": lambda q, k, v: fused_attention(q, k, v, impl="chunked")}
    if device.startswith("cuda") and triton_usable(device):
        out["triton"] = lambda q, k, v: fused_attention(q, k, v, impl="triton")
    return out


def plan(args) -> list[dict]:
    """What a run with these arguments measures (for ``--dry-run``)."""
    itemsize = getattr(torch, args.dtype).itemsize
    provs = "sdpa/reference/chunked/triton" if args.device.startswith("cuda") else "sdpa/reference/chunked"
    return [{"model": model, "H": H, "N": N, "D": D, "B": B, "dtype": args.dtype,
             "qkv_mib": round(3 * B * H * N * D * itemsize / 2 ** 20, 1),
             "reference_probs_mib": round(B * H * N * N * 4 / 2 ** 20, 1), "providers": provs,
             "reps": f"{args.reps} after {args.warmup}"}
            for model, (H, N, D) in (SMOKE_SHAPES if args.smoke else SHAPES).items() for B in args.batches]


def run(args, report: bench_report.Report | None = None) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    clock = bench_report.Budget(args.budget_s)
    rows = []
    for model, (H, N, D) in (SMOKE_SHAPES if args.smoke else SHAPES).items():
        for B in args.batches:
            if clock.spent():
                if report:
                    report.stop(f"--budget-s {args.budget_s} spent before {model} B={B}")
                return rows
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(B, H, N, D, generator=g).to(dtype).to(args.device) for _ in range(3))
            group = []
            for name, fn in providers(args.device).items():
                try:
                    q1, med, q3 = br._quantiles(br.measure(lambda: fn(q, k, v), args.device, args.reps, args.warmup))
                except Exception as e:  # noqa: BLE001 - recorded; the other providers still run
                    if report is None:
                        raise
                    report.error(f"{model} B={B} {name}", e)
                    continue
                group.append(dict(model=model, H=H, N=N, D=D, B=B, dtype=args.dtype, device=args.device,
                                  provider=name, median_ms=med * 1e3, q25_ms=q1 * 1e3, q75_ms=q3 * 1e3))
            rows += group
            if report:
                report.add(group)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | B | provider | median ms (q25-q75) |", "|---|---:|---|---:|"]
    lines += [f"| {r['model']} | {r['B']} | {r['provider']} | {r['median_ms']:.3f} "
              f"({r['q25_ms']:.3f}-{r['q75_ms']:.3f}) |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="a tiny shape, a quick check that it all runs")
    p.add_argument("--csv", default=None, metavar="PATH", help="append the rows to this CSV file")
    bench_report.add_arguments(p)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available() and not args.dry_run:
        p.error("--device cuda: no CUDA device is available")
    the_plan = plan(args)
    if args.dry_run:
        bench_report.print_plan("bench_attention", the_plan)
        args.device, args.smoke, args.batches = "cpu", True, [b for b in args.batches if b <= 8] or [1]
        args.reps, args.warmup = min(args.reps, 2), 1
    report = bench_report.Report(args.json, "bench_attention.py", argv, dry_run=args.dry_run, plan=the_plan,
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
