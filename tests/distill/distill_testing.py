"""Helpers shared by the distillation tests (pytest puts this folder on sys.path, so test files import it)."""

from __future__ import annotations

from rollout_fast.distill import DistillConfig

TINY_ARCH = {"img_size": 32, "patch_size": 4, "num_classes": 10, "embed_dim": 32, "depth": 1, "num_heads": 2,
             "embed_layer": {"name": "conv_stem", "convs_per_stage": 1}}
VIT = {"depth": 1, "embed_dim": 32, "num_heads": 2}


def cfg(teacher, **kw):
    """A tiny, fast :class:`DistillConfig` (a 1-block vit-tiny student, batch 8, one epoch per phase)."""
    base = {"teacher": teacher, "student": "vit-tiny", "strategy": "lowres", "factor": 2, "head_epochs": 1,
            "epochs": 1, "batch_size": 8, "lr": 3e-3, "val_images": 8, "workers": 0, "amp": False,
            "student_options": dict(VIT)}
    base.update(kw)
    return DistillConfig(**base)
