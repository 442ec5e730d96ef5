"""The student architectures, by name: a new student is one factory decorated with :func:`register_student`.

A factory takes a :class:`BuildContext` and returns the map network: an ``nn.Module`` whose
``forward(x)`` maps what the input strategy feeds it (B, 3, h, w) to (B, gh, gw) logits on the teacher's
grid, with a ``bias_map`` parameter (gh, gw), ``head_modules()`` (the fresh map head, trained alone in
distillation's phase 1) and ``backbone()`` (the trunk, frozen in phase 1). It may record resolved options
in ``ctx.options``: they go into the student's spec, which rebuilds it (:func:`rollout_fast.load_student`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from .inputs import STRATEGIES
from .model import LOSS_ACTIVATIONS

__all__ = ["BuildContext", "StudentArch", "check_student_choice", "get_arch", "register_student",
           "student_archs"]


@dataclass
class BuildContext:
    """What a factory builds for: the teacher's ``input_size`` (H, W) and ``grid`` (gh, gw), the input
    ``strategy`` and ``factor``, the backbone's input ``thumbnail_size`` (h, w), ``pretrained`` weights,
    and ``options`` (the architecture's defaults updated with the caller's; the factory may resolve
    more)."""

    strategy: str
    factor: int
    input_size: tuple[int, int]
    grid: tuple[int, int]
    thumbnail_size: tuple[int, int]
    pretrained: bool
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class StudentArch:
    """A registered architecture: its ``factory``, default ``options``, ``extra_options`` it accepts
    without a default, and the input ``strategies`` it supports."""

    name: str
    factory: Callable[[BuildContext], nn.Module]
    options: dict
    extra_options: frozenset
    strategies: tuple


_REGISTRY: dict[str, StudentArch] = {}

# why a strategy is refused by architectures that do not list it
_STRATEGY_NEEDS = {"mask": "drops patch tokens and needs a ViT student"}


def register_student(name: str, *, options: dict | None = None, extra_options=(), strategies=STRATEGIES):
    """Decorator: register ``factory(ctx: BuildContext) -> nn.Module`` as student architecture ``name``.

    Args:
        name: the ``arch`` of :func:`create_student` (and ``rollout-fast distill --student``).
        options: the architecture's options and their defaults (the only keys callers may pass, with
            ``extra_options``).
        extra_options: option names accepted without a default.
        strategies: the input strategies it supports.

    Raises:
        ValueError: ``name`` already registered, or an unknown strategy.
    """
    unknown = set(strategies) - set(STRATEGIES)
    if unknown:
        raise ValueError(f"strategies: unknown {sorted(unknown)}; known: {STRATEGIES}")

    def deco(factory):
        if name in _REGISTRY:
            raise ValueError(f"student: {name!r} is already registered")
        _REGISTRY[name] = StudentArch(name, factory, dict(options or {}), frozenset(extra_options),
                                      tuple(strategies))
        return factory
    return deco


def student_archs() -> tuple[str, ...]:
    """The registered architecture names, in registration order."""
    return tuple(_REGISTRY)


def get_arch(name: str) -> StudentArch:
    """The registered architecture ``name``. Raises ValueError naming the known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"student: expected one of {student_archs()}, got {name!r}")
    return _REGISTRY[name]


def check_student_choice(arch: str, strategy: str, loss: str) -> StudentArch:
    """Check an architecture, input strategy and loss together; returns the architecture.

    Raises:
        ValueError: unknown ``arch``, ``loss`` or ``strategy``, or a strategy ``arch`` does not support
            (e.g. 'mask' with a convnet), naming the argument.
    """
    spec = get_arch(arch)
    if loss not in LOSS_ACTIVATIONS:
        raise ValueError(f"loss: expected one of {tuple(LOSS_ACTIVATIONS)}, got {loss!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    if strategy not in spec.strategies:
        able = ", ".join(repr(a.name) for a in _REGISTRY.values() if strategy in a.strategies)
        raise ValueError(f"strategy: {strategy!r} {_STRATEGY_NEEDS.get(strategy, 'is not supported by this student')}"
                         f" ({able}), got {arch!r}")
    return spec
