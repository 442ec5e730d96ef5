"""Pruned ViT inference: run a timm ViT on the prefix tokens plus the patch tokens that matter.

``pruned = prune_tokens(model, keep_ratio, scorer)`` returns a module whose forward scores the
``G = gh * gw`` patch tokens of each image, keeps the prefix tokens (class, distillation, register) and the
top ``k = keep_count(keep_ratio, G)`` patches right after the position embedding (before ``norm_pre`` and
the blocks), and runs every block unchanged on the shorter sequence. The pruning point is timm's
``model.patch_drop`` (REFERENCE.md section 4): a shallow copy of the model gets its own ``patch_drop``, a
:class:`TokenPruner` that calls the fused :func:`rollout_fast.gather.topk_gather`; parameters and every
other submodule are shared with the original, which is not modified. SDPA stays on, LayerScale and q/k norm
run as timm wrote them, and the shapes are static for a fixed ratio.

Scorers (``scorer=`` a name, a :class:`PatchScorer`, or a callable ``images -> (B, G)`` scores):

- ``'random'`` (:class:`RandomScorer`): uniform random scores from a seeded generator (the baseline).
- ``'rollout'`` (:class:`RolloutScorer`): the model's own attention rollout of the full image. An oracle
  needing a full forward pass first: an upper-bound reference, not a speed-up.
- ``'grad-rollout'`` (:class:`GradRolloutScorer`): the model's own gradient rollout (Chefer et al. 2021)
  for its predicted class: a stronger oracle (a forward and a backward pass), which keeps the tokens that
  carry the full model's decision.
- ``'cls-attention'`` (:class:`ClsAttentionScorer`): the class token's attention (mean over heads) in an
  early block on the full token sequence, training-free, EViT-style (Liang et al., "Not All Patches are
  What You Need: Expediting Vision Transformers via Token Reorganizations", ICLR 2022). Block 0 (default)
  costs one LayerNorm and the q/k projections of block 0, computed inside the pruned forward from the same
  embedded tokens (no second patch embedding).
- ``'student'`` (:class:`StudentScorer`): a small trained model mapping the (thumbnail of the) image to a
  ``(B, gh, gw)`` relevance map (issue 5's students; the seeds' ResNet/DeiT-tiny students).

Sources: EViT (Liang et al. 2022) and DynamicViT (Rao et al., NeurIPS 2021) prune inside the network with
trained or attention-based selection; the seeds dropped patches before the blocks by a (student's) rollout
map (REFERENCE.md section 5). Here selection happens once, before the blocks, for any timm ViT.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .capture import UnsupportedModelError, token_layout
from .gather import GATHER_BACKENDS, topk_gather
from .metrics import check_keep_ratio

__all__ = [
    "SCORERS",
    "ClsAttentionScorer",
    "GradRolloutScorer",
    "PatchScorer",
    "PrunedViT",
    "RandomScorer",
    "RolloutScorer",
    "StudentScorer",
    "TokenPruner",
    "add_prune_eval_parser",
    "keep_count",
    "make_scorer",
    "measure_speedup",
    "measure_throughput",
    "prune_tokens",
    "run_prune_eval",
]

SCORERS = ("random", "rollout", "grad-rollout", "cls-attention", "student")


def keep_count(keep_ratio: float, num_patches: int) -> int:
    """Patch tokens kept: ``round(keep_ratio * G)`` (halves round up), at least 1.

    Raises:
        ValueError: ``keep_ratio`` not a number in (0, 1].
    """
    check_keep_ratio(keep_ratio)
    return max(1, min(num_patches, math.floor(keep_ratio * num_patches + 0.5)))


def _require_prunable(model: nn.Module) -> None:
    need = ("patch_embed", "_pos_embed", "patch_drop", "blocks", "num_prefix_tokens")
    missing = [a for a in need if not hasattr(model, a)]
    if not isinstance(model, nn.Module) or missing:
        raise UnsupportedModelError(
            f"model: expected a timm VisionTransformer-family model with {need}, got {type(model).__name__}"
            + (f" missing {missing}" if isinstance(model, nn.Module) else ""))


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


# ---------------------------------------------------------------------------------------------- scorers
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


class RandomScorer(PatchScorer):
    """Uniform random scores from a CPU ``torch.Generator`` seeded with ``seed`` (reproducible batch order)."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.reset()

    def reset(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    def score(self, model, images):
        G = math.prod(token_layout(model, tuple(images.shape[-2:])).grid)
        return torch.rand((images.shape[0], G), generator=self.generator).to(images.device)


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
            from .explain import AttentionRollout

            self._explainer = AttentionRollout(model, head_fusion=self.head_fusion, discard_ratio=self.discard_ratio)
            self._model = model
        return self._explainer

    def score(self, model, images):
        return self.explainer(model)(images).flatten(1)


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


class ClsAttentionScorer(PatchScorer):
    """Class-token attention in block ``block`` on the full token sequence, mean over heads (EViT-style).

    ``score_tokens``: ``x = norm_pre(tokens)``, blocks ``0 .. block-1`` run on ``x`` unchanged, then in block
    ``block``: ``y = norm1(x)``; ``q`` of the class token and ``k`` of every token from the rows of
    ``attn.qkv`` (timm's (3, H, head_dim) layout), ``attn.q_norm``/``k_norm``; scores = mean over heads of
    ``softmax(q k^T * scale)`` restricted to the patch columns: float32 ``(B, G)``. Only the q/k projections
    are computed (about a twelfth of a block at ``block=0``).

    Raises (at call): UnsupportedModelError when the model has no class token or the block's attention is not
    timm's ``Attention`` layout (``qkv``, ``num_heads``, ``head_dim``, ``scale``, ``q_norm``, ``k_norm``).

    Source: EViT (Liang et al., ICLR 2022): the class token's attention as token attentiveness.
    """

    name = "cls-attention"
    uses_tokens = True

    def __init__(self, block: int = 0):
        if isinstance(block, bool) or not isinstance(block, int) or block < 0:
            raise ValueError(f"block: expected an int >= 0, got {block!r}")
        self.block = block

    def score_tokens(self, model, tokens):
        if getattr(model, "cls_token", None) is None:
            raise UnsupportedModelError("cls-attention: the model has no class token")
        if self.block >= len(model.blocks):
            raise ValueError(f"cls-attention: block {self.block} >= the model's {len(model.blocks)} blocks")
        blk = model.blocks[self.block]
        attn = getattr(blk, "attn", None)
        need = ("qkv", "num_heads", "scale", "q_norm", "k_norm")
        if attn is None or not all(hasattr(attn, a) for a in need) or not isinstance(attn.qkv, nn.Linear):
            raise UnsupportedModelError(f"cls-attention: model.blocks[{self.block}].attn is not timm's Attention "
                                        f"(needs {need})")
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


def make_scorer(scorer, *, seed: int = 0, student=None, thumbnail=None, block: int = 0,
                rollout_discard_ratio: float = 0.9, head_fusion: str = "mean") -> PatchScorer:
    """A :class:`PatchScorer` from a name ('random' | 'rollout' | 'grad-rollout' | 'cls-attention' | 'student'),
    a scorer, or a callable ``images -> (B, G)``.

    'student' needs ``student``: a module/callable, or a name for ``rollout_fast.students.load_student``.

    Raises:
        ValueError: unknown name; 'student' without a student (or the students package is missing).
        TypeError: neither a name, a PatchScorer nor a callable.
    """
    if isinstance(scorer, PatchScorer):
        return scorer
    if isinstance(scorer, str):
        if scorer == "random":
            return RandomScorer(seed)
        if scorer == "rollout":
            return RolloutScorer(head_fusion=head_fusion, discard_ratio=rollout_discard_ratio)
        if scorer == "grad-rollout":
            return GradRolloutScorer()
        if scorer == "cls-attention":
            return ClsAttentionScorer(block)
        if scorer == "student":
            if student is None:
                raise ValueError("scorer: 'student' needs student= (a module mapping images to (B, gh, gw) maps, "
                                 "or the name of a shipped student)")
            if isinstance(student, str):
                try:
                    from .students import load_student  # issue 5
                except ImportError as e:
                    raise ValueError(f"student: cannot load {student!r}: rollout_fast.students is not available "
                                     f"({e}); pass a student module instead") from e
                student = load_student(student)
                if isinstance(student, tuple):  # (module, config) like load_teacher
                    student = student[0]
            return StudentScorer(student, thumbnail=thumbnail)
        raise ValueError(f"scorer: expected one of {SCORERS}, a PatchScorer or a callable, got {scorer!r}")
    if callable(scorer):
        return _CallableScorer(scorer)
    raise TypeError(f"scorer: expected one of {SCORERS}, a PatchScorer or a callable, got {type(scorer).__name__}")


# ------------------------------------------------------------------------------------------ the model
class TokenPruner(nn.Module):
    """Drop-in for timm's ``model.patch_drop``: ``(B, N, D)`` tokens -> ``(B, P + k, D)`` kept tokens.

    The scores come from :meth:`PrunedViT.forward` (``pending``, set for one forward) or, for a scorer with
    ``uses_tokens``, from the tokens themselves. ``k = keep_count(keep_ratio, G)``; at ``k == G`` the tokens
    pass through untouched (no scoring). ``last_indices``: int64 ``(B, k)`` kept patch indices of the last
    forward (None when nothing was dropped).
    """

    def __init__(self, keep_ratio: float, num_prefix_tokens: int, scorer: PatchScorer | None = None,
                 backend: str = "auto"):
        super().__init__()
        self.keep_ratio = check_keep_ratio(keep_ratio)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.backend = backend
        object.__setattr__(self, "_scorer", scorer)  # not a submodule: it may hold the model itself
        object.__setattr__(self, "_owner", None)     # the pruned model copy (set by prune_tokens)
        self.pending: torch.Tensor | None = None
        self.last_indices: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"keep_ratio={self.keep_ratio}, num_prefix_tokens={self.num_prefix_tokens}, backend={self.backend!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        P = self.num_prefix_tokens
        G = x.shape[1] - P
        k = keep_count(self.keep_ratio, G)
        if k >= G:
            self.last_indices = None
            return x
        scores = self.pending
        if scores is None:
            if self._scorer is None or not self._scorer.uses_tokens or self._owner is None:
                raise RuntimeError("TokenPruner: no scores for this forward; call the PrunedViT, not its .vit")
            scores = self._scorer.score_tokens(self._owner, x)
        if tuple(scores.shape) != (x.shape[0], G):
            raise ValueError(f"scorer: scores of shape {tuple(scores.shape)} for {x.shape[0]} images of "
                             f"{G} patch tokens")
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
    """A timm ViT that runs on the prefix tokens + the top ``k`` patch tokens; see :func:`prune_tokens`.

    ``forward(images)`` -> the model's output (logits ``(B, num_classes)``) on the pruned sequence.
    ``forward(images, scores=S)`` uses given ``(B, G)`` / ``(B, gh, gw)`` scores instead of the scorer
    (evaluation: one scorer pass shared by several keep ratios). ``.vit`` is the model copy,
    ``.pruner`` its :class:`TokenPruner`, ``.last_indices`` the kept patch indices of the last call.
    """

    def __init__(self, model: nn.Module, keep_ratio: float, scorer: PatchScorer, backend: str = "auto"):
        super().__init__()
        pruner = TokenPruner(keep_ratio, int(model.num_prefix_tokens), scorer, backend)
        self.vit = _shallow_copy(model, pruner)
        object.__setattr__(pruner, "_owner", self.vit)
        object.__setattr__(self, "scorer", scorer)
        object.__setattr__(self, "original", model)
        if isinstance(getattr(scorer, "student", None), nn.Module):
            self.student = scorer.student  # moves with .to(device)

    @property
    def pruner(self) -> TokenPruner:
        return self.vit.patch_drop

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
        elif keep_count(self.keep_ratio, G) < G and not self.scorer.uses_tokens:
            who = f"scorer {getattr(self.scorer, 'name', '')!r}".replace(" ''", "")
            scores = check_scores(self.scorer.score(self.original, images), images.shape[0], layout.grid, who)
        pruner.pending = scores
        try:
            return self.vit(images)
        finally:
            pruner.pending = None


def prune_tokens(model: nn.Module, keep_ratio: float, scorer="cls-attention", *, backend: str = "auto",
                 **scorer_kwargs) -> PrunedViT:
    """A version of ``model`` that keeps only the prefix tokens and the top ``round(keep_ratio * G)`` patches.

    Args:
        model: a timm VisionTransformer-family model (vit_*, deit_* incl. distilled, register tokens, q/k norm,
            LayerScale, non-square or dynamic image size). Not modified: the result is a shallow copy sharing
            its parameters and submodules, with its own ``patch_drop``.
        keep_ratio: fraction of patch tokens kept, in (0, 1]; ``k = max(1, floor(keep_ratio * G + 0.5))``.
        scorer: 'random' | 'rollout' | 'cls-attention' | 'student', a :class:`PatchScorer`, or a callable
            ``images (B, 3, H, W) -> (B, G) or (B, gh, gw)`` float scores (larger = keep).
        backend: :func:`rollout_fast.gather.topk_gather` backend ('auto' picks the compiled/Triton kernel).
        **scorer_kwargs: passed to :func:`make_scorer` (``seed``, ``student``, ``thumbnail``, ``block``,
            ``rollout_discard_ratio``, ``head_fusion``).

    Returns:
        :class:`PrunedViT`; ``pruned(images)`` returns the model's output for ``images`` (B, 3, H, W).
        ``keep_ratio=1.0`` returns exactly the unpruned model's output (the scorer is not run).

    Raises:
        ValueError: ``keep_ratio`` outside (0, 1]; an unknown scorer or backend; a student whose grid differs
            from the model's patch grid; at call time, a scorer returning the wrong shape or non-finite scores.
        UnsupportedModelError (TypeError): ``model`` is not a timm ViT with ``patch_drop``.
    """
    check_keep_ratio(keep_ratio)
    _require_prunable(model)
    if backend not in GATHER_BACKENDS:
        raise ValueError(f"backend: expected one of {GATHER_BACKENDS}, got {backend!r}")
    sc = make_scorer(scorer, **scorer_kwargs)
    if isinstance(sc, StudentScorer):
        sg = sc.student_grid()
        mg = tuple(int(g) for g in model.patch_embed.grid_size)
        if sg is not None and sg != mg:
            raise ValueError(f"student: predicts a {sg[0]}x{sg[1]} grid but the model's patch grid is "
                             f"{mg[0]}x{mg[1]}; use a student trained for this model")
    return PrunedViT(model, keep_ratio, sc, backend)


# --------------------------------------------------------------------------------------- measurement
def measure_throughput(fn: Callable[[torch.Tensor], object], images: torch.Tensor, *, min_time: float = 1.0,
                       min_runs: int = 3, warmup: int = 1) -> float:
    """Images per second of ``fn(images)`` (median over runs of at least ``min_time`` seconds in total).

    CUDA work is synchronised around each run.
    """
    sync = torch.cuda.synchronize if images.device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(warmup):
            fn(images)
        sync()
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < min_runs or time.perf_counter() - start < min_time:
            t0 = time.perf_counter()
            fn(images)
            sync()
            times.append(time.perf_counter() - t0)
    times.sort()
    return images.shape[0] / times[len(times) // 2]


def measure_speedup(baseline: Callable[[torch.Tensor], object], fn: Callable[[torch.Tensor], object],
                    images: torch.Tensor, *, min_time: float = 1.0, min_runs: int = 3,
                    warmup: int = 1) -> tuple[float, float]:
    """Images per second of ``baseline(images)`` and ``fn(images)``, timed in alternation (A B A B ...) so
    that load changes on a shared machine hit both alike; medians over at least ``min_runs`` runs each and
    ``min_time`` seconds in total. Returns ``(baseline_ips, fn_ips)``."""
    sync = torch.cuda.synchronize if images.device.type == "cuda" else (lambda: None)
    ta: list[float] = []
    tb: list[float] = []
    with torch.inference_mode():
        for _ in range(warmup):
            baseline(images)
            fn(images)
        sync()
        start = time.perf_counter()
        while len(ta) < min_runs or time.perf_counter() - start < min_time:
            for f, ts in ((baseline, ta), (fn, tb)):
                t0 = time.perf_counter()
                f(images)
                sync()
                ts.append(time.perf_counter() - t0)
    ta.sort()
    tb.sort()
    return images.shape[0] / ta[len(ta) // 2], images.shape[0] / tb[len(tb) // 2]


# ------------------------------------------------------------------------------------ prune-eval job
def _labels_csv_dataset(root, transform):
    import csv
    from pathlib import Path

    from PIL import Image

    root = Path(root)
    rows = list(csv.DictReader((root / "labels.csv").open()))
    if not rows or "filename" not in rows[0] or "class_index" not in rows[0]:
        raise ValueError(f"data: {root / 'labels.csv'} needs columns filename, class_index")
    img_dir = root / "images" if (root / "images").is_dir() else root

    class _DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            with Image.open(img_dir / rows[i]["filename"]) as im:
                return transform(im.convert("RGB")), int(rows[i]["class_index"])

    return _DS()


def load_eval_data(root, data_config: dict, limit: int | None = None):
    """Images and labels: an ImageFolder tree, or a folder with ``labels.csv`` (filename, class_index) and
    ``images/`` (../shared/data/imagenet-sample); timm's eval transform. Returns ``(images (M, 3, H, W)
    float32, labels (M,) int64)``, the first ``limit`` samples when given (ImageFolder: evenly spread)."""
    from pathlib import Path

    from timm.data import create_transform

    from .data import image_folder

    transform = create_transform(**data_config)
    root = Path(root)
    if (root / "labels.csv").is_file():
        ds = _labels_csv_dataset(root, transform)
    else:
        ds = image_folder(root, transform)
    n = len(ds)
    idx = list(range(n))
    if limit is not None and limit < n:
        idx = [int(i * n / limit) for i in range(limit)]  # spread over the classes of a sorted ImageFolder
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), batch_size=500, num_workers=0)
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def _parse_floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated numbers, got {text!r}") from None
    if not vals:
        raise ValueError(f"{what}: empty list")
    return vals


def add_prune_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``prune-eval`` sub-command to an argparse ``subparsers`` (``set_defaults(func=run_prune_eval)``)."""
    p = subparsers.add_parser(
        "prune-eval", help="top-1 and throughput of token-pruned inference against the fraction of tokens dropped",
        description="Prune patch tokens before the blocks with several scorers and keep ratios; write "
                    "results.csv/json, prune_top1.png and throughput.csv to --out.")
    p.add_argument("--model", default="cifar10-vit",
                   help="'cifar10-vit' (embedded teacher), a timm model name, or a rollout_fast .safetensors")
    p.add_argument("--checkpoint", default=None, help="local weights for a timm model")
    p.add_argument("--timm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model argument for a timm name (JSON value), e.g. img_size=64")
    p.add_argument("--data", required=True, help="ImageFolder split, or a folder with labels.csv + images/")
    p.add_argument("--scorers", default="random,rollout,cls-attention,student",
                   help=f"comma-separated, from {', '.join(SCORERS)} (grad-rollout: a second oracle, "
                        "the model's gradient rollout for its predicted class)")
    p.add_argument("--keep", default="1.0,0.9,0.75,0.5,0.4,0.25,0.1", help="keep ratios in (0, 1]")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, default=3, help="random-scorer seeds averaged (0 .. n-1)")
    p.add_argument("--limit", type=int, default=None, help="evaluate on this many images only")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch and the large throughput batch")
    p.add_argument("--throughput-batches", default="1,256", help="batch sizes timed ('' to skip timing)")
    p.add_argument("--throughput-time", type=float, default=1.0, help="seconds per timing (median of runs)")
    p.add_argument("--student", default=None,
                   help="student name or path for scorer 'student' (default: MODEL's shipped pruning student, "
                        "e.g. cifar10-vit-prune, else MODEL's student)")
    p.add_argument("--student-thumbnail", type=int, default=None, help="resize images to this side for the student")
    p.add_argument("--cls-block", type=int, default=0, help="block whose class-token attention 'cls-attention' uses")
    p.add_argument("--rollout-discard", type=float, default=0.9, help="discard ratio of the 'rollout' scorer")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--throughput-only", action="store_true", help="only time the models (no top-1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (torch.set_num_threads); 1 gives stable timings on a shared machine")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_prune_eval)
    return p


def run_prune_eval(args) -> int:
    """The ``prune-eval`` command: load, evaluate, time, write; returns the exit status (2: bad arguments)."""
    import json
    import sys

    from .zoo import load_teacher

    try:
        keeps = [check_keep_ratio(v) for v in _parse_floats(args.keep, "--keep")]
        batches = [int(v) for v in _parse_floats(args.throughput_batches, "--throughput-batches")] \
            if args.throughput_batches.strip() else []
        scorers = [s.strip() for s in args.scorers.split(",") if s.strip()]
        bad = [s for s in scorers if s not in SCORERS]
        if bad or not scorers:
            raise ValueError(f"--scorers: expected names from {SCORERS}, got {args.scorers!r}")
        timm_kwargs = {}
        for item in args.timm_arg:
            key, sep, val = item.partition("=")
            if not sep:
                raise ValueError(f"--timm-arg: expected KEY=VALUE, got {item!r}")
            try:
                timm_kwargs[key] = json.loads(val)
            except json.JSONDecodeError:
                timm_kwargs[key] = val
        if args.seeds < 1:
            raise ValueError("--seeds: expected >= 1")
        if args.threads is not None and args.threads < 1:
            raise ValueError("--threads: expected >= 1")
        student = student_name = None
        if "student" in scorers:  # resolved first: a missing student fails before any work
            from .students import pruning_student_name

            student_name = args.student or pruning_student_name(args.model)
            try:
                student = make_scorer("student", student=student_name).student
            except (ValueError, OSError) as e:
                raise ValueError(f"--scorers student: no student for {student_name!r} ({e}); "
                                 "pass --student NAME_OR_PATH or leave 'student' out") from None
            try:
                StudentScorer(student, thumbnail=args.student_thumbnail)
            except ValueError as e:
                raise ValueError(f"--student-thumbnail: {e}") from None
    except ValueError as e:
        print(f"rollout-fast prune-eval: {e}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, data_config = load_teacher(args.model, checkpoint=args.checkpoint, device=device, **timm_kwargs)
    images, labels = load_eval_data(args.data, data_config, args.limit)
    result = prune_eval(model, images, labels, scorers=scorers, keeps=keeps, seeds=args.seeds,
                        batch_size=args.batch_size, throughput_batches=batches,
                        throughput_time=args.throughput_time, device=device,
                        student=student,
                        thumbnail=args.student_thumbnail, block=args.cls_block,
                        rollout_discard_ratio=args.rollout_discard, progress=not args.no_progress,
                        accuracy=not args.throughput_only)
    result["meta"].update(model=args.model, checkpoint=args.checkpoint, data=str(args.data), student=student_name)
    paths = write_prune_eval(result, args.out)
    print(format_table(result))
    print("written: " + ", ".join(str(p) for p in paths))
    return 0


def prune_eval(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, scorers: Sequence[str],
               keeps: Sequence[float], seeds: int = 3, batch_size: int = 256,
               throughput_batches: Sequence[int] = (1, 256), throughput_time: float = 1.0, device="cpu",
               student=None, thumbnail=None, block: int = 0, rollout_discard_ratio: float = 0.9,
               progress: bool = True, accuracy: bool = True) -> dict:
    """Top-1 of ``model`` pruned by each scorer at each keep ratio, and images/s (scorer included).

    Throughput: each pruned configuration is timed in alternation with the full model
    (:func:`measure_speedup`), so ``speedup`` compares runs made under the same machine load; the 'full'
    row is the median of those full-model timings. ``accuracy=False`` only times (``rows`` empty).

    Scores are computed once per batch and scorer (they do not depend on the keep ratio) and shared by the
    keep ratios; 'random' is run with seeds ``0 .. seeds-1`` (mean and standard deviation reported).

    Returns:
        dict with ``rows`` (scorer, keep_ratio, tokens_kept, num_patches, dropped_fraction, top1, top1_std,
        seeds, images), ``throughput`` (scorer, keep_ratio, batch, images_per_s, speedup) and ``meta``.
    """
    import datetime
    import platform

    from tqdm.auto import tqdm

    model = model.to(device).eval()
    H, W = images.shape[-2:]
    layout = token_layout(model, (H, W))
    G = layout.grid[0] * layout.grid[1]
    kw = {"student": student, "thumbnail": thumbnail, "block": block, "rollout_discard_ratio": rollout_discard_ratio}
    timed = {name: make_scorer(name, seed=0, **kw) for name in dict.fromkeys(scorers)}  # one each, seed 0
    runs: list[tuple[str, PatchScorer]] = []
    for name, sc in timed.items():
        if name == "random":
            runs += [("random", RandomScorer(s)) for s in range(seeds)]
        else:
            runs.append((name, sc))
    pruned = {r: prune_tokens(model, r, "random") for r in keeps}  # scores are passed in explicitly
    correct = {(i, r): 0 for i in range(len(runs)) for r in keeps}
    full_correct = 0
    n = images.shape[0]
    with torch.inference_mode():
        for start in tqdm(range(0, n if accuracy else 0, batch_size), desc="prune-eval", disable=not progress):
            x = images[start:start + batch_size].to(device)
            y = labels[start:start + batch_size].to(device)
            full_correct += int((model(x).argmax(-1) == y).sum())
            for i, (_, sc) in enumerate(runs):
                s = check_scores(sc.score(model, x), x.shape[0], layout.grid, f"scorer {sc.name!r}")
                for r in keeps:
                    out = pruned[r](x, scores=s)
                    correct[(i, r)] += int((out.argmax(-1) == y).sum())
    rows = []
    for name in dict.fromkeys(n for n, _ in runs) if accuracy else ():
        ids = [i for i, (m, _) in enumerate(runs) if m == name]
        for r in keeps:
            accs = torch.tensor([correct[(i, r)] / n for i in ids], dtype=torch.float64)
            k = keep_count(r, G)
            rows.append({"scorer": name, "keep_ratio": r, "tokens_kept": k, "num_patches": G, "dropped_fraction": 1 - k / G,
                             "top1": float(accs.mean()), "top1_std": float(accs.std()) if len(ids) > 1 else 0.0,
                             "seeds": len(ids), "images": n})
    throughput = []
    for bsz in throughput_batches:
        reps = -(-bsz // n)
        xb = images.repeat(reps, 1, 1, 1)[:bsz].to(device)
        fulls, entries = [], []
        for name, sc in timed.items():
            for r in keeps:
                if r >= 1.0:
                    continue
                sc.reset()
                pm = prune_tokens(model, r, sc)
                full, ips = measure_speedup(model, pm, xb, min_time=throughput_time)
                fulls.append(full)
                entries.append({"scorer": name, "keep_ratio": r, "batch": bsz, "images_per_s": ips, "speedup": ips / full})
        if not fulls:
            fulls.append(measure_throughput(model, xb, min_time=throughput_time))
        fulls.sort()
        throughput.append({"scorer": "full", "keep_ratio": 1.0, "batch": bsz, "images_per_s": fulls[len(fulls) // 2],
                               "speedup": 1.0})
        throughput += entries
    import os

    meta = {"full_top1": full_correct / n if accuracy else None, "images": n if accuracy else 0,
                "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None, "num_patches": G, "num_prefix_tokens": layout.num_prefix_tokens,
                "device": str(device) if str(device) != "cuda" else torch.cuda.get_device_name(),
                "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "seeds": seeds, "rollout_discard_ratio": rollout_discard_ratio, "cls_block": block}
    return {"rows": rows, "throughput": throughput, "meta": meta}


def format_table(result: dict) -> str:
    """Markdown tables: top-1 per scorer and fraction dropped, then throughput."""
    rows = result["rows"]
    lines = []
    if rows:
        lines = _accuracy_table(result)
    if result["throughput"]:
        lines += ["", "| scorer | keep | batch | images/s | speed-up |", "|---|---|---|---|---|"]
        for t in result["throughput"]:
            lines.append(f"| {t['scorer']} | {t['keep_ratio']} | {t['batch']} | {t['images_per_s']:.1f} | "
                         f"{t['speedup']:.2f}x |")
    return "\n".join(lines)


def _accuracy_table(result: dict) -> list[str]:
    rows = result["rows"]
    keeps = list(dict.fromkeys(r["keep_ratio"] for r in rows))
    scorers = list(dict.fromkeys(r["scorer"] for r in rows))
    by = {(r["scorer"], r["keep_ratio"]): r for r in rows}
    head = "| scorer | " + " | ".join(f"keep {k} ({by[(scorers[0], k)]['dropped_fraction']:.0%} dropped)" for k in keeps) + " |"
    lines = [head, "|---" * (len(keeps) + 1) + "|"]
    for s in scorers:
        cells = []
        for k in keeps:
            r = by[(s, k)]
            cells.append(f"{r['top1']:.4f}" + (f" ± {r['top1_std']:.4f}" if r["seeds"] > 1 else ""))
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines.append(f"\nfull model top-1 {result['meta']['full_top1']:.4f} on {result['meta']['images']} images")
    return lines


def write_prune_eval(result: dict, out) -> list:
    """Write ``results.csv``, ``throughput.csv``, ``results.json``, ``results.md`` and ``prune_top1.png``."""
    import csv
    import json
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, table in (("results.csv", result["rows"]), ("throughput.csv", result["throughput"])):
        if table:
            with (out / name).open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(table[0]))
                w.writeheader()
                w.writerows(table)
            paths.append(out / name)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(format_table(result) + "\n")
    paths += [out / "results.json", out / "results.md"]
    if result["rows"]:
        paths.append(plot_prune_eval(result, out / "prune_top1.png"))
    return paths


def plot_prune_eval(result: dict, path):
    """Top-1 against the fraction of patch tokens dropped, one curve per scorer (random: mean ± std band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for s in dict.fromkeys(r["scorer"] for r in result["rows"]):
        rs = sorted((r for r in result["rows"] if r["scorer"] == s), key=lambda r: r["dropped_fraction"])
        x = [r["dropped_fraction"] for r in rs]
        y = [r["top1"] for r in rs]
        label = s + (f" (mean of {rs[0]['seeds']} seeds ± std)" if rs[0]["seeds"] > 1 else "")
        line, = ax.plot(x, y, marker="o", label=label)
        if rs[0]["seeds"] > 1:
            sd = [r["top1_std"] for r in rs]
            ax.fill_between(x, [a - b for a, b in zip(y, sd)], [a + b for a, b in zip(y, sd)],
                            color=line.get_color(), alpha=0.2)
    m = result["meta"]
    ax.axhline(m["full_top1"], color="gray", ls="--", lw=1, label=f"full model ({m['full_top1']:.3f})")
    ax.set_xlabel("fraction of patch tokens dropped before the blocks")
    ax.set_ylabel("top-1")
    ax.set_title(f"{m.get('model', 'model')}: pruned inference on {m['images']} images", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
