"""Stratified top-k: keep the best patches of every window of the patch grid first, so the kept tokens cover
the whole image.

Plain top-k by a relevance map keeps the ``k`` best-scored patches; when the map is a few sharp peaks (attention
rollout, a distilled student's prediction), they crowd around the same spots and the pruned model loses the
rest of the image. Stratified top-k tiles the ``(gh, gw)`` patch grid with square windows of side
``w = ceil(sqrt(G / k))`` (about ``k`` windows; those at the bottom and right edges may be smaller), reserves the
best ``q = k // n_windows`` patches of each window, and fills the remaining ``k - reserved`` slots with the best
of the other patches. Where ``q = 0`` (more windows than ``k``, on odd grids) it is plain top-k. This is
stratified sampling (each stratum a window) with the scorer's ranking in place of chance; on the Imagenette
teacher it lifts every scorer at low keep ratios, random selection included (README, "Pruned inference").
"""

from __future__ import annotations

import math

import torch

__all__ = ["stratified_scores", "stratified_windows"]


def stratified_windows(grid: tuple[int, int], k: int) -> tuple[int, int, int]:
    """``(w, n_windows, q)``: the window side, the number of windows and the patches reserved in each, for
    keeping ``k`` of the ``gh x gw`` patches.

    Raises:
        ValueError: ``k`` not in [1, gh * gw], or a grid side below 1.
    """
    gh, gw = (int(g) for g in grid)
    if gh < 1 or gw < 1:
        raise ValueError(f"grid: expected two sides >= 1, got {tuple(grid)}")
    if isinstance(k, bool) or not 1 <= int(k) <= gh * gw:
        raise ValueError(f"k: expected 1 .. {gh * gw} patches, got {k!r}")
    w = math.ceil(math.sqrt(gh * gw / int(k)))
    n = math.ceil(gh / w) * math.ceil(gw / w)
    return w, n, int(k) // n


def stratified_scores(scores: torch.Tensor, grid: tuple[int, int], k: int) -> torch.Tensor:
    """Scores whose plain top-``k`` is the stratified top-``k`` of ``scores`` (module docstring).

    Args:
        scores: (B, G) float patch scores, G = gh * gw in row-major grid order (larger = keep).
        grid: (gh, gw), the patch grid.
        k: patches kept, 1 <= k <= G.

    Returns:
        (B, G) float32 on ``scores``' device: ``G - rank`` (rank 0 = the best score; equal scores ranked by
        patch index, lower first) plus ``G`` for every reserved patch, so any top-k picks the reserved patches
        first and then the best of the rest, without ties.

    Raises:
        ValueError: ``scores`` not (B, gh * gw), or a bad ``grid`` / ``k`` (:func:`stratified_windows`).
    """
    w, n, q = stratified_windows(grid, k)
    gh, gw = (int(g) for g in grid)
    if scores.dim() != 2 or scores.shape[1] != gh * gw:
        raise ValueError(f"scores: expected (B, {gh * gw}) for a {gh}x{gw} grid, got {tuple(scores.shape)}")
    B, G = scores.shape
    order = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices  # (B, G): best first
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(G, device=scores.device).expand(B, G))
    out = (G - rank).to(torch.float32)
    if q == 0:
        return out
    rows = torch.arange(gh, device=scores.device) // w
    cols = torch.arange(gw, device=scores.device) // w
    window = (rows[:, None] * math.ceil(gw / w) + cols[None, :]).reshape(G)  # (G,) window of each patch
    start = torch.bincount(window, minlength=n).cumsum(0) - torch.bincount(window, minlength=n)
    key, perm = torch.sort(window * G + rank, dim=1)  # grouped by window, best first within each
    within = torch.arange(G, device=scores.device) - start[key // G]  # rank inside the window
    reserved = torch.zeros(B, G, dtype=torch.bool, device=scores.device)
    reserved.scatter_(1, perm, within < q)
    return out + G * reserved
