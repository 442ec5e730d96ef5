"""In-network token reduction for timm ViTs: :func:`reduce_tokens`, :class:`ReducedViT` and the method registry.

``reduced = reduce_tokens(model, "tome", r=8)`` (or ``"evit", keep_ratio=0.7``) returns a shallow copy of
``model`` (parameters and blocks shared, the original untouched, like :func:`~rollout_fast.prune.prune_tokens`)
whose ``blocks`` container is a :class:`ReducingBlocks`: an ``nn.Sequential`` holding the same block modules
(same state-dict keys) whose forward runs each block unchanged and, between blocks, lets the method reduce
the tokens. During a block, a small ``TorchFunctionMode`` sees the block's ``F.scaled_dot_product_attention``
call (q and k after q/k norm, the mask and scale: :func:`rollout_fast.capture.hooks.sdpa_call`) so the method
can read the keys / class-token attention and add an additive ``attn_mask`` (ToMe's proportional attention);
SDPA itself still computes the attention. A block a method does not touch runs without the interception,
so a no-reduction setting (``r=0``, ``keep_ratio=1.0``) runs exactly the unpruned model.

The one deviation from the papers, shared by every method here: reduction happens at a block's output
(after its MLP), not between its attention and its MLP, because timm's ``Block.forward`` keeps the
residual in a local variable and is not copied here.

A new method is one :func:`register_method` entry: a :class:`TokenReducer` subclass implementing
``bind`` (check the settings against the model, raise at build time), ``plan`` (tokens entering each block),
``uses_sdpa`` / ``sdpa`` (what to read from, or add to, a block's SDPA call) and ``after`` (reduce the tokens
at the block's output), and optionally ``operating_points`` (the settings ``rollout-fast prune-eval --methods``
evaluates when none are given). A method that ranks tokens by a pre-block scorer's scores sets ``uses_scores``
(it then runs only after a scorer, which computes the scores and drops nothing itself: ``state['scores']``,
(B, N - P), aligned with the non-prefix tokens entering the first block) and may reduce the tokens before the
first block too (``before``). It is then usable alone (``prune-eval --methods NAME:KEY=...``) and after a
pre-block scorer (:func:`prune_and_reduce`, ``--methods SCORER+NAME``) with no other change.

Supported models: timm ``VisionTransformer`` and subclasses (vit_*, deit_* incl. distilled, register tokens,
LayerScale, q/k norm, parallel blocks) with SDPA on (``fused_attn``).
"""

from __future__ import annotations

import copy
import inspect
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..capture import UnsupportedModelError, token_layout
from ..capture.hooks import SDPACall, sdpa_call
from .keep import keep_count
from .model import PrunedViT, prune_tokens

__all__ = ["METHODS", "ReducedViT", "ReducingBlocks", "TokenReducer", "add_attn_mask", "method_names",
           "method_settings", "prune_and_reduce", "reduce_tokens", "register_method"]

METHODS: dict[str, type] = {}
_SDPA = F.scaled_dot_product_attention


def register_method(name: str):
    """Class decorator: register a :class:`TokenReducer` subclass under ``name`` for :func:`reduce_tokens`."""
    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, TokenReducer)):
            raise TypeError(f"register_method({name!r}): expected a TokenReducer subclass, got {cls!r}")
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"method: {name!r} is already registered ({METHODS[name].__name__})")
        cls.name = name
        METHODS[name] = cls
        return cls
    return deco


def method_names() -> tuple[str, ...]:
    """The registered in-network method names, in registration order."""
    return tuple(METHODS)


def method_settings(name: str) -> tuple[str, ...]:
    """The setting names of registered method ``name`` (its ``__init__`` arguments), e.g. ('r', 'prop_attn')."""
    return tuple(p for p in inspect.signature(METHODS[name].__init__).parameters if p != "self")


