"""Benchmark of attention rollout: reference, a vit-explain-style loop, each fused backend, the memory floor.

Attention shaped like DeiT-S (L 12, H 6, N 197), ViT-B (L 12, H 12, N 197), ViT-L (L 24, H 16, N 197) and
ViT-B at 384 px (L 12, H 12, N 577); batch 1, 8, 32 on CPU (up to 256 on GPU). Providers:

- ``reference``: :func:`rollout_fast.reference.attention_rollout` (batched PyTorch, matrix chain).
- ``loop``: the code people use today, vit-explain's ``rollout`` (and fast-vit-rollout's batch loop): one
  sample at a time, per layer head fusion, ``topk`` discard, eye, normalisation and an (N, N) matmul
  chain; its defects are fixed (keepdim, per-sample discard) so it does the same work as the others.
- ``cpu`` / ``cuda`` / ``triton``: the fused backends of this install (``rollout_fast.attention_rollout``
  with ``backend=...``; argument validation included, its finiteness pass too).
- ``cpu-op`` / ``cuda-op``: the registered op ``torch.ops.rollout_fast.rollout`` alone (no Python
  validation; the CPU kernel checks finiteness and signs during its own read).
- ``cpu-op+rows``: the same CPU op with the row-sum check the public op asks of it by default
  (``row_tolerance``: every row of every head summed during the same read).
- ``floor``: the memory floor, the time to read the same attention once (``attentions.sum()``).

For each provider the table gives the median time (with the 25-75% quantiles), the speed-up over the
reference and the multiple of the floor. Times are wall-clock medians of ``--reps`` calls after
``--warmup`` calls (CUDA synchronised). ``--write`` writes the table to benchmarks/RESULTS.md; ``--csv``
appends rows with device name and versions.

Usage::

    python benchmarks/bench_rollout.py                       # CPU, float32, the four models, B 1/8/32
    python benchmarks/bench_rollout.py --device cuda --dtype float16 --batches 1 8 32 256
    python benchmarks/bench_rollout.py --smoke               # tiny shapes, a few repetitions
    python benchmarks/bench_rollout.py --write --csv benchmarks/results.csv
    python benchmarks/bench_rollout.py --device cuda --dtype bfloat16 --batches 256 32 1 --batch-major \
        --loop-max-batch 32 --max-gib 60 --budget-s 60 --json /tmp/rollout.json     # gpu_check.py's step
    python benchmarks/bench_rollout.py --device cuda --batches 256 --dry-run       # the plan, then --smoke on CPU

``--json``, ``--budget-s`` and ``--dry-run`` are those of every script (bench_report.py).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_report  # noqa: E402

import rollout_fast  # noqa: E402
from rollout_fast import reference  # noqa: E402

MODELS = {  # name: (L, H, N)
    "DeiT-S": (12, 6, 197),
    "ViT-B": (12, 12, 197),
    "ViT-L": (24, 16, 197),
    "ViT-B/384": (12, 12, 577),
}
SMOKE_MODELS = {"tiny-a": (4, 3, 50), "tiny-b": (2, 2, 65)}
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def make_attention(L: int, B: int, H: int, N: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """(L, B, H, N, N) softmax attention of random logits (rows sum to 1), made one layer at a time so the
    peak is the output plus two float32 layers (ViT-B/384 at batch 256 is 49 GB of float32)."""
    g = torch.Generator(device=device).manual_seed(0)
    out = torch.empty(L, B, H, N, N, device=device, dtype=dtype)
    for layer in range(L):
        logits = torch.randn(B, H, N, N, generator=g, device=device, dtype=torch.float32).mul_(2.0)
        out[layer] = logits.softmax(-1)
        del logits
    return out


def loop_rollout(att: torch.Tensor, head_fusion: str = "mean", discard_ratio: float = 0.0) -> torch.Tensor:
    """vit-explain's rollout, one sample at a time as fast-vit-rollout loops (defects fixed), (B, G)."""
    L, B, H, N, _ = att.shape
    maps = []
    with torch.no_grad():
        for b in range(B):
            result = torch.eye(N, device=att.device)
            for layer in range(L):
                attention = att[layer, b:b + 1].float()
                if head_fusion == "mean":
                    fused = attention.mean(axis=1)
                elif head_fusion == "max":
                    fused = attention.max(axis=1)[0]
                else:
                    fused = attention.min(axis=1)[0]
                flat = fused.view(fused.size(0), -1)
                _, indices = flat.topk(int(flat.size(-1) * discard_ratio), -1, False)
                indices = indices[indices != 0]
                flat[0, indices] = 0
                eye = torch.eye(N, device=att.device)
                a = (fused + 1.0 * eye) / 2
                a = a / a.sum(dim=-1, keepdim=True)
                result = torch.matmul(a, result)
            mask = result[0, 0, 1:]
            maps.append(mask / mask.max())
    return torch.stack(maps)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn, device: str, reps: int, warmup: int) -> list[float]:
    """Wall-clock seconds of ``reps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _quantiles(times: list[float]) -> tuple[float, float, float]:
    if len(times) < 2:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=4, method="inclusive")
    return q[0], statistics.median(times), q[2]


def providers(device: str, head_fusion: str, discard: float, readout: str, loop: bool = True) -> dict:
    """name -> fn(att) for every provider available on ``device`` (``loop``: include the per-sample loop)."""
    kw = dict(head_fusion=head_fusion, discard_ratio=discard, readout=readout)
    out = {"reference": lambda a: reference.attention_rollout(a, **kw)}
    if loop and readout == "cls" and not os.environ.get("ROLLOUT_BENCH_NO_LOOP"):
        out["loop"] = lambda a: loop_rollout(a, head_fusion, discard)
    probe = make_attention(1, 1, 1, 5, torch.float32, device)
    for name in ("cpu", "cuda", "triton"):
        if name not in rollout_fast.available_backends():
            continue
        try:  # available in this install, but does it run on this device?
            rollout_fast.attention_rollout(probe, backend=name)
        except ValueError:
            continue
        except Exception as e:  # noqa: BLE001 - it should run here but fails: keep it, so its error is recorded
            print(f"# provider {name} failed its probe: {type(e).__name__}: {e}", file=sys.stderr)
        out[name] = (lambda n: lambda a: rollout_fast.attention_rollout(a, backend=n, **kw))(name)
    if "cpu" in out or "cuda" in out:  # the registered op alone: no Python validation pass
        out[f"{'cpu' if 'cpu' in out else 'cuda'}-op"] = lambda a: torch.ops.rollout_fast.rollout(
            a, head_fusion, discard, 1, True, readout, "max")
    if "cpu" in out:  # with the kernel's row check, as the public op runs it (check_rows=True)
        from rollout_fast.ops.rollout import kernel_row_tolerance

        out["cpu-op+rows"] = lambda a: torch.ops.rollout_fast.rollout(
            a, head_fusion, discard, 1, True, readout, "max", kernel_row_tolerance(a.dtype, a.shape[-1]))
    out["floor"] = lambda a: a.sum()
    return out


def shapes(args) -> list[tuple[str, int, int, int, int]]:
    """(model, L, H, N, B) in measuring order: model-major, or batch-major with ``--batch-major`` (the batch-256
    targets first, so a run cut short by its budget still has them)."""
    models = SMOKE_MODELS if args.smoke else {m: MODELS[m] for m in args.models}
    pairs = [(m, B) for B in args.batches for m in models] if args.batch_major else \
        [(m, B) for m in models for B in args.batches]
    return [(m, *models[m], B) for m, B in pairs]


def _gib(L: int, B: int, H: int, N: int, dtype: torch.dtype) -> float:
    return L * B * H * N * N * dtype.itemsize / 2 ** 30


def plan(args) -> list[dict]:
    """What a run with these arguments measures (for ``--dry-run``; no tensors are made)."""
    dtype = getattr(torch, args.dtype)
    fused = ["cuda", "cuda-op", "triton"] if args.device.startswith("cuda") else ["cpu", "cpu-op", "cpu-op+rows"]
    out = []
    for model, L, H, N, B in shapes(args):
        gib = _gib(L, B, H, N, dtype)
        loop = args.readout == "cls" and (args.loop_max_batch is None or B <= args.loop_max_batch)
        provs = ["reference", *(["loop"] if loop else []), *fused, "floor"]
        out.append({"model": model, "L": L, "H": H, "N": N, "B": B, "dtype": args.dtype, "gib": round(gib, 2),
                    "providers": "/".join(provs) if gib <= args.max_gib else f"skipped (> --max-gib {args.max_gib})",
                    "reps": f"{args.reps} ({args.slow_reps} for reference/loop)"})
    return out


def run(args, report: bench_report.Report | None = None) -> list[dict]:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dtype = getattr(torch, args.dtype)
    budget = bench_report.Budget(args.budget_s)
    rows = []
    for model, L, H, N, B in shapes(args):
        if budget.spent():
            if report:
                report.stop(f"--budget-s {args.budget_s} spent before {model} B={B}")
            break
        gib = _gib(L, B, H, N, dtype)
        if gib > args.max_gib:
            print(f"# skip {model} B={B}: {gib:.1f} GiB of attention > --max-gib {args.max_gib}", file=sys.stderr)
            continue
        try:
            att = make_attention(L, B, H, N, dtype, args.device)
        except Exception as e:  # noqa: BLE001 - recorded; the next shape may fit
            if report is None:
                raise
            report.error(f"{model} B={B} inputs", e)
            continue
        loop = args.loop_max_batch is None or B <= args.loop_max_batch
        provs = providers(args.device, args.head_fusion, args.discard, args.readout, loop=loop)
        res = {}
        for name, fn in provs.items():
            slow = name in ("reference", "loop")
            reps = max(1, min(args.reps, args.slow_reps)) if slow else args.reps
            try:
                res[name] = _quantiles(measure(lambda: fn(att), args.device, reps, 1 if slow else args.warmup))
            except Exception as e:  # noqa: BLE001 - recorded; the other providers still run
                if report is None:
                    raise
                report.error(f"{model} B={B} {name}", e)
        nan = float("nan")
        ref_t, floor_t = res.get("reference", (nan,) * 3)[1], res.get("floor", (nan,) * 3)[1]
        group = []
        for name, (q1, med, q3) in res.items():
            group.append(dict(model=model, L=L, H=H, N=N, B=B, dtype=args.dtype, device=args.device,
                              discard=args.discard, head_fusion=args.head_fusion, readout=args.readout,
                              provider=name, median_ms=med * 1e3, q25_ms=q1 * 1e3, q75_ms=q3 * 1e3,
                              speedup_vs_reference=ref_t / med, x_floor=med / floor_t, gib=gib))
        rows += group
        if report:
            report.add(group)
        del att
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | B | provider | median ms (q25-q75) | speed-up vs reference | x floor |",
             "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['B']} | {r['provider']} | {r['median_ms']:.2f} "
                     f"({r['q25_ms']:.2f}-{r['q75_ms']:.2f}) | {r['speedup_vs_reference']:.1f}x | "
                     f"{r['x_floor']:.2f} |")
    return "\n".join(lines)


def environment(args) -> dict:
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
           "rollout_fast": rollout_fast.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
           "backends": ",".join(rollout_fast.available_backends())}
    if args.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
    try:
        from rollout_fast.ops import _ext

        if _ext.loaded():
            env["cpu_isa"] = _ext.load().cpu_isa()
    except ImportError:
        pass
    return env


def write_results(path: Path, rows: list[dict], args, note: str) -> None:
    env = environment(args)
    head = [
        "# Rollout benchmark results", "",
        f"Command: `python benchmarks/bench_rollout.py {' '.join(sys.argv[1:])}`  ",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()) + "  ",
        f"Settings: device {args.device}, dtype {args.dtype}, head_fusion {args.head_fusion}, "
        f"discard_ratio {args.discard}, readout {args.readout}; median of {args.reps} calls "
        f"({args.slow_reps} for reference/loop).",
        "", "x floor = median time / median time of `attentions.sum()` (one read of the attention).", "",
    ]
    if note:
        head += [f"Note: {note}", ""]
    path.write_text("\n".join(head) + "\n" + table(rows) + "\n")


def append_csv(path: Path, rows: list[dict], args) -> None:
    env = environment(args)
    fields = list(rows[0].keys()) + list(env.keys()) if rows else []
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**r, **env})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="attention dtype (default float32 on CPU, float16 on CUDA)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=None,
                   help="batch sizes (default 1 8 32 on CPU, 1 8 32 256 on CUDA)")
    p.add_argument("--head-fusion", default="mean", choices=list(reference.HEAD_FUSIONS))
    p.add_argument("--discard", type=float, default=0.9, help="discard ratio (default 0.9, vit-explain's)")
    p.add_argument("--readout", default="cls", choices=["cls", "mean"])
    p.add_argument("--reps", type=int, default=10, help="timed calls per fused provider and the floor")
    p.add_argument("--slow-reps", type=int, default=3, help="timed calls for reference and loop")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-gib", type=float, default=8.0, help="skip shapes with more attention than this")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for every provider (default: torch's choice)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (a quick check that it all runs)")
    p.add_argument("--write", nargs="?", const=str(RESULTS), default=None, metavar="PATH",
                   help=f"write the table as markdown (default path {RESULTS.name} beside this script)")
    p.add_argument("--note", default="", help="a line written under the table's header (e.g. load)")
    p.add_argument("--csv", default=None, metavar="PATH", help="append the rows to this CSV file")
    p.add_argument("--loop-max-batch", type=int, default=None, metavar="B",
                   help="time the per-sample loop only at batches <= B (default: every batch)")
    p.add_argument("--batch-major", action="store_true",
                   help="measure every model at the first batch size, then the next (default: model by model)")
    bench_report.add_arguments(p)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available() and not args.dry_run:
        p.error("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    args.batches = args.batches or ([1, 8, 32, 256] if args.device.startswith("cuda") else [1, 8, 32])
    the_plan = plan(args)
    if args.dry_run:
        bench_report.print_plan("bench_rollout", the_plan)
        args.device, args.smoke = "cpu", True
        args.reps, args.slow_reps, args.warmup = min(args.reps, 2), 1, 1
    if args.smoke:
        args.batches = [b for b in args.batches if b <= 8] or [1]
    report = bench_report.Report(args.json, "bench_rollout.py", argv, dry_run=args.dry_run, plan=the_plan,
                                 env=environment(args), table=table)
    rows = run(args, report)
    report.finish()
    print(table(rows))
    code = report.exit_code()
    if args.write:
        write_results(Path(args.write), rows, args, args.note)
    if args.csv:
        append_csv(Path(args.csv), rows, args)
    return code


if __name__ == "__main__":
    sys.exit(main())
