"""Saliency encoder-decoders: a timm ResNet encoder + an upsampling decoder to a full-resolution map, with one
saliency head (model A, the teacher) or a second head matched to a teacher's map (model B).

Source: seed 004 (../shared/seeds, REFERENCE.md section 9), "Saliency detection using knowledge
distillation": the student is a ResNet18 backbone whose last residual block feeds "a series of UpScale2D and
Convolution2D layers" up to the input resolution; model B branches the decoder's last layer into two outputs,
a saliency map and a map matched to the teacher's (MSI-Net in the seed; Kroner et al., "Contextual
encoder-decoder network for visual saliency prediction", Neural Networks 2020). MSI-Net cannot be downloaded
here, so the teacher is a larger model of the same family trained on the same data (``resnet50`` encoder,
wider decoder: :data:`TEACHER_SPEC`).

Architecture (:class:`SaliencyNet`): ``encoder`` = timm ``resnet18`` / ``resnet34`` / ``resnet50`` without
pooling and classifier (stride 32; He et al., CVPR 2016); ``decoder`` = 5 x (nearest upsampling x2, 3x3
conv), the first four each followed by BatchNorm + ReLU and shared by the heads, the fifth's conv being the
head itself (1 output channel; model B has two such heads on the same upsampled features). Nearest
upsampling is Keras' ``UpSampling2D`` default, the seed's layer. Inputs whose sides are not multiples of 32
are padded symmetrically with zeros (the mean colour after normalisation) and the output is cropped back, so
a map pixel is exactly an input pixel (240 x 320, the seed's and MSI-Net's SALICON size, runs as 256 x 320).

Output: log-probability maps (B, H, W) float32, a spatial log-softmax per image (``exp`` sums to 1 over
the pixels): what the KLD loss compares with a fixation density.

Weights: ``pretrained=True`` loads timm's ImageNet weights into the encoder (needs internet); ``init_from=PATH``
loads an encoder from a local classifier checkpoint holding a timm ResNet state dict of the same depth
(safetensors, or a torch file read with ``weights_only=True``; the classifier's ``fc.*`` is dropped).
The project's own such checkpoint: ``rollout-fast train-teacher --recipe imagenette-resnet18 --data
../shared/data/imagenette --out runs/imagenette-resnet18`` (a timm ResNet18 classifier of the Imagenette
photographs, arch type ``"timm"`` of :func:`rollout_fast.models.create_model`), then
``init_from=runs/imagenette-resnet18/teacher.safetensors``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["ENCODERS", "SALIENCY_MODELS", "STUDENT_SPEC", "TEACHER_SPEC", "SaliencyNet", "create_saliency_model",
           "load_saliency_model", "save_saliency_model"]

ENCODERS = ("resnet18", "resnet34", "resnet50")
STRIDE = 32  # the encoder's output stride: 5 halvings, undone by the 5 upsamplings
STUDENT_SPEC = {"encoder": "resnet18", "decoder": [256, 128, 64, 32], "heads": 1, "input_size": [240, 320]}
"""Model A (``heads=2``: model B): ResNet18 encoder, decoder widths 256-128-64-32, then the head(s)."""
TEACHER_SPEC = {"encoder": "resnet50", "decoder": [512, 256, 128, 64], "heads": 1, "input_size": [240, 320]}
"""The saliency teacher: ResNet50 encoder (2048 channels at stride 32), decoder widths 512-256-128-64."""

# the one assets folder of the package (rollout_fast.zoo.ASSETS); shipped saliency models by name
_ASSETS = Path(__file__).resolve().parent.parent / "assets"
SALIENCY_MODELS = {"osie-resnet18": _ASSETS / "osie-resnet18"}


def _check_spec(spec: dict) -> dict:
    """A complete, JSON-serialisable spec; ValueError naming the first bad key."""
    if not isinstance(spec, dict):
        raise TypeError(f"spec: expected a dict, got {type(spec).__name__}")
    unknown = set(spec) - {"encoder", "decoder", "heads", "input_size", "mean", "std"}
    if unknown:
        raise ValueError(f"spec: unknown keys {sorted(unknown)}")
    out = {**STUDENT_SPEC, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), **spec}
    if out["encoder"] not in ENCODERS:
        raise ValueError(f"encoder: expected one of {ENCODERS}, got {out['encoder']!r}")
    dec = out["decoder"]
    if not (isinstance(dec, (list, tuple)) and len(dec) == 4
            and all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in dec)):
        raise ValueError(f"decoder: expected four positive channel counts, got {dec!r}")
    if out["heads"] not in (1, 2) or isinstance(out["heads"], bool):
        raise ValueError(f"heads: expected 1 (model A, teacher) or 2 (model B), got {out['heads']!r}")
    size = out["input_size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ValueError(f"input_size: expected (H, W) positive ints, got {size!r}")
    for k in ("mean", "std"):
        if len(out[k]) != 3:
            raise ValueError(f"{k}: expected 3 values, got {out[k]!r}")
    return {**out, "decoder": [int(c) for c in dec], "input_size": [int(s) for s in size],
            "mean": [float(v) for v in out["mean"]], "std": [float(v) for v in out["std"]]}


class SaliencyNet(nn.Module):
    """ResNet encoder + 5-stage upsampling decoder + 1 or 2 heads -> (B, H, W) log-probability maps.

    ``net(x)``: ``x`` (B, 3, H, W) float, normalised with ``spec["mean"]``/``spec["std"]`` (ImageNet's), any
    H, W (trained at ``spec["input_size"]``) -> the saliency head's log-probabilities (B, H, W) float32,
    ``logsumexp`` over each map = 0. ``net(x, heads="all")`` -> a tuple, one map per head (model B: the
    saliency map, then the map matched to the teacher's). ``net.predict(x)`` -> probabilities (no grad).

    Attributes: ``spec`` (the JSON-serialisable recipe that rebuilds it), ``encoder`` (timm ResNet),
    ``decoder`` (the shared stages), ``heads`` (ModuleList of 3x3 convs to one channel).

    Raises (on call):
        TypeError: ``x`` not a floating-point tensor. ValueError: ``x`` not (B, 3, H, W), or unknown ``heads``.
    """

    def __init__(self, spec: dict, *, pretrained: bool = False):
        import timm

        super().__init__()
        self.spec = _check_spec(spec)
        self.encoder = timm.create_model(self.spec["encoder"], pretrained=pretrained, num_classes=0,
                                         global_pool="")
        layers, c = [], self.encoder.num_features
        for w in self.spec["decoder"]:
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, w, 3, padding=1, bias=False),
                       nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c = w
        self.decoder = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 3, padding=1) for _ in range(self.spec["heads"]))

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.spec["input_size"])

    def extra_repr(self) -> str:
        s = self.spec
        return f"encoder={s['encoder']!r}, decoder={s['decoder']}, heads={s['heads']}, input_size={self.input_size}"

    def forward(self, x: torch.Tensor, heads: str = "saliency"):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor, got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x: expected (B, 3, H, W) images, got shape {tuple(x.shape)}")
        if heads not in ("saliency", "all"):
            raise ValueError(f"heads: expected 'saliency' or 'all', got {heads!r}")
        H, W = x.shape[-2:]
        ph, pw = -H % STRIDE, -W % STRIDE
        if ph or pw:
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        f = F.interpolate(self.decoder(self.encoder.forward_features(x)), scale_factor=2, mode="nearest")
        outs = []
        for head in self.heads if heads == "all" else self.heads[:1]:
            z = head(f)[:, 0, ph // 2:ph // 2 + H, pw // 2:pw // 2 + W].float()
            outs.append(z.flatten(1).log_softmax(dim=1).view(z.shape))
        return tuple(outs) if heads == "all" else outs[0]

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Saliency probabilities (B, H, W) float32 summing to 1 per image (eval mode; the mode is restored)."""
        was = self.training
        self.eval()
        try:
            return self(x).exp()
        finally:
            self.train(was)

    def head_parameters(self) -> list[nn.Parameter]:
        """Decoder and heads (the distillation loop's 'head' phase trains only these)."""
        return [*self.decoder.parameters(), *self.heads.parameters()]

    def backbone_modules(self) -> nn.Module:
        """The encoder (frozen and in eval mode during a 'head' phase)."""
        return self.encoder


def _encoder_state(path: str | os.PathLike, encoder: nn.Module) -> dict:
    """The encoder's tensors from a classifier checkpoint: keys as timm's ResNet, or under ``encoder.`` (a
    :class:`SaliencyNet`) or ``module.`` (DDP); the classifier (``fc.*``) dropped."""
    from ..checkpoint import load_weights

    state = load_weights(path)
    for prefix in ("module.", "encoder."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    want = encoder.state_dict()
    missing = [k for k in want if k not in state]
    wrong = [k for k in want if k in state and state[k].shape != want[k].shape]
    extra = [k for k in state if k not in want and not k.startswith("fc.")]
    if missing or wrong or extra:
        raise ValueError(f"init_from: {str(path)!r} is not a timm {type(encoder).__name__} of this depth: "
                         f"{len(missing)} encoder tensors missing (first: {missing[:3]}), {len(wrong)} of another "
                         f"shape (first: {wrong[:3]}), {len(extra)} unexpected (first: {extra[:3]})")
    return {k: state[k] for k in want}


def create_saliency_model(spec: dict | None = None, *, pretrained: bool = False,
                          init_from: str | os.PathLike | None = None, **overrides) -> SaliencyNet:
    """Build a :class:`SaliencyNet` (train mode, CPU).

    Args:
        spec: keys ``encoder`` ('resnet18' | 'resnet34' | 'resnet50'), ``decoder`` (four channel counts),
            ``heads`` (1 or 2), ``input_size`` ((H, W) it is trained at), ``mean``/``std``; missing keys from
            :data:`STUDENT_SPEC` (model A). ``overrides`` update ``spec`` (e.g. ``heads=2`` for model B).
        pretrained: timm's ImageNet weights for the encoder (needs internet).
        init_from: a local classifier checkpoint with a timm ResNet state dict of the same depth.

    Raises:
        ValueError: a bad spec key or value (named); ``pretrained`` with ``init_from``; ``init_from`` not a
            matching ResNet (missing or mis-shaped tensors counted and named) or unreadable.
        FileNotFoundError: ``init_from`` does not exist.
    """
    if pretrained and init_from is not None:
        raise ValueError("init_from: give pretrained or init_from, not both")
    net = SaliencyNet({**(spec or {}), **overrides}, pretrained=pretrained)
    if init_from is not None:
        net.encoder.load_state_dict(_encoder_state(init_from, net.encoder), strict=True)
    return net


def save_saliency_model(path: str | os.PathLike, model: SaliencyNet, card: dict) -> tuple[Path, Path]:
    """Write ``model`` as safetensors at ``path`` and ``card`` + its spec (``card["model"]``) as JSON beside it
    (both atomic). :func:`load_saliency_model` reads them back. Returns ``(weights_path, card_path)``."""
    from ..checkpoint import save_weights, write_json

    path = Path(path)
    w = save_weights(path, model.state_dict(), {"card": path.with_suffix(".json").name})
    return w, write_json(path.with_suffix(".json"), {**card, "model": model.spec})


def load_saliency_model(name: str | os.PathLike = "osie-resnet18", *, device: str | torch.device = "cpu"
                        ) -> tuple[SaliencyNet, dict]:
    """Load a shipped or saved saliency model in eval mode, offline (safetensors, or a torch file read with
    ``weights_only=True``: no pickled code runs).

    Args:
        name: a shipped model (:data:`SALIENCY_MODELS`: ``"osie-resnet18"``, once
            ``python/train_saliency.py --install`` has put it in ``rollout_fast/assets``), or a path to a
            ``.safetensors`` with its ``.json`` card beside it (as written by
            :func:`rollout_fast.distill.distill_saliency`).

    Returns:
        ``(model, card)``; ``card["model"]`` is the spec, ``card["metrics"]`` the validation metrics.

    Raises:
        FileNotFoundError: the file, its card or the shipped asset is missing. ValueError: an unknown name,
            a card without a model spec, or weights that do not match it.
    """
    from ..checkpoint import load_weights

    key = str(name)
    if key in SALIENCY_MODELS:
        weights = SALIENCY_MODELS[key].with_suffix(".safetensors")
        if not weights.is_file():
            raise FileNotFoundError(f"saliency model {key!r} is not shipped yet (no {weights}); train it with "
                                    "python python/train_saliency.py --install")
    elif key.endswith((".safetensors", ".pt", ".pth")) or os.sep in key:
        weights = Path(key)
        if not weights.is_file():
            raise FileNotFoundError(f"saliency model: no file at {key!r}")
    else:
        raise ValueError(f"saliency model: {key!r} is neither a shipped model {sorted(SALIENCY_MODELS)} nor a "
                         "path to a .safetensors file")
    card_path = weights.with_suffix(".json")
    if not card_path.is_file():
        raise FileNotFoundError(f"saliency model: card {card_path} missing beside {weights}")
    card = json.loads(card_path.read_text())
    if not isinstance(card.get("model"), dict):
        raise ValueError(f"saliency model: {card_path} has no 'model' spec")  # noqa: TRY004 (file content)
    model = SaliencyNet(card["model"])
    try:
        model.load_state_dict(load_weights(weights), strict=True)
    except RuntimeError as e:
        raise ValueError(f"saliency model: {str(weights)!r} does not match its card's spec: "
                         f"{' '.join(str(e).split())[:300]}") from e
    return model.to(device).eval(), card
