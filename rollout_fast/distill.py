"""Distillation: train a student (:mod:`rollout_fast.students`) to predict a teacher's rollout maps.

``rollout-fast distill --teacher cifar10-vit --student resnet-cifar --strategy lowres --factor 2
--data ../shared/data/cifar10 --out runs/NAME`` (or :func:`distill` from Python).

Recipe (the seeds', REFERENCE.md section 5, made reproducible):

- Targets: the frozen teacher (eval mode) gives attention-rollout maps through
  :class:`rollout_fast.AttentionRollout` (the fused rollout op; ``target='grad-rollout'``: its
  class-specific gradient rollout for the teacher's predicted class, Chefer et al. 2021 as in
  REFERENCE.md section 2, which selects tokens for pruning far better), on the *same augmented images* the
  student sees: computed on the fly per batch, or with ``cache_targets`` precomputed once for
  ``views`` augmented copies of the training set (view 0 unaugmented) and reused, which makes CPU
  training affordable. Augmentation = random translation by up to ``max_shift`` pixels (border filled
  with the mean colour) and horizontal flip, drawn per (seed, view, image) so every process and every
  resumed run sees exactly the same images and targets.
- Two phases as in the seeds: ``head_epochs`` with the backbone frozen (eval mode) training a fresh map
  head at ``lr``, then ``epochs`` training everything at ``lr * finetune_lr_scale`` (seeds: 1e-3 then
  1e-4). AdamW, per-phase linear warm-up + cosine decay, bf16 autocast, tqdm, a CSV log (and
  TensorBoard when installed), an atomic checkpoint each epoch (``resume`` loses at most the epoch in
  progress), a seed, and a final ``metrics.json``.
- Losses (``loss``): 'kld' (default): KL divergence between the teacher map normalised to sum 1 and
  the student's softmax over the grid; 'bce': binary cross-entropy between the student's sigmoid and
  the max-normalised teacher map (seed: DeiT student); 'mse': mean squared error of the same
  (seed: ResNet student).
- Multi-GPU / multi-node: run under ``torchrun``; each process trains on its
  ``DistributedSampler`` shard with ``batch_size / world_size`` images and DistributedDataParallel
  averages gradients, so N processes train the same model as one process with the same global batch
  (BatchNorm statistics are per process unless on CUDA, where convnets use SyncBatchNorm).
- Evaluation (rank 0): :mod:`rollout_fast.metrics` on the test split against the teacher's maps,
  next to the centre-prior, mean-map and uniform baselines, plus the object-placement test (every
  test image shifted diagonally by ``placement_shift`` pixels, objects leave the centre: the student
  must keep agreeing with the teacher's rollout of the shifted image), and the cost of student and
  teacher (parameters, multiply-adds, latency).

Data: an ImageFolder split (``DATA/train``, ``DATA/test``) is decoded once into memory as uint8 at the
teacher's input size (resize + centre crop) and cached under ``cache_dir``; fine for CIFAR-sized data.
"""

from __future__ import annotations

import argparse
import csv
import gc
import hashlib
import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import atomic_write, load_training_state, save_training_state, write_json
from .metrics import MapMetrics, fit_centre_prior, shift_images, uniform_map
from .students import (
    LOSS_ACTIVATIONS,
    STRATEGIES,
    STUDENT_ARCHS,
    check_student_grid,
    count_macs,
    create_student,
    logits_to_maps,
    measure_cost,
    save_student,
)
from .training import adamw, autocast_for, lr_lambda, seed_everything

__all__ = ["LOSSES", "DistillConfig", "add_distill_parser", "config_from_args", "distill",
           "distill_loss", "load_split_tensor", "run_distill", "view_params"]

LOSSES = tuple(LOSS_ACTIVATIONS)
TARGETS = ("rollout", "grad-rollout")


