"""The pruned model: :class:`TokenPruner` in timm's ``patch_drop`` slot (or, for Hugging Face, torchvision and
open_clip ViTs, on the input of the first block), :class:`PrunedViT`, :func:`prune_tokens`."""

from __future__ import annotations

import copy
import math
import threading

import torch
from torch import nn

from ..capture import UnsupportedModelError, default_input_size, describe_model, token_layout
from ..ops import GATHER_BACKENDS, topk_gather
from .keep import check_keep_ratio, keep_count
from .scorers import PatchScorer, StudentScorer, check_scores, make_scorer
from .stratify import stratified_scores

__all__ = ["PrunedViT", "TokenPruner", "prune_tokens"]


def _require_prunable(model: nn.Module) -> None:
    """Raise UnsupportedModelError unless dropping patch tokens before the blocks gives the model's own
    computation on the kept tokens: timm's VisionTransformer layout (``patch_drop`` a module) or another
    supported family (tokens dropped at the first block's input), and no position information applied
    inside the blocks by token index (rotary embeddings would rotate the kept tokens by the wrong positions;
    a relative-position bias would be (N, N) for N tokens no longer there)."""
    spec = describe_model(model) if isinstance(model, nn.Module) else None
    if spec is not None and spec.family != "timm":
        if spec.prune_refusal is not None:
            raise UnsupportedModelError(f"model: {spec.prune_refusal}, so prune_tokens cannot prune it correctly")
        return
    blocks = getattr(model, "blocks", None) if isinstance(model, nn.Module) else None
    if isinstance(blocks, nn.Module):
        _refuse_positional(model, blocks)
    need = ("patch_embed", "_pos_embed", "patch_drop", "blocks", "num_prefix_tokens")
    missing = [a for a in need if not hasattr(model, a)]
    if not isinstance(model, nn.Module) or missing:
        raise UnsupportedModelError(
            f"model: expected a timm VisionTransformer-family model with {need}, got {type(model).__name__}"
            + (f" missing {missing}" if isinstance(model, nn.Module) else ""))
    if not isinstance(model.patch_drop, nn.Module):
        raise UnsupportedModelError(f"model: {type(model).__name__}.patch_drop is {model.patch_drop!r}, not timm's PatchDropout "
                                    "slot (a module called on the tokens) that prune_tokens replaces")


def _refuse_positional(model: nn.Module, blocks) -> None:
    name = type(model).__name__
    if getattr(model, "rope", None) is not None or any(getattr(b.attn, "rope", None) is not None
                                                       for b in blocks if hasattr(b, "attn")):
        raise UnsupportedModelError(f"model: {name} applies rotary position embeddings (RoPE) inside its blocks; "
                                    "pruned tokens would not keep their own rotary positions, so prune_tokens "
                                    "cannot prune it correctly")
    bias = ("rel_pos", "relative_position_bias_table", "rel_pos_bias", "shared_rel_pos")
    if any(getattr(m, a, None) is not None for m in (model, *(getattr(b, "attn", b) for b in blocks))
           for a in bias):
        raise UnsupportedModelError(f"model: {name} adds a relative-position bias to its attention; the bias is "
                                    "not gathered for kept tokens, so prune_tokens cannot prune it correctly")