class TokenReducer:
    """One in-network method with its settings. Subclasses override the hooks below; ``state`` is a dict
    private to one forward pass (sizes, keys, class-token attention)."""

    name = ""
    num_prefix_tokens = 0
    # settings -> values that prune-eval --methods evaluates by default (one operating point per value)
    operating_points: ClassVar[dict[str, tuple]] = {}
    # True: ranks tokens by a pre-block scorer's scores (state['scores']); only usable after a scorer
    uses_scores: ClassVar[bool] = False

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def bind(self, model: nn.Module, layout) -> None:
        """Check the settings against ``model`` and its default :class:`~rollout_fast.capture.TokenLayout`;
        raise ValueError / UnsupportedModelError naming the setting."""
        self.num_prefix_tokens = layout.num_prefix_tokens

    def plan(self, num_tokens: int) -> list[int]:
        """Tokens entering each block, then leaving the last, for ``num_tokens`` input tokens; raises
        ValueError when the settings cannot apply to that many tokens."""
        raise NotImplementedError

    def before(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        """The tokens ``x`` (B, N, D) entering the first block, reduced (default: unchanged)."""
        return x

    def uses_sdpa(self, block: int, state: dict) -> bool:
        """Whether block ``block``'s SDPA call must be intercepted."""
        return False

    def attn_mask(self, block: int, state: dict) -> torch.Tensor | None:
        """An additive float mask (B, 1, 1, N) for block ``block``'s attention that needs nothing from its SDPA
        call (ToMe's proportional attention), or None. Passed as the block's own ``attn_mask`` argument where
        its forward takes one (timm's ``Block``), so the block runs without the SDPA interception (whose
        per-op Python dispatch dominates at batch 1); otherwise the block is intercepted and :meth:`sdpa`
        must return the same mask."""
        return None

    def sdpa(self, block: int, q, k, v, mask, scale: float, state: dict) -> torch.Tensor | None:
        """See the block's SDPA call; return an additive float mask broadcastable to (B, H, N, N), or None.
        ``state['num_tokens']``: the tokens entering the first block in this forward."""
        return None

    def after(self, block: int, x: torch.Tensor, state: dict) -> torch.Tensor:
        """The tokens ``x`` (B, N, D) leaving block ``block``, reduced."""
        return x

    def observed_tokens(self) -> list[float] | None:
        """Mean tokens entering each block over the images run since :meth:`reset_observed`, for a method whose
        count depends on the image (ATS); None for one whose count :meth:`plan` gives."""
        return None

    def reset_observed(self) -> None:
        """Forget the counts :meth:`observed_tokens` averages (a no-op for fixed-count methods)."""

    def observed_state(self) -> dict | None:
        """The running counts behind :meth:`observed_tokens`, JSON-able, for a resumed evaluation (None for
        fixed-count methods)."""
        return None

    def load_observed(self, state: dict | None) -> None:
        """Restore counts :meth:`observed_state` returned (a no-op for fixed-count methods)."""

    def take(self, state: dict, key: str, block: int):
        if key not in state:
            raise UnsupportedModelError(f"model.blocks[{block}]: its attention did not call "
                                        f"F.scaled_dot_product_attention; {self.name} needs SDPA")
        return state.pop(key)


def add_attn_mask(mask: torch.Tensor | None, extra: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """An SDPA ``attn_mask`` plus an additive float mask ``extra``: a bool ``mask`` (True = attend) becomes
    0 / -inf in ``dtype`` first; either may be None (the other is returned)."""
    if extra is None or mask is None:
        return mask if extra is None else extra
    if mask.dtype == torch.bool:
        mask = torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, -torch.inf)
    return mask + extra


class _SDPATap(TorchFunctionMode):
    """Answers the block's SDPA call: lets ``reducer.sdpa`` read it and add an additive mask, then runs SDPA."""

    def __init__(self, reducer: TokenReducer, block: int, state: dict):
        super().__init__()
        self.reducer, self.block, self.state = reducer, block, state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is not _SDPA:
            return func(*args, **kwargs)
        call = sdpa_call(args, kwargs)
        if not isinstance(call, SDPACall):
            raise UnsupportedModelError(f"model.blocks[{self.block}]: {call}; {self.reducer.name} cannot run here")
        q, k, v, mask, scale = call
        extra = self.reducer.sdpa(self.block, q, k, v, mask, scale, self.state)
        if extra is None:
            return func(*args, **kwargs)
        mask = add_attn_mask(mask, extra, q.dtype)
        args = list(args)
        if len(args) > 3:
            args[3] = mask
        else:
            kwargs["attn_mask"] = mask
        return func(*args, **kwargs)


def _takes_attn_mask(block: nn.Module) -> bool:
    """Whether ``block.forward`` takes an ``attn_mask`` argument (timm >= 1.0's ``Block``), cached per class."""
    cls = type(block)
    if cls not in _TAKES_MASK:
        try:
            _TAKES_MASK[cls] = "attn_mask" in inspect.signature(cls.forward).parameters
        except (TypeError, ValueError):
            _TAKES_MASK[cls] = False
    return _TAKES_MASK[cls]


_TAKES_MASK: dict[type, bool] = {}


class ReducingBlocks(nn.Sequential):
    """The model's blocks (same modules, same keys) with ``reducer`` acting between them."""

    def __init__(self, blocks, reducer: TokenReducer, score_source=None):
        super().__init__(*blocks)
        object.__setattr__(self, "reducer", reducer)  # not a submodule
        object.__setattr__(self, "score_source", score_source)  # () -> (B, N - P) scores, for uses_scores

    def __getitem__(self, idx):
        """A block, or (a slice) a plain ``nn.Sequential`` of the blocks: no reduction (a scorer running
        the first blocks on the full sequence, e.g. 'cls-attention', slices them)."""
        if isinstance(idx, slice):
            return nn.Sequential(*list(self._modules.values())[idx])
        return super().__getitem__(idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        red = self.reducer
        red.plan(x.shape[1])  # a dynamic-size input the settings cannot apply to fails here, with the reason
        state: dict = {"num_tokens": x.shape[1]}
        if red.uses_scores and red.plan(x.shape[1]) != [x.shape[1]] * (len(self) + 1):
            scores = self.score_source() if self.score_source is not None else None
            if scores is None:
                raise RuntimeError(f"{red.name}: no scores for this forward; it runs after a scorer "
                                   "(prune_and_reduce), called through the pruned model")
            state["scores"] = scores
        x = red.before(x, state)
        for i, blk in enumerate(self):
            mask = red.attn_mask(i, state)
            if red.uses_sdpa(i, state) or (mask is not None and not _takes_attn_mask(blk)):
                with _SDPATap(red, i, state):
                    x = blk(x)
            elif mask is not None:
                x = blk(x, attn_mask=mask.to(x.dtype))
            else:
                x = blk(x)
            x = red.after(i, x, state)
        return x


def _require_reducible(model: nn.Module) -> None:
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(
            f"model: in-network token reduction needs a timm VisionTransformer (vit_*, deit_*), got "
            f"{type(model).__name__}; families whose blocks take per-token positions (EVA/RoPE, BEiT, relpos) "
            "cannot drop or merge tokens inside the network")
    if not isinstance(model.blocks, nn.Sequential) or len(model.blocks) == 0:
        raise UnsupportedModelError("model.blocks: expected a non-empty nn.Sequential of transformer blocks")
    for i, blk in enumerate(model.blocks):
        attn = getattr(blk, "attn", blk)
        if not getattr(attn, "fused_attn", getattr(blk, "fused_attn", False)):
            raise UnsupportedModelError(
                f"model.blocks[{i}]: fused_attn is False; in-network reduction reads keys and adds its bias at "
                "F.scaled_dot_product_attention (build the model with SDPA on, timm's default)")


def _shallow_copy(model: nn.Module, blocks: nn.Module) -> nn.Module:
    clone = copy.copy(model)
    for attr in ("_modules", "_parameters", "_buffers", "_forward_hooks", "_forward_pre_hooks",
                 "_backward_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks"):
        if isinstance(getattr(model, attr, None), dict):
            object.__setattr__(clone, attr, type(getattr(model, attr))(getattr(model, attr)))
    clone._modules["blocks"] = blocks
    return clone


class ReducedViT(nn.Module):
    """A timm ViT whose tokens are reduced inside the network; see :func:`reduce_tokens`.

    ``forward(images)`` -> the model's output (logits). ``.vit``: the model copy; ``.method``: its
    :class:`TokenReducer`; ``.original``: the model given.
    """

    def __init__(self, model: nn.Module, reducer: TokenReducer):
        super().__init__()
        self.vit = _shallow_copy(model, ReducingBlocks(model.blocks, reducer))
        object.__setattr__(self, "method", reducer)
        object.__setattr__(self, "original", model)

    def extra_repr(self) -> str:
        return f"method={self.method!r}"

    def tokens_per_block(self, image_size: tuple[int, int]) -> list[int]:
        """Tokens entering each block, then the number leaving the last, for images of ``image_size`` (H, W)."""
        return self.method.plan(token_layout(self.original, image_size).num_tokens)

    def forward(self, images: torch.Tensor):
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError("images: expected a (B, C, H, W) tensor")
        return self.vit(images)


def _make_reducer(method, settings: dict) -> TokenReducer:
    if isinstance(method, TokenReducer):
        if settings:
            raise ValueError(f"settings: {sorted(settings)} given with a TokenReducer instance; set them on it")
        return method
    if method not in METHODS:
        raise ValueError(f"method: expected one of {method_names()} or a TokenReducer, got {method!r}")
    known = list(method_settings(method))
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ValueError(f"{method}: unknown setting(s) {unknown}; expected {known}")
    return METHODS[method](**settings)


def reduce_tokens(model: nn.Module, method="tome", **settings) -> ReducedViT:
    """A version of ``model`` that reduces its tokens inside the network with a registered method.

    Args:
        model: a timm VisionTransformer (see the module docstring). Not modified: the result is a shallow copy
            sharing its parameters and blocks, with its own ``blocks`` container.
        method: 'tome' (``r``, ``prop_attn``; :class:`~rollout_fast.prune.merge.ToMe`) | 'evit'
            (``keep_ratio``, ``blocks``, ``fuse``; :class:`~rollout_fast.prune.evit.EViT`) | 'ats' (``keep_ratio``,
            ``blocks``; :class:`~rollout_fast.prune.ats.ATS`), another :func:`register_method` name, or a
            :class:`TokenReducer` instance.
        **settings: the method's settings.

    Returns:
        :class:`ReducedViT`; ``reduced(images)`` -> the model's output. At a no-reduction setting (ToMe
        ``r=0``, EViT ``keep_ratio=1.0``, ATS ``blocks=[]``) the output equals the unpruned model's exactly.

    Raises:
        ValueError: unknown method or setting; settings the model's token count cannot take (ToMe: ``r`` above
            half the unprotected tokens at some block; EViT, ATS: ``keep_ratio`` outside (0, 1], ``blocks`` out of
            range), checked here for the model's default image size and at forward for other sizes.
        UnsupportedModelError (TypeError): not a timm VisionTransformer with SDPA on; EViT or ATS on a model
            without a class token; ATS on a model pooling over the tokens.
    """
    reducer = _make_reducer(method, settings)
    if reducer.uses_scores:
        raise ValueError(f"method: {reducer.name!r} ranks tokens by a scorer's scores; use it after one: "
                         f"prune_and_reduce(model, 1.0, 'student', {reducer.name!r}, ...) or --methods "
                         f"student+{reducer.name}")
    _require_reducible(model)
    img = getattr(model.patch_embed, "img_size", None)
    reducer.bind(model, token_layout(model, tuple(img) if img is not None else (224, 224)))
    return ReducedViT(model, reducer)


def prune_and_reduce(model: nn.Module, keep_ratio: float, scorer="student", method="tome",
                     settings: dict | None = None, *, scorer_options: dict | None = None,
                     backend: str = "auto", stratify: bool = False) -> PrunedViT:
    """Pre-select patch tokens with a scorer, then reduce the kept tokens inside the network.

    ``prune_and_reduce(model, 0.75, "student", "tome", {"r": 4}, scorer_options={"student": s})``: the model keeps
    the prefix tokens and the ``keep_count(keep_ratio, G)`` best-scored patches before the blocks (exactly
    :func:`~rollout_fast.prune.prune_tokens`; the scorer sees the full image and the unmodified model), and
    ``method`` then reduces those tokens between the blocks (exactly :func:`reduce_tokens`). Our combination
    of the student pre-selection with ToMe (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023),
    or with any other registered method.

    Args:
        model: a timm VisionTransformer that both :func:`~rollout_fast.prune.prune_tokens` and
            :func:`reduce_tokens` accept. Not modified (a shallow copy, parameters and blocks shared).
        keep_ratio: fraction of patch tokens kept before the blocks, in (0, 1].
        scorer: a scorer name, :class:`~rollout_fast.prune.PatchScorer` or callable (see ``prune_tokens``).
        method: a :func:`register_method` name or a :class:`TokenReducer`.
        settings: the method's settings (``{"r": 4}``; EViT's own ``{"keep_ratio": 0.7}``), None for its defaults.
            A method ranking tokens by the scorer's scores (``uses_scores``, e.g. 'smerge') gets them (of the
            kept tokens, in their order) in ``state['scores']``; give it ``keep_ratio=1.0`` here and its own
            ``{"keep_ratio": ...}`` (the scores are computed although nothing is dropped before it).
        scorer_options: keywords of :func:`~rollout_fast.prune.make_scorer` (``student``, ``seed``, ...).
        backend: the top-k gather backend. stratify: stratified top-k pre-selection (see ``prune_tokens``).

    Returns:
        :class:`~rollout_fast.prune.PrunedViT` whose ``vit.blocks`` is a :class:`ReducingBlocks` (its
        ``reducer``: the method). ``pruned(images)`` / ``pruned(images, scores=S)`` -> logits (B, classes);
        at ``keep_ratio=1.0`` it equals :func:`reduce_tokens`' model, and with a no-reduction setting too
        (``r=0``) the unpruned model, exactly.

    Raises:
        ValueError: anything ``prune_tokens`` or ``reduce_tokens`` refuses, and settings that do not fit the
            tokens left after pre-selection (ToMe: ``r`` above half the unprotected tokens at some block).
        UnsupportedModelError (TypeError): a model either function refuses.
    """
    reducer = _make_reducer(method, dict(settings or {}))
    _require_reducible(model)
    pruned = prune_tokens(model, keep_ratio, scorer, backend=backend, stratify=stratify, **(scorer_options or {}))
    img = getattr(model.patch_embed, "img_size", None)
    layout = token_layout(model, tuple(img) if img is not None else (224, 224))
    reducer.bind(model, layout)
    G = layout.grid[0] * layout.grid[1]
    kept = keep_count(keep_ratio, G)
    try:
        reducer.plan(layout.num_prefix_tokens + kept)
    except ValueError as e:
        raise ValueError(f"{e} (after pre-selection keeps {kept} of {G} patch tokens)") from None
    source = None
    if reducer.uses_scores:
        pruner = pruned.pruner
        # the scores are computed (and kept in .pending) also when nothing is dropped before the blocks, unless
        # the method reduces nothing either (its no-reduction setting: the unpruned model, nothing scored)
        n = layout.num_prefix_tokens + kept
        pruner.score_always = reducer.plan(n) != [n] * (len(model.blocks) + 1)

        def source():
            s, idx = pruner.pending, pruner.last_indices
            return s if s is None or idx is None else s.gather(1, idx.to(s.device))
    pruned.vit._modules["blocks"] = ReducingBlocks(model.blocks, reducer, source)  # pruned.vit owns its _modules
    return pruned
