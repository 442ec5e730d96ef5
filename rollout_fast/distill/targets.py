"""Distillation targets: the frozen teacher's maps (attention rollout, or gradient rollout of its predicted
class) of the same augmented images the student sees, computed per batch or cached on disk.

Cache files (``maps_<key>.pt`` in the cache folder) are keyed by the teacher's weights, its normalisation,
the rollout settings, the input size, the images (by content: :func:`rollout_fast.distill.data.files_fingerprint`)
and their augmentation, so runs with the same data and teacher share them and a changed input gives a new
file; a corrupt one is reported by name and rebuilt.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..checkpoint import atomic_write
from .config import DistillConfig
from .data import CACHE_VERSION, Normalizer, fingerprint, load_cache
from .ddp import DistEnv

__all__ = ["TeacherTargets"]

EVAL_BATCH = 256  # batch of teacher-map computation and evaluation


def _teacher_fingerprint(model) -> str:
    h = hashlib.sha1()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class TeacherTargets:
    """The frozen teacher of a distillation run and the maps it gives.

    Attributes: ``teacher`` (eval mode, no gradients), ``data_config``, ``input_size`` (H, W), ``grid``
    (gh, gw), ``explainer`` (:class:`rollout_fast.AttentionRollout`), ``norm`` (:class:`Normalizer`),
    ``key`` (the cache key of teacher + rollout settings). ``targets(x)``: (B, 3, H, W) normalised images
    -> (B, gh, gw) float32 maps (grad rollout: for each image's predicted class).
    """

    def __init__(self, cfg: DistillConfig, env: DistEnv, cache: Path, progress: bool = True):
        from ..capture import token_layout
        from ..explain import AttentionRollout
        from ..zoo import load_teacher

        self.env, self.cache, self.progress = env, cache, progress
        self.teacher, self.data_config = load_teacher(cfg.teacher, device=env.device)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        H, W = (int(s) for s in self.data_config["input_size"][-2:])
        self.input_size = (H, W)
        self.grid = token_layout(self.teacher, (H, W)).grid
        self.explainer = AttentionRollout(self.teacher, head_fusion=cfg.head_fusion,
                                          discard_ratio=cfg.discard_ratio)
        self.maps = self.explainer if cfg.target == "rollout" else self.explainer.grad_rollout
        self.norm = Normalizer(self.data_config["mean"], self.data_config["std"], env.device)
        self.key = fingerprint(CACHE_VERSION, _teacher_fingerprint(self.teacher), cfg.head_fusion,
                               cfg.discard_ratio, H, W, tuple(self.data_config["mean"]),
                               tuple(self.data_config["std"]), *(() if cfg.target == "rollout" else (cfg.target,)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.maps(x)

    @torch.no_grad()
    def compute(self, images: torch.Tensor, params, desc: str) -> torch.Tensor:
        """Maps (N, gh, gw) float32 on the CPU of uint8 ``images`` (N, 3, H, W) augmented by ``params``
        (dx, dy, flip), in batches of :data:`EVAL_BATCH`."""
        from tqdm.auto import tqdm

        dx, dy, fl = params
        out = []
        for s in tqdm(range(0, len(images), EVAL_BATCH), desc=desc, leave=False, disable=not self.progress):
            sl = slice(s, s + EVAL_BATCH)
            out.append(self.maps(self.norm(images[sl], dx[sl], dy[sl], fl[sl])).float().cpu())
        return torch.cat(out)

    def cached(self, name: str, images: torch.Tensor, params, desc: str) -> torch.Tensor:
        """:meth:`compute`, through the cache file ``maps_<name>.pt`` (rank 0 computes and writes it, or
        rebuilds it when it is corrupt or of another shape, with a ``UserWarning`` naming it; every other
        process then loads it)."""
        path = self.cache / f"maps_{name}.pt"
        shape = (len(images), *self.grid)

        def check(maps):
            if not isinstance(maps, torch.Tensor) or tuple(maps.shape) != shape or maps.dtype != torch.float32:
                raise ValueError(f"expected float32 maps of shape {shape}")

        if self.env.rank == 0:
            maps = load_cache(path, check)
            if maps is None:
                maps = self.compute(images, params, desc)
                atomic_write(path, lambda tmp: torch.save(maps, tmp))
        self.env.barrier()
        return maps if self.env.rank == 0 else torch.load(path, map_location="cpu", weights_only=True)
