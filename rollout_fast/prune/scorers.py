"""Patch scorers: ``score(model, images) -> (B, G)`` float scores (larger = keep), and their registry.

A scorer name maps to a factory through :func:`register_scorer`; :func:`make_scorer` builds a scorer from a
name, a :class:`PatchScorer` or a callable. A new scorer is one decorated factory::

    @register_scorer("entropy")
    def _entropy(**options) -> PatchScorer:       # options: seed, student, thumbnail, block,
        return EntropyScorer()                     # rollout_discard_ratio, head_fusion, scorer_model, image_norm

Registered: 'random', 'rollout', 'grad-rollout', 'cls-attention', 'student' (see :mod:`rollout_fast.prune`),
and, from :mod:`rollout_fast.prune.cross`, 'model-rollout' and 'model-grad-rollout' (another ViT's rollout) and
'ltpa' (a Learn to Pay Attention model's attention).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..capture import UnsupportedModelError, token_layout

__all__ = [
    "SCORERS",
    "ClsAttentionScorer",
    "GradRolloutScorer",
    "PatchScorer",
    "RandomScorer",
    "RolloutScorer",
    "StudentScorer",
    "check_scores",
    "make_scorer",
    "register_scorer",
    "scorer_names",
]

ScorerFactory = Callable[..., "PatchScorer"]
_FACTORIES: dict[str, ScorerFactory] = {}


def register_scorer(name: str) -> Callable[[ScorerFactory], ScorerFactory]:
    """Decorator: register ``factory(**options) -> PatchScorer`` under ``name`` for :func:`make_scorer`.

    The factory receives every option of :func:`make_scorer` as keywords (``seed``, ``student``,
    ``thumbnail``, ``block``, ``rollout_discard_ratio``, ``head_fusion``, ``scorer_model``, ``image_norm``)
    and uses those it needs.

    Raises:
        ValueError: ``name`` is already registered.
    """
    def decorate(factory: ScorerFactory) -> ScorerFactory:
        if name in _FACTORIES:
            raise ValueError(f"scorer {name!r} is already registered")
        _FACTORIES[name] = factory
        return factory
    return decorate


def scorer_names() -> tuple[str, ...]:
    """The registered scorer names, in registration order."""
    return tuple(_FACTORIES)


def check_scores(scores, batch: int, grid: tuple[int, int], who: str = "scorer") -> torch.Tensor:
    """``scores`` as a float ``(B, G)`` tensor (``(B, gh, gw)`` is flattened), finite.

    Raises:
        ValueError: not a floating tensor of shape (B, G) or (B, gh, gw) for this model's grid, or NaN/inf.
    """
    G = grid[0] * grid[1]
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise ValueError(f"{who}: must return a floating-point (B, G) = ({batch}, {G}) tensor, got "
                         f"{scores.dtype if isinstance(scores, torch.Tensor) else type(scores).__name__}")
    shape = tuple(scores.shape)
    if shape == (batch, *grid):
        scores = scores.reshape(batch, G)
    elif shape != (batch, G):
        raise ValueError(f"{who}: returned scores of shape {shape}; expected (B, G) = ({batch}, {G}) or "
                         f"(B, gh, gw) = ({batch}, {grid[0]}, {grid[1]}) for this model's patch grid")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"{who}: returned NaN or infinite scores")
    return scores


class PatchScorer:
    """Base of the scorers: ``score(model, images) -> (B, G)`` float scores (larger = keep).

    A scorer with ``uses_tokens = True`` instead implements ``score_tokens(model, tokens)`` on the embedded
    token sequence ``(B, N, D)`` (after the position embedding, prefix tokens first); :class:`TokenPruner`
    calls it inside the forward so the patch embedding runs once. ``score`` then embeds the images itself.
    ``name`` labels the scorer in tables.
    """

    name = "scorer"
    uses_tokens = False

    def score(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        if self.uses_tokens:
            with torch.no_grad():
                return self.score_tokens(model, model._pos_embed(model.patch_embed(images)))
        raise NotImplementedError

    def score_tokens(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reset(self) -> None:
        """Restart any random stream (a no-op for deterministic scorers)."""

    def get_state(self) -> list | None:
        """The random stream's state, JSON-able, for a resumed evaluation (None for deterministic scorers)."""
        return None

    def set_state(self, state: list | None) -> None:
        """Restore a state :meth:`get_state` returned (a no-op for deterministic scorers)."""

    def check_model(self, model: nn.Module) -> None:
        """Raise UnsupportedModelError when this scorer cannot score ``model`` (called by ``prune_tokens``)."""

    def module(self) -> nn.Module | None:
        """The network this scorer runs besides the pruned model (a student, a scorer model), whose parameters
        count as its cost (:func:`rollout_fast.prune.study.scorer_cost`); None when it has none."""
        return None


