"""Saliency and token-selection metrics between predicted and teacher maps, batched on tensors.

Every metric takes a prediction ``pred`` and a ground truth ``target`` of the same shape, either
``(B, gh, gw)`` maps or ``(B, G)`` flattened patch scores (any float dtype, any device; computed in
float32), and returns a float32 tensor of shape ``(B,)``: one value per image, so means, medians or
per-image comparisons are left to the caller. Maps must be non-negative for :func:`kld` and
:func:`sim` (they are normalised to sum 1); the rank metrics accept any real scores (e.g. logits).

Definitions (REFERENCE.md section 7) follow Bylinskii et al., "What do different evaluation metrics
tell us about saliency models?" (TPAMI 2019), with MSI-Net's epsilon for KLD:

- KLD (lower is better): ``sum_i Q_i log(eps + Q_i / (eps + P_i))``, P the prediction and Q the
  target, each divided by its sum, ``eps = 1e-7``.
- CC: Pearson correlation of the two maps (0 when either map is constant).
- SIM: ``sum_i min(P_i, Q_i)`` after each sums to 1.
- top-k recall at keep ratio r: with ``k = max(1, round(r * G))``, the fraction of the target's k
  highest patches that are among the prediction's k highest (the token-selection view: how many of
  the patches the teacher would keep does the student keep). Ties are broken by ``torch.topk``.
- Spearman: Pearson correlation of the ranks, ties given their average rank (0 for a constant map).

Baselines (:func:`centre_prior`, :func:`fit_centre_prior`, :func:`uniform_map`, :func:`mean_map`) are
what a student must beat: a student that learned only "objects are in the middle" scores like the
centre prior. :func:`shift_images` builds the object-placement test (seed: the convnet student's map
stayed centred when the object moved).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .prune.keep import check_keep_ratio

__all__ = [
    "KEEP_RATIOS",
    "MapMetrics",
    "cc",
    "centre_prior",
    "fit_centre_prior",
    "kld",
    "map_metrics",
    "mean_map",
    "shift_images",
    "sim",
    "spearman",
    "topk_recall",
    "uniform_map",
]

KEEP_RATIOS = (0.25, 0.5, 0.75)
EPS = 1e-7


def _pair(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and flatten to float32 (B, G)."""
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
        if t.dim() not in (2, 3):
            raise ValueError(f"{name}: expected (B, gh, gw) or (B, G), got shape {tuple(t.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target: shapes differ, {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.shape[0] == 0 or pred[0].numel() == 0:
        raise ValueError(f"pred: empty batch or map, shape {tuple(pred.shape)}")
    B = pred.shape[0]
    return pred.reshape(B, -1).float(), target.reshape(B, -1).to(pred.device).float()


def _check_nonnegative(name: str, t: torch.Tensor) -> None:
    if bool((t < 0).any()):
        raise ValueError(f"{name}: maps must be non-negative for this metric (apply softmax/sigmoid "
                         "to logits first)")


def _to_distribution(t: torch.Tensor) -> torch.Tensor:
    return t / t.sum(dim=1, keepdim=True).clamp_min(EPS)


def kld(pred: torch.Tensor, target: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """KL divergence of the target from the prediction, per image: (B,) float32, lower is better.

    ``P = pred / sum(pred)``, ``Q = target / sum(target)``, ``KLD = sum_i Q_i log(eps + Q_i / (eps + P_i))``
    (Bylinskii et al.; MSI-Net's eps = 1e-7).

    Raises:
        TypeError: non-tensor or non-float input. ValueError: shapes differ, wrong rank, empty, or a
            negative entry.
    """
    p, q = _pair(pred, target)
    _check_nonnegative("pred", p)
    _check_nonnegative("target", q)
    p, q = _to_distribution(p), _to_distribution(q)
    return (q * torch.log(eps + q / (eps + p))).sum(dim=1)


def _pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x - x.mean(dim=1, keepdim=True)
    y = y - y.mean(dim=1, keepdim=True)
    den = torch.sqrt((x * x).sum(dim=1) * (y * y).sum(dim=1))
    num = (x * y).sum(dim=1)
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))


