"""The prune-eval study: top-1 of a ViT pruned by each scorer at each keep ratio, and its throughput; and the
comparison of token-reduction methods at their operating points.

:func:`prune_eval` (scorers x keep ratios, tokens dropped before the blocks) and :func:`compare_methods`
(any method at its operating points: pre-block scorers, in-network methods such as ToMe and EViT, and a
scorer's pre-selection followed by an in-network method; top-1, images/s and speed-up in one run) compute;
:mod:`rollout_fast.prune.report` formats, writes and plots the results. The ``rollout-fast prune-eval``
command (:mod:`rollout_fast.cli.prune_eval`, ``--scorers/--keep`` or ``--methods``) and
``python/prune_eval.py`` run them.

A method of :func:`compare_methods` is a spec string ``NAME[:KEY=V1,V2,...]...`` (:func:`parse_method`):

- ``NAME``: a pre-block scorer (:func:`~rollout_fast.prune.register_scorer`: ``random``, ``student``, ...;
  :func:`~rollout_fast.prune.prune_tokens`), an in-network method (:func:`~rollout_fast.prune.register_method`:
  ``tome``, ``evit``, ``ats``; :func:`~rollout_fast.prune.reduce_tokens`), or ``SCORER+METHOD`` (pre-select with the
  scorer, then reduce inside: :func:`~rollout_fast.prune.inner.prune_and_reduce`, e.g. ``student+tome``).
  So a new scorer or method is one registry entry, usable here with no other change.
- ``KEY=V1,V2``: the operating points of one setting; values are JSON (numbers, ``true``, ``[1,2,3]``;
  commas inside brackets do not split). Keys: a scorer's ``keep`` (= ``keep_ratio``, default
  :data:`PRESELECT_POINTS`), ``seed`` and ``stratify`` (``true``: stratified top-k,
  :mod:`~rollout_fast.prune.stratify`); a method's own arguments (ToMe ``r``, ``prop_attn``; EViT
  ``keep`` = ``keep_ratio``, ``blocks``, ``fuse``; ATS ``keep``, ``blocks``; defaults: its ``operating_points``). In ``SCORER+METHOD``
  a key goes to the scorer when both have it; ``METHOD.KEY`` (``evit.keep``) names the other.
- Several keys: every combination (``student+tome:keep=0.75,0.5:r=2,4`` is four operating points).
- A method that ranks tokens by the scorer's scores (``uses_scores``: ``smerge``,
  :mod:`~rollout_fast.prune.smerge`) runs only as ``SCORER+METHOD``; its scorer then drops nothing itself and
  ``keep`` is the method's (``student+smerge:keep=0.375``, ``student+smerge:keep=[0.375,0.125]:blocks=[1]``).

Examples: ``tome:r=2,4,6,8``, ``evit:keep=0.7,0.5:blocks=[1,2,3]``, ``student:keep=0.75,0.5``,
``random:keep=0.5:seed=0,1,2``, ``student+tome:keep=0.75:r=2,4``, ``ats:keep=1.0,0.5:blocks=[1,2,3]``,
``model-rollout:keep=0.5`` (with ``scorer_model``).
"""

from __future__ import annotations

import datetime
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..capture import UnsupportedModelError, token_layout
from .inner import prune_and_reduce, reduce_tokens
from .keep import keep_count
from .model import prune_tokens
from .progress import AccuracyCheckpoint, data_fingerprint
from .scorers import PatchScorer, RandomScorer, check_scores, make_scorer
from .spec import PRESELECT_POINTS, MethodSpec, OperatingPoint, parse_method
from .timing import measure_speedup, measure_throughput

__all__ = ["PRESELECT_POINTS", "BuiltMethod", "MethodSpec", "OperatingPoint", "build_methods", "compare_methods",
           "parse_method", "prune_eval", "scorer_cost"]