class RandomScorer(PatchScorer):
    """Uniform random scores from a CPU ``torch.Generator`` seeded with ``seed`` (reproducible batch order)."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.reset()

    def reset(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    def get_state(self) -> list:
        return self.generator.get_state().tolist()

    def set_state(self, state: list | None) -> None:
        if state is not None:
            self.generator.set_state(torch.tensor(state, dtype=torch.uint8))

    def score(self, model, images):
        G = math.prod(token_layout(model, tuple(images.shape[-2:])).grid)
        return torch.rand((images.shape[0], G), generator=self.generator).to(images.device)


@register_scorer("random")
def _random_scorer(*, seed: int = 0, **_) -> PatchScorer:
    return RandomScorer(seed)


class RolloutScorer(PatchScorer):
    """The model's own attention rollout (:class:`rollout_fast.AttentionRollout`) of the full image.

    An oracle: it needs a full forward pass before the pruned one, so it is an upper-bound reference for
    selection, never a speed-up. ``head_fusion``/``discard_ratio`` as in :class:`AttentionRollout`; discard
    0.9 by default (on the CIFAR-10 teacher, 1,000 test images, it selected better than discard 0: top-1
    0.785 vs 0.749 at keep 0.5, 0.593 vs 0.479 at keep 0.1).
    """

    name = "rollout"

    def __init__(self, head_fusion: str = "mean", discard_ratio: float = 0.9):
        self.head_fusion = head_fusion
        self.discard_ratio = discard_ratio
        self._model = self._explainer = None

    def explainer(self, model: nn.Module):
        """The :class:`rollout_fast.AttentionRollout` of ``model``, kept for the last model scored."""
        if self._model is not model:
            from ..explain import AttentionRollout

            self._explainer = AttentionRollout(model, head_fusion=self.head_fusion, discard_ratio=self.discard_ratio)
            self._model = model
        return self._explainer

    def score(self, model, images):
        return self.explainer(model)(images).flatten(1)


@register_scorer("rollout")
def _rollout_scorer(*, head_fusion: str = "mean", rollout_discard_ratio: float = 0.9, **_) -> PatchScorer:
    return RolloutScorer(head_fusion=head_fusion, discard_ratio=rollout_discard_ratio)


class GradRolloutScorer(RolloutScorer):
    """The model's own gradient rollout of the full image for its predicted class (:meth:`rollout_fast.
    AttentionRollout.grad_rollout`: ``F_l = relu(mean_h(A_l * dy/dA_l))``, Chefer et al., "Transformer
    Interpretability Beyond Attention Visualization", CVPR 2021, in vit-explain's form; REFERENCE.md
    section 2).

    An oracle like :class:`RolloutScorer`, costlier (a forward and a backward pass) and stronger: it keeps
    the tokens that carry the full model's decision (on the CIFAR-10 teacher, 2,000 test images: top-1
    0.8035 at keep 0.5 and 0.7755 at keep 0.1, full model 0.80, where the rollout oracle gives 0.785 and
    0.59). It is also a distillation target (``rollout-fast distill --target grad-rollout``).
    """

    name = "grad-rollout"

    def __init__(self, discard_ratio: float = 0.0):
        super().__init__(discard_ratio=discard_ratio)  # head fusion: the gradient-weighted mean, fixed

    def score(self, model, images):
        with torch.inference_mode(False):  # a backward pass, also when called under inference mode
            return self.explainer(model).grad_rollout(images.clone()).flatten(1)


@register_scorer("grad-rollout")
def _grad_rollout_scorer(**_) -> PatchScorer:
    return GradRolloutScorer()


class ClsAttentionScorer(PatchScorer):
    """Class-token attention in block ``block`` on the full token sequence, mean over heads (EViT-style).

    ``score_tokens``: ``x = norm_pre(tokens)``, blocks ``0 .. block-1`` run on ``x`` unchanged, then in block
    ``block``: ``y = norm1(x)``; ``q`` of the class token and ``k`` of every token from the rows of
    ``attn.qkv`` (timm's (3, H, head_dim) layout), ``attn.q_norm``/``k_norm``; scores = mean over heads of
    ``softmax(q k^T * scale)`` restricted to the patch columns: float32 ``(B, G)``. Only the q/k projections
    are computed (about a twelfth of a block at ``block=0``).

    Raises (from :meth:`check_model`, so at ``prune_tokens``, and again at call): UnsupportedModelError when
    the model has no class token or the block's attention is not timm's ``Attention`` layout (``qkv``, ``num_heads``, ``head_dim``, ``scale``, ``q_norm``, ``k_norm``).

    Source: EViT (Liang et al., ICLR 2022): the class token's attention as token attentiveness.
    """

    name = "cls-attention"
    uses_tokens = True

    def __init__(self, block: int = 0):
        if isinstance(block, bool) or not isinstance(block, int) or block < 0:
            raise ValueError(f"block: expected an int >= 0, got {block!r}")
        self.block = block

    def check_model(self, model):
        if getattr(model, "cls_token", None) is None:
            raise UnsupportedModelError("cls-attention: the model has no class token")
        if self.block >= len(model.blocks):
            raise ValueError(f"cls-attention: block {self.block} >= the model's {len(model.blocks)} blocks")
        attn = getattr(model.blocks[self.block], "attn", None)
        need = ("qkv", "num_heads", "scale", "q_norm", "k_norm")
        if attn is None or not all(hasattr(attn, a) for a in need) or not isinstance(attn.qkv, nn.Linear):
            raise UnsupportedModelError(f"cls-attention: model.blocks[{self.block}].attn is not timm's Attention "
                                        f"(needs {need})")

    def score_tokens(self, model, tokens):
        self.check_model(model)
        blk = model.blocks[self.block]
        attn = blk.attn
        P = int(model.num_prefix_tokens)
        with torch.no_grad():
            x = model.norm_pre(tokens)
            for b in model.blocks[:self.block]:
                x = b(x)
            y = blk.norm1(x)
            H = attn.num_heads
            hd = getattr(attn, "head_dim", attn.qkv.out_features // (3 * H))
            A = H * hd
            w, bias = attn.qkv.weight, attn.qkv.bias
            q = F.linear(y[:, :1], w[:A], None if bias is None else bias[:A])
            k = F.linear(y, w[A:2 * A], None if bias is None else bias[A:2 * A])
            B, N, _ = y.shape
            q = attn.q_norm(q.reshape(B, 1, H, hd).transpose(1, 2))   # (B, H, 1, hd)
            k = attn.k_norm(k.reshape(B, N, H, hd).transpose(1, 2))   # (B, H, N, hd)
            logits = torch.matmul(q.float(), k.float().transpose(-2, -1)) * float(attn.scale)
            probs = logits.softmax(dim=-1)[:, :, 0, P:]               # (B, H, G)
            return probs.mean(dim=1)


@register_scorer("cls-attention")
def _cls_attention_scorer(*, block: int = 0, **_) -> PatchScorer:
    return ClsAttentionScorer(block)


class StudentScorer(PatchScorer):
    """A trained student: ``student(images) -> (B, gh, gw)`` relevance maps (or ``(B, G)``), on a thumbnail.

    Args:
        student: any module/callable mapping ``(B, 3, h, w)`` images to maps; run under ``no_grad``.
        thumbnail: None (the student gets the model's input as is) or an int / (h, w): images are resized
            with antialiased bilinear interpolation first, the seeds' cheap low-resolution input. Not for a
            :class:`rollout_fast.students.RolloutStudent`, which takes the model's input and makes its own
            thumbnail (ValueError).

    A student exposing ``grid`` / ``grid_size`` is checked against the model's patch grid by
    :func:`prune_tokens`; otherwise its output shape is checked at each call.
    """

    name = "student"

    def __init__(self, student: Callable, thumbnail: int | tuple[int, int] | None = None):
        if not callable(student):
            raise TypeError(f"student: expected a module or callable, got {type(student).__name__}")
        self.student = student
        if thumbnail is not None and hasattr(student, "thumbnail_size"):
            raise ValueError(f"thumbnail: this student makes its own {tuple(student.thumbnail_size)} thumbnail from "
                             "the model's input; leave thumbnail unset (--student-thumbnail is for other students)")
        if isinstance(thumbnail, int):
            thumbnail = (thumbnail, thumbnail)
        self.thumbnail = None if thumbnail is None else tuple(int(s) for s in thumbnail)

    def module(self) -> nn.Module | None:
        return self.student if isinstance(self.student, nn.Module) else None

    def student_grid(self) -> tuple[int, int] | None:
        g = getattr(self.student, "grid", None) or getattr(self.student, "grid_size", None)
        return None if g is None else tuple(int(s) for s in g)

    def score(self, model, images):
        x = images
        if self.thumbnail is not None and tuple(x.shape[-2:]) != self.thumbnail:
            x = F.interpolate(x, size=self.thumbnail, mode="bilinear", antialias=True, align_corners=False)
        with torch.no_grad():
            return self.student(x)


class _CallableScorer(PatchScorer):
    def __init__(self, fn: Callable, name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "callable")

    def score(self, model, images):
        with torch.no_grad():
            return self.fn(images)



def _load_student(name: str) -> Callable:
    """A shipped student (or a student file) by name, through :func:`rollout_fast.students.load_student`."""
    try:
        from ..students import load_student  # issue 5
    except ImportError as e:
        raise ValueError(f"student: cannot load {name!r}: rollout_fast.students is not available "
                         f"({e}); pass a student module instead") from e
    student = load_student(name)
    return student[0] if isinstance(student, tuple) else student  # (module, card) like load_teacher


@register_scorer("student")
def _student_scorer(*, student=None, thumbnail=None, **_) -> PatchScorer:
    if student is None:
        raise ValueError("scorer: 'student' needs student= (a module mapping images to (B, gh, gw) maps, "
                         "or the name of a shipped student)")
    if isinstance(student, str):
        student = _load_student(student)
    return StudentScorer(student, thumbnail=thumbnail)


SCORERS = scorer_names()  # the built-in names; scorer_names() also lists scorers registered later


def make_scorer(scorer, *, seed: int = 0, student=None, thumbnail=None, block: int = 0,
                rollout_discard_ratio: float = 0.9, head_fusion: str = "mean", scorer_model=None,
                image_norm=None) -> PatchScorer:
    """A :class:`PatchScorer` from a registered name ('random' | 'rollout' | 'grad-rollout' | 'cls-attention'
    | 'student' | 'model-rollout' | 'model-grad-rollout' | 'ltpa', see :func:`register_scorer`), a scorer, or a
    callable ``images -> (B, G)``.

    'student' needs ``student``: a module/callable, or a name for ``rollout_fast.students.load_student``.
    'model-rollout' / 'model-grad-rollout' need ``scorer_model``: a ViT module, a ``(module, data_config)``
    pair or a name for :func:`rollout_fast.zoo.load_teacher`; ``image_norm`` = (mean, std) of the images
    lets them be re-normalised for a scorer model whose data config is known
    (:class:`~rollout_fast.prune.cross.ModelRolloutScorer`). 'ltpa' needs ``scorer_model``: a Learn to Pay
    Attention AttnVGG (module, pair or name; :class:`~rollout_fast.prune.cross.LTPAScorer`).

    Raises:
        ValueError: unknown name; 'student' without a student (or the students package is missing);
            'model-rollout' / 'ltpa' without a scorer model, or 'ltpa' with one that is not an attention-gated
            AttnVGG.
        TypeError: neither a name, a PatchScorer nor a callable.
    """
    if isinstance(scorer, PatchScorer):
        return scorer
    if isinstance(scorer, str):
        factory = _FACTORIES.get(scorer)
        if factory is None:
            raise ValueError(f"scorer: expected one of {scorer_names()}, a PatchScorer or a callable, "
                             f"got {scorer!r}")
        return factory(seed=seed, student=student, thumbnail=thumbnail, block=block,
                       rollout_discard_ratio=rollout_discard_ratio, head_fusion=head_fusion,
                       scorer_model=scorer_model, image_norm=image_norm)
    if callable(scorer):
        return _CallableScorer(scorer)
    raise TypeError(f"scorer: expected one of {scorer_names()}, a PatchScorer or a callable, "
                    f"got {type(scorer).__name__}")