class TokenPruner(nn.Module):
    """Drop-in for timm's ``model.patch_drop``: ``(B, N, D)`` tokens -> ``(B, P + k, D)`` kept tokens.

    The scores come from :meth:`PrunedViT.forward` (``pending``, set for one forward) or, for a scorer with
    ``uses_tokens``, from the tokens themselves. ``k = keep_count(keep_ratio, G)``; at ``k == G`` the tokens
    pass through untouched (no scoring). ``stratify``: stratified top-k on the patch grid ``grid`` (set by
    :meth:`PrunedViT.forward` for each call; :func:`~rollout_fast.prune.stratify.stratified_scores`) instead of
    plain top-k. ``last_indices``: int64 ``(B, k)`` kept patch indices of the last forward (None when nothing
    was dropped).
    """

    def __init__(self, keep_ratio: float, num_prefix_tokens: int, scorer: PatchScorer | None = None,
                 backend: str = "auto", stratify: bool = False):
        super().__init__()
        self.keep_ratio = check_keep_ratio(keep_ratio)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.backend = backend
        self.stratify = bool(stratify)
        self.grid: tuple[int, int] | None = None
        object.__setattr__(self, "_scorer", scorer)  # not a submodule: it may hold the model itself
        object.__setattr__(self, "_owner", None)     # the pruned model copy (set by prune_tokens)
        self.pending: torch.Tensor | None = None
        self.last_indices: torch.Tensor | None = None
        self.score_always = False  # score also when nothing is dropped (an in-network method reads .pending)

    def extra_repr(self) -> str:
        return (f"keep_ratio={self.keep_ratio}, num_prefix_tokens={self.num_prefix_tokens}, backend={self.backend!r}"
                + (", stratify=True" if self.stratify else ""))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        P = self.num_prefix_tokens
        G = x.shape[1] - P
        k = keep_count(self.keep_ratio, G)
        if k >= G:
            self.last_indices = None
            if self.score_always and self.pending is None and self._scorer is not None and self._scorer.uses_tokens:
                self.pending = self._scorer.score_tokens(self._owner, x)
            return x
        scores = self.pending
        if scores is None:
            if self._scorer is None or not self._scorer.uses_tokens or self._owner is None:
                raise RuntimeError("TokenPruner: no scores for this forward; call the PrunedViT, not its .vit")
            scores = self._scorer.score_tokens(self._owner, x)
            if self.score_always:
                self.pending = scores
        if tuple(scores.shape) != (x.shape[0], G):
            raise ValueError(f"scorer: scores of shape {tuple(scores.shape)} for {x.shape[0]} images of "
                             f"{G} patch tokens")
        if self.stratify:
            if self.grid is None or self.grid[0] * self.grid[1] != G:
                raise RuntimeError(f"TokenPruner: stratify needs the patch grid of these {G} patch tokens; call the "
                                   "PrunedViT, not its .vit")
            scores = stratified_scores(scores, self.grid, k)
        kept, idx = topk_gather(x, scores.to(x.device), k, P, backend=self.backend)
        self.last_indices = idx
        return kept


def _shallow_copy(model: nn.Module, pruner: TokenPruner) -> nn.Module:
    """``model`` with its own module/parameter/buffer/hook dicts and ``patch_drop = pruner``; every
    parameter, buffer and other submodule is shared. ``model`` itself is not touched."""
    clone = copy.copy(model)
    for attr in ("_modules", "_parameters", "_buffers", "_forward_hooks", "_forward_pre_hooks",
                 "_backward_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks"):
        if isinstance(getattr(model, attr, None), dict):
            object.__setattr__(clone, attr, type(getattr(model, attr))(getattr(model, attr)))
    clone._modules["patch_drop"] = pruner
    return clone


