"""The rollout jobs' input pipeline and precision: image files decoded and transformed in DataLoader workers,
unreadable files dropped by the collate and passed back by name, pinned memory and non-blocking copies on CUDA,
and the ``fp32`` / ``bf16`` / ``fp16`` modes of the forward pass.

A batch is a fixed list of positions in the file list (:func:`plan_batches`), whatever can be read in it: the
same files give the same batches with any number of workers, sharded or not, so the maps are the same bits
(a model's output may differ in the last bits between batch compositions).
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch

__all__ = ["PRECISIONS", "Batch", "ImageFiles", "collate_readable", "explain_batch", "explain_result",
           "image_batches", "plan_batches", "precision_setup"]

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Batch(NamedTuple):
    """One batch of the pipeline.

    ``images``: (b, 3, H, W) float32 (on the device once :func:`image_batches` yields it), or None when no file
    of the batch could be read; ``index``: the b positions (in the file list) of the readable files, in order;
    ``skipped``: ``(position, reason)`` of the unreadable ones (reason ``"ErrorType: message"``)."""

    images: torch.Tensor | None
    index: list[int]
    skipped: list[tuple[int, str]]


class ImageFiles(torch.utils.data.Dataset):
    """``files[i]`` read by :func:`rollout_fast.data.load_image` and passed through ``transform``.

    Item ``i``: ``(i, image tensor, None)``, or ``(i, None, "ErrorType: message")`` when the file cannot be read
    (OSError, PIL's UnidentifiedImageError, ValueError ...); errors of the transform itself propagate."""

    def __init__(self, files: Sequence[str | os.PathLike], transform):
        self.files, self.transform = list(files), transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from .data import load_image

        try:
            img = load_image(self.files[i])
        except Exception as e:  # noqa: BLE001 -- PIL: OSError, UnidentifiedImageError, ValueError, DecompressionBomb...
            return i, None, f"{type(e).__name__}: {e}"
        return i, self.transform(img), None


def collate_readable(items) -> Batch:
    """Stack the readable items of :class:`ImageFiles` into a :class:`Batch`; the unreadable ones are dropped
    and listed in ``skipped``."""
    good = [(i, x) for i, x, _ in items if x is not None]
    skipped = [(i, why) for i, x, why in items if x is None]
    images = torch.stack([x for _, x in good]) if good else None
    return Batch(images, [i for i, _ in good], skipped)


def plan_batches(stop: int, batch_size: int, start: int = 0) -> list[list[int]]:
    """Positions ``start .. stop - 1`` in batches of ``batch_size`` (the last one shorter)."""
    return [list(range(s, min(s + batch_size, stop))) for s in range(start, stop, batch_size)]


def image_batches(files: Sequence[str | os.PathLike], transform, batches: Sequence[Sequence[int]], *,
                  device: str | torch.device = "cpu", workers: int = 0, warn: bool = True) -> Iterator[Batch]:
    """The :class:`Batch` of each entry of ``batches`` (positions in ``files``), in order, images on ``device``.

    ``workers`` > 0: decoding and ``transform`` run in that many DataLoader worker processes (0: in this
    process); on CUDA the batches are pinned and copied without blocking. ``warn``: a ``UserWarning`` per
    unreadable file, naming it and the reason.

    Raises:
        ValueError: ``workers`` < 0.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers: expected an int >= 0, got {workers!r}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    loader = torch.utils.data.DataLoader(
        ImageFiles(files, transform), batch_sampler=[list(b) for b in batches], num_workers=workers,
        collate_fn=collate_readable, pin_memory=cuda, prefetch_factor=4 if workers else None,
        persistent_workers=False)
    for batch in loader:
        if warn:
            for i, why in batch.skipped:
                # stacklevel 3: the warning points at the caller of the job iterating these batches
                warnings.warn(f"skipping unreadable image {str(files[i])!r}: {why}", stacklevel=3)
        images = batch.images
        if images is not None and images.device != device:
            images = images.to(device, non_blocking=cuda)
        yield Batch(images, batch.index, batch.skipped)


def precision_setup(model: torch.nn.Module, device: str | torch.device, precision: str = "fp32"):
    """How the forward pass runs in ``precision``: ``(model to explain, autocast context factory, input dtype)``.

    - ``fp32``: the model as it is, no autocast, float32 input.
    - ``bf16`` / ``fp16`` on CUDA: the model as it is under ``torch.autocast('cuda', dtype)``.
    - ``bf16`` on the CPU: a bfloat16 copy of the model (``model`` itself is not changed) fed bfloat16 input, no
      autocast (the capture's row-sum check refuses CPU autocast's attention; a bf16 model is supported).

    Maps come out float32 in every mode (their values carry the lower precision of the forward pass).

    Raises:
        ValueError: ``precision`` not one of :data:`PRECISIONS`; ``fp16`` on a device other than CUDA.
    """
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return model, contextlib.nullcontext, None
    dtype = _DTYPES[precision]
    if device.type == "cuda":
        return model, lambda: torch.autocast("cuda", dtype=dtype), None
    if precision == "fp16":
        raise ValueError(f"precision: fp16 needs a CUDA device (here {device.type}); use bf16 or fp32")
    return copy.deepcopy(model).to(dtype), contextlib.nullcontext, dtype


def explain_result(explainer, images: torch.Tensor, method: str, target: int | None, autocast, input_dtype):
    """The explainer's whole result for ``images``: ``explainer.explain(x)`` ('attention') or
    ``explainer.explain_grad(x, target)`` ('grad') in the mode of :func:`precision_setup` (``autocast``,
    ``input_dtype``): a :class:`~rollout_fast.explain.RolloutResult`, or for an
    :class:`~rollout_fast.ltpa.LTPAExplainer` an :class:`~rollout_fast.ltpa.LTPAResult` (with ``levels``)."""
    x = images if input_dtype is None else images.to(input_dtype)
    with autocast():
        return explainer.explain_grad(x, target) if method == "grad" else explainer.explain(x)


def explain_batch(explainer, images: torch.Tensor, method: str, target: int | None, autocast, input_dtype):
    """``(maps (b, gh, gw) float32, logits (b, C) float32)`` of ``images`` on the model's device:
    :meth:`~rollout_fast.AttentionRollout.explain` ('attention') or ``explain_grad(images, target)`` ('grad'),
    in the mode of :func:`precision_setup` (``autocast``, ``input_dtype``); see :func:`explain_result`."""
    res = explain_result(explainer, images, method, target, autocast, input_dtype)
    return res.maps.float(), res.logits.float()