@dataclass
class DistillConfig:
    """Hyper-parameters of :func:`distill` (see the module docstring)."""

    teacher: str = "cifar10-vit"
    student: str = "resnet-cifar"
    strategy: str = "lowres"
    factor: int = 2
    loss: str = "kld"
    target: str = "rollout"
    head_fusion: str = "mean"
    discard_ratio: float = 0.0
    head_epochs: int = 1
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3
    finetune_lr_scale: float = 0.1
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    seed: int = 0
    cache_targets: bool = False
    views: int = 4
    max_shift: int = 4
    flip: bool = True
    train_images: int | None = None
    val_images: int | None = 2000
    placement_shift: int | None = None
    amp: bool = True
    pretrained: bool = False
    workers: int = 2
    student_options: dict = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        def pos_int(name, lo=1):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
        if self.student not in STUDENT_ARCHS:
            raise ValueError(f"student: expected one of {STUDENT_ARCHS}, got {self.student!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: expected one of {STRATEGIES}, got {self.strategy!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss: expected one of {LOSSES}, got {self.loss!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target: expected one of {TARGETS}, got {self.target!r}")
        if self.target == "grad-rollout" and self.head_fusion != "mean":
            raise ValueError(f"head_fusion: applies to target 'rollout' only (gradient rollout fuses heads by the "
                             f"gradient-weighted mean), got {self.head_fusion!r} with target 'grad-rollout'")
        for n in ("factor", "batch_size", "views"):
            pos_int(n)
        for n in ("head_epochs", "epochs", "max_shift", "workers"):
            pos_int(n, 0)
        if self.strategy == "mask" and self.student != "vit-tiny":
            raise ValueError(f"strategy: 'mask' drops patch tokens and needs student 'vit-tiny', got "
                             f"{self.student!r}")
        if self.head_epochs + self.epochs < 1:
            raise ValueError("epochs: head_epochs + epochs must be >= 1")
        for n in ("lr", "finetune_lr_scale"):
            if not getattr(self, n) > 0:
                raise ValueError(f"{n}: expected > 0, got {getattr(self, n)!r}")
        if not self.weight_decay >= 0 or not self.warmup_epochs >= 0:
            raise ValueError("weight_decay, warmup_epochs: expected >= 0")
        for n in ("train_images", "val_images", "placement_shift"):
            v = getattr(self, n)
            if v is not None:
                pos_int(n)


