"""Training helpers shared by the teacher (:mod:`rollout_fast.teacher`) and student (:mod:`rollout_fast.distill`)
trainers: bf16 autocast, seeding, AdamW with weight decay on weight matrices only, linear warm-up + cosine
decay. Torch only (no timm), so the CLI can build its parser without importing models.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["adamw", "autocast_for", "lr_lambda", "seed_everything", "sgd", "step_lr_lambda"]


def autocast_for(device: torch.device, enabled: bool = True):
    """bf16 autocast for ``device`` (CPU or CUDA): the mixed precision every trainer here uses."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, torch and numpy."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass


def lr_lambda(total_steps: int, warmup_steps: int):
    """Multiplier of the base learning rate at ``step``: linear warm-up over ``warmup_steps``, then cosine
    decay to 0 at ``total_steps`` (for ``torch.optim.lr_scheduler.LambdaLR``)."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    return f


def decay_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Optimizer parameter groups: ``weight_decay`` on weight matrices and kernels (``ndim > 1``), none on
    biases, norms, position embeddings and the class token (the usual ViT recipe)."""
    decay, no_decay = [], []
    for n, p in named_parameters:
        (decay if p.ndim > 1 and "pos_embed" not in n and "cls_token" not in n else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(named_parameters: Iterable[tuple[str, nn.Parameter]], lr: float, weight_decay: float
          ) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (:func:`decay_groups`)."""
    return torch.optim.AdamW(decay_groups(named_parameters, weight_decay), lr=lr)


def step_lr_lambda(warmup_steps: int, milestones: Iterable[int], gamma: float):
    """Multiplier of the base learning rate at ``step``: linear warm-up over ``warmup_steps``, then
    multiplied by ``gamma`` at each step in ``milestones`` (step decay, as Learn to Pay Attention's recipe)."""
    marks = sorted(int(m) for m in milestones)

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return gamma ** sum(step >= m for m in marks)
    return f


def sgd(named_parameters: Iterable[tuple[str, nn.Parameter]], lr: float, weight_decay: float,
        momentum: float = 0.9) -> torch.optim.SGD:
    """SGD with momentum and weight decay on weight matrices only (:func:`decay_groups`)."""
    return torch.optim.SGD(decay_groups(named_parameters, weight_decay), lr=lr, momentum=momentum)
