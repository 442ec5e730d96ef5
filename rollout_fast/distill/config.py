"""The hyper-parameters of :func:`rollout_fast.distill.distill` and their validation."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..students.model import LOSS_ACTIVATIONS
from ..students.registry import check_student_choice

__all__ = ["LOSSES", "TARGETS", "DistillConfig"]

LOSSES = tuple(LOSS_ACTIVATIONS)
TARGETS = ("rollout", "grad-rollout")


@dataclass
class DistillConfig:
    """Hyper-parameters of :func:`rollout_fast.distill.distill` (see :mod:`rollout_fast.distill`)."""

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
    # the data folder's evaluation split (the test and per-epoch validation images): 'test' (CIFAR-10),
    # 'val' (Imagenette)
    test_split: str = "test"

    def validate(self) -> None:
        """Raise ValueError naming the first bad field (the student, strategy and loss through
        :func:`rollout_fast.students.check_student_choice`, as :func:`~rollout_fast.students.create_student`
        checks them)."""
        def pos_int(name, lo=1):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
        check_student_choice(self.student, self.strategy, self.loss)
        if self.target not in TARGETS:
            raise ValueError(f"target: expected one of {TARGETS}, got {self.target!r}")
        if self.target == "grad-rollout" and self.head_fusion != "mean":
            raise ValueError(f"head_fusion: applies to target 'rollout' only (gradient rollout fuses heads by the "
                             f"gradient-weighted mean), got {self.head_fusion!r} with target 'grad-rollout'")
        for n in ("factor", "batch_size", "views"):
            pos_int(n)
        for n in ("head_epochs", "epochs", "max_shift", "workers"):
            pos_int(n, 0)
        if self.head_epochs + self.epochs < 1:
            raise ValueError("epochs: head_epochs + epochs must be >= 1")
        for n in ("lr", "finetune_lr_scale"):
            if not getattr(self, n) > 0:
                raise ValueError(f"{n}: expected > 0, got {getattr(self, n)!r}")
        if not self.weight_decay >= 0 or not self.warmup_epochs >= 0:
            raise ValueError("weight_decay, warmup_epochs: expected >= 0")
        if not isinstance(self.test_split, str) or not self.test_split or self.test_split == "train" \
                or "/" in self.test_split or "\\" in self.test_split:
            raise ValueError(f"test_split: expected the name of a split folder other than 'train', "
                             f"got {self.test_split!r}")
        for n in ("train_images", "val_images", "placement_shift"):
            v = getattr(self, n)
            if v is not None:
                pos_int(n)