def distill_loss(logits: torch.Tensor, target: torch.Tensor, loss: str = "kld") -> torch.Tensor:
    """Distillation loss, averaged over the batch: a 0-dim float32 tensor.

    Args:
        logits: (B, gh, gw) student scores.
        target: (B, gh, gw) non-negative teacher rollout maps (any scale).
        loss: 'kld': ``sum_i Q_i (log Q_i - log_softmax(logits)_i)`` with ``Q = target / sum(target)``;
            'bce': BCE-with-logits against ``target / max(target)``; 'mse': MSE of ``sigmoid(logits)``
            against ``target / max(target)``.

    Raises:
        ValueError: unknown ``loss`` or shapes differ.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
    if logits.shape != target.shape:
        raise ValueError(f"logits and target: shapes differ, {tuple(logits.shape)} vs "
                         f"{tuple(target.shape)} (student grid vs teacher grid)")
    B = logits.shape[0]
    z = logits.float().reshape(B, -1)
    t = target.float().reshape(B, -1).clamp_min(0)
    if loss == "kld":
        q = t / t.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return (torch.xlogy(q, q) - q * z.log_softmax(dim=1)).sum(dim=1).mean()
    t = t / t.amax(dim=1, keepdim=True).clamp_min(1e-12)
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(z, t)
    return F.mse_loss(z.sigmoid(), t)


# -------------------------------------------------------------------------------------------- data

def _sha1(*parts) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def load_split_tensor(root: str | os.PathLike, size: tuple[int, int], cache_dir: str | os.PathLike | None = None,
                      *, workers: int = 0, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Decode an ImageFolder split once: ``(images uint8 (N, 3, H, W), labels int64 (N,), key)``.

    Images are resized (shorter side, bicubic) and centre-cropped to ``size`` = (H, W). With
    ``cache_dir`` the tensors are cached there under a key of the folder, its file list and the size.

    Raises:
        FileNotFoundError: missing folder. ValueError: a folder with no class folders or images.
    """
    from torch.utils.data import DataLoader
    from torchvision import transforms as T
    from tqdm.auto import tqdm

    from .data import image_folder

    tf = T.Compose([T.Resize(min(size), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                    T.PILToTensor()])
    ds = image_folder(root, tf)
    key = _sha1(Path(root).resolve(), len(ds.samples), ds.samples[0][0], ds.samples[-1][0], size)
    path = Path(cache_dir) / f"images_{key}.pt" if cache_dir is not None else None
    if path is not None and path.is_file():
        obj = torch.load(path, map_location="cpu", weights_only=True)
        return obj["images"], obj["labels"], key
    images = torch.empty((len(ds), 3, *size), dtype=torch.uint8)
    labels = torch.empty(len(ds), dtype=torch.long)
    i = 0
    loader = DataLoader(ds, batch_size=500, num_workers=workers)
    for x, y in tqdm(loader, desc=f"decode {Path(root).name}", leave=False, disable=not progress):
        images[i:i + len(y)] = x
        labels[i:i + len(y)] = y
        i += len(y)
    if path is not None:
        atomic_write(path, lambda tmp: torch.save({"images": images, "labels": labels}, tmp))
    return images, labels, key


def view_params(seed: int, view: int, n: int, max_shift: int, flip: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Augmentation of every image in one view: ``(dx, dy, flip)``, each (n,), from (seed, view) only.

    View 0 is the identity. dx, dy are int64 in [-max_shift, max_shift]; flip is bool.
    """
    if view == 0:
        z = torch.zeros(n, dtype=torch.long)
        return z, z.clone(), torch.zeros(n, dtype=torch.bool)
    g = torch.Generator().manual_seed(1_000_003 * seed + 7919 * view + 17)
    dx = torch.randint(-max_shift, max_shift + 1, (n,), generator=g)
    dy = torch.randint(-max_shift, max_shift + 1, (n,), generator=g)
    fl = torch.rand(n, generator=g) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    return dx, dy, fl


def placement_params(seed: int, n: int, shift: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The object-placement test's shifts: each image moved by (+-shift, +-shift), a random diagonal."""
    g = torch.Generator().manual_seed(seed + 424242)
    sx = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    sy = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    return sx * shift, sy * shift, torch.zeros(n, dtype=torch.bool)


class _Normalizer:
    def __init__(self, mean, std, device):
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.device = device

    def __call__(self, u8: torch.Tensor, dx=None, dy=None, flip=None) -> torch.Tensor:
        x = (u8.to(self.device).float() / 255.0 - self.mean) / self.std
        if dx is not None:
            x = shift_images(x, dx.to(self.device), dy.to(self.device), flip.to(self.device), fill=0.0)
        return x


@torch.no_grad()
def _teacher_maps(explainer, norm: _Normalizer, images: torch.Tensor, params, batch: int,
                  progress: bool, desc: str) -> torch.Tensor:
    from tqdm.auto import tqdm

    dx, dy, fl = params
    out = []
    for s in tqdm(range(0, len(images), batch), desc=desc, leave=False, disable=not progress):
        sl = slice(s, s + batch)
        out.append(explainer(norm(images[sl], dx[sl], dy[sl], fl[sl])).float().cpu())
    return torch.cat(out)


def _teacher_fingerprint(model) -> str:
    h = hashlib.sha1()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------- distributed

def _dist_env() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _all_sum(values: list[float], world: int, device) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


# ------------------------------------------------------------------------------------------ training

@torch.no_grad()
def _evaluate(student, norm, images, maps, params, batch, progress, desc) -> dict:
    from tqdm.auto import tqdm

    student.eval()
    m = MapMetrics()
    dx, dy, fl = params
    for s in tqdm(range(0, len(images), batch), desc=desc, leave=False, disable=not progress):
        sl = slice(s, s + batch)
        logits = student(norm(images[sl], dx[sl], dy[sl], fl[sl]))
        m.update(logits_to_maps(logits, student.activation).cpu(), maps[sl])
    return m.compute()


def _baseline_metrics(prior: torch.Tensor, maps: torch.Tensor, seed: int) -> dict:
    """Metrics of the same map for every image. Top-k recall breaks the baseline's ties at random
    (seeded), so a constant map scores chance (k/G) rather than whatever ``topk`` picks first."""
    from .metrics import KEEP_RATIOS, topk_recall

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


def distill(data: str | os.PathLike, out: str | os.PathLike, config: DistillConfig | None = None, *,
            device: str | None = None, resume: bool = False, cache_dir: str | os.PathLike | None = None,
            command: str | None = None, progress: bool = True) -> dict:
    """Train a student to predict the teacher's rollout; write checkpoints, logs, weights, card, metrics.

    Args:
        data: ImageFolder root with ``train/`` and ``test/`` (e.g. ``../shared/data/cifar10``).
        out: output folder: ``last.pt`` (resumable state, rewritten atomically each epoch),
            ``log.csv``, and at the end ``student.safetensors`` + ``student.json`` (card, loadable by
            :func:`rollout_fast.students.load_student`) and ``metrics.json``.
        config: :class:`DistillConfig` (defaults if None).
        device: 'cpu' | 'cuda' | None (CUDA when available; under torchrun cuda:LOCAL_RANK).
        resume: continue from ``out/last.pt`` (same config required).
        cache_dir: where decoded images and cached teacher maps go (default ``out/cache``); share it
            between runs with the same data and teacher to compute teacher maps once.
        command: the command recorded in the card (default ``sys.argv``).

    Returns:
        The metrics dict written to ``metrics.json`` (on every rank; only rank 0 evaluates, others
        return ``{}``).

    Raises:
        FileNotFoundError: missing data folder, or ``resume`` without a checkpoint.
        FileExistsError: ``out`` already holds a checkpoint and ``resume`` is False (nothing is
            overwritten).
        ValueError: bad config field (named), empty data folder, corrupt checkpoint or one written
            with another config, a batch size not divisible by the number of processes, a student whose
            output grid differs from the teacher's.
    """
    from tqdm.auto import tqdm

    from .capture import token_layout
    from .data import resolve_split
    from .explain import AttentionRollout
    from .zoo import load_teacher

    cfg = config or DistillConfig()
    cfg.validate()
    world, rank, local_rank = _dist_env()
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available()
                                             and device != "cpu" else "gloo")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(f"cuda:{local_rank}" if device == "cuda" and world > 1 else device)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size: {cfg.batch_size} is not divisible by the {world} processes")
    per_rank = cfg.batch_size // world
    out = Path(out)
    ckpt_path = out / "last.pt"
    state = None
    if resume:
        state = load_training_state(ckpt_path)  # FileNotFoundError / ValueError: nothing written yet
        # fields added since a checkpoint was written read as their defaults
        if {**asdict(DistillConfig()), **state.get("config", {})} != asdict(cfg):
            raise ValueError("resume: the checkpoint was written with a different configuration: "
                             f"{state.get('config')} vs {asdict(cfg)}")
    elif ckpt_path.exists():
        raise FileExistsError(f"out: {str(out)!r} already holds a checkpoint (last.pt); pass resume "
                              "(--resume) to continue it or choose another output folder")
    train_root, test_root = resolve_split(data, "train"), resolve_split(data, "test")
    if train_root == test_root:
        raise ValueError(f"data: {str(data)!r} must hold train/ and test/ ImageFolder splits")

    teacher, data_config = load_teacher(cfg.teacher, device=dev)
    for p in teacher.parameters():
        p.requires_grad_(False)
    H, W = (int(s) for s in data_config["input_size"][-2:])
    grid = token_layout(teacher, (H, W)).grid
    explainer = AttentionRollout(teacher, head_fusion=cfg.head_fusion, discard_ratio=cfg.discard_ratio)
    # (B, 3, H, W) -> (B, gh, gw) float32 teacher maps (grad rollout: for each image's predicted class)
    teacher_maps = explainer if cfg.target == "rollout" else explainer.grad_rollout
    norm = _Normalizer(data_config["mean"], data_config["std"], dev)
    cache = Path(cache_dir) if cache_dir is not None else out / "cache"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        cache.mkdir(parents=True, exist_ok=True)
    _barrier(world)

    # ---- data (rank 0 decodes and caches first so the others just load)
    def split(root):
        if rank == 0:
            res = load_split_tensor(root, (H, W), cache, workers=cfg.workers, progress=progress)
        _barrier(world)
        if rank != 0:
            res = load_split_tensor(root, (H, W), cache, workers=cfg.workers, progress=False)
        return res

    train_x, _, train_key = split(train_root)
    test_x, _, test_key = split(test_root)
    if cfg.train_images is not None and cfg.train_images < len(train_x):
        sel = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.train_images]
        train_x = train_x[sel.sort().values]
        train_key = _sha1(train_key, cfg.train_images, cfg.seed)
    N = len(train_x)
    if N < cfg.batch_size:
        raise ValueError(f"batch_size: {cfg.batch_size} exceeds the {N} training images")
    teacher_key = _sha1(_teacher_fingerprint(teacher), cfg.head_fusion, cfg.discard_ratio, H, W,
                        *(() if cfg.target == "rollout" else (cfg.target,)))
    eval_batch = 256

    def cached_maps(name, images, params, desc):
        path = cache / f"maps_{name}.pt"
        if rank == 0 and not path.is_file():
            maps = _teacher_maps(teacher_maps, norm, images, params, eval_batch, progress, desc)
            atomic_write(path, lambda tmp: torch.save(maps, tmp))
        _barrier(world)
        return torch.load(path, map_location="cpu", weights_only=True)

    shift = cfg.placement_shift or max(1, H // 4)
    test_id = (torch.zeros(len(test_x), dtype=torch.long),) * 2 + (torch.zeros(len(test_x), dtype=torch.bool),)
    test_sh = placement_params(cfg.seed, len(test_x), shift)
    test_maps = cached_maps(_sha1(teacher_key, test_key, "centred"), test_x, test_id, "teacher maps (test)")
    test_maps_sh = cached_maps(_sha1(teacher_key, test_key, "shifted", shift, cfg.seed), test_x, test_sh,
                               "teacher maps (test, shifted)")
    train_views = []
    if cfg.cache_targets:
        for v in range(cfg.views):
            pv = view_params(cfg.seed, v, N, cfg.max_shift, cfg.flip)
            name = _sha1(teacher_key, train_key, "view", v, cfg.seed, cfg.max_shift, cfg.flip)
            train_views.append((pv, cached_maps(name, train_x, pv, f"teacher maps (train view {v})")))
    if test_maps.shape[1:] != grid:
        raise ValueError(f"teacher: maps of grid {tuple(test_maps.shape[1:])}, expected {grid}")
    nval = min(cfg.val_images or len(test_x), len(test_x))

    # ---- student
    seed_everything(cfg.seed)
    student = create_student(cfg.student, strategy=cfg.strategy, factor=cfg.factor, input_size=(H, W),
                             grid=grid, loss=cfg.loss, pretrained=cfg.pretrained, **cfg.student_options)
    check_student_grid(student, grid, (H, W))
    if world > 1 and dev.type == "cuda":
        student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
    student.to(dev)

    phases = [("head", cfg.head_epochs, cfg.lr), ("all", cfg.epochs, cfg.lr * cfg.finetune_lr_scale)]
    total_epochs = cfg.head_epochs + cfg.epochs
    start_epoch = 0
    seen_sum = torch.zeros(grid, dtype=torch.float64)  # on-the-fly targets of the first epoch
    seen_count = 0
    seen_sample: list[torch.Tensor] = []
    if state is not None:
        student.load_state_dict(state["model"])
        start_epoch = state["epoch"]
        torch.set_rng_state(state["rng_cpu"])
        seen_sum, seen_count = state["seen_sum"], state["seen_count"]
        seen_sample = [state["seen_sample"]] if state["seen_sample"].numel() else []

    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(N), num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed,
                                 drop_last=True)
    steps = len(sampler) // per_rank
    log_path = out / "log.csv"
    if rank == 0 and (state is None or not log_path.exists()):
        with open(log_path, "w", newline="") as f:
            csv.writer(f).writerow(["epoch", "phase", "train_loss", "val_kld", "val_cc", "val_recall@0.5",
                                    "lr", "seconds"])
    tb = None
    if rank == 0:
        try:
            from torch.utils.tensorboard import SummaryWriter
            tb = SummaryWriter(str(out / "tensorboard"))
        except Exception:  # tensorboard not installed: the CSV log is the record
            tb = None

    epoch0 = 0
    for phase_idx, (phase, n_epochs, lr) in enumerate(phases):
        phase_end = epoch0 + n_epochs
        if n_epochs == 0 or start_epoch >= phase_end:
            epoch0 = phase_end
            continue
        head = {id(p) for p in student.head_parameters()}
        for p in student.parameters():
            p.requires_grad_(phase == "all" or id(p) in head)
        opt = adamw(((n, p) for n, p in student.named_parameters() if p.requires_grad), lr, cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(n_epochs * steps, int(cfg.warmup_epochs * steps)))
        if state is not None and state.get("phase") == phase_idx and start_epoch > epoch0:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
        model = student
        if world > 1:
            model = torch.nn.parallel.DistributedDataParallel(
                student, device_ids=[dev.index] if dev.type == "cuda" else None)
        for epoch in range(max(start_epoch, epoch0), phase_end):
            t0 = time.time()
            student.train()
            if phase == "head":
                student.backbone_modules().eval()
            sampler.set_epoch(epoch)
            idx_all = torch.tensor(list(iter(sampler)), dtype=torch.long)
            if cfg.cache_targets:
                (dxa, dya, fla), maps_a = train_views[epoch % cfg.views]
            else:
                dxa, dya, fla = view_params(cfg.seed, epoch + 1, N, cfg.max_shift, cfg.flip)
            tot_loss = tot = 0.0
            bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{total_epochs} ({phase})",
                       disable=not progress or rank != 0)
            for s in bar:
                idx = idx_all[s * per_rank:(s + 1) * per_rank]
                x = norm(train_x[idx], dxa[idx], dya[idx], fla[idx])
                if cfg.cache_targets:
                    target = maps_a[idx].to(dev)
                else:
                    target = teacher_maps(x)
                    if epoch == 0:
                        seen_sum += target.double().sum(0).cpu()
                        seen_count += len(target)
                        if sum(len(t) for t in seen_sample) < 4096:
                            seen_sample.append(target.cpu())
                with autocast_for(dev, cfg.amp):
                    logits = model(x)
                loss = distill_loss(logits.float(), target, cfg.loss)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                tot_loss += loss.item() * len(idx)
                tot += len(idx)
                if s % 10 == 0:
                    bar.set_postfix(loss=f"{tot_loss / tot:.4f}")
            tot_loss, tot = _all_sum([tot_loss, tot], world, dev)
            if rank == 0:
                val = _evaluate(student, norm, test_x[:nval], test_maps[:nval], tuple(t[:nval] for t in test_id),
                                eval_batch, progress, "validate")
                seconds = time.time() - t0
                with open(log_path, "a", newline="") as f:
                    csv.writer(f).writerow([epoch + 1, phase, f"{tot_loss / tot:.5f}", f"{val['kld']:.4f}",
                                            f"{val['cc']:.4f}", f"{val['recall@0.5']:.4f}",
                                            f"{sched.get_last_lr()[0]:.6g}", f"{seconds:.1f}"])
                if tb is not None:
                    tb.add_scalar("train/loss", tot_loss / tot, epoch + 1)
                    for k in ("kld", "cc", "recall@0.5", "spearman"):
                        tb.add_scalar(f"val/{k}", val[k], epoch + 1)
                if progress:
                    print(f"epoch {epoch + 1}/{total_epochs} ({phase}): loss {tot_loss / tot:.4f}, val KLD "
                          f"{val['kld']:.4f} CC {val['cc']:.4f} recall@0.5 {val['recall@0.5']:.4f} "
                          f"({seconds:.0f} s)", flush=True)
                sample = torch.cat(seen_sample)[:4096] if seen_sample else torch.zeros(0, *grid)
                save_training_state(ckpt_path, {
                    "model": student.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "epoch": epoch + 1, "phase": phase_idx,
                    "config": asdict(cfg), "rng_cpu": torch.get_rng_state(),
                    "seen_sum": seen_sum, "seen_count": seen_count, "seen_sample": sample})
            _barrier(world)
        if model is not student:  # drop this phase's DDP reducer (and its hooks) before the next phase
            del model
            gc.collect()
        epoch0 = phase_end
    if tb is not None:
        tb.close()
    if rank != 0:
        return {}

    # ---- final evaluation (rank 0)
    student.eval()
    centred = _evaluate(student, norm, test_x, test_maps, test_id, eval_batch, progress, "test")
    shifted = _evaluate(student, norm, test_x, test_maps_sh, test_sh, eval_batch, progress, "test shifted")
    if cfg.cache_targets:
        train_maps = torch.cat([m for _, m in train_views])
        mean = train_maps.double().mean(0).float()
        sample = train_maps[torch.randperm(len(train_maps), generator=torch.Generator().manual_seed(0))[:4096]]
    else:
        mean = (seen_sum / max(seen_count, 1)).float()
        sample = torch.cat(seen_sample)[:4096] if seen_sample else test_maps[:0]
    sigma, prior = fit_centre_prior(sample if len(sample) else test_maps[:1000])
    baselines = {}
    for name, m in (("centre_prior", prior), ("mean_map", mean), ("uniform", uniform_map(grid))):
        c = _baseline_metrics(m, test_maps, cfg.seed)
        sh = _baseline_metrics(m, test_maps_sh, cfg.seed)
        baselines[name] = {"centred": c, "shifted": sh, "cc_drop": c["cc"] - sh["cc"]}
    baselines["centre_prior"]["sigma_patches"] = sigma

    student_cost = measure_cost(student, student, (H, W), batch_size=eval_batch, repeats=3, device=dev)
    teacher_cost = measure_cost(teacher_maps, teacher, (H, W), batch_size=eval_batch, repeats=3, device=dev)
    teacher_cost["forward_macs_per_image"] = count_macs(teacher, torch.randn(1, 3, H, W, device=dev))
    rel = student_cost["macs_per_image"] / teacher_cost["forward_macs_per_image"]
    cc_drop = centred["cc"] - shifted["cc"]
    metrics = _round({
        "student": student.spec, "teacher": cfg.teacher,
        "rollout": {"target": cfg.target, "head_fusion": cfg.head_fusion if cfg.target == "rollout" else
                    "gradient-weighted mean", "discard_ratio": cfg.discard_ratio,
                    "readout": explainer.readout, "normalize": explainer.normalize},
        "test_images": len(test_x), "centred": centred, "shifted": shifted,
        "object_placement": {"shift_pixels": shift, "cc_centred": centred["cc"], "cc_shifted": shifted["cc"],
                             "cc_drop": cc_drop, "passed": bool(cc_drop <= 0.05)},
        "baselines": baselines,
        "cost": {"student": student_cost, "teacher_rollout": teacher_cost,
                 "macs_relative_to_teacher_forward": rel,
                 "latency_relative_to_teacher_rollout_batch1":
                     student_cost["latency_ms_batch1"] / teacher_cost["latency_ms_batch1"]},
    })
    card = {
        "name": f"{Path(str(cfg.teacher)).stem}-student",
        "teacher": cfg.teacher,
        "rollout": metrics["rollout"],
        "input": {"strategy": cfg.strategy, "factor": cfg.factor, "teacher_input_size": [H, W],
                  "student_input_size": list(student.thumbnail_size), "data_config": {
                      k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}},
        "output": {"grid": list(grid), "scores": "logits (B, gh, gw); higher = more important",
                   "maps": f"{student.activation} over the grid, then max-normalised (student.maps)"},
        "metrics": {"centred": metrics["centred"], "shifted": metrics["shifted"],
                    "object_placement": metrics["object_placement"]},
        "cost": metrics["cost"],
        "training": {**{k: v for k, v in asdict(cfg).items()}, "device": str(dev), "world_size": world,
                     "torch": torch.__version__},
        "command": command or " ".join(shlex.quote(a) for a in sys.argv),
        "source": "rollout_fast.distill; seeds' rollout-prediction students (REFERENCE.md section 5)",
    }
    save_student(out / "student.safetensors", student, card)
    write_json(out / "metrics.json", metrics)
    return metrics


