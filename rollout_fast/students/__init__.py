"""Students: small, fast models that predict a teacher ViT's rollout map from a thumbnail.

The seeds' idea (REFERENCE.md section 5, ../seeds): instead of running the expensive teacher to learn
which patches matter, a small model looks at a low-resolution version of the image and predicts the
teacher's attention-rollout map (or its gradient rollout for the predicted class: ``rollout-fast
distill --target grad-rollout``, the better token selector) on the teacher's (gh, gw) patch grid. Its
scores then rank patches for pruning.

A :class:`RolloutStudent` takes the *teacher's own input batch* ``(B, 3, H, W)`` (normalised the
teacher's way), applies its input strategy itself, and returns ``(B, gh, gw)`` float32 scores (logits;
higher = more important). :meth:`RolloutStudent.maps` turns them into maps comparable with the
teacher's (softmax or sigmoid, then max-normalised per image).

Modules:

- :mod:`.registry`: architectures by name; a new student is one factory decorated with
  :func:`register_student`. Built in: ``"resnet"``, ``"resnet-cifar"`` (:mod:`.convnet`), ``"vit-tiny"``
  (:mod:`.vit`), all built from timm modules.
- :mod:`.inputs`: the input strategies ``"downsize"``, ``"lowres"``, ``"mask"`` (the seeds' ``DOWNSIZE``,
  44-px "from scratch" and ``MAE`` variants).
- :mod:`.model`: :class:`RolloutStudent`, :func:`logits_to_maps`, :func:`save_student`;
  :mod:`.factory`: :func:`create_student`; :mod:`.cost`: :func:`count_macs`, :func:`measure_cost`.

Shipped students and loading live in :mod:`rollout_fast.zoo` (``load_student``, ``EMBEDDED_STUDENTS``,
``pruning_student_name``; also importable from here).
"""

from __future__ import annotations

from .cost import count_macs, measure_cost
from .factory import create_student
from .inputs import STRATEGIES, student_input_size
from .model import LOSS_ACTIVATIONS, RolloutStudent, check_student_grid, logits_to_maps, save_student
from .registry import BuildContext, StudentArch, check_student_choice, register_student, student_archs

__all__ = [
    "EMBEDDED_STUDENTS",
    "LOSS_ACTIVATIONS",
    "STRATEGIES",
    "STUDENT_ARCHS",
    "BuildContext",
    "RolloutStudent",
    "StudentArch",
    "check_student_choice",
    "check_student_grid",
    "count_macs",
    "create_student",
    "load_student",
    "logits_to_maps",
    "measure_cost",
    "pruning_student_name",
    "register_student",
    "save_student",
    "student_archs",
    "student_input_size",
]

# the built-in architectures (a snapshot taken at import; student_archs() also lists ones registered later)
STUDENT_ARCHS = student_archs()

_FROM_ZOO = ("EMBEDDED_STUDENTS", "load_student", "pruning_student_name")


def __getattr__(name):  # shipped students live in rollout_fast.zoo (which builds them with this package)
    if name in _FROM_ZOO:
        from .. import zoo

        return getattr(zoo, name)
    raise AttributeError(f"module 'rollout_fast.students' has no attribute {name!r}")
