"""Timing helpers for pruned inference: images/s of one callable, or of two in alternation.

Used by the prune-eval study (:func:`rollout_fast.prune.prune_eval`) and ``benchmarks/bench_prune.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

__all__ = ["measure_speedup", "measure_throughput"]


def measure_throughput(fn: Callable[[torch.Tensor], object], images: torch.Tensor, *, min_time: float = 1.0,
                       min_runs: int = 3, warmup: int = 1) -> float:
    """Images per second of ``fn(images)`` (median over runs of at least ``min_time`` seconds in total).

    CUDA work is synchronised around each run.
    """
    sync = torch.cuda.synchronize if images.device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(warmup):
            fn(images)
        sync()
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < min_runs or time.perf_counter() - start < min_time:
            t0 = time.perf_counter()
            fn(images)
            sync()
            times.append(time.perf_counter() - t0)
    times.sort()
    return images.shape[0] / times[len(times) // 2]


def measure_speedup(baseline: Callable[[torch.Tensor], object], fn: Callable[[torch.Tensor], object],
                    images: torch.Tensor, *, min_time: float = 1.0, min_runs: int = 3,
                    warmup: int = 1) -> tuple[float, float]:
    """Images per second of ``baseline(images)`` and ``fn(images)``, timed in alternation (A B A B ...) so
    that load changes on a shared machine hit both alike; medians over at least ``min_runs`` runs each and
    ``min_time`` seconds in total. Returns ``(baseline_ips, fn_ips)``."""
    sync = torch.cuda.synchronize if images.device.type == "cuda" else (lambda: None)
    ta: list[float] = []
    tb: list[float] = []
    with torch.inference_mode():
        for _ in range(warmup):
            baseline(images)
            fn(images)
        sync()
        start = time.perf_counter()
        while len(ta) < min_runs or time.perf_counter() - start < min_time:
            for f, ts in ((baseline, ta), (fn, tb)):
                t0 = time.perf_counter()
                f(images)
                sync()
                ts.append(time.perf_counter() - t0)
    ta.sort()
    tb.sort()
    return images.shape[0] / ta[len(ta) // 2], images.shape[0] / tb[len(tb) // 2]
