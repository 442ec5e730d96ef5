"""The prune-eval study: top-1 of a ViT pruned by each scorer at each keep ratio, and its throughput.

:func:`prune_eval` computes; :mod:`rollout_fast.prune.report` formats, writes and plots the result. The
``rollout-fast prune-eval`` command (:mod:`rollout_fast.cli.prune_eval`) and ``python/prune_eval.py`` run it.
"""

from __future__ import annotations

import datetime
import os
import platform
from collections.abc import Sequence

import torch
from torch import nn

from ..capture import token_layout
from .keep import keep_count
from .model import prune_tokens
from .scorers import PatchScorer, RandomScorer, check_scores, make_scorer
from .timing import measure_speedup, measure_throughput

__all__ = ["prune_eval"]


def prune_eval(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, scorers: Sequence[str],
               keeps: Sequence[float], seeds: int = 3, batch_size: int = 256,
               throughput_batches: Sequence[int] = (1, 256), throughput_time: float = 1.0, device="cpu",
               student=None, thumbnail=None, block: int = 0, rollout_discard_ratio: float = 0.9,
               progress: bool = True, accuracy: bool = True) -> dict:
    """Top-1 of ``model`` pruned by each scorer at each keep ratio, and images/s (scorer included).

    Throughput: each pruned configuration is timed in alternation with the full model
    (:func:`measure_speedup`), so ``speedup`` compares runs made under the same machine load; the 'full'
    row is the median of those full-model timings. ``accuracy=False`` only times (``rows`` empty).

    Scores are computed once per batch and scorer (they do not depend on the keep ratio) and shared by the
    keep ratios; 'random' is run with seeds ``0 .. seeds-1`` (mean and standard deviation reported).

    Returns:
        dict with ``rows`` (scorer, keep_ratio, tokens_kept, num_patches, dropped_fraction, top1, top1_std,
        seeds, images), ``throughput`` (scorer, keep_ratio, batch, images_per_s, speedup) and ``meta``.
    """
    model = model.to(device).eval()
    layout = token_layout(model, tuple(images.shape[-2:]))
    options = {"student": student, "thumbnail": thumbnail, "block": block,
               "rollout_discard_ratio": rollout_discard_ratio}
    timed = {name: make_scorer(name, seed=0, **options) for name in dict.fromkeys(scorers)}  # one each, seed 0
    full_top1, rows = None, []
    if accuracy:
        full_top1, rows = _accuracy(model, images, labels, _scorer_runs(timed, seeds), keeps,
                                    batch_size=batch_size, grid=layout.grid, device=device, progress=progress)
    throughput = []
    for bsz in throughput_batches:
        throughput += _throughput(model, images, timed, keeps, bsz, throughput_time, device)
    meta = {"full_top1": full_top1, "images": images.shape[0] if accuracy else 0,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "num_patches": layout.grid[0] * layout.grid[1], "num_prefix_tokens": layout.num_prefix_tokens,
            **_environment(device), "seeds": seeds, "rollout_discard_ratio": rollout_discard_ratio,
            "cls_block": block}
    return {"rows": rows, "throughput": throughput, "meta": meta}


def _scorer_runs(timed: dict[str, PatchScorer], seeds: int) -> list[tuple[str, PatchScorer]]:
    """(name, scorer) evaluated: each scorer once, 'random' once per seed ``0 .. seeds-1``."""
    runs: list[tuple[str, PatchScorer]] = []
    for name, sc in timed.items():
        runs += [("random", RandomScorer(s)) for s in range(seeds)] if name == "random" else [(name, sc)]
    return runs


def _accuracy(model, images, labels, runs, keeps, *, batch_size, grid, device, progress):
    """``(full-model top-1, rows)``: every run's scores computed once per batch, shared by the keep ratios."""
    from tqdm.auto import tqdm

    pruned = {r: prune_tokens(model, r, "random") for r in keeps}  # scores are passed in explicitly
    correct = {(i, r): 0 for i in range(len(runs)) for r in keeps}
    full_correct = 0
    n = images.shape[0]
    with torch.inference_mode():
        for start in tqdm(range(0, n, batch_size), desc="prune-eval", disable=not progress):
            x = images[start:start + batch_size].to(device)
            y = labels[start:start + batch_size].to(device)
            full_correct += int((model(x).argmax(-1) == y).sum())
            for i, (_, sc) in enumerate(runs):
                s = check_scores(sc.score(model, x), x.shape[0], grid, f"scorer {sc.name!r}")
                for r in keeps:
                    correct[(i, r)] += int((pruned[r](x, scores=s).argmax(-1) == y).sum())
    return full_correct / n, _accuracy_rows(runs, correct, keeps, n, grid[0] * grid[1])


def _accuracy_rows(runs, correct, keeps, n: int, G: int) -> list[dict]:
    rows = []
    for name in dict.fromkeys(m for m, _ in runs):
        ids = [i for i, (m, _) in enumerate(runs) if m == name]
        for r in keeps:
            accs = torch.tensor([correct[(i, r)] / n for i in ids], dtype=torch.float64)
            k = keep_count(r, G)
            rows.append({"scorer": name, "keep_ratio": r, "tokens_kept": k, "num_patches": G,
                         "dropped_fraction": 1 - k / G, "top1": float(accs.mean()),
                         "top1_std": float(accs.std()) if len(ids) > 1 else 0.0, "seeds": len(ids), "images": n})
    return rows


def _throughput(model, images, timed, keeps, bsz: int, min_time: float, device) -> list[dict]:
    """Rows for batch ``bsz``: 'full' (median of the alternated full-model timings) then each scorer and
    keep ratio below 1."""
    xb = images.repeat(-(-bsz // images.shape[0]), 1, 1, 1)[:bsz].to(device)
    fulls, entries = [], []
    for name, sc in timed.items():
        for r in keeps:
            if r >= 1.0:
                continue
            sc.reset()
            full, ips = measure_speedup(model, prune_tokens(model, r, sc), xb, min_time=min_time)
            fulls.append(full)
            entries.append({"scorer": name, "keep_ratio": r, "batch": bsz, "images_per_s": ips,
                            "speedup": ips / full})
    if not fulls:
        fulls.append(measure_throughput(model, xb, min_time=min_time))
    fulls.sort()
    return [{"scorer": "full", "keep_ratio": 1.0, "batch": bsz, "images_per_s": fulls[len(fulls) // 2],
             "speedup": 1.0}, *entries]


def _environment(device) -> dict:
    return {"device": str(device) if str(device) != "cuda" else torch.cuda.get_device_name(),
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