# ----------------------------------------------------------------------------------------------- CLI

def _add_arguments(p: argparse.ArgumentParser) -> None:
    d = DistillConfig()
    p.add_argument("--teacher", default=d.teacher,
                   help="'cifar10-vit' (embedded), a timm name, or a rollout_fast .safetensors with its card")
    p.add_argument("--student", choices=STUDENT_ARCHS, default=d.student)
    p.add_argument("--strategy", choices=STRATEGIES, default=d.strategy)
    p.add_argument("--factor", type=int, default=d.factor, help="the student sees 1/F^2 of the pixels")
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and test/")
    p.add_argument("--out", required=True, help="output folder (checkpoints, log, weights, card, metrics)")
    p.add_argument("--loss", choices=LOSSES, default=d.loss)
    p.add_argument("--target", choices=TARGETS, default=d.target,
                   help="teacher maps to predict: attention rollout, or gradient rollout of the teacher's "
                        "predicted class (the better token selector for pruning)")
    p.add_argument("--head-fusion", choices=["mean", "max", "min"], default=d.head_fusion,
                   help="head fusion of --target rollout")
    p.add_argument("--discard-ratio", type=float, default=d.discard_ratio)
    p.add_argument("--head-epochs", type=int, default=d.head_epochs, help="phase 1: frozen backbone")
    p.add_argument("--epochs", type=int, default=d.epochs, help="phase 2: all weights")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch (all processes)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--finetune-lr-scale", type=float, default=d.finetune_lr_scale,
                   help="phase-2 learning rate = lr * this (seeds: 0.1)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--cache-targets", action="store_true",
                   help="precompute teacher maps for --views augmented copies once and reuse them")
    p.add_argument("--views", type=int, default=d.views)
    p.add_argument("--max-shift", type=int, default=d.max_shift, help="augmentation: max translation (px)")
    p.add_argument("--no-flip", action="store_true", help="augmentation: no horizontal flips")
    p.add_argument("--train-images", type=int, default=None, help="train on a seeded subset")
    p.add_argument("--val-images", type=int, default=d.val_images, help="per-epoch validation subset")
    p.add_argument("--placement-shift", type=int, default=None,
                   help="object-placement test shift in pixels (default H/4)")
    p.add_argument("--pretrained", action="store_true", help="timm ImageNet weights for the backbone")
    p.add_argument("--student-option", action="append", default=[], metavar="KEY=JSON",
                   help="student architecture option, e.g. channels=[32,64,128,256] or depth=2")
    p.add_argument("--cache-dir", default=None, help="decoded images and teacher maps (default OUT/cache)")
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--no-amp", action="store_true", help="float32 instead of bf16 autocast")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--no-progress", action="store_true")


