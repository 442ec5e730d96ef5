"""Distillation: train a student (:mod:`rollout_fast.students`) to predict a teacher's rollout maps.

``rollout-fast distill --teacher cifar10-vit --student resnet-cifar --strategy lowres --factor 2
--data ../shared/data/cifar10 --out runs/NAME`` (or :func:`distill` from Python).

Recipe (the seeds', REFERENCE.md section 5, made reproducible):

- Targets: the frozen teacher (eval mode) gives attention-rollout maps through
  :class:`rollout_fast.AttentionRollout` (the fused rollout op; ``target='grad-rollout'``: its
  class-specific gradient rollout for the teacher's predicted class, Chefer et al. 2021 as in
  REFERENCE.md section 2, which selects tokens for pruning far better), on the *same augmented images* the
  student sees: computed on the fly per batch, or with ``cache_targets`` precomputed once for
  ``views`` augmented copies of the training set (view 0 unaugmented) and reused, which makes CPU
  training affordable. Augmentation = random translation by up to ``max_shift`` pixels (border filled
  with the mean colour) and horizontal flip, drawn per (seed, view, image) so every process and every
  resumed run sees exactly the same images and targets.
- Two phases as in the seeds: ``head_epochs`` with the backbone frozen (eval mode) training a fresh map
  head at ``lr``, then ``epochs`` training everything at ``lr * finetune_lr_scale`` (seeds: 1e-3 then
  1e-4). AdamW, per-phase linear warm-up + cosine decay, bf16 autocast, tqdm, a CSV log (and
  TensorBoard when installed), an atomic checkpoint each epoch (``resume`` loses at most the epoch in
  progress), a seed, and a final ``metrics.json``.
- Losses (``loss``): 'kld' (default): KL divergence between the teacher map normalised to sum 1 and
  the student's softmax over the grid; 'bce': binary cross-entropy between the student's sigmoid and
  the max-normalised teacher map (seed: DeiT student); 'mse': mean squared error of the same
  (seed: ResNet student).
- Multi-GPU / multi-node: run under ``torchrun``; each process trains on its
  ``DistributedSampler`` shard with ``batch_size / world_size`` images and DistributedDataParallel
  averages gradients, so N processes train the same model as one process with the same global batch
  (BatchNorm statistics are per process unless on CUDA, where convnets use SyncBatchNorm).
- Evaluation (rank 0): :mod:`rollout_fast.metrics` on the test split against the teacher's maps,
  next to the centre-prior, mean-map and uniform baselines, plus the object-placement test (every
  test image shifted diagonally by ``placement_shift`` pixels, objects leave the centre: the student
  must keep agreeing with the teacher's rollout of the shifted image), and the cost of student and
  teacher (parameters, multiply-adds, latency).

Data: the ImageFolder splits ``DATA/train`` and ``DATA/<test_split>`` (``test``; ``val`` for Imagenette) are
decoded once into memory as uint8 at the teacher's input size (timm's eval transform: resize to
``H / crop_pct``, centre crop) and cached under ``cache_dir``; fine for CIFAR- and Imagenette-sized data.

Saliency (:func:`distill_saliency`, :class:`SaliencyConfig`; :mod:`.saliency`): the same loop trains a saliency
encoder-decoder on human fixation densities (dense pixel targets), model B with a second head matched to a
saliency teacher's maps (seed 004).

Modules: :mod:`.config` (:class:`DistillConfig`), :mod:`.data` (decoding, augmentation views),
:mod:`.targets` (the teacher's maps and their cache), :mod:`.loop` (the loop over a task: loss, training,
checkpoints; :mod:`.rollout_task` the rollout student's task),
:mod:`.report` (final metrics, baselines, cost, card), :mod:`.ddp` (torchrun set-up), :mod:`.api`
(:func:`distill`); ``python -m rollout_fast.distill`` (:mod:`.__main__`) is the torchrun entry point.
Progress goes through tqdm and the ``rollout_fast.distill`` logger.
"""

from __future__ import annotations

from .api import distill
from .config import LOSSES, TARGETS, DistillConfig
from .data import load_split_tensor, placement_params, view_params
from .ddp import shutdown_distributed
from .loop import distill_loss
from .saliency import SaliencyConfig, distill_saliency

__all__ = ["LOSSES", "TARGETS", "DistillConfig", "SaliencyConfig", "distill", "distill_loss", "distill_saliency",
           "load_split_tensor", "placement_params", "shutdown_distributed", "view_params"]
