"""Map sources for ``rollout-fast saliency-eval``: everything that gives a map of a photograph, to be scored
against where people looked.

A spec list is comma-separated; each item is one of

- ``centre-prior``: the Gaussian fitted to the train split's fixations
  (:func:`~rollout_fast.saliency.metrics.fit_centre_gaussian`), at each image's size;
- ``mean-map``: the mean of the train split's fixation densities (at the first train image's size, resized
  bilinearly and renormalised for images of other sizes);
- ``uniform``: the constant map (chance);
- ``rollout:MODEL`` / ``grad-rollout:MODEL``: a ViT's attention rollout / gradient rollout of its predicted
  class (:class:`rollout_fast.AttentionRollout`), ``MODEL`` as :func:`rollout_fast.load_teacher` takes it
  (``cifar10-vit``, a rollout_fast ``.safetensors`` with its card, a timm name) or the name of a teacher in
  ``rollout_fast/assets`` (e.g. ``imagenette-vit`` once installed);
- ``ltpa:MODEL``: a Learn to Pay Attention model's own attention maps
  (:func:`rollout_fast.ltpa.ltpa_saliency`: all levels, each normalised to sum 1, averaged on the finest
  level's grid), ``MODEL`` an AttnVGG card path or asset name;
- ``LABEL:PATH_OR_NAME`` (any other label, e.g. ``student-a:runs/sal/A-s0/model.safetensors``,
  ``teacher:...``): a saliency model (:func:`~rollout_fast.saliency.models.load_saliency_model`);
- ``osie-resnet18`` (a shipped saliency model's name, :data:`~rollout_fast.saliency.models.SALIENCY_MODELS`):
  that model, labelled with its name.

Model inputs: the whole photograph is resized (bicubic, aspect ratio not kept, no crop) to the model's input
size and normalised with its mean/std; so a 32 x 32 CIFAR ViT sees the photo squeezed to 32 x 32. Every map is
then upsampled bilinearly (``align_corners=False``) to the photograph's size and clamped at 0 (the MIT
benchmark's way: resize the map to the image), where the metrics are computed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .data import Fixations
from .metrics import centre_gaussian, fit_centre_gaussian
from .models import SALIENCY_MODELS

__all__ = ["BASELINES", "MODEL_KINDS", "MapSource", "MapSpec", "build_sources", "parse_map_specs", "resize_pil",
           "upsample_maps"]

BASELINES = ("centre-prior", "mean-map", "uniform")
MODEL_KINDS = ("rollout", "grad-rollout", "ltpa")


@dataclass(frozen=True)
class MapSpec:
    """One item of ``--maps``: ``label`` (as written), ``kind`` (a baseline, a MODEL_KIND or 'saliency-model')
    and ``arg`` (the model, or None)."""

    label: str
    kind: str
    arg: str | None


def parse_map_specs(text: str) -> list[MapSpec]:
    """Parse ``--maps`` (see the module docstring).

    Raises:
        ValueError: an empty list or item, a baseline with an argument, a model kind without one, an unknown
            name without a model, or a label given twice (each naming the item).
    """
    items = [s.strip() for s in str(text).split(",")]
    if not any(items):
        raise ValueError("maps: empty list")
    out, seen = [], set()
    for item in items:
        if not item:
            raise ValueError(f"maps: empty item in {text!r}")
        name, sep, arg = item.partition(":")
        if name in BASELINES:
            if sep:
                raise ValueError(f"maps: {name!r} takes no model, got {item!r}")
            spec = MapSpec(name, name, None)
        elif not sep and name in SALIENCY_MODELS:
            spec = MapSpec(name, "saliency-model", name)
        elif not sep or not arg or not name:
            kinds = ", ".join([*BASELINES, *(f"{k}:MODEL" for k in MODEL_KINDS), "LABEL:SALIENCY_MODEL",
                               *SALIENCY_MODELS])
            raise ValueError(f"maps: {item!r} is not one of {kinds}")
        else:
            spec = MapSpec(item if name in MODEL_KINDS else name, name if name in MODEL_KINDS else "saliency-model",
                           arg)
        if spec.label in seen:
            raise ValueError(f"maps: {spec.label!r} given twice")
        seen.add(spec.label)
        out.append(spec)
    return out


@dataclass
class MapSource:
    """A built source: ``maps(images, records)`` -> one float32 map per image at the image's (H, W) (PIL RGB
    images and their :class:`~rollout_fast.saliency.data.Fixations`); ``note`` says what it is and what input
    it saw (the table's footnote)."""

    spec: MapSpec
    note: str
    maps: Callable[[Sequence, Sequence[Fixations]], list[torch.Tensor]]


def upsample_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) maps -> (B, H, W) float32: bilinear (``align_corners=False``), clamped at 0; as is at (H, W)."""
    m = maps.float()
    if tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    return m.clamp_min(0)


def resize_pil(images: Sequence, size: tuple[int, int], mean, std, device) -> torch.Tensor:
    """PIL RGB images -> (B, 3, H, W) float32 on ``device``: resized to ``size`` = (H, W) (bicubic, the whole
    image), then ``(x / 255 - mean) / std``."""
    from PIL import Image

    H, W = size
    arr = np.stack([np.asarray(im if im.size == (W, H) else im.resize((W, H), Image.BICUBIC), dtype=np.uint8)
                    for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).to(device).float() / 255.0
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return (x - m) / s


def _per_image(maps: torch.Tensor, records: Sequence[Fixations]) -> list[torch.Tensor]:
    return [upsample_maps(maps[i:i + 1].cpu(), r.size)[0] for i, r in enumerate(records)]


def _resolve_model(arg: str) -> str:
    """An asset name (``rollout_fast/assets/<arg>.safetensors``) as its path; anything else as given."""
    from ..zoo import ASSETS, EMBEDDED_TEACHERS

    if arg not in EMBEDDED_TEACHERS and os.sep not in arg and (ASSETS / f"{arg}.safetensors").is_file():
        return str(ASSETS / f"{arg}.safetensors")
    return arg


def _rollout_source(spec: MapSpec, device, head_fusion: str, discard_ratio: float) -> MapSource:
    from ..explain import AttentionRollout
    from ..zoo import load_teacher

    model, dc = load_teacher(_resolve_model(spec.arg), device=device)
    explainer = AttentionRollout(model, head_fusion=head_fusion, discard_ratio=discard_ratio)
    size = tuple(int(s) for s in dc["input_size"][-2:])

    def maps(images, records):
        x = resize_pil(images, size, dc["mean"], dc["std"], device)
        m = explainer.grad_rollout(x) if spec.kind == "grad-rollout" else explainer(x)
        return _per_image(m, records)

    what = ("gradient rollout of the predicted class" if spec.kind == "grad-rollout" else
            f"attention rollout (head fusion {head_fusion}, discard ratio {discard_ratio:g})")
    return MapSource(spec, f"{spec.arg}: {what}; photo resized to {size[0]} x {size[1]}", maps)


def _ltpa_source(spec: MapSpec, device) -> MapSource:
    from ..ltpa import AttnVGG, ltpa_saliency
    from ..zoo import load_teacher

    model, dc = load_teacher(_resolve_model(spec.arg), device=device)
    if not isinstance(model, AttnVGG) or not model.attention:
        raise ValueError(f"maps: {spec.label!r}: {spec.arg!r} is not an attention-gated AttnVGG "
                         f"({type(model).__name__}{'' if not isinstance(model, AttnVGG) else ', variant vgg'})")
    size = tuple(int(s) for s in dc["input_size"][-2:])

    @torch.no_grad()
    def maps(images, records):
        _, levels = model(resize_pil(images, size, dc["mean"], dc["std"], device))
        grid = tuple(levels[0].shape[-2:])
        return _per_image(ltpa_saliency(levels, grid), records)

    return MapSource(spec, f"{spec.arg}: LTPA attention ({model.variant}), levels averaged; photo resized to "
                           f"{size[0]} x {size[1]}", maps)


def _saliency_model_source(spec: MapSpec, device) -> MapSource:
    from .models import load_saliency_model

    model, _ = load_saliency_model(spec.arg, device=device)
    size, mean, std = model.input_size, model.spec["mean"], model.spec["std"]

    def maps(images, records):
        return _per_image(model.predict(resize_pil(images, size, mean, std, device)), records)

    s = model.spec
    return MapSource(spec, f"{spec.arg}: saliency model ({s['encoder']}, {s['heads']} head(s)); photo resized to "
                           f"{size[0]} x {size[1]}", maps)


class _Baselines:
    """The train split's centre prior and mean map, made once and rendered per image size."""

    def __init__(self, train: Sequence[Fixations], need_mean: bool, sigma: float, progress: bool):
        from tqdm.auto import tqdm

        from .metrics import mean_fixation_map

        self.mean, self.cov = fit_centre_gaussian([r.points for r in train], [r.size for r in train])
        self._centre: dict = {}
        self.mean_map = None
        if need_mean:
            ref = train[0].size
            it = tqdm(train, desc="mean train map", leave=False, disable=not progress)
            self.mean_map = mean_fixation_map(r.density(sigma) if r.size == ref else
                                              _renormalised(upsample_maps(r.density(sigma)[None], ref)[0])
                                              for r in it)

    def centre(self, size) -> torch.Tensor:
        if size not in self._centre:
            self._centre[size] = centre_gaussian(self.mean, self.cov, size)
        return self._centre[size]

    def mean_at(self, size) -> torch.Tensor:
        m = self.mean_map
        return m if tuple(m.shape) == tuple(size) else _renormalised(upsample_maps(m[None], size)[0])