def cc(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pearson correlation coefficient per image: (B,) float32 in [-1, 1]; 0 when a map is constant.

    Raises:
        TypeError, ValueError: as :func:`kld` (negative values are allowed).
    """
    p, q = _pair(pred, target)
    return _pearson(p, q)


def sim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Similarity (histogram intersection) per image: ``sum_i min(P_i, Q_i)``, each map summing to 1.

    (B,) float32 in [0, 1], 1 for identical distributions.

    Raises:
        TypeError, ValueError: as :func:`kld`.
    """
    p, q = _pair(pred, target)
    _check_nonnegative("pred", p)
    _check_nonnegative("target", q)
    return torch.minimum(_to_distribution(p), _to_distribution(q)).sum(dim=1)


def topk_recall(pred: torch.Tensor, target: torch.Tensor, keep_ratio: float = 0.5) -> torch.Tensor:
    """Fraction of the target's top-k patches among the prediction's top-k, per image: (B,) float32.

    ``k = max(1, round(keep_ratio * G))`` with ``G = gh * gw``; ties broken by ``torch.topk``.

    Raises:
        TypeError, ValueError: as :func:`cc`; ``keep_ratio`` outside (0, 1].
    """
    p, q = _pair(pred, target)
    r = check_keep_ratio(keep_ratio)
    G = p.shape[1]
    k = max(1, int(round(r * G)))
    sel_p = torch.zeros_like(p, dtype=torch.bool).scatter_(1, p.topk(k, dim=1).indices, True)
    sel_q = torch.zeros_like(q, dtype=torch.bool).scatter_(1, q.topk(k, dim=1).indices, True)
    return (sel_p & sel_q).sum(dim=1).float() / k


def _average_ranks(x: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Ranks 1..G along dim 1 with ties given their average rank: (B, G) float32."""
    out = []
    for xs in x.split(chunk):
        less = (xs[:, None, :] < xs[:, :, None]).sum(dim=2).float()   # (b, G): # values below x_i
        equal = (xs[:, None, :] == xs[:, :, None]).sum(dim=2).float()  # including x_i itself
        out.append(less + (equal + 1.0) / 2.0)
    return torch.cat(out)


def spearman(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of the patch scores per image: (B,) float32 in [-1, 1].

    Pearson correlation of average ranks (ties share their mean rank); 0 when a map is constant.

    Raises:
        TypeError, ValueError: as :func:`cc`.
    """
    p, q = _pair(pred, target)
    return _pearson(_average_ranks(p), _average_ranks(q))


def map_metrics(pred: torch.Tensor, target: torch.Tensor,
                keep_ratios: Sequence[float] = KEEP_RATIOS) -> dict[str, torch.Tensor]:
    """All metrics at once: ``{"kld", "cc", "sim", "recall@0.25", ..., "spearman"}`` -> (B,) tensors.

    ``pred`` must be non-negative maps (apply the student's output activation first).

    Raises:
        TypeError, ValueError: as the individual metrics.
    """
    out = {"kld": kld(pred, target), "cc": cc(pred, target), "sim": sim(pred, target)}
    for r in keep_ratios:
        out[f"recall@{check_keep_ratio(r):g}"] = topk_recall(pred, target, r)
    out["spearman"] = spearman(pred, target)
    return out


class MapMetrics:
    """Streaming mean of :func:`map_metrics` over batches.

    ``m = MapMetrics(); m.update(pred, target); ...; m.compute()`` -> ``{name: float}`` plus
    ``"images"`` (the count). ``pred``/``target``: (B, gh, gw) non-negative maps.
    """

    def __init__(self, keep_ratios: Sequence[float] = KEEP_RATIOS):
        self.keep_ratios = tuple(check_keep_ratio(r) for r in keep_ratios)
        self.sums: dict[str, float] = {}
        self.count = 0

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch (see :func:`map_metrics` for shapes and errors)."""
        for k, v in map_metrics(pred, target, self.keep_ratios).items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.double().sum())
        self.count += pred.shape[0]

    def compute(self) -> dict[str, float]:
        """Means over every image seen. Raises ValueError when no batch was added."""
        if self.count == 0:
            raise ValueError("MapMetrics.compute: no batch was added")
        return {**{k: v / self.count for k, v in self.sums.items()}, "images": self.count}


# ----------------------------------------------------------------------------------------- baselines

def _check_grid(grid) -> tuple[int, int]:
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2
            and all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)):
        raise ValueError(f"grid: expected (gh, gw) positive ints, got {grid!r}")
    return int(grid[0]), int(grid[1])


def uniform_map(grid: tuple[int, int]) -> torch.Tensor:
    """The uniform baseline: a (gh, gw) float32 map of ones. Raises ValueError for a bad ``grid``."""
    return torch.ones(_check_grid(grid), dtype=torch.float32)


def centre_prior(grid: tuple[int, int], sigma: float) -> torch.Tensor:
    """Isotropic Gaussian centred on the grid: (gh, gw) float32, maximum 1.

    ``sigma`` is the standard deviation in patches (cell centres at integer + 0.5).

    Raises:
        ValueError: bad ``grid`` or ``sigma`` <= 0.
    """
    gh, gw = _check_grid(grid)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
        raise ValueError(f"sigma: expected a positive number, got {sigma!r}")
    y = torch.arange(gh, dtype=torch.float32) + 0.5 - gh / 2
    x = torch.arange(gw, dtype=torch.float32) + 0.5 - gw / 2
    d2 = y[:, None] ** 2 + x[None, :] ** 2
    return torch.exp(-d2 / (2.0 * float(sigma) ** 2))


def fit_centre_prior(maps: torch.Tensor, sigmas: Sequence[float] | None = None) -> tuple[float, torch.Tensor]:
    """Fit the centre prior's width to teacher maps: the sigma with the highest mean CC.

    Args:
        maps: (M, gh, gw) non-negative teacher maps (e.g. the training set's).
        sigmas: candidate widths in patches (default: 24 values from 0.25 to 2 * max(gh, gw),
            geometrically spaced).

    Returns:
        ``(sigma, prior)``: the chosen width and the (gh, gw) float32 prior.

    Raises:
        ValueError: ``maps`` not a non-empty (M, gh, gw) tensor.
    """
    if not isinstance(maps, torch.Tensor) or maps.dim() != 3 or maps.shape[0] == 0:
        raise ValueError(f"maps: expected a non-empty (M, gh, gw) tensor, got "
                         f"{tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__}")
    gh, gw = maps.shape[1:]
    if sigmas is None:
        hi = 2.0 * max(gh, gw)
        sigmas = [0.25 * (hi / 0.25) ** (i / 23) for i in range(24)]
    best = (-math.inf, None)
    for s in sigmas:
        prior = centre_prior((gh, gw), float(s))
        score = float(cc(prior.expand_as(maps), maps.float()).mean())
        if score > best[0]:
            best = (score, float(s))
    return best[1], centre_prior((gh, gw), best[1])


def mean_map(maps: torch.Tensor) -> torch.Tensor:
    """The mean-map baseline: the average (gh, gw) map of (M, gh, gw) teacher maps, float32.

    Raises:
        ValueError: ``maps`` not a non-empty (M, gh, gw) tensor.
    """
    if not isinstance(maps, torch.Tensor) or maps.dim() != 3 or maps.shape[0] == 0:
        raise ValueError("maps: expected a non-empty (M, gh, gw) tensor")
    return maps.float().mean(dim=0)


# ------------------------------------------------------------------------ the object-placement test

def shift_images(images: torch.Tensor, dx: torch.Tensor | int, dy: torch.Tensor | int,
                 flip: torch.Tensor | bool = False, fill: float = 0.0) -> torch.Tensor:
    """Translate each image by whole pixels (and optionally mirror it), filling the border with ``fill``.

    Used for the object-placement test (CIFAR objects sit in the middle; shifting moves them towards a
    corner) and for the distillation augmentation. On normalised inputs ``fill=0`` is the dataset's
    mean colour.

    Args:
        images: (B, C, H, W) float tensor.
        dx, dy: shift right/down in pixels: ints, or (B,) integer tensors (one shift per image).
            A shift of magnitude >= W (H) leaves only ``fill``.
        flip: bool or (B,) bool tensor: mirror horizontally (before shifting).
        fill: value of the uncovered border.

    Returns:
        (B, C, H, W) tensor of ``images``' dtype and device.

    Raises:
        TypeError: non-integer shifts. ValueError: ``images`` not 4-D, or per-image tensors not (B,).
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError("images: expected a (B, C, H, W) tensor")
    B, C, H, W = images.shape
    dev = images.device

    def per_image(name, v, dtype):
        if isinstance(v, torch.Tensor):
            if v.shape != (B,):
                raise ValueError(f"{name}: expected shape ({B},), got {tuple(v.shape)}")
            if dtype is torch.long and v.is_floating_point():
                raise TypeError(f"{name}: expected integer shifts, got {v.dtype}")
            return v.to(dev, dtype)
        if dtype is torch.long and (isinstance(v, bool) or not isinstance(v, int)):
            raise TypeError(f"{name}: expected an int or a (B,) integer tensor, got {v!r}")
        return torch.full((B,), v, device=dev, dtype=dtype)

    dx, dy = per_image("dx", dx, torch.long), per_image("dy", dy, torch.long)
    flip = per_image("flip", flip, torch.bool)
    x = torch.where(flip[:, None, None, None], images.flip(-1), images)
    ys = torch.arange(H, device=dev)[None, :] - dy[:, None]  # (B, H) source rows
    xs = torch.arange(W, device=dev)[None, :] - dx[:, None]  # (B, W) source cols
    valid = ((ys >= 0) & (ys < H))[:, :, None] & ((xs >= 0) & (xs < W))[:, None, :]  # (B, H, W)
    b = torch.arange(B, device=dev)[:, None, None]
    out = x.permute(0, 2, 3, 1)[b, ys.clamp(0, H - 1)[:, :, None], xs.clamp(0, W - 1)[:, None, :]]
    out = out.permute(0, 3, 1, 2)
    return torch.where(valid[:, None], out, torch.full_like(out, fill))
