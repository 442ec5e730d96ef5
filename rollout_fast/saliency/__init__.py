"""Human-fixation saliency: OSIE and OSIE-layout datasets, fixation maps, saliency metrics, baselines.

``rollout_fast.saliency.data``: :class:`OSIE` / :class:`FixationDataset` (torchvision-style),
:func:`fixation_counts`, :func:`fixation_density` (Gaussian of one degree, :data:`OSIE_SIGMA_PX`),
the packaged 600/100 split (:func:`load_split`). ``rollout_fast.saliency.metrics``: NSS, CC, AUC-Judd,
shuffled AUC, KLD, SIM and information gain batched on (B, H, W) tensors (Bylinskii et al. 2019), the
uniform, centre-prior and mean-map baselines. Reading the .mat needs scipy
(``pip install 'rollout_fast[saliency]'``).
"""

from .data import (
    OSIE,
    OSIE_DEGREES_PER_PX,
    OSIE_SIGMA_PX,
    OSIE_SIZE,
    SPLIT_FILE,
    FixationDataset,
    Fixations,
    fixation_counts,
    fixation_density,
    load_split,
    make_split,
    read_fixations_mat,
)
from .metrics import (
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

__all__ = [
    "MATLAB_EPS", "OSIE", "OSIE_DEGREES_PER_PX", "OSIE_SIGMA_PX", "OSIE_SIZE", "SPLIT_FILE",
    "FixationDataset", "Fixations", "SaliencyMetrics", "auc_judd", "cc", "centre_gaussian",
    "fit_centre_gaussian", "fixation_counts", "fixation_density", "information_gain", "kld",
    "load_split", "make_split", "mean_fixation_map", "nss", "read_fixations_mat", "saliency_metrics",
    "shuffled_auc", "sim", "uniform_map",
]
