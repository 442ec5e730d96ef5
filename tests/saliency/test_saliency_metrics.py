"""Saliency metrics against fixations: hand-made cases with known values, pysaliency's implementations on
the same maps and fixations, and clear errors."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import rollout_fast.metrics as grid_metrics
from rollout_fast.saliency import (
    MATLAB_EPS,
    SaliencyMetrics,
    auc_judd,
    cc,
    centre_gaussian,
    fit_centre_gaussian,
    information_gain,
    kld,
    mean_fixation_map,
    nss,
    saliency_metrics,
    shuffled_auc,
    sim,
    uniform_map,
)

# pysaliency (float64 numpy) against ours: location metrics are float64 throughout, so they agree to
# rounding; KLD/CC/SIM are rollout_fast.metrics' float32 functions, compared at float32 tolerances.
# IG: ours has eps = 2.2e-16 inside the logs (InfoGain.m), pysaliency none: a difference of eps / (P ln 2).
TOL = {"nss": 1e-12, "auc": 1e-12, "ig": 1e-9, "cc": 2e-6, "sim": 2e-6, "kld_rel": 2e-5}
# pysaliency's AUC_per_image(nonfixations='uniform', thresholds='fixations') counts the fixated pixels
# among the negatives too (MIT's AUC_Judd.m does not): the two differ by O(fixated / pixels).
TOL_AUC_ALL_PIXELS = 5e-3


def m(*rows, b=True):
    x = torch.tensor(rows, dtype=torch.float64)
    return x[None] if b else x


# ------------------------------------------------------------------------------------- hand-made cases

def test_nss_hand_computed():
    s = m([0.0, 0.0], [0.0, 4.0])  # mean 1, population std sqrt(3)
    r3 = math.sqrt(3.0)
    assert nss(s, [torch.tensor([[1.0, 1.0]])]).item() == pytest.approx(r3, abs=1e-12)
    assert nss(s, [torch.tensor([[0.0, 0.0]])]).item() == pytest.approx(-1 / r3, abs=1e-12)
    # points count per fixation (two on pixel (1, 1)); a binary map counts each fixated pixel once
    pts = [torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])]
    assert nss(s, pts).item() == pytest.approx(5 / (3 * r3), abs=1e-12)
    binary = torch.tensor([[[True, False], [False, True]]])
    assert nss(s, binary).item() == pytest.approx(1 / r3, abs=1e-12)
    assert nss(s, binary.double() * torch.tensor([[1.0, 0.0], [0.0, 2.0]])).item() == pytest.approx(5 / (3 * r3))
    assert nss(torch.full((1, 2, 2), 3.0), binary).item() == 0.0  # constant map
    assert nss(s, binary).dtype == torch.float64


def test_nss_is_invariant_to_affine_changes_and_batches():
    g = torch.Generator().manual_seed(1)
    s = torch.rand(3, 7, 9, generator=g, dtype=torch.float64)
    f = torch.rand(3, 7, 9, generator=g) > 0.8
    ref = torch.stack([nss(s[i:i + 1], f[i:i + 1])[0] for i in range(3)])
    torch.testing.assert_close(nss(s, f), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(nss(5 * s + 2, f), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(nss(s.float(), f), ref, rtol=0, atol=1e-5)


def test_auc_judd_hand_computed():
    s = m([4.0, 3.0, 2.0, 1.0])
    # one fixation on the 3: (0,0) -> (1/3, 1) -> (1,1): 1/6 + 2/3
    assert auc_judd(s, torch.tensor([[[0, 1, 0, 0]]])).item() == pytest.approx(5 / 6, abs=1e-12)
    # fixations on 4 and 2: (0,0) (0,1/2) (1/2,1) (1,1): 0.375 + 0.5
    assert auc_judd(s, torch.tensor([[[1, 0, 1, 0]]])).item() == pytest.approx(0.875, abs=1e-12)
    # counts weight the true-positive rate: 1 fixation on 4, 3 on 2: (0,1/4) (1/2,1): 0.3125 + 0.5
    assert auc_judd(s, torch.tensor([[[1.0, 0, 3, 0]]])).item() == pytest.approx(0.8125, abs=1e-12)
    assert auc_judd(s, torch.tensor([[[1, 0, 0, 0]]])).item() == 1.0
    # one fixation on the lowest pixel: its only threshold takes every pixel, (0,0) -> (1,1): chance
    assert auc_judd(s, torch.tensor([[[0, 0, 0, 1]]])).item() == 0.5
    # ties: a constant map is chance
    assert auc_judd(torch.ones(1, 5, 5), torch.eye(5)[None]).item() == 0.5


def test_shuffled_auc_hand_computed():
    s = m([4.0, 3.0, 2.0, 1.0])
    pos = torch.tensor([[[0, 1, 0, 0]]])
    assert shuffled_auc(s, torch.tensor([[[1, 0, 0, 0]]]), torch.tensor([[[0, 1, 0, 1]]])).item() == 1.0
    assert shuffled_auc(s, pos, torch.tensor([[[1, 0, 0, 1]]])).item() == 0.5
    assert shuffled_auc(s, pos, torch.tensor([[[3.0, 0, 0, 1]]])).item() == 0.25  # negatives weighted
    assert shuffled_auc(s, pos, pos).item() == 0.5  # a tie counts one half
    # a (H, W) negative map is shared by the batch; point lists work for both
    s2 = torch.cat([s, s.flip(-1)])
    out = shuffled_auc(s2, [torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 0.0]])], torch.tensor([[0, 0, 0, 1]]))
    assert out.tolist() == [1.0, 0.0]


def test_information_gain_hand_computed():
    uni = torch.ones(1, 2, 2, dtype=torch.float64)
    base = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # 1/2 on the diagonal
    assert information_gain(uni, torch.tensor([[[1, 0], [0, 0]]]), base).item() == pytest.approx(-1.0, abs=1e-12)
    # off the baseline's support: log2(1/4) - log2(eps) = -2 + 52
    assert information_gain(uni, torch.tensor([[[0, 1], [0, 0]]]), base).item() == pytest.approx(50.0, abs=1e-9)
    assert information_gain(uni, torch.tensor([[[0, 1], [0, 0]]]), base, eps=1e-3).item() == pytest.approx(
        math.log2(1e-3 + 0.25) - math.log2(1e-3), abs=1e-12)
    # bits per fixation: mean over fixations, counts weighted
    f = torch.tensor([[[3.0, 1.0], [0.0, 0.0]]])
    assert information_gain(uni, f, base).item() == pytest.approx((3 * -1.0 + 50.0) / 4, abs=1e-9)
    assert information_gain(uni, f, uni[0]).item() == 0.0


def test_distribution_metrics_are_rollout_fast_metrics():
    # same definitions (Bylinskii et al.; MSI-Net's eps): imported, not rewritten
    assert kld is grid_metrics.kld and cc is grid_metrics.cc and sim is grid_metrics.sim
    assert uniform_map is grid_metrics.uniform_map
    p = torch.ones(1, 2, 2)
    q = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    eps = 1e-7
    assert kld(p, q).item() == pytest.approx(math.log(eps + 1 / (eps + 0.25)), rel=1e-6)
    assert kld(p, q, eps=MATLAB_EPS).item() == pytest.approx(math.log(4.0), rel=1e-6)
    assert sim(p, q).item() == pytest.approx(0.25)
    assert cc(torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]), torch.tensor([[[2.0, 4.0], [6.0, 8.0]]])).item() == \
        pytest.approx(1.0)


def test_saliency_metrics_and_streaming():
    s = torch.tensor([[[4.0, 3.0, 2.0, 1.0]]])
    f = torch.tensor([[[0.0, 1.0, 0.0, 0.0]]])
    d = torch.tensor([[[0.0, 1.0, 0.0, 0.0]]])
    out = saliency_metrics(s, d, f, nonfixations=torch.tensor([[1.0, 0, 0, 1]]), baseline=torch.ones(1, 4))
    assert set(out) == {"nss", "cc", "auc_judd", "sauc", "kld", "sim", "ig"}
    assert out["auc_judd"].item() == pytest.approx(5 / 6) and out["sauc"].item() == 0.5
    assert out["sim"].item() == pytest.approx(0.3)
    assert out["ig"].item() == pytest.approx(math.log2(0.3 / 0.25))
    assert set(saliency_metrics(s, d, f)) == {"nss", "cc", "auc_judd", "kld", "sim"}
    # streaming: sAUC's negatives are the split's other fixations (total minus own)
    ev = SaliencyMetrics(total_counts=torch.tensor([[1.0, 1.0, 0.0, 1.0]]), baseline=torch.ones(1, 4))
    ev.update(s, d, f)
    ev.update(s.flip(-1), d, f)
    res = ev.compute()
    assert res["images"] == 2
    assert res["sauc"] == pytest.approx((0.5 + 0.5) / 2)  # 3 vs {4, 1}; 2 vs {1, 4}
    assert res["auc_judd"] == pytest.approx((5 / 6 + 2 / 3) / 2)  # [1, 2, 3, 4] fixated at 2: (2/3, 1)
    with pytest.raises(ValueError, match="no batch"):
        SaliencyMetrics().compute()


# ------------------------------------------------------------------------------------------ baselines

def test_centre_gaussian_fit_and_map():
    # four points symmetric about the centre of a 4 x 4 image: mean at the centre, cov from the spread
    pts = [torch.tensor([[0.5, 1.5], [2.5, 1.5], [1.5, 0.5], [1.5, 2.5]])]
    mean, cov = fit_centre_gaussian(pts, [(4, 4)])
    torch.testing.assert_close(mean, torch.tensor([0.5, 0.5], dtype=torch.float64))
    # relative offsets +-0.25 in one coordinate, 2 of 4 points each: variance 0.25^2 / 2
    torch.testing.assert_close(cov, torch.diag(torch.tensor([0.03125, 0.03125], dtype=torch.float64)))
    g = centre_gaussian(mean, cov, (4, 4))
    assert g.shape == (4, 4) and g.dtype == torch.float32
    assert float(g.sum()) == pytest.approx(1.0)
    torch.testing.assert_close(g, g.flip(0)), torch.testing.assert_close(g, g.T)
    # value ratio between a centre pixel (d^2 = 2 * (1/8)^2) and a corner (2 * (3/8)^2), sigma^2 = 1/32
    assert float(g[1, 1] / g[0, 0]) == pytest.approx(math.exp(0.5 * 32 * 2 * (9 - 1) / 64), rel=1e-5)
    with pytest.raises(ValueError, match="cov"):
        centre_gaussian(mean, torch.zeros(2, 2), (4, 4))


def test_mean_fixation_map_streams_and_reuses_mean_map():
    maps = torch.rand(5, 3, 4)
    torch.testing.assert_close(mean_fixation_map(maps), maps.mean(0))
    torch.testing.assert_close(mean_fixation_map(iter([maps[:2], maps[2], maps[3:]])), maps.mean(0))
    with pytest.raises(ValueError, match="item 1"):
        mean_fixation_map([maps[0], torch.ones(4, 4)])
    with pytest.raises(ValueError, match="empty"):
        mean_fixation_map([])


# ----------------------------------------------------------------------------------------- bad input

def test_errors_name_the_argument():
    s = torch.rand(2, 3, 4)
    with pytest.raises(ValueError, match=r"fixations: map of shape \(2, 4, 3\) does not match"):
        nss(s, torch.ones(2, 4, 3))
    with pytest.raises(ValueError, match="fixations: image 1 of the batch has no fixations"):
        auc_judd(s, torch.stack([torch.ones(3, 4), torch.zeros(3, 4)]))
    with pytest.raises(ValueError, match=r"fixations\[1\]: no fixations"):
        nss(s, [torch.tensor([[0.0, 0.0]]), torch.zeros(0, 2)])
    with pytest.raises(ValueError, match=r"fixations\[0\]: fixation 1 at \(x=3.5, y=0\).*outside the 4 x 3"):
        nss(s, [torch.tensor([[0.0, 0.0], [3.5, 0.0]]), torch.tensor([[0.0, 0.0]])])
    with pytest.raises(ValueError, match="2 point lists for a batch of 1"):
        nss(s[:1], [torch.zeros(1, 2), torch.zeros(1, 2)])
    with pytest.raises(ValueError, match="nonfixations: image 0 of the batch has no fixations"):
        shuffled_auc(s, torch.ones(2, 3, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="baseline: shape"):
        information_gain(s, torch.ones(2, 3, 4), torch.ones(4, 3))
    with pytest.raises(ValueError, match="saliency: must be >= 0"):
        information_gain(s - 1, torch.ones(2, 3, 4), torch.ones(3, 4))
    with pytest.raises(ValueError, match="every pixel of image 0 is fixated"):
        auc_judd(s, torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match=r"saliency: expected a non-empty \(B, H, W\)"):
        nss(s[0], torch.ones(3, 4))
    with pytest.raises(TypeError, match="saliency: expected a floating-point"):
        nss(torch.ones(1, 3, 4, dtype=torch.long), torch.ones(1, 3, 4))
    with pytest.raises(ValueError, match="fixations: counts must be finite and >= 0"):
        nss(s, -torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="pred and target: shapes differ"):  # rollout_fast.metrics' check
        kld(s, torch.rand(2, 4, 3))


# ----------------------------------------------------------------------------------- against pysaliency

def _load_pysaliency():
    """pysaliency's metrics.py and compiled ROC module, loaded from its installation without running its
    package __init__, which imports pkg_resources (gone from setuptools >= 81) and numba/models."""
    spec = importlib.util.find_spec("pysaliency")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pysaliency is not installed (test-only dependency: pip install -e '.[dev]')")
    base = Path(next(iter(spec.submodule_search_locations)))
    mods = {}
    for name, pattern in (("metrics", "metrics.py"), ("roc_cython", "roc_cython*.so")):
        files = sorted(base.glob(pattern))
        if not files:
            pytest.skip(f"pysaliency installation at {base} has no {pattern}")
        s = importlib.util.spec_from_file_location(f"pysaliency.{name}", files[0])
        mod = importlib.util.module_from_spec(s)
        s.loader.exec_module(mod)
        mods[name] = mod
    return mods["metrics"], mods["roc_cython"]


@pytest.fixture(scope="module")
def pysal():
    return _load_pysaliency()


def _cases(n=6, H=45, W=60):
    """Smooth non-negative maps (blurred noise, some with exact zeros and plateaus) and fixations with
    repeats, like real predictions."""
    g = torch.Generator().manual_seed(0)
    k = torch.exp(-torch.arange(-6, 7, dtype=torch.float64) ** 2 / 8)
    out = []
    for i in range(n):
        x = torch.rand(1, 1, H, W, generator=g, dtype=torch.float64)
        x = torch.nn.functional.conv2d(x, k.view(1, 1, 1, -1), padding=(0, 6))
        x = torch.nn.functional.conv2d(x, k.view(1, 1, -1, 1), padding=(6, 0))[0, 0]
        if i % 2:
            x = (x - x.median()).clamp_min(0)  # zeros: ties in the ROC, P_i = 0 in KLD
        if i == 3:
            x = torch.round(x * 4) / 4  # plateaus: many ties
        nfix = 20 + 7 * i
        pts = torch.stack([torch.randint(0, W, (nfix,), generator=g), torch.randint(0, H, (nfix,), generator=g)], 1)
        pts[1] = pts[0]  # a repeated fixation
        y = torch.rand(1, 1, H, W, generator=g, dtype=torch.float64)
        y = torch.nn.functional.conv2d(y, k.view(1, 1, 1, -1), padding=(0, 6))
        y = torch.nn.functional.conv2d(y, k.view(1, 1, -1, 1), padding=(6, 0))[0, 0]
        out.append((x, pts.double(), y))
    return out


def test_against_pysaliency(pysal, monkeypatch):
    pm, roc = pysal
    if not hasattr(np, "trapz"):  # pysaliency's compiled ROC calls np.trapz, removed in NumPy 2.4
        monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)
    cases = _cases()
    H, W = cases[0][0].shape
    sal = torch.stack([c[0] for c in cases])
    pts = [c[1] for c in cases]
    dens = torch.stack([c[2] for c in cases])
    counts = torch.zeros(len(cases), H, W, dtype=torch.float64)
    for b, p in enumerate(pts):
        counts[b].index_put_((p[:, 1].long(), p[:, 0].long()), torch.ones(len(p), dtype=torch.float64), accumulate=True)
    total = counts.sum(0)
    base = (sal.mean(0) + 0.01)

    ours = {"nss": nss(sal, pts), "auc_pts": auc_judd(sal, pts), "auc_bin": auc_judd(sal, counts > 0),
            "sauc": shuffled_auc(sal, pts, total - counts), "ig": information_gain(sal + 1e-3, pts, base),
            "cc": cc(sal, dens), "sim": sim(sal, dens), "kld": kld(sal + 1e-4, dens),
            "kld_mit": kld(sal + 1e-4, dens, eps=MATLAB_EPS)}
    worst = {k: 0.0 for k in ours}
    worst["auc_all_pixels"] = 0.0
    for b in range(len(cases)):
        s = sal[b].numpy()
        xs, ys = pts[b][:, 0].long().numpy(), pts[b][:, 1].long().numpy()
        fixated = counts[b].numpy() > 0
        uniq_y, uniq_x = np.nonzero(fixated)
        others = total - counts[b]
        ny, nx = np.nonzero(others.numpy())
        negatives = np.repeat(s[ny, nx], others.numpy()[ny, nx].astype(int))
        d = dens[b].numpy()
        lp = np.log(pm.convert_saliency_map_to_density(s + 1e-3, minimum_value=0))
        lb = np.log(pm.convert_saliency_map_to_density(base.numpy(), minimum_value=0))
        ref = {
            "nss": pm.NSS(s, xs, ys).mean(),
            "auc_pts": roc.general_roc(s[ys, xs].astype(float), s[~fixated].astype(float), judd=1)[0],
            "auc_bin": roc.general_roc(s[uniq_y, uniq_x].astype(float), s[~fixated].astype(float), judd=1)[0],
            "sauc": roc.general_roc(s[ys, xs].astype(float), negatives.astype(float), judd=0)[0],
            "ig": ((lp[ys, xs] - lb[ys, xs]) / np.log(2)).mean(),  # pysaliency Model.information_gains
            "cc": pm.CC(s, d), "sim": pm.SIM(s, d),
            "kld": pm.image_based_kl_divergence(s + 1e-4, d, minimum_value=0, log_regularization=1e-7,
                                                quotient_regularization=1e-7),
            "kld_mit": pm.MIT_KLDiv(s + 1e-4, d),
        }
        for k, v in ref.items():
            diff = abs(float(ours[k][b]) - float(v))
            worst[k] = max(worst[k], diff / abs(v) if k.startswith("kld") else diff)
        # pysaliency's own AUC_per_image convention: all pixels (fixated included) are negatives
        all_pix = roc.general_roc(s[ys, xs].astype(float), s.ravel().astype(float), judd=1)[0]
        worst["auc_all_pixels"] = max(worst["auc_all_pixels"], abs(float(ours["auc_pts"][b]) - all_pix))
    print("max |ours - pysaliency|:", {k: f"{v:.1e}" for k, v in worst.items()})
    assert worst["nss"] <= TOL["nss"]
    assert worst["auc_pts"] <= TOL["auc"] and worst["auc_bin"] <= TOL["auc"] and worst["sauc"] <= TOL["auc"]
    assert worst["ig"] <= TOL["ig"]
    assert worst["cc"] <= TOL["cc"] and worst["sim"] <= TOL["sim"]
    assert worst["kld"] <= TOL["kld_rel"] and worst["kld_mit"] <= TOL["kld_rel"]
    assert worst["auc_all_pixels"] <= TOL_AUC_ALL_PIXELS