def prune_eval(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, scorers: Sequence[str],
               keeps: Sequence[float], seeds: int = 3, batch_size: int = 256,
               throughput_batches: Sequence[int] = (1, 256), throughput_time: float = 1.0, device="cpu",
               student=None, thumbnail=None, block: int = 0, rollout_discard_ratio: float = 0.9,
               scorer_model=None, image_norm=None, progress: bool = True, accuracy: bool = True,
               checkpoint: AccuracyCheckpoint | None = None) -> dict:
    """Top-1 of ``model`` pruned by each scorer at each keep ratio, and images/s (scorer included).

    ``student``, ``thumbnail``, ``block``, ``rollout_discard_ratio``, ``scorer_model``, ``image_norm``: the
    scorers' options (:func:`~rollout_fast.prune.make_scorer`; ``scorer_model`` for 'model-rollout').

    Throughput: each pruned configuration is timed in alternation with the full model
    (:func:`measure_speedup`), so ``speedup`` compares runs made under the same machine load; the 'full'
    row is the median of those full-model timings. ``accuracy=False`` only times (``rows`` empty).

    Scores are computed once per batch and scorer (they do not depend on the keep ratio) and shared by the
    keep ratios; 'random' is run with seeds ``0 .. seeds-1`` (mean and standard deviation reported).
    ``checkpoint``: the counts are saved after every batch and a matching saved pass is resumed
    (:class:`~rollout_fast.prune.progress.AccuracyCheckpoint`; the caller removes it once the results are written).

    Scorer cost: with timing (``throughput_batches`` not empty), every scorer that runs a network of its own
    (a student, a scorer model: :meth:`PatchScorer.module`) gets its parameters, MACs per image and latency
    alone (:func:`scorer_cost`, the measurement of the students' cards), so scorers can be compared at equal
    cost (e.g. the distilled student against a thumbnail LTPA model's attention, ``'ltpa'``).

    Returns:
        dict with ``rows`` (scorer, keep_ratio, tokens_kept, num_patches, dropped_fraction, top1, top1_std,
        seeds, images), ``throughput`` (scorer, keep_ratio, batch, images_per_s, speedup), ``scorer_cost``
        (scorer, params, macs_per_image, latency_ms_batch1, ms_per_image_batch<B>, device, threads; empty
        without timing) and ``meta``.
    """
    model = model.to(device).eval()
    layout = token_layout(model, tuple(images.shape[-2:]))
    options = {"student": student, "thumbnail": thumbnail, "block": block,
               "rollout_discard_ratio": rollout_discard_ratio, "scorer_model": scorer_model, "image_norm": image_norm}
    timed = {name: make_scorer(name, seed=0, **options) for name in dict.fromkeys(scorers)}  # one each, seed 0
    for sc in timed.values():
        sc.check_model(model)  # e.g. a scorer model with another patch grid: refused before any compute
    full_top1, rows = None, []
    if accuracy:
        full_top1, rows = _accuracy(model, images, labels, _scorer_runs(timed, seeds), keeps,
                                    batch_size=batch_size, grid=layout.grid, device=device, progress=progress,
                                    checkpoint=checkpoint)
    throughput = []
    for bsz in throughput_batches:
        throughput += _throughput(model, images, timed, keeps, bsz, throughput_time, device)
    cost = []
    if throughput_batches:
        size = tuple(images.shape[-2:])
        cost = [c for c in (scorer_cost(sc, model, size, batch_size=max(throughput_batches), device=device)
                            for sc in timed.values()) if c is not None]
    meta = {"full_top1": full_top1, "images": images.shape[0] if accuracy else 0,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "num_patches": layout.grid[0] * layout.grid[1], "num_prefix_tokens": layout.num_prefix_tokens,
            **_environment(device), "seeds": seeds, "rollout_discard_ratio": rollout_discard_ratio,
            "cls_block": block}
    return {"rows": rows, "throughput": throughput, "scorer_cost": cost, "meta": meta}


def scorer_cost(scorer: PatchScorer, model: nn.Module, image_size: tuple[int, int], *, batch_size: int = 64,
                repeats: int = 5, device="cpu") -> dict | None:
    """The cost of a scorer alone, as the students' cards report a student's
    (:func:`rollout_fast.students.measure_cost` on ``scorer.score(model, x)``, random (B, 3, H, W) inputs at
    the pruned model's ``image_size``): ``{"scorer", "params", "macs_per_image", "latency_ms_batch1",
    "ms_per_image_batch<batch_size>", "device", "threads"}``. Params: :meth:`PatchScorer.module`'s; MACs: matmuls
    and convolutions (``torch.utils.flop_counter``), so resizing the image for a scorer is not counted. None
    for a scorer without a network of its own (random, cls-attention, the model's own rollout)."""
    from ..students.cost import measure_cost

    net = scorer.module()
    if net is None:
        return None
    cost = measure_cost(lambda x: scorer.score(model, x), net, image_size, batch_size=batch_size,
                        repeats=repeats, device=device)
    return {"scorer": scorer.name, **cost}


