"""Saliency metrics against human fixations, batched on tensors, and the three baselines.

Definitions follow Bylinskii, Judd, Oliva, Torralba & Durand, "What do different evaluation metrics
tell us about saliency models?" (TPAMI 41(3), 2019) and its MATLAB code (the MIT saliency benchmark);
information gain follows Kümmerer, Wallis & Bethge, "Information-theoretic model comparison unifies
saliency metrics" (PNAS 112(52), 2015).

Inputs:

- ``saliency``: (B, H, W) float maps at the image's resolution (any float dtype or device; resize a
  model's output to the stimulus size first, as the benchmark does).
- ``fixations``: either a (B, H, W) map of fixation counts (bool or a number >= 0 per pixel; a binary
  map gives the MIT benchmark's convention, each fixated pixel once) or a list of B (N_b, 2) tensors of
  ``(x, y)`` 0-based pixel coordinates (counted per fixation, several on one pixel count several
  times, as pysaliency does; see :func:`rollout_fast.saliency.data.fixation_counts`).
- ``density``: the (B, H, W) continuous ground truth (Gaussian-blurred fixations,
  :func:`~rollout_fast.saliency.data.fixation_density`) for the distribution metrics.

Location metrics (:func:`nss`, :func:`auc_judd`, :func:`shuffled_auc`, :func:`information_gain`) are
computed in float64 and return (B,) float64. The distribution metrics KLD, CC and SIM are
:mod:`rollout_fast.metrics`' own functions, imported here because the definitions agree (same
formulas, and ``kld``'s default eps 1e-7 is MSI-Net's; pass ``eps=MATLAB_EPS`` for the MIT benchmark's
KLD); they compute in float32 and return (B,) float32, on maps of any size (here the image's).

Bad input raises a one-line error naming the argument: a saliency map whose size differs from the
fixation map's, an image with no fixations, a fixation outside the image, negative maps where a
distribution is needed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ..metrics import cc, kld, mean_map, sim, uniform_map
from .data import _check_points, _points_list

__all__ = [
    "MATLAB_EPS",
    "SaliencyMetrics",
    "auc_judd",
    "cc",
    "centre_gaussian",
    "fit_centre_gaussian",
    "information_gain",
    "kld",
    "mean_fixation_map",
    "nss",
    "saliency_metrics",
    "shuffled_auc",
    "sim",
    "uniform_map",
]

MATLAB_EPS = 2.220446049250313e-16
"""MATLAB's ``eps``: the regulariser of the MIT benchmark's KLDiv.m and InfoGain.m."""


# ---------------------------------------------------------------------------------------- validation

def _saliency(saliency: torch.Tensor, name: str = "saliency") -> torch.Tensor:
    if not isinstance(saliency, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(saliency).__name__}")
    if not saliency.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {saliency.dtype}")
    if saliency.dim() != 3 or saliency.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty (B, H, W) tensor, got shape {tuple(saliency.shape)}")
    if not bool(torch.isfinite(saliency).all()):
        raise ValueError(f"{name}: non-finite values")
    return saliency.double()


def _counts(fixations, shape: torch.Size, device, name: str = "fixations") -> torch.Tensor:
    """Fixation counts (B, H, W) float64 on ``device`` from a count/binary map or point lists."""
    B, H, W = shape
    if isinstance(fixations, torch.Tensor):
        if fixations.dim() != 3 or fixations.shape[1:] != (H, W) or fixations.shape[0] != B:
            raise ValueError(f"{name}: map of shape {tuple(fixations.shape)} does not match saliency's "
                             f"{(B, H, W)}")
        f = fixations.to(device=device, dtype=torch.float64)
        if not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
            raise ValueError(f"{name}: counts must be finite and >= 0")
    else:
        pts = _points_list(fixations, name)
        if len(pts) != B:
            raise ValueError(f"{name}: {len(pts)} point lists for a batch of {B} maps")
        f = torch.zeros(B, H * W, dtype=torch.float64)
        for b, p in enumerate(pts):
            _check_points(p, (H, W), f"{name}[{b}]")
            idx = torch.floor(p[:, 1] + 0.5).long() * W + torch.floor(p[:, 0] + 0.5).long()
            f[b].index_add_(0, idx, torch.ones(p.shape[0], dtype=torch.float64))
        f = f.view(B, H, W).to(device)
    empty = (f.flatten(1).sum(1) == 0).nonzero()
    if empty.numel():
        raise ValueError(f"{name}: image {int(empty[0, 0])} of the batch has no fixations")
    return f


def _baseline(baseline: torch.Tensor, shape: torch.Size, device, name: str = "baseline") -> torch.Tensor:
    if not isinstance(baseline, torch.Tensor) or not baseline.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor")
    if baseline.dim() == 2:
        baseline = baseline.unsqueeze(0)
    if baseline.dim() != 3 or baseline.shape[1:] != shape[1:] or baseline.shape[0] not in (1, shape[0]):
        raise ValueError(f"{name}: shape {tuple(baseline.shape)} does not match saliency's {tuple(shape)} "
                         "(give (H, W) or (B, H, W))")
    b = baseline.to(device=device, dtype=torch.float64)
    if not bool(torch.isfinite(b).all()) or bool((b < 0).any()) or bool((b.flatten(1).sum(1) == 0).any()):
        raise ValueError(f"{name}: must be finite, >= 0 and not all zero")
    return b.expand(shape)


# ------------------------------------------------------------------------------------------- metrics

def nss(saliency: torch.Tensor, fixations) -> torch.Tensor:
    """Normalised scanpath saliency: the mean z-scored saliency at the fixations, per image.

    ``NSS = sum_i w_i (S_i - mean(S)) / std(S) / sum_i w_i`` with ``w`` the fixation counts (Peters et
    al. 2005; Bylinskii et al. 2019, NSS.m). The standard deviation is the population one (ddof 0, as
    pysaliency; the MIT code's ddof 1 differs by a factor sqrt(HW / (HW - 1)), 1 + 1e-6 at 800 x 600).
    A constant map scores 0 (the MIT code returns NaN).

    Args:
        saliency: (B, H, W) float maps. fixations: (B, H, W) counts/binary map or B (N_b, 2) point lists.

    Returns:
        (B,) float64, higher is better (0 = chance).

    Raises:
        TypeError, ValueError: see the module docstring.
    """
    s = _saliency(saliency)
    w = _counts(fixations, s.shape, s.device).flatten(1)
    s = s.flatten(1)
    std = s.std(dim=1, correction=0, keepdim=True)
    z = torch.where(std > 0, (s - s.mean(dim=1, keepdim=True)) / std.clamp_min(1e-300), torch.zeros_like(s))
    return (z * w).sum(1) / w.sum(1)


def auc_judd(saliency: torch.Tensor, fixations) -> torch.Tensor:
    """AUC-Judd: area under the ROC curve of fixated (positive) against non-fixated pixels, per image.

    As the MIT benchmark's AUC_Judd.m (Judd et al. 2009; Bylinskii et al. 2019): thresholds at the
    saliency values of the fixated pixels; at threshold t the true-positive rate is the (count-weighted)
    share of fixations with ``S >= t`` and the false-positive rate is the share of the *non-fixated*
    pixels with ``S >= t``; the points (0, 0) and (1, 1) close the curve, integrated by the trapezoid
    rule. Ties are counted with ``>=`` instead of the MIT code's random jitter of 1e-7, so the value is
    deterministic and equal to the MIT code's wherever the saliency values at fixations are distinct.

    Args:
        saliency: (B, H, W) float maps. fixations: (B, H, W) counts/binary map or B (N_b, 2) point lists.

    Returns:
        (B,) float64 in [0, 1], higher is better (0.5 = chance).

    Raises:
        TypeError, ValueError: see the module docstring; every pixel fixated (no negatives).
    """
    s = _saliency(saliency)
    w = _counts(fixations, s.shape, s.device).flatten(1)
    s = s.flatten(1)
    B, N = s.shape
    fix = (w > 0).double()
    n_fix = fix.sum(1, keepdim=True)
    if bool((n_fix == N).any()):
        raise ValueError(f"fixations: every pixel of image {int((n_fix[:, 0] == N).nonzero()[0, 0])} is fixated; "
                         "AUC needs non-fixated pixels")
    total_w = w.sum(1, keepdim=True)
    s_desc, order = s.sort(dim=1, descending=True)
    w_d, fix_d = w.gather(1, order), fix.gather(1, order)
    # ``>= t`` includes the whole tie group of t: the group's last index in descending order.
    # Its end = N - (first index in ascending order), found with searchsorted on the ascending values.
    s_asc = s_desc.flip(1).contiguous()
    end = N - torch.searchsorted(s_asc, s_desc.contiguous(), side="left")  # (B, N) count of S >= t
    cw = torch.cat([torch.zeros(B, 1, dtype=w.dtype, device=w.device), w_d.cumsum(1)], 1)
    cf = torch.cat([torch.zeros(B, 1, dtype=w.dtype, device=w.device), fix_d.cumsum(1)], 1)
    tp = cw.gather(1, end) / total_w
    fp = (end.double() - cf.gather(1, end)) / (N - n_fix)
    # Keep only the fixated pixels' thresholds: other entries repeat the last kept point (cummax along
    # decreasing thresholds), adding zero area.
    valid = fix_d > 0
    tp = torch.where(valid, tp, torch.zeros_like(tp)).cummax(1).values
    fp = torch.where(valid, fp, torch.zeros_like(fp)).cummax(1).values
    zeros, ones = torch.zeros_like(tp[:, :1]), torch.ones_like(tp[:, :1])
    tp, fp = torch.cat([zeros, tp, ones], 1), torch.cat([zeros, fp, ones], 1)
    return ((fp[:, 1:] - fp[:, :-1]) * (tp[:, 1:] + tp[:, :-1]) / 2).sum(1)


def _mann_whitney(s: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Weighted ROC area over all thresholds: P(S_pos > S_neg) + P(S_pos = S_neg) / 2. All (B, N) float64."""
    s_asc, order = s.sort(dim=1)
    cn = torch.cat([torch.zeros_like(neg[:, :1]), neg.gather(1, order).cumsum(1)], 1)
    below = cn.gather(1, torch.searchsorted(s_asc, s, side="left"))
    upto = cn.gather(1, torch.searchsorted(s_asc, s, side="right"))
    return (pos * (below + upto) / 2).sum(1) / (pos.sum(1) * neg.sum(1))


def shuffled_auc(saliency: torch.Tensor, fixations, nonfixations) -> torch.Tensor:
    """Shuffled AUC: the ROC area of the saliency at this image's fixations against its values at the
    fixation locations of *other* images (which carry the centre bias, so a centre prior scores ~0.5).

    The MIT benchmark's AUC_shuffled.m (Zhang et al. 2008; Bylinskii et al. 2019) samples as many
    negatives as fixations, 100 times, and thresholds in steps of 0.1; here every negative is used and
    every threshold, so the value is exact and deterministic: ``P(S_pos > S_neg) + P(S_pos = S_neg)/2``
    with positives weighted by ``fixations`` and negatives by ``nonfixations`` (what pysaliency's
    ``AUC(..., nonfixations='shuffled')`` computes with ``thresholds='all'``).

    Args:
        saliency: (B, H, W) float maps.
        fixations: (B, H, W) counts/binary map or B (N_b, 2) point lists: the positives.
        nonfixations: (B, H, W) or (H, W) counts/binary map of the other images' fixations, or B point
            lists (e.g. the split's total counts minus this image's: :class:`SaliencyMetrics` does so).

    Returns:
        (B,) float64 in [0, 1], higher is better (0.5 = chance, or centre bias only).

    Raises:
        TypeError, ValueError: see the module docstring; an image without negatives.
    """
    s = _saliency(saliency)
    pos = _counts(fixations, s.shape, s.device).flatten(1)
    if isinstance(nonfixations, torch.Tensor) and nonfixations.dim() == 2:
        nonfixations = nonfixations.unsqueeze(0).expand(s.shape)
    neg = _counts(nonfixations, s.shape, s.device, "nonfixations").flatten(1)
    return _mann_whitney(s.flatten(1), pos, neg)


def information_gain(saliency: torch.Tensor, fixations, baseline: torch.Tensor,
                     eps: float = MATLAB_EPS) -> torch.Tensor:
    """Information gain over a baseline, in bits per fixation, per image.

    ``P = S / sum(S)``, ``Q = baseline / sum(baseline)``, ``IG = sum_i w_i (log2(eps + P_i) -
    log2(eps + Q_i)) / sum_i w_i`` over the fixated pixels weighted by their counts (Kümmerer et al.
    2015; Bylinskii et al. 2019, InfoGain.m with MATLAB's eps). Both maps are read as probability
    distributions over pixels, so IG > 0 means the map predicts the fixations better than the baseline
    (the centre prior in the benchmark).

    Args:
        saliency: (B, H, W) float maps, >= 0 and not all zero.
        fixations: (B, H, W) counts/binary map or B (N_b, 2) point lists.
        baseline: (H, W) or (B, H, W) float map, >= 0 and not all zero.
        eps: regulariser inside the logarithms.

    Returns:
        (B,) float64 bits per fixation, higher is better.

    Raises:
        TypeError, ValueError: see the module docstring; a negative or all-zero map.
    """
    s = _saliency(saliency)
    if bool((s < 0).any()) or bool((s.flatten(1).sum(1) == 0).any()):
        raise ValueError("saliency: must be >= 0 and not all zero for information gain")
    w = _counts(fixations, s.shape, s.device).flatten(1)
    b = _baseline(baseline, s.shape, s.device).flatten(1)
    s = s.flatten(1)
    p, q = s / s.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    return (w * (torch.log2(eps + p) - torch.log2(eps + q))).sum(1) / w.sum(1)


def saliency_metrics(saliency: torch.Tensor, density: torch.Tensor, fixations, *,
                     nonfixations=None, baseline: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Every metric at once: ``{"nss", "cc", "auc_judd", "sauc", "kld", "sim", "ig"}`` -> (B,) tensors.

    ``sauc`` only with ``nonfixations``, ``ig`` only with ``baseline``. KLD, CC and SIM compare
    ``saliency`` with ``density`` (float32, :mod:`rollout_fast.metrics`), the others use ``fixations``
    (float64). ``saliency`` must be >= 0 (KLD, SIM).

    Raises:
        TypeError, ValueError: as the individual metrics.
    """
    out = {"nss": nss(saliency, fixations), "cc": cc(saliency, density),
           "auc_judd": auc_judd(saliency, fixations)}
    if nonfixations is not None:
        out["sauc"] = shuffled_auc(saliency, fixations, nonfixations)
    out["kld"] = kld(saliency, density)
    out["sim"] = sim(saliency, density)
    if baseline is not None:
        out["ig"] = information_gain(saliency, fixations, baseline)
    return out


class SaliencyMetrics:
    """Streaming per-image metrics over a split: ``m.update(saliency, density, counts, index)``, then
    ``m.compute()`` -> ``{name: mean}`` plus ``"images"``; ``m.values`` keeps the per-image values.

    Args:
        total_counts: (H, W) fixation counts summed over every image of the split; an image's shuffled
            negatives are ``total_counts`` minus its own counts (all the other images' fixations).
            None skips sAUC.
        baseline: (H, W) map for information gain (the centre prior in the benchmark); None skips IG.

    Raises (update):
        As :func:`saliency_metrics`; ``counts`` must be the (B, H, W) count maps, not point lists.
    """

    def __init__(self, total_counts: torch.Tensor | None = None, baseline: torch.Tensor | None = None):
        self.total_counts = None if total_counts is None else total_counts.double()
        self.baseline = baseline
        self.values: dict[str, list[torch.Tensor]] = {}

    def update(self, saliency: torch.Tensor, density: torch.Tensor, counts: torch.Tensor) -> None:
        """Add a batch: ``saliency``, ``density`` and ``counts`` all (B, H, W)."""
        if not isinstance(counts, torch.Tensor):
            raise TypeError("counts: expected the (B, H, W) fixation count maps")
        neg = None
        if self.total_counts is not None:
            neg = (self.total_counts.to(counts.device) - counts.double()).clamp_min(0)
        out = saliency_metrics(saliency, density, counts, nonfixations=neg, baseline=self.baseline)
        for k, v in out.items():
            self.values.setdefault(k, []).append(v.double().cpu())

    def compute(self) -> dict[str, float]:
        """Means over every image seen. Raises ValueError when nothing was added."""
        if not self.values:
            raise ValueError("SaliencyMetrics.compute: no batch was added")
        out = {k: float(torch.cat(v).mean()) for k, v in self.values.items()}
        out["images"] = int(sum(len(x) for x in next(iter(self.values.values()))))
        return out


# ----------------------------------------------------------------------------------------- baselines

def fit_centre_gaussian(points: Sequence[torch.Tensor], sizes: Sequence[tuple[int, int]]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit the centre prior: the maximum-likelihood 2-D Gaussian of the fixation positions.

    Positions are taken in image-relative units (``x / W``, ``y / H``, pixel centres at
    ``(c + 0.5) / W``) so that images of different sizes pool; mean and full covariance (ddof 0) of
    all fixations, each fixation weighted equally. (:func:`rollout_fast.metrics.fit_centre_prior`
    fits an isotropic, centred width to maps by CC instead; here the fixations themselves are fitted.)

    Args:
        points: M tensors (N_m, 2) of ``(x, y)`` 0-based pixel coordinates (e.g. the train split's).
        sizes: M ``(H, W)`` image sizes.

    Returns:
        ``(mean, cov)``: (2,) and (2, 2) float64 in image-relative units, order ``(x, y)``.

    Raises:
        ValueError: no images, lengths differ, an image without fixations or a point outside it.
    """
    pts = _points_list(points)
    if len(pts) != len(sizes):
        raise ValueError(f"sizes: {len(sizes)} sizes for {len(pts)} point lists")
    rel = []
    for m, (p, (H, W)) in enumerate(zip(pts, sizes)):
        _check_points(p, (H, W), f"points[{m}]")
        rel.append((p + 0.5) / torch.tensor([W, H], dtype=torch.float64))
    rel = torch.cat(rel)
    mean = rel.mean(0)
    d = rel - mean
    return mean, d.T @ d / rel.shape[0]


def centre_gaussian(mean: torch.Tensor, cov: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The centre prior map: the Gaussian ``(mean, cov)`` of :func:`fit_centre_gaussian` at the pixel
    centres of an (H, W) image, divided by its sum.

    Returns:
        (H, W) float32 summing to 1.

    Raises:
        ValueError: bad ``size``, or ``cov`` not a (2, 2) symmetric positive-definite matrix.
    """
    H, W = size
    mean, cov = torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(cov, dtype=torch.float64)
    if mean.shape != (2,) or cov.shape != (2, 2) or not torch.allclose(cov, cov.T) \
            or not bool((torch.linalg.eigvalsh(cov) > 0).all()):
        raise ValueError("cov: expected a (2, 2) symmetric positive-definite matrix (and mean of shape (2,))")
    x = (torch.arange(W, dtype=torch.float64) + 0.5) / W - mean[0]
    y = (torch.arange(H, dtype=torch.float64) + 0.5) / H - mean[1]
    inv = torch.linalg.inv(cov)
    q = inv[0, 0] * x[None, :] ** 2 + 2 * inv[0, 1] * x[None, :] * y[:, None] + inv[1, 1] * y[:, None] ** 2
    g = torch.exp(-0.5 * q)
    return (g / g.sum()).float()


def mean_fixation_map(densities: torch.Tensor | Iterable[torch.Tensor]) -> torch.Tensor:
    """The mean-map baseline: the average of the training images' fixation densities.

    Args:
        densities: an (M, H, W) tensor (averaged by :func:`rollout_fast.metrics.mean_map`) or an
            iterable of (H, W) or (B, H, W) tensors (streamed in float64, for splits too large to hold).

    Returns:
        (H, W) float32.

    Raises:
        ValueError: nothing given, or maps of different sizes (naming the offending item).
    """
    if isinstance(densities, torch.Tensor):
        return mean_map(densities)
    total, count = None, 0
    for i, d in enumerate(densities):
        d = d.unsqueeze(0) if d.dim() == 2 else d
        if total is None:
            total = torch.zeros(d.shape[1:], dtype=torch.float64)
        if d.dim() != 3 or d.shape[1:] != total.shape:
            raise ValueError(f"densities: item {i} has shape {tuple(d.shape)}, expected (..., {total.shape[0]}, "
                             f"{total.shape[1]})")
        total += d.double().sum(0)
        count += d.shape[0]
    if not count:
        raise ValueError("densities: empty")
    return (total / count).float()

