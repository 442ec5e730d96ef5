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
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
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


def run(args) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    rows = []
    for model, (H, N, D) in (SMOKE_SHAPES if args.smoke else SHAPES).items():
        for B in args.batches:
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(B, H, N, D, generator=g).to(dtype).to(args.device) for _ in range(3))
            for name, fn in providers(args.device).items():
                q1, med, q3 = br._quantiles(br.measure(lambda: fn(q, k, v), args.device, args.reps, args.warmup))
                rows.append(dict(model=model, H=H, N=N, D=D, B=B, dtype=args.dtype, device=args.device,
                                 provider=name, median_ms=med * 1e3, q25_ms=q1 * 1e3, q75_ms=q3 * 1e3))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="a tiny shape, a quick check that it all runs")
    p.add_argument("--csv", default=None, metavar="PATH", help="append the rows to this CSV file")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    rows = run(args)
    print("| model | B | provider | median ms (q25-q75) |\n|---|---:|---|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['B']} | {r['provider']} | {r['median_ms']:.3f} "
              f"({r['q25_ms']:.3f}-{r['q75_ms']:.3f}) |")
    if args.csv:
        br.append_csv(Path(args.csv), rows, argparse.Namespace(device=args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