def _renormalised(m: torch.Tensor) -> torch.Tensor:
    return m / m.sum().clamp_min(1e-30)


def build_sources(specs: Sequence[MapSpec], train: Sequence[Fixations] | None, *, sigma: float,
                  device="cpu", head_fusion: str = "mean", discard_ratio: float = 0.0,
                  progress: bool = False) -> tuple[list[MapSource], Callable | None]:
    """Build every source (models loaded, baselines fitted) before any image is scored.

    Args:
        specs: from :func:`parse_map_specs`. train: the train split's records (centre prior: always, as the
            information-gain baseline; mean map when asked for); None skips both (and IG).

    Returns:
        ``(sources, centre)``: ``centre(size)`` -> the (H, W) centre prior (None without ``train``).

    Raises:
        ValueError / FileNotFoundError: a model that cannot be loaded (as the loaders say), an LTPA source that
            is not an attention-gated AttnVGG; ``centre-prior``/``mean-map`` without a train split.
        rollout_fast.capture.UnsupportedModelError: a rollout source whose model is not a supported ViT.
    """
    need_base = any(s.kind in ("centre-prior", "mean-map") for s in specs)
    if train is None and need_base:
        raise ValueError("maps: centre-prior and mean-map are fitted to the train split, which is missing")
    base = _Baselines(train, any(s.kind == "mean-map" for s in specs), sigma, progress) if train else None
    sources = []
    for s in specs:
        if s.kind == "uniform":
            sources.append(MapSource(s, "constant map (chance)", lambda ims, recs: [torch.full(r.size, 1.0 / (
                r.size[0] * r.size[1])) for r in recs]))
        elif s.kind == "centre-prior":
            sources.append(MapSource(s, f"Gaussian fitted to the {len(train)} train images' fixations",
                                     lambda ims, recs: [base.centre(r.size) for r in recs]))
        elif s.kind == "mean-map":
            sources.append(MapSource(s, f"mean fixation density of the {len(train)} train images",
                                     lambda ims, recs: [base.mean_at(r.size) for r in recs]))
        elif s.kind in ("rollout", "grad-rollout"):
            sources.append(_rollout_source(s, device, head_fusion, discard_ratio))
        elif s.kind == "ltpa":
            sources.append(_ltpa_source(s, device))
        else:
            sources.append(_saliency_model_source(s, device))
    return sources, (base.centre if base else None)
