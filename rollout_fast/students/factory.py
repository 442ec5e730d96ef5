"""``create_student``: a :class:`RolloutStudent` of a registered architecture (the built-in ones imported
here register themselves: :mod:`.convnet`, :mod:`.vit`)."""

from __future__ import annotations

from . import convnet, vit  # noqa: F401  (register the built-in architectures)
from .inputs import check_size, student_input_size
from .model import LOSS_ACTIVATIONS, RolloutStudent
from .registry import BuildContext, check_student_choice

__all__ = ["create_student"]


def create_student(arch: str = "resnet-cifar", *, strategy: str = "lowres", factor: int = 2,
                   input_size: tuple[int, int] = (32, 32), grid: tuple[int, int] = (8, 8),
                   loss: str = "kld", pretrained: bool = False, **options) -> RolloutStudent:
    """Build a student for a teacher with input ``input_size`` (H, W) and patch grid ``grid`` (gh, gw).

    Args:
        arch: a registered architecture (:func:`rollout_fast.students.student_archs`): 'resnet' (resnet18
            layout) | 'resnet-cifar' (light CIFAR ResNet) | 'vit-tiny'.
        strategy: 'downsize' | 'lowres' | 'mask' (mask: 'vit-tiny' only).
        factor: F >= 1; the student sees 1/F^2 of the pixels (see :mod:`rollout_fast.students.inputs`).
        input_size: the teacher's input (H, W).
        grid: the teacher's patch grid (gh, gw): the student's output shape.
        loss: 'kld' | 'bce' | 'mse': fixes the output activation (softmax | sigmoid) used by
            :meth:`RolloutStudent.maps`.
        pretrained: timm's ImageNet weights for the trunk ('resnet', 'vit-tiny'; needs internet).
        **options: architecture options. resnet-cifar: ``channels`` (4 ints, default 24,48,96,192),
            ``layers`` (blocks per stage, default 1,1,1,1), ``head_width`` (64). resnet: ``head_width``.
            vit-tiny: ``depth`` (4), ``patch_size`` (4), ``embed_dim`` (192), ``num_heads`` (3),
            ``head`` ('tokens' | 'cls'; default 'cls' for mask, else 'tokens'), ``keep_ratio``
            (mask only; default 1/F^2), ``mask_seed`` (0).

    Returns:
        A :class:`RolloutStudent` in train mode on the CPU.

    Raises:
        ValueError: unknown arch/strategy/loss/option, bad sizes, 'mask' with a convnet, a thumbnail
            the backbone cannot take (e.g. not divisible by the ViT patch size), pretrained
            'resnet-cifar'.
    """
    spec = check_student_choice(arch, strategy, loss)
    input_size = check_size("input_size", input_size)
    grid = check_size("grid", grid)
    thumb = student_input_size(strategy, factor, input_size)
    unknown = set(options) - set(spec.options) - spec.extra_options
    if unknown:
        raise ValueError(f"options: unknown for {arch!r}: {sorted(unknown)}; known: "
                         f"{sorted(set(spec.options) | spec.extra_options)}")
    ctx = BuildContext(strategy=strategy, factor=factor, input_size=input_size, grid=grid, thumbnail_size=thumb,
                       pretrained=pretrained, options={**spec.options, **options})
    net = spec.factory(ctx)
    recipe = {"arch": arch, "strategy": strategy, "factor": int(factor), "input_size": list(input_size),
              "grid": list(grid), "loss": loss, "activation": LOSS_ACTIVATIONS[loss], "options": ctx.options}
    return RolloutStudent(net, recipe)