def add_distill_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``distill`` sub-command to an ``argparse`` subparsers object; returns the sub-parser
    (its ``func`` default is :func:`run_distill`)."""
    p = subparsers.add_parser("distill", help="train a student to predict the teacher's rollout",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=run_distill)
    return p


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    """:class:`DistillConfig` from parsed ``distill`` arguments.

    Raises:
        ValueError: a malformed ``--student-option`` (not KEY=JSON).
    """
    options = {}
    for item in args.student_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--student-option: expected KEY=JSON, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return DistillConfig(
        teacher=args.teacher, student=args.student, strategy=args.strategy, factor=args.factor,
        loss=args.loss, target=args.target, head_fusion=args.head_fusion, discard_ratio=args.discard_ratio,
        head_epochs=args.head_epochs, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        finetune_lr_scale=args.finetune_lr_scale, weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs, seed=args.seed, cache_targets=args.cache_targets,
        views=args.views, max_shift=args.max_shift, flip=not args.no_flip, train_images=args.train_images,
        val_images=args.val_images, placement_shift=args.placement_shift, amp=not args.no_amp,
        pretrained=args.pretrained, workers=args.workers, student_options=options)


def run_distill(args: argparse.Namespace) -> int:
    """``rollout-fast distill``: train, then print the headline metrics (rank 0). Returns the exit code
    (errors about the user's input print one line and return 1)."""
    try:
        cfg = config_from_args(args)
        metrics = distill(args.data, args.out, cfg, device=args.device, resume=args.resume,
                          cache_dir=args.cache_dir, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"rollout-fast distill: {e}", file=sys.stderr)
        return 1
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if metrics:
        c, op = metrics["centred"], metrics["object_placement"]
        print(f"student {cfg.student}/{cfg.strategy} x{cfg.factor}: KLD {c['kld']:.4f} CC {c['cc']:.4f} "
              f"recall@0.5 {c['recall@0.5']:.4f} Spearman {c['spearman']:.4f}; shifted CC "
              f"{op['cc_shifted']:.4f} (placement test {'passed' if op['passed'] else 'FAILED'}); "
              f"{100 * metrics['cost']['macs_relative_to_teacher_forward']:.1f}% of the teacher's MACs")
        print(f"weights, card and metrics in {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m rollout_fast.distill ...`` (same arguments as ``rollout-fast distill``; the form to
    launch with ``torchrun``)."""
    p = argparse.ArgumentParser(prog="python -m rollout_fast.distill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    return run_distill(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