def _scorer_runs(timed: dict[str, PatchScorer], seeds: int) -> list[tuple[str, PatchScorer]]:
    """(name, scorer) evaluated: each scorer once, 'random' once per seed ``0 .. seeds-1``."""
    runs: list[tuple[str, PatchScorer]] = []
    for name, sc in timed.items():
        runs += [("random", RandomScorer(s)) for s in range(seeds)] if name == "random" else [(name, sc)]
    return runs


def _accuracy(model, images, labels, runs, keeps, *, batch_size, grid, device, progress, checkpoint=None):
    """``(full-model top-1, rows)``: every run's scores computed once per batch, shared by the keep ratios;
    the counts saved to / resumed from ``checkpoint`` after every batch."""
    from tqdm.auto import tqdm

    pruned = {r: prune_tokens(model, r, "random") for r in keeps if r < 1.0}  # scores are passed in explicitly
    n = images.shape[0]
    state = {"full": 0, "correct": [[0] * len(keeps) for _ in runs], "scorers": [None] * len(runs)}
    first = _resume(checkpoint, state, {"study": "scorers", "runs": [m for m, _ in runs], "keeps": list(keeps),
                                        "batch_size": batch_size, "data": data_fingerprint(images, labels)})
    for (_, sc), st in zip(runs, state["scorers"]):
        sc.set_state(st)
    with torch.inference_mode():
        for start in tqdm(range(first, n, batch_size), desc="prune-eval", disable=not progress):
            x = images[start:start + batch_size].to(device)
            y = labels[start:start + batch_size].to(device)
            full = int((model(x).argmax(-1) == y).sum())
            state["full"] += full
            for i, (_, sc) in enumerate(runs):
                s = check_scores(sc.score(model, x), x.shape[0], grid, f"scorer {sc.name!r}")
                for j, r in enumerate(keeps):  # keep 1.0 is the unpruned model exactly (tested): not rerun
                    state["correct"][i][j] += full if r >= 1.0 else int((pruned[r](x, scores=s).argmax(-1) == y).sum())
            if checkpoint is not None:
                state["scorers"] = [sc.get_state() for _, sc in runs]
                checkpoint.save(start + x.shape[0], state)
    correct = {(i, r): state["correct"][i][j] for i in range(len(runs)) for j, r in enumerate(keeps)}
    return state["full"] / n, _accuracy_rows(runs, correct, keeps, n, grid[0] * grid[1])


def _resume(checkpoint: AccuracyCheckpoint | None, state: dict, key: dict) -> int:
    """The first image of the pass: 0, or where ``checkpoint``'s saved pass stopped (``state`` updated)."""
    saved = checkpoint.begin(key) if checkpoint is not None else None
    if saved is None:
        return 0
    state.update(saved["state"])
    return saved["next"]


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
    xb = _timing_batch(images, bsz, device)
    configs = [(name, r, sc) for name, sc in timed.items() for r in keeps if r < 1.0]
    full, ips = _time_against_full(model, xb, [(lambda r=r, sc=sc: prune_tokens(model, r, sc), sc)
                                               for _, r, sc in configs], min_time)
    return [{"scorer": "full", "keep_ratio": 1.0, "batch": bsz, "images_per_s": full, "speedup": 1.0},
            *({"scorer": name, "keep_ratio": r, "batch": bsz, "images_per_s": v, "speedup": v / full}
              for (name, r, _), v in zip(configs, ips))]


