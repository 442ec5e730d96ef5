"""The end of a distillation run (rank 0): the student on the test split, centred and shifted (the
object-placement test), next to the centre-prior, mean-map and uniform baselines, the cost of student and
teacher, and the student's card."""

from __future__ import annotations

import shlex
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from ..metrics import MapMetrics, fit_centre_prior, uniform_map
from ..students import RolloutStudent, count_macs, measure_cost
from .config import DistillConfig
from .rollout_task import Seen, evaluate
from .targets import EVAL_BATCH, TeacherTargets

__all__ = ["TestSet", "final_metrics", "student_card"]


class TestSet:
    """The test split (uint8 images) with the teacher's maps, centred and shifted by ``shift`` pixels."""

    def __init__(self, images: torch.Tensor, maps: torch.Tensor, params, maps_shifted: torch.Tensor,
                 params_shifted, shift: int):
        self.images, self.maps, self.params = images, maps, params
        self.maps_shifted, self.params_shifted, self.shift = maps_shifted, params_shifted, shift


def baseline_metrics(prior: torch.Tensor, maps: torch.Tensor, seed: int) -> dict:
    """Metrics of the same map for every image. Top-k recall breaks the baseline's ties at random
    (seeded), so a constant map scores chance (k/G) rather than whatever ``topk`` picks first."""
    from ..metrics import KEEP_RATIOS, topk_recall

    g = torch.Generator().manual_seed(seed)
    m = MapMetrics()
    recall = {r: 0.0 for r in KEEP_RATIOS}
    for s in range(0, len(maps), 1000):
        t = maps[s:s + 1000]
        p = prior.expand_as(t)
        m.update(p, t)
        jitter = p + torch.rand(t.shape, generator=g) * 1e-6 * float(p.abs().max().clamp_min(1e-30))
        for r in KEEP_RATIOS:
            recall[r] += float(topk_recall(jitter, t, r).double().sum())
    out = m.compute()
    for r in KEEP_RATIOS:
        out[f"recall@{r:g}"] = recall[r] / out["images"]
    return out


def _round(d):
    if isinstance(d, dict):
        return {k: _round(v) for k, v in d.items()}
    return round(d, 4) if isinstance(d, float) else d


def _baselines(cfg: DistillConfig, test: TestSet, train_views: list, seen: Seen) -> dict:
    """Centre prior (fitted to training targets), mean training map and uniform map, centred and shifted."""
    if cfg.cache_targets:
        train_maps = torch.cat([m for _, m in train_views])
        mean = train_maps.double().mean(0).float()
        sample = train_maps[torch.randperm(len(train_maps), generator=torch.Generator().manual_seed(0))[:4096]]
    else:
        mean = (seen.total / max(seen.count, 1)).float()
        sample = seen.sample(test.maps[:0])
    sigma, prior = fit_centre_prior(sample if len(sample) else test.maps[:1000])
    out = {}
    for name, m in (("centre_prior", prior), ("mean_map", mean), ("uniform", uniform_map(tuple(mean.shape)))):
        c = baseline_metrics(m, test.maps, cfg.seed)
        sh = baseline_metrics(m, test.maps_shifted, cfg.seed)
        out[name] = {"centred": c, "shifted": sh, "cc_drop": c["cc"] - sh["cc"]}
    out["centre_prior"]["sigma_patches"] = sigma
    return out


def _cost(student: RolloutStudent, targets: TeacherTargets) -> dict:
    """Student and teacher cost; the teacher's is that of the map the student replaces."""
    dev, (H, W) = targets.env.device, targets.input_size
    student_cost = measure_cost(student, student, (H, W), batch_size=EVAL_BATCH, repeats=3, device=dev)
    teacher_cost = measure_cost(targets.maps, targets.teacher, (H, W), batch_size=EVAL_BATCH, repeats=3,
                                device=dev)
    teacher_cost["forward_macs_per_image"] = count_macs(targets.teacher, torch.randn(1, 3, H, W, device=dev))
    return {"student": student_cost, "teacher_rollout": teacher_cost,
            "macs_relative_to_teacher_forward": student_cost["macs_per_image"]
            / teacher_cost["forward_macs_per_image"],
            "latency_relative_to_teacher_rollout_batch1":
                student_cost["latency_ms_batch1"] / teacher_cost["latency_ms_batch1"]}


def final_metrics(cfg: DistillConfig, student: RolloutStudent, targets: TeacherTargets, test: TestSet,
                  train_views: list, seen: Seen, progress: bool) -> dict:
    """The run's ``metrics.json``: the student's test metrics centred and shifted, the object-placement
    verdict, the baselines and the cost (floats rounded to 4 places)."""
    student.eval()
    norm = targets.norm
    centred = evaluate(student, norm, test.images, test.maps, test.params, progress, "test")
    shifted = evaluate(student, norm, test.images, test.maps_shifted, test.params_shifted, progress,
                       "test shifted")
    baselines = _baselines(cfg, test, train_views, seen)
    cost = _cost(student, targets)
    cc_drop = centred["cc"] - shifted["cc"]
    ex = targets.explainer
    return _round({
        "student": student.spec, "teacher": cfg.teacher,
        "rollout": {"target": cfg.target, "head_fusion": cfg.head_fusion if cfg.target == "rollout" else
                    "gradient-weighted mean", "discard_ratio": cfg.discard_ratio,
                    "readout": ex.readout, "normalize": ex.normalize},
        "test_images": len(test.images), "centred": centred, "shifted": shifted,
        "object_placement": {"shift_pixels": test.shift, "cc_centred": centred["cc"], "cc_shifted": shifted["cc"],
                             "cc_drop": cc_drop, "passed": bool(cc_drop <= 0.05)},
        "baselines": baselines,
        "cost": cost,
    })


def student_card(cfg: DistillConfig, student: RolloutStudent, targets: TeacherTargets, metrics: dict,
                 command: str | None) -> dict:
    """The student's card (saved beside its weights; :func:`rollout_fast.load_student` returns it)."""
    H, W = targets.input_size
    return {
        "name": f"{Path(str(cfg.teacher)).stem}-student",
        "teacher": cfg.teacher,
        "rollout": metrics["rollout"],
        "input": {"strategy": cfg.strategy, "factor": cfg.factor, "teacher_input_size": [H, W],
                  "student_input_size": list(student.thumbnail_size), "data_config": {
                      k: list(v) if isinstance(v, tuple) else v for k, v in targets.data_config.items()}},
        "output": {"grid": list(targets.grid), "scores": "logits (B, gh, gw); higher = more important",
                   "maps": f"{student.activation} over the grid, then max-normalised (student.maps)"},
        "metrics": {"centred": metrics["centred"], "shifted": metrics["shifted"],
                    "object_placement": metrics["object_placement"]},
        "cost": metrics["cost"],
        "training": {**{k: v for k, v in asdict(cfg).items()}, "device": str(targets.env.device),
                     "world_size": targets.env.world, "torch": torch.__version__},
        "command": command or " ".join(shlex.quote(a) for a in sys.argv),
        "source": "rollout_fast.distill; seeds' rollout-prediction students (REFERENCE.md section 5)",
    }
