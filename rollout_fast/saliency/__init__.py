"""Human-fixation saliency: OSIE and OSIE-layout datasets, fixation maps, saliency metrics, baselines.

``rollout_fast.saliency.data``: :class:`OSIE` / :class:`FixationDataset` (torchvision-style),
:func:`fixation_counts`, :func:`fixation_density` (Gaussian of one degree, :data:`OSIE_SIGMA_PX`),
the packaged 600/100 split (:func:`load_split`). ``rollout_fast.saliency.metrics``: NSS, CC, AUC-Judd,
shuffled AUC, KLD, SIM and information gain batched on (B, H, W) tensors (Bylinskii et al. 2019), the
uniform, centre-prior and mean-map baselines. ``rollout_fast.saliency.models``: :class:`SaliencyNet`
(ResNet encoder-decoder to full-resolution log-probability maps, one or two heads; seed 004),
:func:`create_saliency_model`, :func:`load_saliency_model`. ``.prepare``: stimuli and densities at a model's
input size, training flips. ``.sources`` / ``.evaluate``: every map source (baselines, saliency models, ViT
rollout, LTPA) scored against fixations (``rollout-fast saliency-eval``). Training:
:func:`rollout_fast.distill.distill_saliency`. Reading the .mat needs scipy (``pip install 'rollout_fast[saliency]'``).
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
from .evaluate import evaluate_saliency, validation_metrics
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
from .models import (
    SALIENCY_MODELS,
    SaliencyNet,
    create_saliency_model,
    load_saliency_model,
    save_saliency_model,
)

__all__ = [
    "MATLAB_EPS",
    "OSIE",
    "OSIE_DEGREES_PER_PX",
    "OSIE_SIGMA_PX",
    "OSIE_SIZE",
    "SALIENCY_MODELS",
    "SPLIT_FILE",
    "FixationDataset",
    "Fixations",
    "SaliencyMetrics",
    "SaliencyNet",
    "auc_judd",
    "cc",
    "centre_gaussian",
    "create_saliency_model",
    "evaluate_saliency",
    "fit_centre_gaussian",
    "fixation_counts",
    "fixation_density",
    "information_gain",
    "kld",
    "load_saliency_model",
    "load_split",
    "make_split",
    "mean_fixation_map",
    "nss",
    "read_fixations_mat",
    "saliency_metrics",
    "save_saliency_model",
    "shuffled_auc",
    "sim",
    "uniform_map",
    "validation_metrics",
]
