"""Do a CNN's learned attention and a ViT's attention flow agree? Learn to Pay Attention maps (Jetley et al., ICLR
2018) against a ViT teacher's attention rollout (Abnar & Zuidema, ACL 2020) and gradient rollout (Chefer et al.,
CVPR 2021, vit-explain's form) on the teacher's patch grid, beside the centre prior and the mean map; and how
spread each LTPA level is (:func:`level_entropy`).

:func:`agreement_study` computes; :func:`study_markdown` formats; ``python/ltpa_study.py`` is the recipe that
loads the models and data and writes ``ltpa_study.json`` + ``ltpa_study.md``.

Protocol, per image of the evaluation set (the teacher's eval transform):

- targets: the teacher's attention rollout (mean head fusion, discard ratio 0, class-token row, max-normalised)
  and its gradient rollout for its predicted class, (gh, gw) on its patch grid;
- LTPA sources: each LTPA model sees the teacher's input re-normalised to its mean/std and resized to its own
  input size (bilinear, antialiased: :func:`rollout_fast.prune.cross.prepare_input`, as the ``ltpa`` pruning
  scorer); each level alone and the three combined (:func:`rollout_fast.ltpa.ltpa_saliency`: resized to the
  teacher's grid, each normalised to sum 1, averaged);
- baselines, per target: the centre prior (:func:`rollout_fast.metrics.fit_centre_prior`, the Gaussian width
  with the best mean CC) and the mean map (:func:`rollout_fast.metrics.mean_map`), both fitted to the same
  images' target maps (in-sample: an optimistic baseline, so an LTPA map that beats it beats it fairly);
- metrics (:mod:`rollout_fast.metrics`, per image, then the mean over images): CC, top-50% recall
  (:func:`~rollout_fast.metrics.topk_recall` at keep ratio 0.5) and Spearman rank correlation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from .metrics import cc, fit_centre_prior, mean_map, spearman, topk_recall

__all__ = ["METRICS", "TARGETS", "agreement_study", "level_entropy", "study_markdown"]

TARGETS = ("rollout", "grad-rollout")
METRICS = {"cc": cc, "recall@0.5": lambda p, t: topk_recall(p, t, 0.5), "spearman": spearman}


def _scores(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: f(pred, target).double() for k, f in METRICS.items()}


def agreement_study(teacher: nn.Module, teacher_config: Mapping, ltpa_models: Mapping[str, tuple], images: torch.Tensor,
                    *, batch_size: int = 64, top: float = 0.05, progress: bool = False) -> dict:
    """Agreement of every LTPA level (and their combination) with the teacher's rollout and gradient rollout.

    Args:
        teacher: a ViT :class:`rollout_fast.AttentionRollout` takes (eval mode), e.g. ``load_teacher("cifar10-vit")``.
        teacher_config: its data config (``mean``, ``std``; the images are normalised with them).
        ltpa_models: ``{name: (AttnVGG, data_config)}`` (attention-gated models, as ``load_teacher`` returns
            them; a data config without ``mean``/``std`` means no re-normalisation).
        images: (M, 3, H, W) float32, the teacher's eval transform applied (:func:`rollout_fast.data.load_eval_data`).
        batch_size: images per forward pass. top: :func:`level_entropy`'s fraction.

    Returns:
        ``{"rows": [...], "entropy": [...], "meta": {...}}``. ``rows``: one per (source, target): ``source``
        ("NAME level 1/2/3", "NAME combined", "centre prior", "mean map"), ``model`` (NAME or None), ``level``
        (1, 2, 3, "combined" or None), ``target`` ("rollout" | "grad-rollout"), mean ``cc``, ``recall@0.5``,
        ``spearman`` (floats) and ``images``. ``entropy``: per model and level, ``map_size`` [h, w], mean
        normalised ``entropy``, mean ``top_mass`` (the top ``top`` of the locations) and ``images``.
        ``meta``: grid, images, top, centre-prior sigma per target.

    Raises:
        ValueError: an LTPA model that is not an attention-gated AttnVGG, an empty ``images``, ``batch_size`` < 1.
        rollout_fast.capture.UnsupportedModelError: ``teacher`` is not a supported ViT.
    """
    from tqdm.auto import tqdm

    from .explain import AttentionRollout
    from .ltpa import LTPAExplainer, ltpa_saliency
    from .prune.cross import prepare_input

    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images: expected a non-empty (M, 3, H, W) tensor, got {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    explainers = {name: LTPAExplainer(model) for name, (model, _) in ltpa_models.items()}
    norms = {name: _renormalization(teacher_config, config) for name, (_, config) in ltpa_models.items()}
    rollout = AttentionRollout(teacher, head_fusion="mean", discard_ratio=0.0)
    dev = next(teacher.parameters()).device
    targets: dict[str, list] = {t: [] for t in TARGETS}
    sources: dict[tuple, list] = {}
    ent_sum: dict[str, tuple] = {}
    for start in tqdm(range(0, images.shape[0], batch_size), desc="ltpa study", disable=not progress):
        x = images[start:start + batch_size].to(dev)
        targets["rollout"].append(rollout(x).cpu())
        targets["grad-rollout"].append(rollout.grad_rollout(x).cpu())
        grid = tuple(targets["rollout"][-1].shape[-2:])
        for name, (model, _) in ltpa_models.items():
            xp = prepare_input(x, model, (model.img_size, model.img_size), norms[name])
            levels = explainers[name].explain(xp, grid=grid).levels
            for i in range(len(levels)):
                sources.setdefault((name, i + 1), []).append(ltpa_saliency(levels, grid, levels=[i]).cpu())
            sources.setdefault((name, "combined"), []).append(ltpa_saliency(levels, grid).cpu())
            e, m = level_entropy(levels, top)
            se, sm = ent_sum.get(name, (0, 0))
            ent_sum[name] = (se + e.sum(0), sm + m.sum(0))
    targets = {t: torch.cat(v) for t, v in targets.items()}
    n = images.shape[0]
    rows, sigmas = [], {}
    for t in TARGETS:
        tm = targets[t]
        sigmas[t], prior = fit_centre_prior(tm)
        candidates = [(f"{name} level {lv}" if lv != "combined" else f"{name} combined", name, lv, torch.cat(v))
                      for (name, lv), v in sources.items()]
        candidates += [("centre prior", None, None, prior.expand_as(tm)),
                       ("mean map", None, None, mean_map(tm).expand_as(tm))]
        for source, name, lv, pred in candidates:
            scores = _scores(pred, tm)
            rows.append({"source": source, "model": name, "level": lv, "target": t,
                         **{k: float(v.mean()) for k, v in scores.items()}, "images": n})
    entropy = [{"model": name, "variant": model.variant, "level": i + 1, "map_size": list(size),
                "entropy": float(se[i] / n), "top_mass": float(sm[i] / n), "images": n}
               for name, (se, sm) in ent_sum.items() for model in [ltpa_models[name][0]]
               for i, size in enumerate(model.map_sizes)]
    meta = {"images": n, "grid": list(targets["rollout"].shape[-2:]), "top": top,
            "centre_prior_sigma": sigmas, "rollout": "mean head fusion, discard ratio 0, class-token row",
            "grad_rollout": "predicted class, discard ratio 0"}
    return {"rows": rows, "entropy": entropy, "meta": meta}


def _renormalization(teacher_config: Mapping, config: Mapping | None):
    """``((teacher mean, std), (model mean, std))`` when an LTPA model's data config normalises otherwise than the
    teacher's (:func:`rollout_fast.prune.cross.prepare_input`'s ``renormalize``), else None."""
    ours = (tuple(teacher_config["mean"]), tuple(teacher_config["std"]))
    if not config or "mean" not in config or (tuple(config["mean"]), tuple(config["std"])) == ours:
        return None
    return ours, (tuple(config["mean"]), tuple(config["std"]))


def level_entropy(maps, top: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """How spread each attention level is: normalised entropy and the mass in the top locations, per image.

    For each level and image, the map is made a distribution ``p_i = a_i / sum_j a_j`` over its ``n = h * w``
    positions (softmax maps already are one; sigmoid maps are divided by their sum). Then

    - normalised entropy ``H = -sum_i p_i log p_i / log n`` (``0 log 0 = 0``), in [0, 1]: 1 for a uniform
      map, 0 for all mass on one position (a level of one position gets 0);
    - top mass: ``sum`` of the ``k = max(1, ceil(top * n))`` largest ``p_i`` (the fraction of the attention in
      the top ``top`` of the locations; ``k / n`` for a uniform map).

    The seed (Jetley et al. 2018, Learn to Pay Attention, ICLR; its figures) saw the first level's attention be
    about zero almost everywhere: a low entropy and a top mass near 1 at level 1.

    Args:
        maps: :class:`~rollout_fast.ltpa.AttnVGG`'s ``maps`` (three (B, h_i, w_i) or (B, 1, h_i, w_i) tensors, non-negative, any
            float dtype). top: the fraction of locations, in (0, 1].

    Returns:
        ``(entropy, top_mass)``: two (B, levels) float64 tensors (means over a test set are left to the caller).

    Raises:
        ValueError: ill-shaped ``maps`` (as :func:`~rollout_fast.ltpa.ltpa_saliency`), a negative or all-zero map, or ``top``
            outside (0, 1].
    """
    from .ltpa import _check_maps

    maps = _check_maps(maps)
    if isinstance(top, bool) or not isinstance(top, (int, float)) or not 0 < top <= 1:
        raise ValueError(f"top must be a fraction in (0, 1], got {top!r}")
    ent, mass = [], []
    for i, m in enumerate(maps):
        p = m.double().flatten(1)
        if bool((p < 0).any()):
            raise ValueError(f"maps[{i}] has negative values; attention maps are non-negative")
        total = p.sum(dim=1, keepdim=True)
        if bool((total <= 0).any()):
            raise ValueError(f"maps[{i}] has an image whose map is all zeros")
        p = p / total
        n = p.shape[1]
        h = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(dim=1)
        ent.append(h / math.log(n) if n > 1 else torch.zeros_like(h))
        mass.append(p.topk(max(1, math.ceil(top * n - 1e-9)), dim=1).values.sum(dim=1))
    return torch.stack(ent, dim=1), torch.stack(mass, dim=1)


def study_markdown(result: dict) -> str:
    """Two Markdown tables: agreement (source x {rollout, grad-rollout} x {CC, recall@0.5, Spearman}) and the
    levels' entropy (model, level, map size, normalised entropy, top mass), with a line naming the images."""
    m = result["meta"]
    by = {(r["source"], r["target"]): r for r in result["rows"]}
    head = ["source"] + [f"{t} {k}" for t in TARGETS for k in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for source in dict.fromkeys(r["source"] for r in result["rows"]):
        cells = [f"{by[(source, t)][k]:.3f}" for t in TARGETS for k in METRICS]
        lines.append(f"| {source} | " + " | ".join(cells) + " |")
    lines.append(f"\nOn {m['images']} images, the teacher's {m['grid'][0]}x{m['grid'][1]} patch grid; centre prior "
                 f"and mean map fitted to the same images' maps (centre prior sigma: "
                 + ", ".join(f"{t} {s:.2f}" for t, s in m["centre_prior_sigma"].items()) + " patches).")
    top = f"{m['top']:.0%}"
    lines += ["", f"| model | variant | level | map | normalised entropy | mass in the top {top} |",
              "|---|---|---|---|---|---|"]
    for e in result["entropy"]:
        lines.append(f"| {e['model']} | {e['variant']} | {e['level']} | {e['map_size'][0]}x{e['map_size'][1]} | "
                     f"{e['entropy']:.3f} | {e['top_mass']:.3f} |")
    lines.append("\nNormalised entropy: 1 = uniform attention, 0 = all on one location (mean over images).")
    return "\n".join(lines) + "\n"
