"""Benchmark of rollout straight from a timm ViT: forward + rollout time over the plain forward's.

Model: a DeiT-S-shaped timm ViT (``deit_small_patch16_224``, random weights: speed does not depend on them;
L 12, H 6, N 197), batch ``--batch`` in ``--dtype``. Providers, each the whole call a user makes:

- ``forward``: the plain forward ``model(images)`` under ``torch.no_grad()``, fused attention (SDPA) on.
  Every ratio in the table is a time over this one.
- ``fused``: ``AttentionRollout(model)(images)`` with ``capture='auto'``: each block's SDPA call answered by
  the fused attention that also returns the head-fused (B, N, N) matrix ('fused-triton' on CUDA,
  'fused-chunked' on the CPU; the path that ran is in the table), then the rollout op.
- ``qk-hooks``: ``AttentionRollout(model, capture='qk-hooks')``: SDPA runs as usual and the head-fused
  attention is rebuilt from q and k (the foundation's path).
- ``vit-explain``: what vit-explain users do: a copy of the model with ``fused_attn = False`` on every
  block, a forward hook on each ``attn_drop`` keeping the full per-head (B, H, N, N) map (``.cpu()`` as
  vit-explain does), then rollout one sample at a time in Python (``bench_rollout.loop_rollout``, vit-explain's
  loop with its defects fixed so it does the same work).
- ``grad``: ``AttentionRollout(model).grad_rollout(images)`` (class-specific gradient rollout: a forward
  and a backward pass to the attention; informative, no target).

Times: wall-clock median (and 25-75% quantiles) of ``--reps`` calls after ``--warmup`` calls (``--slow-reps``
calls after at most one warm-up for ``vit-explain`` and ``grad``), CUDA synchronised, all providers in one run.

Peak memory, "extra" = the provider's peak over the plain forward's peak:
- CUDA: ``torch.cuda.max_memory_allocated()`` during the last timed call minus the allocation before it.
- CPU, ``--memory-method profiler`` (default): one call under ``torch.profiler`` with ``profile_memory=True``;
  the peak of live tensor bytes over the allocation timeline (``torch.profiler._memory_profiler.MemoryProfile``,
  each tensor's creation and destruction). Exact for tensors, blind to allocator caching; it uses a private
  PyTorch module, so on failure the script falls back to:
- CPU, ``--memory-method rss``: each provider once in a fresh subprocess of this script (``--memory-child``):
  build the model, warm up with a batch-1 forward, reset the peak resident set size (Linux
  ``/proc/self/clear_refs`` '5'), run the provider at the full batch, report the peak RSS (``VmHWM``) over the
  RSS before the call (``ru_maxrss`` where the reset is impossible). Includes the allocator's caching and
  fragmentation: coarse, tens of MiB of noise at batch 32.
``--no-memory`` skips it. The budget line is the target: plain forward's peak + B * L * N^2 float32 values (the head-fused matrices).

Targets (issue 4): ``fused`` / ``forward`` <= 1.15 at batch 256 bf16 on a GPU, <= 1.5 at batch 32 on the
CPU; peak within the budget.

Usage::

    python benchmarks/bench_capture.py                           # CPU, float32, batch 32
    python benchmarks/bench_capture.py --device cuda --dtype bfloat16 --batch 256
    python benchmarks/bench_capture.py --batch 4 --reps 2 --warmup 1 --providers forward fused   # quick check
    python benchmarks/bench_capture.py --csv benchmarks/capture.csv
    python benchmarks/bench_capture.py --smoke                   # a 2-block 32 px ViT, a few calls
    python benchmarks/bench_capture.py --device cuda --dry-run   # the plan, then --smoke on CPU

``--json``, ``--budget-s`` and ``--dry-run`` are those of every script (bench_report.py).
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_report  # noqa: E402
import bench_rollout  # noqa: E402

import rollout_fast  # noqa: E402
from rollout_fast import AttentionRollout  # noqa: E402

PROVIDERS = ("forward", "fused", "qk-hooks", "vit-explain", "grad")
SLOW = ("vit-explain", "grad")
TARGETS = {"cuda": 1.15, "cpu": 1.5}
SMOKE_MODEL = dict(img_size=32, patch_size=8, depth=2)  # --smoke: the --model's width and heads, 17 tokens


def build(args):
    """(model, images) on ``args.device`` in ``args.dtype``, random weights, eval mode."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, **(SMOKE_MODEL if args.smoke else {})).eval()
    model = model.to(device=args.device, dtype=getattr(torch, args.dtype))
    size = (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
    images = torch.randn(args.batch, *size, device=args.device, dtype=getattr(torch, args.dtype))
    return model, images


def vit_explain_style(model, head_fusion: str, discard_ratio: float):
    """fn(images) -> maps the way vit-explain works: an unfused copy, hooks keeping every head's map."""
    twin = copy.deepcopy(model)
    store: list[torch.Tensor] = []
    for blk in twin.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(lambda m, i, o: store.append(o.cpu()))

    def run(images):
        store.clear()
        with torch.no_grad():
            twin(images)
        att = torch.stack(store)
        store.clear()
        return bench_rollout.loop_rollout(att, head_fusion, discard_ratio)

    return run


def providers(model, args) -> dict:
    """name -> (fn(images), explainer or None)."""
    fused = AttentionRollout(model, head_fusion=args.head_fusion, discard_ratio=args.discard_ratio)
    qk = AttentionRollout(model, head_fusion=args.head_fusion, discard_ratio=args.discard_ratio,
                          capture="qk-hooks")
    grad = AttentionRollout(model, discard_ratio=args.discard_ratio)

    def forward(images):
        with torch.no_grad():
            return model(images)

    out = {"forward": (forward, None), "fused": (fused, fused), "qk-hooks": (qk, qk),
           "vit-explain": (vit_explain_style(model, args.head_fusion, args.discard_ratio), None),
           "grad": (grad.grad_rollout, grad)}
    return {k: v for k, v in out.items() if k in args.providers}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_provider(fn, images, args, slow: bool = False) -> tuple[tuple[float, float, float], int | None]:
    """((q25, median, q75) seconds, CUDA peak bytes of the last timed call over the allocation before it, or
    None off CUDA)."""
    reps = max(1, min(args.reps, args.slow_reps)) if slow else args.reps
    for _ in range(min(args.warmup, 1) if slow else args.warmup):
        fn(images)
    _sync(args.device)
    times, peak = [], None
    for i in range(reps):
        cuda_last = args.device.startswith("cuda") and i == reps - 1
        if cuda_last:
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        fn(images)
        _sync(args.device)
        times.append(time.perf_counter() - t0)
        if cuda_last:
            peak = torch.cuda.max_memory_allocated() - base
    if len(times) < 2:
        return (times[0], times[0], times[0]), peak
    q = statistics.quantiles(times, n=4, method="inclusive")
    return (q[0], statistics.median(times), q[2]), peak


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the process's peak RSS (VmHWM) to the current RSS (Linux >= 4.0: clear_refs '5')."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def memory_child(args) -> None:
    """Run in a fresh process: print the peak-RSS increase over the current RSS of one call of
    ``args.memory_child`` (VmHWM after resetting it; else ``ru_maxrss``, which also counts the setup's peak)."""
    model, images = build(args)
    fn = providers(model, args)[args.memory_child][0]
    with torch.no_grad():
        model(images[:1])  # libraries and thread pools warmed up at the cost of one image
    if _reset_peak():
        before = _status_kib("VmRSS")
        fn(images)
        increase, how = (_status_kib("VmHWM") - before) * 1024, "VmHWM"
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn(images)
        increase, how = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024, "ru_maxrss"
    print(json.dumps({"provider": args.memory_child, "peak_increase": increase, "method": how}))


def profiler_peak(fn, images) -> int | None:
    """Peak live tensor bytes during one call, from torch.profiler's memory timeline (CPU)."""
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import Action, MemoryProfile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            fn(images)
        live = peak = 0
        for _, action, _, size in sorted(MemoryProfile(prof.profiler.kineto_results).timeline,
                                         key=lambda r: r[0]):
            if action == Action.CREATE:
                live += size
            elif action == Action.DESTROY:
                live -= size
            peak = max(peak, live)
        return peak
    except Exception as e:  # noqa: BLE001 - a private PyTorch API: report, let the caller fall back
        print(f"# profiler memory measurement failed ({type(e).__name__}: {e}); using rss", file=sys.stderr)
        return None


def cpu_peak(name: str, argv: list[str]) -> int | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--memory-child", name]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in res.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return int(json.loads(line)["peak_increase"])
    print(f"# memory of {name}: the subprocess failed: {res.stderr[-2000:]}", file=sys.stderr)
    return None


def run(args, argv: list[str], report: bench_report.Report | None = None) -> list[dict]:
    torch.backends.cuda.matmul.allow_tf32 = False
    model, images = build(args)
    L = len(model.blocks)
    N = int(model.patch_embed.num_patches) + int(model.num_prefix_tokens)
    budget = args.batch * L * N * N * 4
    clock = bench_report.Budget(args.budget_s)
    rows = []
    for name, (fn, explainer) in providers(model, args).items():
        if clock.spent():
            if report:
                report.stop(f"--budget-s {args.budget_s} spent before provider {name}")
            break
        try:
            (q1, med, q3), cuda_peak_bytes = time_provider(fn, images, args, slow=name in SLOW)
        except Exception as e:  # noqa: BLE001 - recorded; the other providers still run
            if report is None:
                raise
            report.error(f"provider {name}", e)
            continue
        peak = None
        if args.no_memory:
            pass
        elif args.device.startswith("cuda"):
            peak = cuda_peak_bytes
        else:
            peak = profiler_peak(fn, images) if args.memory_method == "profiler" else None
            if peak is None:
                peak = cpu_peak(name, argv)
        rows.append({"provider": name, "path": explainer.info["last_capture"] if explainer else "-",
                     "median_ms": med * 1e3, "q25_ms": q1 * 1e3, "q75_ms": q3 * 1e3, "peak_bytes": peak})
        _relative(rows, args, L, N, budget)
        if report:
            report.data["rows"] = rows
            report.flush()
    return rows


def _relative(rows: list[dict], args, L: int, N: int, budget: int) -> None:
    """Ratios and extra peak over the plain forward's row (NaN / None without one), and the run's settings."""
    base = next((r for r in rows if r["provider"] == "forward"), None)
    for r in rows:
        r["ratio"] = r["median_ms"] / base["median_ms"] if base else float("nan")
        r["extra_bytes"] = (r["peak_bytes"] - base["peak_bytes"]
                            if base and r["peak_bytes"] is not None and base["peak_bytes"] is not None else None)
        r.update(model=args.model, L=L, N=N, B=args.batch, dtype=args.dtype, device=args.device,
                 budget_extra_bytes=budget)


def plan(args) -> list[dict]:
    """What a run with these arguments measures (for ``--dry-run``): shapes and sizes from the model's
    config, no weights made."""
    import timm

    cfg = timm.models.get_pretrained_cfg(args.model)
    size = (cfg.input_size if cfg is not None else None) or (3, 224, 224)
    with torch.device("meta"):
        model = timm.create_model(args.model, pretrained=False)
    L, H = len(model.blocks), model.blocks[0].attn.num_heads
    N = int(model.patch_embed.num_patches) + int(model.num_prefix_tokens)
    itemsize = getattr(torch, args.dtype).itemsize
    return [{"model": args.model, "L": L, "H": H, "N": N, "B": args.batch, "dtype": args.dtype,
             "input_mib": round(args.batch * size[0] * size[1] * size[2] * itemsize / 2 ** 20, 1),
             "fused_budget_mib": round(args.batch * L * N * N * 4 / 2 ** 20, 1),
             "vit_explain_maps_mib": round(args.batch * L * H * N * N * itemsize / 2 ** 20, 1),
             "providers": "/".join(args.providers),
             "reps": f"{args.reps} after {args.warmup} ({args.slow_reps} for {'/'.join(SLOW)})"}]


def _mib(x) -> str:
    return "-" if x is None else f"{x / 2 ** 20:.1f}"


def table(rows: list[dict]) -> str:
    lines = ["| provider | path | median ms (q25-q75) | x forward | peak MiB | extra over forward MiB |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['provider']} | {r['path']} | {r['median_ms']:.1f} ({r['q25_ms']:.1f}-"
                     f"{r['q75_ms']:.1f}) | {r['ratio']:.2f} | {_mib(r['peak_bytes'])} | {_mib(r['extra_bytes'])} |")
    return "\n".join(lines)


def verdict(rows: list[dict], args) -> str:
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    fused = next((r for r in rows if r["provider"] == "fused"), None)
    if fused is None or "forward" not in {r["provider"] for r in rows}:
        return "(run with providers forward and fused for the target check)"
    budget = fused["budget_extra_bytes"]
    out = [(f"target fused/forward <= {TARGETS[kind]} ({kind}): {fused['ratio']:.2f} -> "
            f"{'met' if fused['ratio'] <= TARGETS[kind] else 'NOT met'}")]
    if fused["extra_bytes"] is not None:
        out.append(f"target extra peak <= B*L*N^2*4 = {_mib(budget)} MiB: {_mib(fused['extra_bytes'])} MiB -> "
                   f"{'met' if fused['extra_bytes'] <= budget else 'NOT met'}")
    return "\n".join(out)


def environment(args) -> dict:
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
           "rollout_fast": rollout_fast.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "cpu_threads": torch.get_num_threads()}
    if args.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224", help="timm ViT name (random weights)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="model and input dtype (default float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--batch", type=int, default=None, help="default 32 on CPU, 256 on CUDA")
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS))
    p.add_argument("--head-fusion", default="mean", choices=["mean", "max", "min"])
    p.add_argument("--discard-ratio", type=float, default=0.9)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--memory-method", default="profiler", choices=["profiler", "rss"],
                   help="CPU peak memory: tensor allocations (torch.profiler, default) or process RSS")
    p.add_argument("--csv", default=None, metavar="PATH", help="append the rows to this CSV file")
    p.add_argument("--slow-reps", type=int, default=3, help=f"timed calls for {' and '.join(SLOW)}")
    p.add_argument("--smoke", action="store_true",
                   help=f"the model at {SMOKE_MODEL} (random weights), batch <= 4, 2 calls (a quick check)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    bench_report.add_arguments(p)
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available() and not args.dry_run:
        p.error("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.batch = args.batch or (256 if args.device.startswith("cuda") else 32)
    the_plan = [] if args.memory_child else plan(args)
    if args.dry_run:
        bench_report.print_plan("bench_capture", the_plan)
        args.device, args.smoke = "cpu", True
    if args.smoke:
        args.batch, args.reps, args.slow_reps, args.warmup = min(args.batch, 4), min(args.reps, 2), 1, 1
    if args.memory_child:
        memory_child(args)
        return 0
    report = bench_report.Report(args.json, "bench_capture.py", argv, dry_run=args.dry_run, plan=the_plan,
                                 env=environment(args), table=table)
    rows = run(args, argv, report)
    report.finish(verdict=verdict(rows, args))
    code = report.exit_code()
    env = environment(args)
    print(f"# {args.model} B={args.batch} {args.dtype} on {args.device}; head_fusion {args.head_fusion}, "
          f"discard {args.discard_ratio}; median of {args.reps} after {args.warmup} warm-up calls")
    print("# " + ", ".join(f"{k} {v}" for k, v in env.items()))
    print(table(rows))
    print(verdict(rows, args))
    if args.csv and rows:
        path = Path(args.csv)
        new = not path.exists()
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) + list(env))
            if new:
                w.writeheader()
            for r in rows:
                w.writerow({**r, **env})
    return code


if __name__ == "__main__":
    sys.exit(main())
