"""The student module: :class:`RolloutStudent` (input strategy + map network), logits -> maps, saving."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .inputs import apply_strategy, student_input_size

__all__ = ["LOSS_ACTIVATIONS", "RolloutStudent", "check_student_grid", "logits_to_maps", "save_student"]

# the output activation that turns logits into a map, for each distillation loss
LOSS_ACTIVATIONS = {"kld": "softmax", "bce": "sigmoid", "mse": "sigmoid"}


class RolloutStudent(nn.Module):
    """A student that predicts a teacher's rollout map from the teacher's own input batch.

    ``student(images)``: ``images`` (B, 3, H, W) float (the teacher's normalised input, H, W =
    ``input_size``) -> (B, gh, gw) float32 logits, one score per teacher patch. The input strategy
    (``downsize`` / ``lowres`` / ``mask``) is applied inside.

    Build with :func:`create_student`; :attr:`spec` is the JSON-serialisable recipe that rebuilds it.
    ``net`` is the architecture's map network (see :func:`rollout_fast.students.register_student`).

    Raises (on call):
        ValueError: ``images`` not (B, 3, H, W) with (H, W) = ``input_size``.
        TypeError: ``images`` not a floating-point tensor.
    """

    def __init__(self, net: nn.Module, spec: dict):
        super().__init__()
        self.net = net
        self.spec = spec
        self.strategy = spec["strategy"]
        self.factor = spec["factor"]
        self.input_size = tuple(spec["input_size"])
        self.grid = tuple(spec["grid"])
        self.activation = spec["activation"]
        self.thumbnail_size = student_input_size(self.strategy, self.factor, self.input_size)

    def extra_repr(self) -> str:
        return (f"arch={self.spec['arch']!r}, strategy={self.strategy!r}, factor={self.factor}, "
                f"input_size={self.input_size}, grid={self.grid}")

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Apply the input strategy: (B, 3, H, W) -> what the backbone sees (B, 3, h, w)."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images: expected a torch.Tensor, got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"images: expected a floating-point tensor, got {images.dtype}")
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != self.input_size:
            raise ValueError(f"images: expected (B, 3, {self.input_size[0]}, {self.input_size[1]}) "
                             f"(the teacher's input), got {tuple(images.shape)}")
        return apply_strategy(images, self.strategy, self.factor)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.prepare(images)).float()

    @torch.no_grad()
    def maps(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted maps (B, gh, gw) float32 in [0, 1], max-normalised per image, like the teacher's.

        Softmax over the grid for students trained with KLD, sigmoid for BCE/MSE.
        """
        return logits_to_maps(self(images), self.activation)

    def head_parameters(self) -> list[nn.Parameter]:
        """The fresh map head's parameters (phase 1 of distillation trains only these)."""
        ps = [p for m in self.net.head_modules() for p in m.parameters()]
        return ps + [self.net.bias_map]

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Everything else (the timm trunk)."""
        head = {id(p) for p in self.head_parameters()}
        return [p for p in self.parameters() if id(p) not in head]

    def backbone_modules(self) -> nn.Module:
        """The timm trunk module (frozen and in eval mode during phase 1)."""
        return self.net.backbone()


def logits_to_maps(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """(B, gh, gw) logits -> maps in [0, 1], max-normalised per image (softmax or sigmoid first)."""
    B = logits.shape[0]
    flat = logits.float().reshape(B, -1)
    if activation == "softmax":
        m = flat.softmax(dim=1)
    elif activation == "sigmoid":
        m = flat.sigmoid()
    else:
        raise ValueError(f"activation: expected 'softmax' or 'sigmoid', got {activation!r}")
    m = m / m.amax(dim=1, keepdim=True).clamp_min(1e-30)
    return m.view_as(logits)


def check_student_grid(student: RolloutStudent, grid: tuple[int, int],
                       input_size: tuple[int, int] | None = None) -> None:
    """Check that ``student`` predicts a teacher's ``grid`` (gh, gw) from its ``input_size`` (H, W).

    Raises:
        TypeError: ``student`` is not a :class:`RolloutStudent`.
        ValueError: the student's output grid or input size differs from the teacher's.
    """
    if not isinstance(student, RolloutStudent):
        raise TypeError(f"student: expected a RolloutStudent, got {type(student).__name__}")
    if tuple(student.grid) != tuple(grid):
        raise ValueError(f"student: predicts a {student.grid[0]}x{student.grid[1]} grid but the teacher's "
                         f"patch grid is {grid[0]}x{grid[1]}")
    if input_size is not None and tuple(student.input_size) != tuple(input_size):
        raise ValueError(f"student: takes {student.input_size} inputs but the teacher takes "
                         f"{tuple(input_size)}")


def save_student(path: str | os.PathLike, student: RolloutStudent, card: dict) -> tuple[Path, Path]:
    """Write ``student`` as safetensors at ``path`` and ``card`` (plus its spec) as JSON beside it.

    Both writes are atomic. Returns ``(weights_path, card_path)``; :func:`rollout_fast.load_student` reads
    them back.
    """
    from ..checkpoint import save_weights, write_json

    path = Path(path)
    card = {**card, "student": student.spec}
    w = save_weights(path, student.state_dict(), {"card": path.with_suffix(".json").name})
    c = write_json(path.with_suffix(".json"), card)
    return w, c