def _timing_batch(images: torch.Tensor, bsz: int, device) -> torch.Tensor:
    """``bsz`` images (the evaluation images repeated as needed) on ``device``."""
    return images.repeat(-(-bsz // images.shape[0]), 1, 1, 1)[:bsz].to(device)


def _time_against_full(model, xb, runs: Sequence[tuple[Callable[[], Callable], PatchScorer | None]],
                       min_time: float) -> tuple[float, list[float]]:
    """``(full model images/s, [images/s of each run])`` on batch ``xb``: each run (``make() -> fn``, its scorer
    reset first) timed in alternation with the full model (:func:`measure_speedup`); the full figure is the
    median of those alternated timings (one timing alone when there are no runs)."""
    fulls, ips = [], []
    for make, sc in runs:
        if sc is not None:
            sc.reset()
        full, v = measure_speedup(model, make(), xb, min_time=min_time)
        fulls.append(full)
        ips.append(v)
    if not fulls:
        fulls.append(measure_throughput(model, xb, min_time=min_time))
    fulls.sort()
    return fulls[len(fulls) // 2], ips


def _environment(device) -> dict:
    return {"device": str(device) if str(device) != "cuda" else torch.cuda.get_device_name(),
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


# --- compare_methods: token-reduction methods at their operating points, in one run -----------------------

@dataclass
class BuiltMethod:
    """One method at one operating point, built on the model (:func:`build_methods`).

    ``module(images)`` -> logits with the method's own cost (the scorer runs inside); with a pre-block
    ``scorer``, ``module(images, scores=S)`` takes (B, G) scores computed once and shared (``scorer_key``
    names them; ``needs_scores`` is False when nothing is dropped before the blocks). ``tokens``: the tokens
    entering each block for the model's image size (for a method whose count depends on the image, ATS, the
    mean over the evaluated images once :func:`compare_methods` has run them). ``reducer``: the in-network
    method's :class:`~rollout_fast.prune.TokenReducer` (None for a scorer alone).
    """

    method: str
    setting: str
    module: nn.Module
    scorer: PatchScorer | None
    scorer_key: tuple | None
    needs_scores: bool
    tokens: list
    reducer: object = None


def build_methods(model: nn.Module, methods: Sequence[str | MethodSpec], image_size: tuple[int, int], *,
                  student=None, thumbnail=None, block: int = 0, rollout_discard_ratio: float = 0.9,
                  scorer_model=None, image_norm=None) -> list[BuiltMethod]:
    """Every method of ``methods`` (spec strings or :class:`MethodSpec`) at each of its operating points.

    One scorer per (scorer name, seed) is made (``student``, ``thumbnail``, ``block``,
    ``rollout_discard_ratio``, ``scorer_model``, ``image_norm``: :func:`~rollout_fast.prune.make_scorer`'s
    options) and shared by its points.
    Building is cheap (shallow copies); nothing runs.

    Raises:
        ValueError / UnsupportedModelError: a bad spec (:func:`parse_method`), or a method or setting the
            model refuses (r too large for its tokens, 'student' without a student, EViT without a class
            token); the message starts with the spec and the operating point.
    """
    layout = token_layout(model, tuple(image_size))
    G, P, depth = layout.grid[0] * layout.grid[1], layout.num_prefix_tokens, len(model.blocks)
    options = {"student": student, "thumbnail": thumbnail, "block": block,
               "rollout_discard_ratio": rollout_discard_ratio, "scorer_model": scorer_model, "image_norm": image_norm}
    scorers: dict[tuple, PatchScorer] = {}
    built = []
    for spec in (m if isinstance(m, MethodSpec) else parse_method(m) for m in methods):
        for pt in spec.points:
            try:
                built.append(_build_one(model, spec, pt, scorers, options, G, P, depth, layout.num_tokens))
            except (ValueError, UnsupportedModelError) as e:
                err = ValueError if isinstance(e, ValueError) else UnsupportedModelError
                raise err(f"{spec.text}: {pt.label}: {e}") from None
    return built


def _build_one(model, spec: MethodSpec, pt: OperatingPoint, scorers: dict, options: dict, G: int, P: int,
               depth: int, num_tokens: int) -> BuiltMethod:
    if spec.scorer is None:
        module = reduce_tokens(model, spec.reducer, **pt.reducer)
        return BuiltMethod(spec.name, pt.label, module, None, None, False, module.method.plan(num_tokens)[:-1],
                           module.method)
    key = (spec.scorer, pt.scorer.get("seed", 0))
    if key not in scorers:
        scorers[key] = make_scorer(spec.scorer, seed=key[1], **options)
    sc, keep = scorers[key], pt.scorer.get("keep_ratio", 1.0)  # 1.0: a method ranking by the scores (smerge)
    k, stratify = keep_count(keep, G), pt.scorer.get("stratify", False)
    if spec.reducer is None:
        return BuiltMethod(spec.name, pt.label, prune_tokens(model, keep, sc, stratify=stratify), sc, key, k < G,
                           [P + k] * depth)
    module = prune_and_reduce(model, keep, sc, spec.reducer, pt.reducer, stratify=stratify)
    reducer = module.vit.blocks.reducer
    return BuiltMethod(spec.name, pt.label, module, sc, key, k < G or module.pruner.score_always,
                       reducer.plan(P + k)[:-1], reducer)


def compare_methods(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, methods: Sequence[str | MethodSpec],
                    *, batch_size: int = 256, throughput_batches: Sequence[int] = (1, 256),
                    throughput_time: float = 1.0, device="cpu", student=None, thumbnail=None, block: int = 0,
                    rollout_discard_ratio: float = 0.9, scorer_model=None, image_norm=None, progress: bool = True,
                    accuracy: bool = True, checkpoint: AccuracyCheckpoint | None = None) -> dict:
    """Top-1, images/s and speed-up of each method at each operating point, on the same images, model and run.

    Args:
        model: a timm ViT (moved to ``device``, eval mode).
        images: (B, 3, H, W) float evaluation images (the model's normalisation applied); labels: (B,) int64.
        methods: spec strings (``'tome:r=2,4'``, ``'student+tome:keep=0.75:r=2'``; see the module docstring)
            or :class:`MethodSpec`.
        batch_size: evaluation batch. throughput_batches: batch sizes timed (empty: no timing).
        throughput_time: seconds per timing (median of runs, at least 3 each).
        student, thumbnail, block, rollout_discard_ratio, scorer_model, image_norm: the scorers' options
            (:func:`make_scorer`; ``scorer_model``: the ViT whose rollout 'model-rollout' uses).
        accuracy: False only times (top-1 None).
        checkpoint: the top-1 counts saved after every batch, a matching saved pass resumed
            (:class:`~rollout_fast.prune.progress.AccuracyCheckpoint`).

    Top-1: the full model's logits once per batch; each pre-block scorer's scores once per batch and scorer
    (shared by its keep ratios and its ``SCORER+METHOD`` points). Throughput: each method at each point is
    timed on batches of the evaluation images, with its own cost (the scorer's forward, ToMe's matching,
    EViT's top-k) included, in alternation with the full model (:func:`measure_speedup`), so ``speedup``
    compares runs under the same machine load; the 'full' rows are the median of those full timings.

    Returns:
        dict: ``rows``, one per (method, setting, batch): ``method``, ``setting`` ('-' for the full model),
        ``batch`` (None without timing), ``tokens`` (mean tokens entering a block), ``top1``, ``images_per_s``,
        ``speedup``; the 'full' rows first. ``methods``: the spec strings. ``meta``: full top-1, image count,
        patch grid, device, CPU, threads, torch, date, load average.

    Raises:
        ValueError / UnsupportedModelError: see :func:`build_methods` (raised before any compute).
    """
    model = model.to(device).eval()
    specs = [m if isinstance(m, MethodSpec) else parse_method(m) for m in methods]
    runs = build_methods(model, specs, tuple(images.shape[-2:]), student=student, thumbnail=thumbnail, block=block,
                         rollout_discard_ratio=rollout_discard_ratio, scorer_model=scorer_model, image_norm=image_norm)
    layout = token_layout(model, tuple(images.shape[-2:]))
    full_top1, top1 = None, [None] * len(runs)
    if accuracy:
        full_top1, top1 = _methods_accuracy(model, images, labels, runs, batch_size, layout.grid, device, progress,
                                            checkpoint)
    timing = {}
    for bsz in throughput_batches:
        timing[bsz] = _time_against_full(model, _timing_batch(images, bsz, device),
                                         [(lambda r=r: r.module, r.scorer) for r in runs], throughput_time)
    rows = _method_rows(runs, full_top1, top1, timing, layout.num_tokens)
    meta = {"full_top1": full_top1, "images": images.shape[0] if accuracy else 0,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "num_patches": layout.grid[0] * layout.grid[1], "num_prefix_tokens": layout.num_prefix_tokens,
            "num_tokens": layout.num_tokens, "depth": len(model.blocks), **_environment(device),
            "rollout_discard_ratio": rollout_discard_ratio, "cls_block": block}
    return {"rows": rows, "methods": [s.text for s in specs], "meta": meta}


def _methods_accuracy(model, images, labels, runs: list[BuiltMethod], batch_size: int, grid, device,
                      progress: bool, checkpoint: AccuracyCheckpoint | None = None) -> tuple[float, list[float]]:
    """``(full-model top-1, [top-1 of each run])``; scores computed once per batch and scorer. A run whose
    reducer counts its tokens per image (ATS) gets ``tokens`` = the mean over these images. The counts saved to
    / resumed from ``checkpoint`` after every batch."""
    from tqdm.auto import tqdm

    for r in runs:
        if r.scorer is not None:
            r.scorer.reset()
        if r.reducer is not None:
            r.reducer.reset_observed()
    n = images.shape[0]
    state = {"full": 0, "correct": [0] * len(runs), "scorers": [None] * len(runs), "observed": [None] * len(runs)}
    first = _resume(checkpoint, state, {"study": "methods", "runs": [[r.method, r.setting] for r in runs],
                                        "batch_size": batch_size, "data": data_fingerprint(images, labels)})
    _restore_runs(runs, state)
    with torch.inference_mode():
        for start in tqdm(range(first, n, batch_size), desc="prune-eval --methods", disable=not progress):
            x = images[start:start + batch_size].to(device)
            y = labels[start:start + batch_size].to(device)
            state["full"] += int((model(x).argmax(-1) == y).sum())
            scores: dict[tuple, torch.Tensor] = {}
            for i, r in enumerate(runs):
                if r.needs_scores:
                    if r.scorer_key not in scores:
                        scores[r.scorer_key] = check_scores(r.scorer.score(model, x), x.shape[0], grid,
                                                            f"scorer {r.scorer.name!r}")
                    out = r.module(x, scores=scores[r.scorer_key])
                else:
                    out = r.module(x)
                state["correct"][i] += int((out.argmax(-1) == y).sum())
            if checkpoint is not None:
                state["scorers"] = [r.scorer.get_state() if r.scorer is not None else None for r in runs]
                state["observed"] = [r.reducer.observed_state() if r.reducer is not None else None for r in runs]
                checkpoint.save(start + x.shape[0], state)
    for r in runs:
        seen = r.reducer.observed_tokens() if r.reducer is not None else None
        if seen is not None:
            r.tokens = seen
    return state["full"] / n, [c / n for c in state["correct"]]


def _restore_runs(runs: list[BuiltMethod], state: dict) -> None:
    """Put the saved random streams and observed token counts of a resumed pass back into the runs."""
    for r, sc, seen in zip(runs, state["scorers"], state["observed"]):
        if r.scorer is not None:
            r.scorer.set_state(sc)
        if r.reducer is not None:
            r.reducer.load_observed(seen)


def _method_rows(runs: list[BuiltMethod], full_top1, top1: list, timing: dict, num_tokens: int) -> list[dict]:
    batches = list(timing) or [None]
    rows = [{"method": "full", "setting": "-", "batch": b, "tokens": float(num_tokens), "top1": full_top1,
             "images_per_s": timing[b][0] if b is not None else None, "speedup": 1.0 if b is not None else None}
            for b in batches]
    for i, r in enumerate(runs):
        for b in batches:
            ips = timing[b][1][i] if b is not None else None
            rows.append({"method": r.method, "setting": r.setting, "batch": b,
                         "tokens": round(sum(r.tokens) / len(r.tokens), 2), "top1": top1[i], "images_per_s": ips,
                         "speedup": ips / timing[b][0] if b is not None else None})
    return rows
