"""Shipped models and loading: ``load_teacher`` and ``load_student``, from one assets folder.

The embedded teacher ``"cifar10-vit"`` lives in ``rollout_fast/assets/`` (:data:`ASSETS`) as a safetensors
file plus a JSON model card (architecture arguments, data config, class names, measured accuracy, the
command that trained it); so do the shipped students (:data:`EMBEDDED_STUDENTS`, cards written by
``rollout-fast distill``). Loading never unpickles code: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_weights
from .models import create_model
from .students.factory import create_student
from .students.model import RolloutStudent

__all__ = ["ASSETS", "EMBEDDED_STUDENTS", "EMBEDDED_TEACHERS", "INSTALLABLE_MODELS", "CheckpointNotFoundError",
           "load_student", "load_teacher", "pruning_student_name", "teacher_card"]

ASSETS = Path(__file__).resolve().parent / "assets"
EMBEDDED_TEACHERS = {"cifar10-vit": ASSETS / "cifar10-vit",
                     # the second, smaller CIFAR-10 ViT: a cross-model scorer (prune-eval --scorer-model, issue 16)
                     "cifar10-vit-small": ASSETS / "cifar10-vit-small",
                     # the Imagenette teacher (issue 13): 112 px, 14 x 14 patch grid + class token (DeiT's layout)
                     "imagenette-vit": ASSETS / "imagenette-vit"}
# Classifiers a recipe script installs into ASSETS as NAME.safetensors + NAME.json (load_teacher(NAME) once
# there), with the command that trains and installs each: the Learn to Pay Attention models (issue 14; the
# -thumb ones classify the students' thumbnail).
INSTALLABLE_MODELS = {
    "cifar10-ltpa": "python python/train_ltpa.py --recipe cifar10-ltpa --install",
    "imagenette-ltpa": "python python/train_ltpa.py --recipe imagenette-ltpa --install",
    "cifar10-ltpa-thumb": "python python/train_ltpa.py --recipe cifar10-ltpa-thumb --only pc-softmax-after --install",
    "imagenette-ltpa-thumb": ("python python/train_ltpa.py --recipe imagenette-ltpa-thumb --only pc-softmax-after "
                              "--install"),
}
# Shipped students, by name: "cifar10-vit" predicts the embedded teacher's rollout at discard ratio 0 (the
# rollout people inspect; issue 5's metrics); "cifar10-vit-prune" predicts the teacher's gradient rollout for
# its predicted class (distill --target grad-rollout), the map that selects the best patch tokens to keep for
# pruned inference (rollout_fast.prune; ``prune-eval``'s default). "imagenette-vit" / "imagenette-vit-prune": the
# same two for the Imagenette teacher (issue 13; python/train_students.py --teacher imagenette-vit installs them,
# a missing asset is reported by load_student).
EMBEDDED_STUDENTS = {"cifar10-vit": ASSETS / "cifar10-vit-student",
                     "cifar10-vit-prune": ASSETS / "cifar10-vit-prune-student",
                     "imagenette-vit": ASSETS / "imagenette-vit-student",
                     "imagenette-vit-prune": ASSETS / "imagenette-vit-prune-student"}


class CheckpointNotFoundError(FileNotFoundError, ValueError):
    """A checkpoint path that does not exist (both a FileNotFoundError and a ValueError)."""


def teacher_card(name: str = "cifar10-vit") -> dict:
    """The JSON model card of an embedded teacher.

    Raises:
        ValueError: unknown name. FileNotFoundError: the asset is missing from the install.
    """
    if name not in EMBEDDED_TEACHERS:
        raise ValueError(f"model: unknown embedded teacher {name!r}; known: {sorted(EMBEDDED_TEACHERS)}")
    path = EMBEDDED_TEACHERS[name].with_suffix(".json")
    if not path.is_file():
        raise FileNotFoundError(f"embedded teacher card missing at {path}; reinstall rollout_fast")
    return json.loads(path.read_text())


def _from_card(card: dict, weights: Path) -> tuple[nn.Module, dict]:
    model = create_model(card["arch"])  # a timm ViT, or an AttnVGG for arch type 'attnvgg'
    state = load_weights(weights)
    model.load_state_dict(state, strict=True)
    data_config = dict(card["data_config"])
    data_config["input_size"] = tuple(data_config["input_size"])
    data_config["mean"] = tuple(data_config["mean"])
    data_config["std"] = tuple(data_config["std"])
    model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **data_config,
                            "num_classes": card["arch"].get("num_classes"),
                            "label_names": card.get("class_names")}
    return model, data_config


def load_teacher(model: str | os.PathLike = "cifar10-vit", *, pretrained: bool = False,
                 checkpoint: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 **timm_kwargs) -> tuple[nn.Module, dict]:
    """Load a teacher ViT in eval mode and its timm data config.

    Args:
        model: ``"cifar10-vit"`` (the embedded CIFAR-10 teacher, offline), a name of
            :data:`INSTALLABLE_MODELS` once its script installed it into ``rollout_fast/assets``
            (``"cifar10-ltpa"``: a Learn to Pay Attention :class:`~rollout_fast.ltpa.AttnVGG` ...), any timm
            model name (e.g. ``"deit_small_patch16_224"``), or a path to a rollout_fast ``.safetensors`` file
            with its ``.json`` card beside it (as written by ``rollout-fast train-teacher``).
        pretrained: for timm names, download timm's pretrained weights (needs internet).
        checkpoint: for timm names, a local weights file: ``.safetensors``, or a torch file read with
            ``weights_only=True`` (a state dict, or a dict with a ``model``/``state_dict`` entry).
        device: where to put the model.
        **timm_kwargs: extra ``timm.create_model`` arguments (``img_size``, ``num_classes`` ...).

    Returns:
        ``(model, data_config)``: the model in eval mode on ``device``; ``data_config`` is the dict of
        ``timm.data.resolve_data_config`` (``input_size`` (3, H, W), ``mean``, ``std``,
        ``interpolation``, ``crop_pct``, ``crop_mode``), ready for ``timm.data.create_transform``.

    Raises:
        CheckpointNotFoundError (FileNotFoundError and ValueError): ``checkpoint`` or a path
            ``model`` does not exist, or a name of :data:`INSTALLABLE_MODELS` is not installed yet (the
            message gives the command that trains and installs it).
        ValueError: an unknown model name, or a checkpoint that cannot be read safely or does not
            match the architecture.
    """
    import timm

    if checkpoint is not None and not Path(checkpoint).is_file():
        raise CheckpointNotFoundError(f"checkpoint: no file at {str(checkpoint)!r}")
    name = str(model)
    if name in EMBEDDED_TEACHERS:
        if checkpoint is not None or pretrained:
            raise ValueError("checkpoint/pretrained: not used with the embedded teacher "
                             f"{name!r}; pass a timm model name instead")
        card = teacher_card(name)
        net, data_config = _from_card(card, EMBEDDED_TEACHERS[name].with_suffix(".safetensors"))
    elif name in INSTALLABLE_MODELS:
        weights, card_path = ASSETS / f"{name}.safetensors", ASSETS / f"{name}.json"
        if checkpoint is not None or pretrained:
            raise ValueError(f"checkpoint/pretrained: not used with the installed model {name!r}")
        if not (weights.is_file() and card_path.is_file()):
            raise CheckpointNotFoundError(f"model: {name!r} is not installed yet (no {weights.name} + "
                                          f"{card_path.name} in {ASSETS}); train and install it with: "
                                          f"{INSTALLABLE_MODELS[name]}")
        net, data_config = _from_card(json.loads(card_path.read_text()), weights)
    elif name.endswith((".safetensors", ".pt", ".pth", ".bin")) or os.sep in name:
        path = Path(name)
        if not path.is_file():
            raise CheckpointNotFoundError(f"model: no checkpoint file at {name!r}")
        card_path = path.with_suffix(".json")
        if not card_path.is_file():
            raise ValueError(f"model: {name!r} has no model card {card_path.name} beside it; for a "
                             "timm model's weights pass model=TIMM_NAME, checkpoint=PATH")
        net, data_config = _from_card(json.loads(card_path.read_text()), path)
    else:
        if not timm.is_model(name):
            raise ValueError(f"model: {name!r} is neither an embedded teacher "
                             f"{sorted(EMBEDDED_TEACHERS)} nor a timm model name")
        net = timm.create_model(name, pretrained=pretrained, **timm_kwargs)
        if checkpoint is not None:
            try:
                net.load_state_dict(load_weights(checkpoint), strict=True)
            except RuntimeError as e:
                raise ValueError(f"checkpoint: {str(checkpoint)!r} does not match {name}: {e}") from e
        data_config = timm.data.resolve_data_config({}, model=net)
        img_size = getattr(getattr(net, "patch_embed", None), "img_size", None)
        if img_size is not None:  # built with another img_size than its pretrained_cfg's
            data_config["input_size"] = (data_config["input_size"][0], *(int(s) for s in img_size))
    return net.to(device).eval(), data_config


# ---------------------------------------------------------------------------------------------- students

def pruning_student_name(model: str) -> str:
    """The shipped student to score patch tokens of ``model`` with: ``"<model>-prune"`` when shipped, else
    ``model`` (its rollout student)."""
    return f"{model}-prune" if f"{model}-prune" in EMBEDDED_STUDENTS else model


def _student_weights(key: str) -> Path:
    if key in EMBEDDED_STUDENTS:
        weights = EMBEDDED_STUDENTS[key].with_suffix(".safetensors")
        if not weights.is_file():
            raise FileNotFoundError(f"embedded student for {key!r} missing at {weights}; train one with "
                                    "python/train_students.py")
        return weights
    if key.endswith(".safetensors") or os.sep in key:
        weights = Path(key)
        if not weights.is_file():
            raise FileNotFoundError(f"student: no file at {key!r}")
        return weights
    raise ValueError(f"student: no shipped student for {key!r} (known: {sorted(EMBEDDED_STUDENTS)}) "
                     "and not a path to a student .safetensors")


def load_student(name: str | os.PathLike = "cifar10-vit", *, device: str | torch.device = "cpu"
                 ) -> tuple[RolloutStudent, dict]:
    """Load a shipped or saved student in eval mode, offline.

    Args:
        name: a shipped student (``"cifar10-vit"``: the embedded teacher's rollout at discard 0;
            ``"cifar10-vit-prune"``: the same teacher's gradient rollout for its predicted class, for token
            pruning), or a path
            to a student ``.safetensors`` with its ``.json`` card beside it (as written by
            ``rollout-fast distill``).
        device: where to put it.

    Returns:
        ``(student, card)``: ``student(images)`` takes the teacher's input batch (B, 3, H, W) and
        returns (B, gh, gw) float32 scores; ``card`` records the teacher, the rollout settings the
        student was trained to predict (``card["rollout"]``: target 'rollout' or 'grad-rollout' -- absent,
        i.e. 'rollout', in cards written before targets existed -- head fusion, discard ratio), its input
        strategy and its measured metrics and cost.

    Raises:
        ValueError: unknown name, a card without a student spec, or weights that do not match it.
        FileNotFoundError: the shipped asset or the given file is missing.
    """
    weights = _student_weights(str(name))
    card_path = weights.with_suffix(".json")
    if not card_path.is_file():
        raise FileNotFoundError(f"student: card {card_path} missing beside {weights}")
    card = json.loads(card_path.read_text())
    spec = card.get("student")
    if not isinstance(spec, dict) or "arch" not in spec:
        raise ValueError(f"student: {card_path} has no 'student' spec")
    student = create_student(spec["arch"], strategy=spec["strategy"], factor=spec["factor"],
                             input_size=tuple(spec["input_size"]), grid=tuple(spec["grid"]),
                             loss=spec["loss"], **spec.get("options", {}))
    try:
        student.load_state_dict(load_weights(weights), strict=True)
    except RuntimeError as e:
        raise ValueError(f"student: {str(weights)!r} does not match its card's architecture: {e}") from e
    return student.to(device).eval(), card
