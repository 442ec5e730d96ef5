"""Distillation targets: the frozen teacher's maps (attention rollout, or gradient rollout of its predicted
class) of the same augmented images the student sees, computed per batch or cached on disk.

Cache files (``maps_<key>.pt`` in the cache folder) are keyed by the teacher's weights, its normalisation,
the rollout settings, the input size, the images (by content: :func:`rollout_fast.distill.data.files_fingerprint`)
and their augmentation, so runs with the same data and teacher share them and a changed input gives a new
file; a corrupt one is reported by name and rebuilt.

:class:`ShardTargets`: the unaugmented maps read instead from a shard folder written by ``rollout-fast rollout
--shards`` (:mod:`rollout_fast.shards`) with this teacher and these settings (``distill --targets-from DIR``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import atomic_write
from .config import DistillConfig
from .data import CACHE_VERSION, Normalizer, fingerprint, load_cache
from .ddp import DistEnv

__all__ = ["ShardTargets", "TeacherTargets"]

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

    def __init__(self, cfg: DistillConfig, env: DistEnv, cache: Path, progress: bool = True,
                 shards: str | os.PathLike | None = None):
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
        self.shards = ShardTargets(shards, self, cfg) if shards is not None else None

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

    def cached(self, name: str, images: torch.Tensor, params, desc: str,
               files: list[str] | None = None) -> torch.Tensor:
        """:meth:`compute`, through the cache file ``maps_<name>.pt`` (rank 0 computes and writes it, or
        rebuilds it when it is corrupt or of another shape, with a ``UserWarning`` naming it; every other
        process then loads it). With shard targets (``shards``), ``files`` (the image file of each of ``images``)
        and ``params`` the identity (no shift, no flip), the maps are read from the shards instead."""
        shape = (len(images), *self.grid)
        if files is not None and self.shards is not None and not any(bool(p.any()) for p in params):
            if len(files) != len(images):
                raise ValueError(f"files: {len(files)} names for {len(images)} images")
            return self.shards.maps_for(files)
        path = self.cache / f"maps_{name}.pt"

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


def _path_key(name: str, root: str | os.PathLike) -> str:
    """``name`` (relative names: to ``root``) as a normalised absolute path string."""
    return os.path.normpath(os.path.join(root, name))


def shard_differences(manifest: dict, targets: TeacherTargets, cfg: DistillConfig) -> list[str]:
    """How the shards of ``manifest`` differ from the teacher maps of a distillation run (empty when they are
    its unaugmented targets): teacher weights (state-dict hash), method and rollout settings, float32 maps,
    input size, normalisation and transform (distill decodes by resizing the shorter side, bicubic, and
    centre-cropping: timm's eval transform with the teacher's crop_pct), grid."""
    from ..shards import state_dict_hash

    want = {"model hash": state_dict_hash(targets.teacher),
            "method": "attention" if cfg.target == "rollout" else "grad", "target": None,
            "head_fusion": cfg.head_fusion if cfg.target == "rollout" else None,
            "discard_ratio": float(cfg.discard_ratio), "readout": targets.explainer.readout,
            "normalize": targets.explainer.normalize, "precision": "fp32", "grid": list(targets.grid),
            "input size": list(targets.input_size), "mean": [float(v) for v in targets.data_config["mean"]],
            "std": [float(v) for v in targets.data_config["std"]], "interpolation": "bicubic",
            "crop_pct": float(targets.data_config.get("crop_pct", 1.0)),
            "crop_mode": "center"}
    inp = manifest.get("input", {})
    got = {"model hash": manifest.get("model", {}).get("hash"), "input size": list(inp.get("input_size", []))[-2:],
           "mean": inp.get("mean"), "std": inp.get("std"), "interpolation": inp.get("interpolation"),
           "crop_pct": inp.get("crop_pct"), "crop_mode": inp.get("crop_mode"),
           **{k: manifest.get(k) for k in ("method", "target", "head_fusion", "discard_ratio", "readout", "normalize",
                                         "precision", "grid")}}
    return [f"{k} {got[k]!r} there, {v!r} here" for k, v in want.items() if got[k] != v]


class ShardTargets:
    """A distillation run's unaugmented teacher maps, read from a finished shard folder of ``rollout-fast rollout
    --shards`` (:func:`rollout_fast.shards.open_maps`; float16 shards are widened to float32).

    Raises (on construction):
        ValueError: ``cfg.cache_targets`` is off (shard maps are cached targets), not a finished shard folder, or
            shards made with another teacher, other settings or another input transform than the run's (the
            message names each difference).
    """

    def __init__(self, folder: str | os.PathLike, targets: TeacherTargets, cfg: DistillConfig):
        from ..shards import open_maps

        if not cfg.cache_targets:
            raise ValueError("targets_from: shard maps are cached targets; pass cache_targets=True (--cache-targets)")
        self.folder = Path(folder)
        try:
            self.shards = open_maps(folder)
        except ValueError as e:
            raise ValueError(f"targets_from: {e}") from None
        diffs = shard_differences(self.shards.manifest, targets, cfg)
        if diffs:
            raise ValueError(f"targets_from: the shards in {str(folder)!r} are not this run's teacher maps: "
                             + "; ".join(diffs))
        root = self.shards.manifest.get("cwd") or os.getcwd()
        self.rows = {_path_key(f, root): i for i, f in enumerate(self.shards.files)}

    def maps_for(self, files: list[str]) -> torch.Tensor:
        """float32 maps (len(files), gh, gw) of ``files`` (paths, relative ones to the working folder).

        Raises:
            ValueError: a file without a map in the shards (not in the run, or skipped as unreadable).
        """
        keys = [_path_key(str(f), os.getcwd()) for f in files]
        missing = [str(f) for f, k in zip(files, keys) if k not in self.rows]
        if missing:
            raise ValueError(f"targets_from: {len(missing)} of the {len(files)} training images have no map in "
                             f"{str(self.folder)!r} (first: {missing[0]!r}); run rollout --shards over the "
                             "training split")
        maps = self.shards.maps[[self.rows[k] for k in keys]]
        return torch.from_numpy(np.asarray(maps, dtype=np.float32))