class PrunedViT(nn.Module):
    """A ViT that runs on the prefix tokens + the top ``k`` patch tokens; see :func:`prune_tokens`.

    ``forward(images)`` -> the model's output (logits ``(B, num_classes)``) on the pruned sequence.
    ``forward(images, scores=S)`` uses given ``(B, G)`` / ``(B, gh, gw)`` scores instead of the scorer
    (evaluation: one scorer pass shared by several keep ratios). ``.vit`` is the model copy (timm) or the
    model itself (other families: the pruner acts through a forward pre-hook on the first block, registered
    for the call only and acting on the calling thread only), ``.pruner`` its :class:`TokenPruner`,
    ``.last_indices`` the kept patch indices of the last call.
    """

    def __init__(self, model: nn.Module, keep_ratio: float, scorer: PatchScorer, backend: str = "auto",
                 stratify: bool = False):
        super().__init__()
        spec = describe_model(model)
        P = spec.layout(default_input_size(model)).num_prefix_tokens
        pruner = TokenPruner(keep_ratio, P, scorer, backend, stratify)
        if spec.family == "timm":
            self.vit = _shallow_copy(model, pruner)
            object.__setattr__(self, "_first_block", None)
        else:
            self.vit = model
            self._pruner = pruner
            object.__setattr__(self, "_first_block", spec.prune_input)
        object.__setattr__(pruner, "_owner", self.vit)
        object.__setattr__(self, "scorer", scorer)
        object.__setattr__(self, "original", model)
        if isinstance(getattr(scorer, "student", None), nn.Module):
            self.student = scorer.student  # moves with .to(device)

    @property
    def pruner(self) -> TokenPruner:
        return self.vit.patch_drop if self._first_block is None else self._pruner

    @property
    def keep_ratio(self) -> float:
        return self.pruner.keep_ratio

    @property
    def last_indices(self) -> torch.Tensor | None:
        return self.pruner.last_indices

    def extra_repr(self) -> str:
        return f"keep_ratio={self.keep_ratio}, scorer={getattr(self.scorer, 'name', type(self.scorer).__name__)!r}"

    def tokens_kept(self, image_size: tuple[int, int]) -> int:
        """Patch tokens kept for images of ``image_size`` = (H, W)."""
        return keep_count(self.keep_ratio, math.prod(token_layout(self.original, image_size).grid))

    def forward(self, images: torch.Tensor, scores: torch.Tensor | None = None):
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError("images: expected a (B, C, H, W) tensor")
        layout = token_layout(self.original, tuple(images.shape[-2:]))
        G = layout.grid[0] * layout.grid[1]
        pruner = self.pruner
        if scores is not None:
            scores = check_scores(scores, images.shape[0], layout.grid, "scores")
        elif (keep_count(self.keep_ratio, G) < G or pruner.score_always) and not self.scorer.uses_tokens:
            who = f"scorer {getattr(self.scorer, 'name', '')!r}".replace(" ''", "")
            scores = check_scores(self.scorer.score(self.original, images), images.shape[0], layout.grid, who)
        pruner.pending, pruner.grid = scores, layout.grid
        try:
            return self.vit(images) if self._first_block is None else self._hooked_forward(images)
        finally:
            pruner.pending, pruner.grid = None, None

    def _hooked_forward(self, images: torch.Tensor):
        """The model's forward with the pruner applied to the first block's input tokens (B, N, D)."""
        thread = threading.get_ident()

        def prune_input(module, args, kwargs):
            if threading.get_ident() != thread:
                return None
            if args:
                return (self._pruner(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": self._pruner(kwargs["hidden_states"])}

        handle = self._first_block.register_forward_pre_hook(prune_input, with_kwargs=True)
        try:
            return self.vit(images)
        finally:
            handle.remove()


def prune_tokens(model: nn.Module, keep_ratio: float, scorer="cls-attention", *, backend: str = "auto",
                 stratify: bool = False, **scorer_kwargs) -> PrunedViT:
    """A version of ``model`` that keeps only the prefix tokens and the top ``round(keep_ratio * G)`` patches.

    Args:
        model: a timm VisionTransformer-family model (vit_*, deit_* incl. distilled, register tokens, q/k norm,
            LayerScale, non-square or dynamic image size): not modified, the result is a shallow copy sharing
            its parameters and submodules, with its own ``patch_drop``. Or a Hugging Face ViT / DeiT / Dinov2
            / CLIP or SigLIP vision model, a torchvision ``VisionTransformer``, an open_clip image tower: the
            tokens are dropped at the first block's input by a hook that exists only during the call.
        keep_ratio: fraction of patch tokens kept, in (0, 1]; ``k = max(1, floor(keep_ratio * G + 0.5))``.
        scorer: a registered name ('random' | 'rollout' | 'grad-rollout' | 'cls-attention' | 'student' |
            'model-rollout' | 'model-grad-rollout', see :func:`~rollout_fast.prune.register_scorer`), a
            :class:`PatchScorer`, or a callable
            ``images (B, 3, H, W) -> (B, G) or (B, gh, gw)`` float scores (larger = keep).
        backend: :func:`rollout_fast.topk_gather` backend ('auto' picks the compiled/Triton kernel).
        stratify: keep the best patches of every window of the patch grid first (stratified top-k,
            :mod:`rollout_fast.prune.stratify`), so the kept tokens cover the image; default plain top-k.
        **scorer_kwargs: passed to :func:`make_scorer` (``seed``, ``student``, ``thumbnail``, ``block``,
            ``rollout_discard_ratio``, ``head_fusion``, ``scorer_model``, ``image_norm``).

    Returns:
        :class:`PrunedViT`; ``pruned(images)`` returns the model's output for ``images`` (B, 3, H, W).
        ``keep_ratio=1.0`` returns exactly the unpruned model's output (the scorer is not run).

    Raises:
        ValueError: ``keep_ratio`` outside (0, 1]; an unknown scorer or backend; a student or a scorer model
            ('model-rollout') whose grid differs from the model's patch grid; at call time, a scorer returning the
            wrong shape or non-finite scores.
        UnsupportedModelError (TypeError), here and never at the first forward: ``model`` is not a supported
            ViT (a timm one needs a ``patch_drop`` module), or applies RoPE (EVA, vit_*_rope*) or a relative-position bias
            (vit_relpos_*, BEiT, Hugging Face BEiT) inside its blocks, which pruning by token index would get wrong; a scorer that
            cannot score this model (``cls-attention`` without a class token, or on a non-timm model).
    """
    check_keep_ratio(keep_ratio)
    _require_prunable(model)
    if backend not in GATHER_BACKENDS:
        raise ValueError(f"backend: expected one of {GATHER_BACKENDS}, got {backend!r}")
    sc = make_scorer(scorer, **scorer_kwargs)
    sc.check_model(model)
    if isinstance(sc, StudentScorer):
        sg = sc.student_grid()
        mg = describe_model(model).layout(default_input_size(model)).grid
        if sg is not None and sg != mg:
            raise ValueError(f"student: predicts a {sg[0]}x{sg[1]} grid but the model's patch grid is "
                             f"{mg[0]}x{mg[1]}; use a student trained for this model")
    return PrunedViT(model, keep_ratio, sc, backend, stratify)
