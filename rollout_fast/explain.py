"""``AttentionRollout``: rollout maps straight from a ViT (timm, Hugging Face, torchvision, open_clip) and images."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .capture import (
    CAPTURES,
    capture_attention,
    capture_attention_grad,
    check_targets,
    describe_model,
)
from .ops import attention_rollout, grad_attention_rollout
from .reference import HEAD_FUSIONS, NORMALIZATIONS
from .reference.rollout import normalize_maps, real_scalar

__all__ = ["AttentionRollout", "RolloutResult"]

FLAT_SPREAD = 1e-4  # (max - min) / max of an unnormalised map below this: the map is flat
_warned_flat = False


def _warn_if_flat(raw: torch.Tensor, has_class_token: bool) -> None:
    """Warn once per process when every gradient-rollout map in ``raw`` (B, gh, gw, unnormalised) is flat."""
    global _warned_flat
    flat = raw.reshape(raw.shape[0], -1)
    hi, lo = flat.amax(dim=1), flat.amin(dim=1)
    if _warned_flat or not bool(((hi - lo) <= FLAT_SPREAD * hi.abs()).all()):
        return
    _warned_flat = True
    why = ("this model has no class token: its logits pool every token alike, so the gradient-weighted "
           "attention is negligible next to the residual identity" if not has_class_token else
           "the gradient-weighted attention is negligible next to the residual identity")
    warnings.warn(f"grad_rollout: the maps are flat (relative spread below {FLAT_SPREAD:g}): {why}. Use plain "
                  "attention rollout (AttentionRollout(model)(images), readout 'mean' for models without a class "
                  "token) instead", UserWarning, stacklevel=3)


class RolloutResult(tuple):
    """``(maps, logits)`` returned by :meth:`AttentionRollout.explain`."""

    __slots__ = ()

    def __new__(cls, maps: torch.Tensor, logits: torch.Tensor):
        return super().__new__(cls, (maps, logits))

    @property
    def maps(self) -> torch.Tensor:
        return self[0]

    @property
    def logits(self) -> torch.Tensor:
        return self[1]


class AttentionRollout:
    """Attention rollout for a timm, Hugging Face, torchvision or open_clip ViT, with fused attention left on.

    ``maps = AttentionRollout(model)(images)`` gives float32 ``(B, gh, gw)`` maps, one value per
    patch token, max-normalised per image (by default). The prefix-token count (class, distillation,
    register tokens) and the patch grid are read from the model and the input size, so distilled DeiT
    (2 prefix tokens), register models, non-224 and non-square inputs all work.

    Capture (``capture='auto'``): each block's SDPA call is answered by a fused attention that also
    returns the head-fused (B, N, N) attention, so rollout costs about one forward pass and never holds
    per-head probabilities: the Triton kernel on CUDA ('fused-triton'), batch-chunked PyTorch elsewhere
    ('fused-chunked'); blocks whose SDPA call cannot be answered fall back to rebuilding the attention
    from q and k ('qk-hooks'). ``info['last_capture']`` and the repr say which path ran. See
    :mod:`rollout_fast.capture`.

    :meth:`grad_rollout` / :meth:`explain_grad` give class-specific gradient rollout (REFERENCE.md
    section 2): ``F_l = relu(mean_h(A_l * dy/dA_l))`` with ``y`` the target logits, head fusion fixed to
    that (``head_fusion`` applies to plain rollout only), ``F[0, 0]`` not protected from the discard.

    The model is not changed: temporary hooks only, run in eval mode, every module's train/eval flag
    restored; outputs, modules, hooks and parameters (and their ``.grad``) are as before.

    Threads: one model (and one explainer) may be used from several threads at once; every call is correct
    and the model is left exactly as it was, because calls on one model are serialised (a lock per attention
    module, held for the forward pass); other threads' plain forwards of the model are not tapped.

    Args:
        model: a timm ViT-family model: ``VisionTransformer`` (vit_*, deit_*, register, q/k-norm,
            LayerScale, GAP models), relative-position ViTs (vit_relpos_*) and BEiT (their bias is in the
            captured softmax), EVA/EVA02 and RoPE ViTs (q, k after the rotation); a Hugging Face ViT, DeiT,
            Dinov2 (registers), BEiT, CLIP / SigLIP vision model with any attention implementation (SDPA or
            eager; logits from ``ModelOutput.logits`` where there is a classifier, else the output itself);
            a torchvision ``VisionTransformer`` (vit_b_16 ...); an open_clip image tower (``clip.visual``).
            See :func:`rollout_fast.capture.describe_model`.
        head_fusion: 'mean' | 'max' | 'min' over heads.
        discard_ratio: fraction in [0, 1) of each fused attention matrix to discard per image.
        readout: 'cls' | 'mean' | None (None: 'cls' if the model has a class token, else 'mean').
        normalize: 'max' | 'minmax' | None, per image.
        backend: rollout backend, see :func:`rollout_fast.available_backends`.
        capture: 'auto' | 'fused-triton' | 'fused-chunked' | 'qk-hooks' (see
            :func:`rollout_fast.capture.resolve_capture`).

    Raises:
        rollout_fast.capture.UnsupportedModelError (a TypeError): the model is not a supported ViT.
        ValueError: bad ``head_fusion``, ``discard_ratio``, ``readout``, ``normalize`` or ``capture``.

    Source: Abnar & Zuidema 2020 (attention rollout); jacobgil/vit-explain (head fusion, discard ratio,
    gradient rollout).
    """

    def __init__(self, model: nn.Module, head_fusion: str = "mean", discard_ratio: float = 0.0,
                 readout: str | None = None, normalize: str | None = "max", backend: str = "auto",
                 capture: str = "auto"):
        spec = describe_model(model)  # fail early on unsupported models
        if head_fusion not in HEAD_FUSIONS:
            raise ValueError(f"head_fusion: expected one of {HEAD_FUSIONS}, got {head_fusion!r}")
        try:
            discard_ratio = real_scalar(discard_ratio, "discard_ratio", "a float in [0, 1)")
        except TypeError as e:
            raise ValueError(str(e)) from None
        if not 0.0 <= discard_ratio < 1.0:
            raise ValueError(f"discard_ratio: expected a float in [0, 1), got {discard_ratio!r}")
        if readout not in ("cls", "mean", None):
            raise ValueError(f"readout: expected 'cls', 'mean' or None, got {readout!r}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize: expected one of {NORMALIZATIONS}, got {normalize!r}")
        if readout == "cls" and not spec.has_class_token:
            raise ValueError("readout: 'cls' needs a model with a class token; use 'mean'")
        if capture not in CAPTURES:
            raise ValueError(f"capture: expected one of {CAPTURES}, got {capture!r}")
        self.model = model
        self.head_fusion = head_fusion
        self.discard_ratio = float(discard_ratio)
        self.readout = readout or ("cls" if spec.has_class_token else "mean")
        self._spec = spec
        self.normalize = normalize
        self.backend = backend
        self.capture = capture
        self.last_capture: str | None = None
        self.last_layer_captures: tuple[str, ...] = ()

    @property
    def info(self) -> dict:
        """Settings and what ran: ``capture`` (requested), ``last_capture`` (the path of the last call:
        'fused-triton' | 'fused-chunked' | 'qk-hooks', '+'-joined when blocks differed; for
        :meth:`grad_rollout` 'grad:sdpa-explicit' or 'grad:attn-drop'; None before the first call),
        ``last_layer_captures`` (per block), ``backend``, ``head_fusion``, ``discard_ratio``,
        ``readout``, ``normalize``."""
        return {"capture": self.capture, "last_capture": self.last_capture,
                "last_layer_captures": self.last_layer_captures, "backend": self.backend,
                "head_fusion": self.head_fusion, "discard_ratio": self.discard_ratio,
                "readout": self.readout, "normalize": self.normalize}

    def __repr__(self) -> str:
        return (f"AttentionRollout(model={type(self.model).__name__}, head_fusion={self.head_fusion!r}, "
                f"discard_ratio={self.discard_ratio}, readout={self.readout!r}, "
                f"normalize={self.normalize!r}, backend={self.backend!r}, capture={self.capture!r}, "
                f"last_capture={self.last_capture!r})")

    def _layout(self, images):
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError("images: expected a (B, C, H, W) tensor")
        return self._spec.layout(tuple(images.shape[-2:]))

    @staticmethod
    def _check_tokens(N: int, layout) -> None:
        if N != layout.num_tokens:
            raise ValueError(f"model: captured {N} tokens, expected {layout.num_prefix_tokens} prefix + "
                             f"{layout.grid[0]}x{layout.grid[1]} patch tokens")

    @torch.no_grad()
    def explain(self, images: torch.Tensor) -> RolloutResult:
        """One forward pass: ``(maps (B, gh, gw) float32, logits)`` for ``images`` (B, 3, H, W).

        Raises:
            ValueError: ``images`` is not a (B, C, H, W) tensor of the model's input size; ``capture``
                names a path that cannot run on the images' device.
        """
        layout = self._layout(images)
        result = capture_attention(self.model, images, head_fusion=self.head_fusion, capture=self.capture)
        output, attention = result
        logits = self._spec.logits(output)
        self.last_capture, self.last_layer_captures = result.path, result.layer_paths
        self._check_tokens(attention.shape[-1], layout)
        # Attention is already head-fused (H = 1): fusion over one head is the identity for every mode.
        # Rows of a max- or min-fused matrix do not sum to 1 (the row normalisation follows in the op); nor, at
        # float32 tolerance, do rows computed in bfloat16 / float16 (autocast, half models): checked for float32.
        exact = result.source_dtypes <= {torch.float32, torch.float64}
        maps = attention_rollout(attention, head_fusion="mean", discard_ratio=self.discard_ratio,
                                 num_prefix_tokens=layout.num_prefix_tokens, grid=layout.grid,
                                 readout=self.readout, normalize=self.normalize, backend=self.backend,
                                 check_rows=self.head_fusion == "mean" and exact)
        return RolloutResult(maps, logits)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Rollout maps ``(B, gh, gw)`` float32 for ``images`` (B, 3, H, W) on the model's device."""
        return self.explain(images).maps

    def explain_grad(self, images: torch.Tensor, targets=None) -> RolloutResult:
        """Class-specific gradient rollout: ``(maps (B, gh, gw) float32, logits (B, C))``.

        One forward and one backward pass (to the attention only; parameter ``.grad`` untouched).

        Args:
            images: (B, 3, H, W) on the model's device.
            targets: None (each image's predicted class), an int class for every image, or an int
                sequence / integer tensor of shape (B,), one class per image.

        Raises:
            ValueError: bad ``images``; ``targets`` of the wrong shape or outside [0, num_classes).
            TypeError: ``targets`` not integers.

        Warns:
            UserWarning (once): the gradient-weighted attention is negligible next to the residual identity,
            so the maps are flat (relative spread below 1e-4); typical of models without a class token
            (global average pooling, SigLIP) and of untrained models.

        Source: REFERENCE.md section 2 (jacobgil/vit-explain's grad rollout with its layer order fixed).
        """
        layout = self._layout(images)
        check_targets(targets, images.shape[0])  # type and shape before the forward pass
        cap = capture_attention_grad(self.model, images, targets)
        self.last_capture = f"grad:{cap.path}"
        self.last_layer_captures = ()
        self._check_tokens(cap.attentions.shape[-1], layout)
        # The captured rows are probabilities already checked at capture (a float32 softmax, or the model's own
        # probabilities read at attn_drop / softmax and checked at their dtype's tolerance, bf16 included).
        raw = grad_attention_rollout(cap.attentions, cap.gradients, discard_ratio=self.discard_ratio,
                                     num_prefix_tokens=layout.num_prefix_tokens, grid=layout.grid,
                                     readout=self.readout, normalize=None, backend=self.backend,
                                     check_rows=False)
        _warn_if_flat(raw, layout.has_class_token)
        return RolloutResult(normalize_maps(raw, self.normalize), cap.output)

    def grad_rollout(self, images: torch.Tensor, targets=None) -> torch.Tensor:
        """Gradient rollout maps ``(B, gh, gw)`` float32; see :meth:`explain_grad`."""
        return self.explain_grad(images, targets).maps
