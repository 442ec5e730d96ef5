"""The cross-model scorers: another (smaller) ViT's attention rollout or gradient rollout of the same image picks
the tokens a larger ViT keeps: ``'model-rollout'`` and ``'model-grad-rollout'``; or a Learn to Pay Attention
CNN's own attention does: ``'ltpa'`` (:class:`LTPAScorer`).

``prune_tokens(vit_b, 0.5, "model-rollout", scorer_model=deit_tiny)`` scores every patch of each image by
DeiT-tiny's rollout (the seeds' strongest pruning result: DeiT-tiny's rollout pruning ViT-B) and keeps the
best half for ViT-B. The scorer model's forward (and, for ``'model-grad-rollout'``, its backward) runs inside
the pruned model's forward, so timings include it.

- Input: images are resized (bilinear, antialiased) to the scorer model's own input size when theirs differs,
  and re-normalised from the pruned model's mean/std to the scorer model's when both are known and differ
  (``renormalize``; the CLI passes both data configs).
- Grid: the scorer model's patch grid at its input size must equal the pruned model's at its own; otherwise
  :func:`~rollout_fast.prune.prune_tokens` raises ValueError before any forward pass (a map on another grid
  cannot rank this model's tokens one to one).

``'ltpa'``: an attention-gated :class:`~rollout_fast.ltpa.AttnVGG` (Jetley et al., "Learn to Pay Attention",
ICLR 2018) sees the image resized to its own input size (re-normalised likewise), and its attention levels,
combined on the pruned ViT's patch grid (:func:`~rollout_fast.ltpa.ltpa_saliency`), score the tokens. Any
grid works (the maps are resampled). With a full-size model (``cifar10-ltpa``, 32 px) it is an oracle-like
cross-architecture scorer; with a thumbnail model (``cifar10-ltpa-thumb``, 16 px: the student's input) it is
a teacher-free scorer, a classifier's own attention with no distillation from the ViT, to compare with the
distilled student at equal cost (``prune_eval``'s ``scorer_cost``).

Sources: attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020);
gradient rollout (Chefer et al., CVPR 2021, in jacobgil/vit-explain's form; REFERENCE.md section 2); Learn to
Pay Attention (Jetley, Lord, Lee & Torr, ICLR 2018).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..capture import default_input_size, describe_model, token_layout
from .scorers import PatchScorer, register_scorer

__all__ = ["LTPAScorer", "ModelRolloutScorer", "prepare_input", "resolve_scorer_model"]

METHODS = ("attention", "grad")


class ModelRolloutScorer(PatchScorer):
    """Scores = another ViT's rollout map of the image, flattened: float32 ``(B, G)``.

    Args:
        model: the scorer ViT (any model :class:`rollout_fast.AttentionRollout` takes: timm, Hugging Face,
            torchvision, open_clip), used in eval mode on its own device; not modified.
        method: 'attention' (attention rollout, ``head_fusion`` and ``discard_ratio``) or 'grad' (gradient
            rollout for the scorer model's predicted class, ``discard_ratio``; a forward and a backward pass).
        head_fusion, discard_ratio: as :class:`rollout_fast.AttentionRollout`.
        renormalize: None, or ``((mean, std), (model_mean, model_std))``: images arrive normalised with the
            first pair and the scorer model expects the second (3 values each).

    ``input_size``: the scorer model's (H, W); ``grid``: its patch grid there.

    Raises:
        ValueError: ``method`` not 'attention' / 'grad'; a bad ``head_fusion``, ``discard_ratio`` or
            ``renormalize``. UnsupportedModelError: ``model`` is not a supported ViT.
        At :meth:`check_model` (so at ``prune_tokens``): ValueError when the pruned model's grid differs.
    """

    def __init__(self, model: nn.Module, method: str = "attention", *, head_fusion: str = "mean",
                 discard_ratio: float = 0.9, renormalize=None):
        from ..explain import AttentionRollout

        if method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
        spec = describe_model(model)
        self.model = model
        self.method = method
        self.name = "model-rollout" if method == "attention" else "model-grad-rollout"
        self.input_size = default_input_size(model)
        self.grid = tuple(spec.layout(self.input_size).grid)
        self.explainer = AttentionRollout(model, head_fusion="mean" if method == "grad" else head_fusion,
                                          discard_ratio=discard_ratio)
        self.renormalize = _check_renormalize(renormalize)

    def check_model(self, model: nn.Module) -> None:
        grid = tuple(describe_model(model).layout(default_input_size(model)).grid)
        if grid != self.grid:
            raise ValueError(f"scorer model: its patch grid is {self.grid[0]}x{self.grid[1]} at its "
                             f"{self.input_size[0]}x{self.input_size[1]} input, the pruned model's is "
                             f"{grid[0]}x{grid[1]}; use a scorer model with the same patch grid")

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` as the scorer model takes them (:func:`prepare_input`)."""
        return prepare_input(images, self.model, self.input_size, self.renormalize)

    def module(self) -> nn.Module:
        return self.model

    def score(self, model, images):
        x = self.prepare(images)
        if self.method == "grad":
            with torch.inference_mode(False):  # a backward pass, also when called under inference mode
                maps = self.explainer.grad_rollout(x.clone())
        else:
            maps = self.explainer(x)
        return maps.flatten(1).to(images.device)


def prepare_input(images: torch.Tensor, model: nn.Module, input_size: tuple[int, int], renormalize=None
                  ) -> torch.Tensor:
    """``images`` (B, 3, H, W) float as ``model`` takes them: on its device and in its dtype, re-normalised
    (``renormalize``: None or ``((mean, std), (model_mean, model_std))`` as checked by the scorers), then
    resized to ``input_size`` (bilinear, antialiased, ``align_corners=False``) when (H, W) differs."""
    p = next(model.parameters(), None)
    x = images if p is None else images.to(device=p.device, dtype=p.dtype)
    if renormalize is not None:
        (m0, s0), (m1, s1) = (tuple(torch.tensor(v, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
                                    for v in pair) for pair in renormalize)
        x = (x * s0 + m0 - m1) / s1
    if tuple(x.shape[-2:]) != tuple(input_size):
        x = F.interpolate(x, size=tuple(input_size), mode="bilinear", antialias=True, align_corners=False)
    return x


class LTPAScorer(PatchScorer):
    """Scores = a Learn to Pay Attention model's attention on the pruned ViT's patch grid: float32 ``(B, G)``.

    ``score(model, images)``: ``images`` (B, 3, H, W) as the pruned ViT takes them are re-normalised and resized
    to the LTPA model's ``img_size`` (:func:`prepare_input`), one forward pass of the LTPA model (no gradients,
    eval mode) gives its three attention levels, and :func:`rollout_fast.ltpa.ltpa_saliency` combines them on
    the ViT's patch grid at (H, W) (each level resized to the grid and normalised to sum 1, averaged; the
    cell's share of the attention), flattened row-major like the patch tokens.

    Args:
        model: an attention-gated :class:`~rollout_fast.ltpa.AttnVGG` (e.g. ``load_teacher("cifar10-ltpa")``
            or ``"cifar10-ltpa-thumb"``), on its own device; not modified.
        renormalize: as :class:`ModelRolloutScorer`.

    ``input_size``: the LTPA model's (S, S).

    Raises:
        ValueError: ``model`` is not an attention-gated AttnVGG (the plain VGG baseline has no maps); a bad
            ``renormalize``. At :meth:`check_model`: UnsupportedModelError when the pruned model's patch grid
            cannot be read.
    """

    name = "ltpa"

    def __init__(self, model: nn.Module, *, renormalize=None):
        from ..ltpa import LTPAExplainer, check_attention_model

        self.model = check_attention_model(model, "scorer model")
        self.explainer = LTPAExplainer(model)
        self.input_size = (model.img_size, model.img_size)
        self.renormalize = _check_renormalize(renormalize)

    def check_model(self, model: nn.Module) -> None:
        token_layout(model, default_input_size(model))

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` as the LTPA model takes them (:func:`prepare_input`)."""
        return prepare_input(images, self.model, self.input_size, self.renormalize)

    def module(self) -> nn.Module:
        return self.model

    def score(self, model, images):
        grid = token_layout(model, tuple(images.shape[-2:])).grid
        maps = self.explainer.explain(self.prepare(images), grid=grid).maps
        return maps.flatten(1).to(images.device)


def _check_renormalize(renormalize):
    if renormalize is None:
        return None
    try:
        pairs = tuple(tuple(tuple(float(v) for v in t) for t in pair) for pair in renormalize)
        ok = len(pairs) == 2 and all(len(p) == 2 and all(len(t) == 3 for t in p) for p in pairs)
    except (TypeError, ValueError):
        ok = False
    if not ok or any(v <= 0 for p in pairs for v in p[1]):
        raise ValueError(f"renormalize: expected ((mean, std), (model_mean, model_std)), 3 values each, std > 0; "
                         f"got {renormalize!r}")
    return None if pairs[0] == pairs[1] else pairs


def resolve_scorer_model(scorer_model) -> tuple[nn.Module, dict | None]:
    """``(model, data_config or None)`` from a module, a ``(module, data_config)`` pair (what
    :func:`rollout_fast.zoo.load_teacher` returns) or a name / path for ``load_teacher`` (the embedded
    'cifar10-vit', a timm model name with random weights, a rollout_fast ``.safetensors`` with its card)."""
    if isinstance(scorer_model, nn.Module):
        return scorer_model, None
    if isinstance(scorer_model, tuple) and len(scorer_model) == 2 and isinstance(scorer_model[0], nn.Module):
        return scorer_model
    if isinstance(scorer_model, str):
        from ..zoo import load_teacher

        return load_teacher(scorer_model)
    raise ValueError(f"scorer_model: expected a ViT module, (module, data_config) or a name for load_teacher, "
                     f"got {type(scorer_model).__name__}")


def _model_and_renorm(scorer_model, image_norm: Sequence | None):
    """``(module, renormalize or None)`` of a scorer model (:func:`resolve_scorer_model`)."""
    net, config = resolve_scorer_model(scorer_model)
    renorm = None
    if image_norm is not None and config is not None and "mean" in config and "std" in config:
        renorm = (tuple(image_norm), (tuple(config["mean"]), tuple(config["std"])))
    return net, renorm


def _factory(name: str, method: str, scorer_model, image_norm: Sequence | None, **kw) -> ModelRolloutScorer:
    if scorer_model is None:
        raise ValueError(f"scorer: {name!r} needs scorer_model= (a ViT, or a name for rollout_fast.zoo.load_teacher: "
                         "'cifar10-vit', a timm name, a .safetensors path; --scorer-model on the command line)")
    net, renorm = _model_and_renorm(scorer_model, image_norm)
    return ModelRolloutScorer(net, method, renormalize=renorm, **kw)


@register_scorer("model-rollout")
def _model_rollout(*, scorer_model=None, image_norm=None, rollout_discard_ratio: float = 0.9,
                   head_fusion: str = "mean", **_) -> PatchScorer:
    return _factory("model-rollout", "attention", scorer_model, image_norm, head_fusion=head_fusion,
                    discard_ratio=rollout_discard_ratio)


@register_scorer("model-grad-rollout")
def _model_grad_rollout(*, scorer_model=None, image_norm=None, **_) -> PatchScorer:
    return _factory("model-grad-rollout", "grad", scorer_model, image_norm, discard_ratio=0.0)


@register_scorer("ltpa")
def _ltpa(*, scorer_model=None, image_norm=None, **_) -> PatchScorer:
    if scorer_model is None:
        raise ValueError("scorer: 'ltpa' needs scorer_model= (a Learn to Pay Attention AttnVGG, or a name for "
                         "rollout_fast.zoo.load_teacher: 'cifar10-ltpa', 'cifar10-ltpa-thumb' once installed, an "
                         "AttnVGG .safetensors path; --scorer-model on the command line)")
    net, renorm = _model_and_renorm(scorer_model, image_norm)
    return LTPAScorer(net, renormalize=renorm)
