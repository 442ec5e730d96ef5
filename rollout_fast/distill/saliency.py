"""Saliency distillation through the one training loop (:mod:`.loop`): a saliency encoder-decoder
(:class:`rollout_fast.saliency.SaliencyNet`) learns human fixation densities (model A, and the teacher), or
fixation densities plus a saliency teacher's dense pixel maps on a second head (model B).

Source: seed 004 (REFERENCE.md section 9): loss ``KLD(gt, s)`` for model A, ``KLD(gt, s) + 2.5 KLD(teacher, t)``
for model B (``s``/``t`` the two heads' maps, ``gt`` the fixation density, ``teacher`` the teacher's map of the
same image); Adam at 1e-3 (here AdamW with weight decay 0, which is Adam, at a constant rate); random horizontal
and vertical flips, one draw applied alike to the image, its density and its teacher map
(:func:`rollout_fast.saliency.prepare.flip_params`, from (seed, epoch) only: resumed runs draw the same). The
seed's "smoothing factor 3" divides both maps inside its KLD and cancels, so it is not repeated here.

Data: the split's stimuli decoded once at the input size (uint8) with their densities at that size, cached under
``cache_dir`` keyed by the data files and settings; the teacher's maps of the (unflipped) training images computed
once with the teacher in eval mode and cached likewise (keyed by its weights), then flipped with each batch.
Validation after every epoch on the val split at each image's own resolution (maps upsampled bilinearly):
KLD, CC, NSS (and SIM) in ``log.csv``; the same at the end in ``metrics.json`` and the model's card.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..checkpoint import atomic_write, check_writable_dir, write_json
from ..saliency.data import OSIE_SIGMA_PX, SPLIT_FILE, load_split
from ..saliency.evaluate import validation_metrics
from ..saliency.models import (
    ENCODERS,
    SaliencyNet,
    create_saliency_model,
    load_saliency_model,
    save_saliency_model,
)
from ..saliency.prepare import SaliencySplit, flip_maps, flip_params, load_saliency_split, normalize_images
from ..training import autocast_for, seed_everything
from .api import _checkpoint_state
from .data import CACHE_VERSION, fingerprint, load_cache
from .ddp import setup_distributed
from .loop import SCHEDULES, Task, TrainingRun, distill_loss, train
from .targets import _teacher_fingerprint

__all__ = ["SaliencyConfig", "SaliencyTask", "distill_saliency"]

EVAL_BATCH = 16


@dataclass
class SaliencyConfig:
    """Hyper-parameters of :func:`distill_saliency` (defaults: seed 004's model A at its budget, 240 x 320).

    Model: ``encoder`` ('resnet18' | 'resnet34' | 'resnet50'), ``decoder`` (four widths), ``heads`` (1: model A
    or a teacher; 2: model B, which needs ``teacher``, a saliency model path or name, weighted by
    ``teacher_weight``), ``pretrained`` (timm ImageNet encoder, online) or ``init_from`` (a classifier
    checkpoint). Budget: ``input_size`` (H, W), ``epochs`` (+ ``head_epochs`` with the encoder frozen),
    ``batch_size``; optimiser: ``lr``, ``weight_decay`` (0: Adam), ``schedule`` ('constant' | 'cosine'),
    ``warmup_epochs``, ``finetune_lr_scale`` (phase 2 rate factor after head epochs); ``amp`` (bf16 autocast),
    ``flips``, ``seed``. Data: ``split_file`` (None: the packaged OSIE split), ``train_split``/``val_split``,
    ``train_images``/``val_images`` (the first N of each, for smoke runs; None: all), ``sigma`` (px, one degree), and the dataset layout
    (``stimuli``, ``fixations``, ``origin``: :class:`rollout_fast.saliency.FixationDataset`).
    """

    encoder: str = "resnet18"
    decoder: list = field(default_factory=lambda: [256, 128, 64, 32])
    heads: int = 1
    teacher: str | None = None
    teacher_weight: float = 2.5
    input_size: list = field(default_factory=lambda: [240, 320])
    epochs: int = 10
    head_epochs: int = 0
    batch_size: int = 8
    lr: float = 1e-3
    finetune_lr_scale: float = 1.0
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0
    schedule: str = "constant"
    amp: bool = True
    flips: bool = True
    seed: int = 0
    pretrained: bool = False
    init_from: str | None = None
    split_file: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    train_images: int | None = None
    val_images: int | None = None
    sigma: float = OSIE_SIGMA_PX
    stimuli: str = "data/stimuli"
    fixations: str = "data/eye/fixations.mat"
    origin: float = 1.0

    def __post_init__(self):
        self.decoder, self.input_size = list(self.decoder), list(self.input_size)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        def pos_int(name, lo=1):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder: expected one of {ENCODERS}, got {self.encoder!r}")
        if self.heads not in (1, 2) or isinstance(self.heads, bool):
            raise ValueError(f"heads: expected 1 (model A, teacher) or 2 (model B), got {self.heads!r}")
        if (self.heads == 2) != (self.teacher is not None):
            raise ValueError("teacher: model B (heads=2) needs a saliency teacher and model A (heads=1) takes none; "
                             f"got heads={self.heads}, teacher={self.teacher!r}")
        if self.pretrained and self.init_from is not None:
            raise ValueError("init_from: give pretrained or init_from, not both")
        for n in ("batch_size",):
            pos_int(n)
        for n in ("epochs", "head_epochs"):
            pos_int(n, 0)
        if self.epochs + self.head_epochs < 1:
            raise ValueError("epochs: head_epochs + epochs must be >= 1")
        for n in ("train_images", "val_images"):
            if getattr(self, n) is not None:
                pos_int(n)
        for n in ("lr", "finetune_lr_scale", "teacher_weight", "sigma"):
            if not getattr(self, n) > 0:
                raise ValueError(f"{n}: expected > 0, got {getattr(self, n)!r}")
        if not self.weight_decay >= 0 or not self.warmup_epochs >= 0:
            raise ValueError("weight_decay, warmup_epochs: expected >= 0")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {SCHEDULES}, got {self.schedule!r}")
        if len(self.input_size) != 2 or not all(isinstance(s, int) and s > 0 for s in self.input_size):
            raise ValueError(f"input_size: expected (H, W) positive ints, got {self.input_size!r}")

    def spec(self) -> dict:
        """The model spec (:func:`rollout_fast.saliency.create_saliency_model`)."""
        return {"encoder": self.encoder, "decoder": self.decoder, "heads": self.heads, "input_size": self.input_size}


class SaliencyTask(Task):
    """Training items: ``train`` (a :class:`~rollout_fast.saliency.prepare.SaliencySplit` at the input size) and,
    for model B, ``teacher_maps`` (N, H, W) float32 probabilities of the teacher; flipped per epoch. Validation:
    :func:`rollout_fast.saliency.evaluate.validation_metrics` on ``val`` at the images' own resolution."""

    val_columns = (("val_kld", "kld"), ("val_cc", "cc"), ("val_nss", "nss"))
    run_files = ("model.safetensors", "model.json")

    def __init__(self, cfg: SaliencyConfig, device, train: SaliencySplit, val: SaliencySplit,
                 teacher_maps: torch.Tensor | None, mean, std):
        self.cfg, self.device, self.train, self.val = cfg, device, train, val
        self.teacher_maps, self.mean, self.std = teacher_maps, mean, std
        self.val_density = [r.density(cfg.sigma) for r in val.records]
        self._flips = None

    def __len__(self) -> int:
        return len(self.train)

    def start_epoch(self, epoch: int) -> None:
        self._flips = flip_params(self.cfg.seed, epoch, len(self.train), self.cfg.flips)

    def batch(self, idx: torch.Tensor, epoch: int) -> tuple:
        h, v = self._flips[0][idx], self._flips[1][idx]
        x = flip_maps(normalize_images(self.train.images[idx], self.mean, self.std), h, v).to(self.device)
        gt = flip_maps(self.train.density[idx], h, v).to(self.device)
        t = None if self.teacher_maps is None else flip_maps(self.teacher_maps[idx], h, v).to(self.device)
        return x, (gt, t)

    def forward(self, model, inputs):
        return model(inputs, heads="all")

    def loss(self, output, target) -> torch.Tensor:
        gt, t = target
        loss = distill_loss(output[0], gt, "kld")
        if t is not None:
            loss = loss + self.cfg.teacher_weight * distill_loss(output[1], t, "kld")
        return loss

    @torch.no_grad()
    def validate(self, student: SaliencyNet, progress: bool) -> dict:
        probs = predict_split(student, self.val.images, self.mean, self.std, self.device, self.cfg.amp, progress)
        return validation_metrics(probs, self.val.records, self.val_density)


@torch.no_grad()
def predict_split(model: SaliencyNet, images: torch.Tensor, mean, std, device, amp: bool,
                  progress: bool = False) -> torch.Tensor:
    """Saliency probabilities (N, H, W) float32 on the CPU of uint8 ``images`` (N, 3, H, W) (eval mode, batches
    of :data:`EVAL_BATCH`, bf16 autocast when ``amp``)."""
    from tqdm.auto import tqdm

    model.eval()
    out = []
    for s in tqdm(range(0, len(images), EVAL_BATCH), desc="predict", leave=False, disable=not progress):
        x = normalize_images(images[s:s + EVAL_BATCH].to(device), mean, std)
        with autocast_for(torch.device(device), amp):
            out.append(model(x).float().exp().cpu())
    return torch.cat(out)


def _data_key(root: Path, cfg: SaliencyConfig, names: list[str]) -> str:
    """Cache key of a decoded split: the .mat and every stimulus (name and SHA-1 of the bytes, so a data
    folder synced again with new modification times keeps its caches), the names, the input size, sigma and
    the layout."""
    parts = []
    for p in [root / cfg.fixations, *(root / cfg.stimuli / n for n in names)]:
        if p.is_file():
            with open(p, "rb") as f:
                parts.append((p.name, hashlib.file_digest(f, "sha1").hexdigest()))
        else:
            parts.append((p.name, None))
    return fingerprint(CACHE_VERSION, "saliency", str(root.resolve()), parts, names, cfg.input_size, cfg.sigma,
                       cfg.origin, cfg.stimuli, cfg.fixations)


def _rank0_first(env, fn):
    """``fn()`` on rank 0 (which writes the cache), then on the other ranks (which read it)."""
    res = fn() if env.rank == 0 else None
    env.barrier()
    return res if env.rank == 0 else fn()


def _split(root: Path, cfg: SaliencyConfig, names: list[str], cache: Path, progress: bool) -> tuple[SaliencySplit, str]:
    """A decoded split through the cache (``saliency_<key>.pt``; a corrupt file is rebuilt with a warning). The
    fixations are read (and checked) every time; the decoded images and densities come from the cache."""
    from ..saliency.data import FixationDataset

    key = _data_key(root, cfg, names)
    path, size = cache / f"saliency_{key}.pt", tuple(cfg.input_size)
    kw = {"stimuli": cfg.stimuli, "fixations": cfg.fixations, "origin": cfg.origin}

    def check(obj):
        if obj["images"].shape != (len(names), 3, *size) or obj["density"].shape != (len(names), *size):
            raise ValueError(f"expected {len(names)} images and densities of {size}")
    obj = load_cache(path, check)
    if obj is not None:
        records = FixationDataset(root, names, sigma=cfg.sigma, **kw).records
        return SaliencySplit(list(names), obj["images"], obj["density"], records), key
    split = load_saliency_split(root, names, size, sigma=cfg.sigma, progress=progress, **kw)
    atomic_write(path, lambda tmp: torch.save({"images": split.images, "density": split.density}, tmp))
    return split, key


def _teacher_maps(cfg: SaliencyConfig, train: SaliencySplit, key: str, cache: Path, device, progress: bool
                  ) -> torch.Tensor:
    """The teacher's probabilities (N, H, W) of the unflipped training images, through the cache
    (``salteacher_<key>.pt``, keyed by the training data and the teacher's weights)."""
    teacher, _ = load_saliency_model(cfg.teacher, device=device)
    if list(teacher.input_size) != list(cfg.input_size):
        raise ValueError(f"teacher: {cfg.teacher!r} gives maps of {teacher.input_size[0]} x {teacher.input_size[1]} "
                         f"(its input size) but this run trains at {cfg.input_size[0]} x {cfg.input_size[1]}; "
                         "train the teacher at the same input size")
    path = cache / f"salteacher_{fingerprint(key, _teacher_fingerprint(teacher))}.pt"
    shape = (len(train), *cfg.input_size)

    def check(maps):
        if not isinstance(maps, torch.Tensor) or tuple(maps.shape) != shape or maps.dtype != torch.float32:
            raise ValueError(f"expected float32 maps of shape {shape}")
    maps = load_cache(path, check)
    if maps is None:
        maps = predict_split(teacher, train.images, teacher.spec["mean"], teacher.spec["std"], device, cfg.amp,
                             progress)
        atomic_write(path, lambda tmp: torch.save(maps, tmp))
    return maps


def distill_saliency(data: str | os.PathLike, out: str | os.PathLike, config: SaliencyConfig | None = None, *,
                     device: str | None = None, resume: bool = False, cache_dir: str | os.PathLike | None = None,
                     command: str | None = None, progress: bool = True) -> dict:
    """Train a saliency model on a fixation dataset (OSIE layout) through the distillation loop.

    Args:
        data: the dataset root (e.g. ``../shared/data/osie``). out: the run folder: ``last.pt`` (resumable,
            atomic, each epoch), ``log.csv`` (``val_kld``, ``val_cc``, ``val_nss`` per epoch), and at the end
            ``model.safetensors`` + ``model.json`` (card; :func:`rollout_fast.saliency.load_saliency_model`) and
            ``metrics.json``.
        config: :class:`SaliencyConfig`. device: 'cpu' | 'cuda' | None (torchrun: cuda:LOCAL_RANK).
        resume: continue from ``out/last.pt`` (same config). cache_dir: decoded data and teacher maps (default
            ``out/cache``; share it between runs on the same data).

    Returns:
        The ``metrics.json`` dict (rank 0; ``{}`` on other ranks).

    Raises:
        ValueError: a bad config field (named), bad data (a fixation outside its image, an image without
            fixations, a .mat without the expected fields, an empty split: named), a teacher of another input
            size, a config differing from the checkpoint's. FileNotFoundError / FileExistsError /
            NotADirectoryError / PermissionError: as :func:`rollout_fast.distill.distill`.
    """
    cfg = config or SaliencyConfig()
    cfg.validate()
    env = setup_distributed(device)
    if cfg.batch_size % env.world:
        raise ValueError(f"batch_size: {cfg.batch_size} is not divisible by the {env.world} processes")
    out, root = Path(out), Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"data: dataset folder not found: {str(root)!r}")
    state = _checkpoint_state(out, cfg, resume)
    cache = Path(cache_dir) if cache_dir is not None else out / "cache"
    check_writable_dir(out, "out")
    check_writable_dir(cache, "cache_dir")
    split_file = cfg.split_file or SPLIT_FILE
    train_names = load_split(cfg.train_split, split_file)[:cfg.train_images]
    val_names = load_split(cfg.val_split, split_file)[:cfg.val_images]
    if env.rank == 0:
        cache.mkdir(parents=True, exist_ok=True)
    show = progress and env.rank == 0
    train_set, key = _rank0_first(env, lambda: _split(root, cfg, train_names, cache, show))
    val_set, _ = _rank0_first(env, lambda: _split(root, cfg, val_names, cache, show))
    if len(train_set) < cfg.batch_size:
        raise ValueError(f"batch_size: {cfg.batch_size} exceeds the {len(train_set)} training images")
    teacher_maps = None if cfg.heads == 1 else _rank0_first(
        env, lambda: _teacher_maps(cfg, train_set, key, cache, env.device, show))
    seed_everything(cfg.seed)
    student = create_saliency_model(cfg.spec(), pretrained=cfg.pretrained, init_from=cfg.init_from)
    student = env.sync_batchnorm(student).to(env.device)
    task = SaliencyTask(cfg, env.device, train_set, val_set, teacher_maps, student.spec["mean"], student.spec["std"])
    train(TrainingRun(cfg, env, student, task, out, progress), state)
    if env.rank != 0:
        return {}
    val = task.validate(student, progress)
    metrics = {"model": student.spec, "val": val, "train_images": len(train_set), "val_images": len(val_set),
               "epochs": cfg.head_epochs + cfg.epochs, "params": sum(p.numel() for p in student.parameters())}
    card = {"name": out.name, "data": {"root": str(root), "split_file": str(split_file), "sigma_px": cfg.sigma},
            "metrics": {"val": val}, "training": {**asdict(cfg), "device": str(env.device), "torch": torch.__version__},
            "output": "log-probabilities (B, H, W) at the input size; model.predict(x) gives probabilities",
            "command": command or " ".join(shlex.quote(a) for a in sys.argv),
            "source": "rollout_fast.distill.distill_saliency; seed 004 (REFERENCE.md section 9)"}
    save_saliency_model(out / "model.safetensors", student, card)
    write_json(out / "metrics.json", metrics)
    return metrics
