"""``distill()``: one distillation run, orchestrated from the parts of this package."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import torch

from ..checkpoint import check_writable_dir, load_training_state, write_json
from ..students import check_student_grid, create_student, save_student
from ..training import seed_everything
from .config import DistillConfig
from .data import fingerprint, identity_params, load_split_tensor, placement_params, split_files, view_params
from .ddp import DistEnv, setup_distributed
from .loop import TrainingRun, train
from .report import TestSet, final_metrics, student_card
from .rollout_task import RolloutTask
from .targets import TeacherTargets

__all__ = ["distill"]


def _splits(data, test_split: str) -> tuple[Path, Path]:
    """``data/train`` and ``data/<test_split>``; FileNotFoundError without ``data``, ValueError without a split."""
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"data: folder {str(data)!r} does not exist")
    train_root, test_root = root / "train", root / test_split
    missing = [f"{p.name}/" for p in (train_root, test_root) if not p.is_dir()]
    if missing:
        raise ValueError(f"data: {str(data)!r} has no {' and no '.join(missing)} split (expected train/ and "
                         f"{test_split}/ ImageFolder trees; test_split names the evaluation split)")
    return train_root, test_root


def distill(data: str | os.PathLike, out: str | os.PathLike, config: DistillConfig | None = None, *,
            device: str | None = None, resume: bool = False, cache_dir: str | os.PathLike | None = None,
            command: str | None = None, progress: bool = True, targets_from: str | Path | None = None) -> dict:
    """Train a student to predict the teacher's rollout; write checkpoints, logs, weights, card, metrics.

    Args:
        data: ImageFolder root with ``train/`` and the evaluation split ``config.test_split`` (``test/``, e.g.
            ``../shared/data/cifar10``; ``val/`` for ``../shared/data/imagenette``); both are decoded the teacher's
            eval way (its data config's ``crop_pct``: resize to ``H / crop_pct``, centre crop).
        out: output folder: ``last.pt`` (resumable state, rewritten atomically each epoch),
            ``log.csv``, and at the end ``student.safetensors`` + ``student.json`` (card, loadable by
            :func:`rollout_fast.load_student`) and ``metrics.json``.
        config: :class:`DistillConfig` (defaults if None).
        device: 'cpu' | 'cuda' | None (CUDA when available; under torchrun cuda:LOCAL_RANK).
        resume: continue from ``out/last.pt`` (same config required).
        cache_dir: where decoded images and cached teacher maps go (default ``out/cache``); share it
            between runs with the same data and teacher to compute teacher maps once.
        command: the command recorded in the card (default ``sys.argv``).
        progress: tqdm bars, and a line per epoch through the ``rollout_fast.distill`` logger (INFO).
        targets_from: shards of ``rollout-fast rollout --shards`` over the training images, this teacher and these
            settings: the unaugmented cached targets are read from them (:class:`.targets.ShardTargets`).

    Returns:
        The metrics dict written to ``metrics.json`` (on every rank; only rank 0 evaluates, others
        return ``{}``).

    Raises:
        FileNotFoundError: missing data folder, or ``resume`` without a checkpoint.
        FileExistsError: ``out`` already holds a checkpoint and ``resume`` is False (nothing is
            overwritten).
        NotADirectoryError / PermissionError: ``out`` or ``cache_dir`` is a file or cannot be written
            (checked before any compute).
        ValueError: bad config field (named), empty data folder, corrupt checkpoint or one written
            with another config, a batch size not divisible by the number of processes, a student whose
            output grid differs from the teacher's; bad ``targets_from`` (see :class:`.targets.ShardTargets`).
    """
    cfg = config or DistillConfig()
    cfg.validate()
    env = setup_distributed(device)
    if cfg.batch_size % env.world:
        raise ValueError(f"batch_size: {cfg.batch_size} is not divisible by the {env.world} processes")
    out = Path(out)
    state = _checkpoint_state(out, cfg, resume)
    train_root, test_root = _splits(data, cfg.test_split)
    cache = Path(cache_dir) if cache_dir is not None else out / "cache"
    check_writable_dir(out, "out")  # before any compute
    check_writable_dir(cache, "cache_dir")
    targets = TeacherTargets(cfg, env, cache, progress, shards=targets_from)
    if env.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        cache.mkdir(parents=True, exist_ok=True)
    env.barrier()

    train_x, train_key, test, train_files = _data(cfg, env, targets, train_root, test_root, progress)
    train_views = []
    if cfg.cache_targets:
        for v in range(cfg.views):
            pv = view_params(cfg.seed, v, len(train_x), cfg.max_shift, cfg.flip)
            name = fingerprint(targets.key, train_key, "view", v, cfg.seed, cfg.max_shift, cfg.flip)
            train_views.append((pv, targets.cached(name, train_x, pv, f"teacher maps (train view {v})", train_files)))
    if test.maps.shape[1:] != targets.grid:
        raise ValueError(f"teacher: maps of grid {tuple(test.maps.shape[1:])}, expected {targets.grid}")
    nval = min(cfg.val_images or len(test.images), len(test.images))

    seed_everything(cfg.seed)
    student = create_student(cfg.student, strategy=cfg.strategy, factor=cfg.factor, input_size=targets.input_size,
                             grid=targets.grid, loss=cfg.loss, pretrained=cfg.pretrained, **cfg.student_options)
    check_student_grid(student, targets.grid, targets.input_size)
    student = env.sync_batchnorm(student).to(env.device)
    val = (test.images[:nval], test.maps[:nval], tuple(t[:nval] for t in test.params))
    task = RolloutTask(cfg, env, targets, train_x, train_views, val)
    train(TrainingRun(cfg, env, student, task, out, progress), state)
    if env.rank != 0:
        return {}
    metrics = final_metrics(cfg, student, targets, test, train_views, task.seen, progress)
    save_student(out / "student.safetensors", student, student_card(cfg, student, targets, metrics, command))
    write_json(out / "metrics.json", metrics)
    return metrics


def _checkpoint_state(out: Path, cfg, resume: bool) -> dict | None:
    """The checkpoint to resume (its config, a dataclass like :class:`DistillConfig`, must match ``cfg``), or
    None; refuses to overwrite one."""
    ckpt_path = out / "last.pt"
    if resume:
        state = load_training_state(ckpt_path)  # FileNotFoundError / ValueError: nothing written yet
        # fields added since a checkpoint was written read as their defaults
        if {**asdict(type(cfg)()), **state.get("config", {})} != asdict(cfg):
            raise ValueError("resume: the checkpoint was written with a different configuration: "
                             f"{state.get('config')} vs {asdict(cfg)}")
        return state
    if ckpt_path.exists():
        raise FileExistsError(f"out: {str(out)!r} already holds a checkpoint (last.pt); pass resume "
                              "(--resume) to continue it or choose another output folder")
    return None


def _data(cfg: DistillConfig, env: DistEnv, targets: TeacherTargets, train_root, test_root, progress: bool
          ) -> tuple[torch.Tensor, str, TestSet, list[str] | None]:
    """Training images (a seeded subset with ``train_images``) and their cache key, the test set with
    the teacher's maps (cached), and with shard targets the training images' files. Rank 0 decodes and
    caches first so the others just load."""
    cache, size = targets.cache, targets.input_size
    crop_pct = float(targets.data_config.get("crop_pct", 1.0))

    def split(root):
        if env.rank == 0:
            res = load_split_tensor(root, size, cache, workers=cfg.workers, progress=progress, crop_pct=crop_pct)
        env.barrier()
        if env.rank != 0:
            res = load_split_tensor(root, size, cache, workers=cfg.workers, progress=False, crop_pct=crop_pct)
        return res

    train_x, _, train_key = split(train_root)
    test_x, _, test_key = split(test_root)
    train_files = split_files(train_root) if targets.shards is not None else None
    if cfg.train_images is not None and cfg.train_images < len(train_x):
        sel = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.train_images]
        train_x = train_x[sel.sort().values]
        train_key = fingerprint(train_key, cfg.train_images, cfg.seed)
        train_files = [train_files[i] for i in sel.sort().values.tolist()] if train_files is not None else None
    if len(train_x) < cfg.batch_size:
        raise ValueError(f"batch_size: {cfg.batch_size} exceeds the {len(train_x)} training images")
    shift = cfg.placement_shift or max(1, size[0] // 4)
    test_id, test_sh = identity_params(len(test_x)), placement_params(cfg.seed, len(test_x), shift)
    maps = targets.cached(fingerprint(targets.key, test_key, "centred"), test_x, test_id, "teacher maps (test)")
    maps_sh = targets.cached(fingerprint(targets.key, test_key, "shifted", shift, cfg.seed), test_x, test_sh,
                             "teacher maps (test, shifted)")
    return train_x, train_key, TestSet(test_x, maps, test_id, maps_sh, test_sh, shift), train_files
