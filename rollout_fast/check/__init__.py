"""A self-check users can run on their own ViT: is rollout_fast's captured attention the model's own?

``rollout_fast.check_model(model)`` captures one batch both ways, through the fast capture (what
:class:`rollout_fast.AttentionRollout` uses) and through the model library's own explicit attention on a
deep copy (timm with ``fused_attn=False`` read at ``attn_drop``; Hugging Face with
``attn_implementation="eager"`` and ``output_attentions=True``; ``nn.MultiheadAttention`` with
``need_weights=True, average_attn_weights=False``), and reports the per-layer maximum difference of the
head-averaged attention, the capture path, prefix tokens, patch grid and whether pruning is supported.

Command line (random initialisation, offline; ``--pretrained`` loads weights where they are available)::

    python -m rollout_fast.check vit_small_patch16_224            # a timm model name
    python -m rollout_fast.check facebook/deit-tiny-patch16-224   # a Hugging Face id or local folder
    python -m rollout_fast.check torchvision:vit_b_16             # a torchvision builder
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass

import torch
from torch import nn

from ..capture import UnsupportedModelError, capture_attention, describe_model
from ..capture.families import default_input_size

__all__ = ["ModelCheck", "check_model", "eager_attention", "load_model", "main"]

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@dataclass
class ModelCheck:
    """What :func:`check_model` measured.

    ``layer_errors``: per layer, the max |fast - eager| of the head-averaged (B, N, N) attention (float32);
    ``output_error``: max |output - plain forward output| of the tensor the forward returns (logits, or
    the last hidden state); ``tolerance``: the bound for the model's dtype (1e-5 for float32); ``ok``: every
    error within it.
    """

    model: str
    family: str
    path: str
    num_prefix_tokens: int
    grid: tuple[int, int]
    has_class_token: bool
    layer_errors: list[float]
    output_error: float
    tolerance: float
    prunable: bool
    prune_note: str

    @property
    def max_error(self) -> float:
        return max(self.layer_errors) if self.layer_errors else 0.0

    @property
    def ok(self) -> bool:
        return self.max_error <= self.tolerance and self.output_error <= max(self.tolerance, 1e-4)

    def table(self) -> str:
        """A plain-text report (what ``python -m rollout_fast.check`` prints)."""
        rows = [f"model            {self.model} ({self.family})",
                f"capture path     {self.path}",
                f"prefix tokens    {self.num_prefix_tokens}" + (" (class token first)" if self.has_class_token
                                                                 else " (no class token)"),
                f"patch grid       {self.grid[0]} x {self.grid[1]}",
                f"output error     {self.output_error:.2e}",
                f"pruning          {'supported' if self.prunable else 'refused: ' + self.prune_note}",
                "layer  max |fast - eager| (head-mean attention)"]
        rows += [f"{i:>5}  {e:.2e}" for i, e in enumerate(self.layer_errors)]
        rows.append(f"result           {'OK' if self.ok else 'MISMATCH'} (tolerance {self.tolerance:g})")
        return "\n".join(rows)


def _main_tensor(spec, output) -> torch.Tensor:
    out = spec.logits(output)
    if isinstance(out, torch.Tensor):
        return out
    for key in ("last_hidden_state", "pooler_output"):
        if isinstance(getattr(out, key, None), torch.Tensor):
            return getattr(out, key)
    raise UnsupportedModelError(f"model: its forward returned {type(out).__name__}, not a tensor or ModelOutput")


@torch.no_grad()
def eager_attention(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Per-head attention ``(L, B, H, N, N)`` float32 from the model library's own explicit path, on a deep copy
    of ``model`` in eval mode (``model`` itself is not touched).

    timm: ``fused_attn=False``, read at ``attn_drop``; Hugging Face: ``attn_implementation="eager"`` with
    ``output_attentions=True``; torchvision / open_clip: ``nn.MultiheadAttention`` called with
    ``need_weights=True, average_attn_weights=False``.

    Raises:
        UnsupportedModelError: ``model`` is not a supported ViT.
    """
    spec = describe_model(model)
    twin = copy.deepcopy(model).eval()
    got: list[torch.Tensor] = []
    if spec.family == "timm":
        for attn in describe_model(twin).attentions:
            attn.fused_attn = False
            attn.attn_drop.register_forward_hook(lambda m, a, out: got.append(out.float()))
        twin(images)
    elif spec.family == "transformers":
        if hasattr(twin, "set_attn_implementation"):
            twin.set_attn_implementation("eager")
        else:  # older transformers
            twin.config._attn_implementation = "eager"
        got = [a.float() for a in twin(pixel_values=images, output_attentions=True).attentions]
    else:
        def pre(module, args, kwargs):
            return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

        def post(module, args, out):
            got.append(out[1].float())
            return out[0], None
        for mha in describe_model(twin).attentions:
            mha.register_forward_pre_hook(pre, with_kwargs=True)
            mha.register_forward_hook(post)
        twin(images)
    if len(got) != len(spec.attentions):
        raise UnsupportedModelError(f"model: the explicit path gave {len(got)} attention maps for "
                                    f"{len(spec.attentions)} blocks")
    return torch.stack(got)


def _prune_support(model: nn.Module) -> tuple[bool, str]:
    from ..prune import prune_tokens
    try:
        prune_tokens(model, 0.5, "random")
    except (UnsupportedModelError, ValueError) as e:
        return False, str(e)
    return True, ""


def check_model(model: nn.Module, images: torch.Tensor | None = None, *, name: str | None = None,
                capture: str = "auto") -> ModelCheck:
    """Capture one batch through the fast path and the library's explicit path and compare them.

    Args:
        model: a ViT :class:`rollout_fast.AttentionRollout` accepts (timm, Hugging Face, torchvision,
            open_clip image tower); left exactly as it was.
        images: (B, 3, H, W) on the model's device; default two random images at the model's input size.
        name: shown in the report (default: the model's class name).
        capture: the fast path to check ('auto' | 'fused-triton' | 'fused-chunked' | 'qk-hooks').

    Returns:
        :class:`ModelCheck`; ``.ok`` says whether every layer agrees within the dtype's tolerance.

    Raises:
        UnsupportedModelError: ``model`` is not a supported ViT (the message says why).
        ValueError: bad ``images`` or ``capture``.
    """
    spec = describe_model(model)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    if images is None:
        images = torch.randn(2, 3, *default_input_size(model), generator=torch.Generator().manual_seed(0)).to(device, dtype)
    layout = spec.layout(tuple(images.shape[-2:]))
    result = capture_attention(model, images, capture=capture)
    with torch.no_grad():
        was = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            plain = model(images)
        finally:
            for m, flag in was:
                m.training = flag
    eager = eager_attention(model, images).mean(dim=2)
    fast = result.attention[:, :, 0]
    errors = [float((f - e).abs().max()) for f, e in zip(fast, eager)]
    out_err = float((_main_tensor(spec, result.output).float() - _main_tensor(spec, plain).float()).abs().max())
    prunable, note = _prune_support(model)
    return ModelCheck(name or type(model).__name__, spec.family, result.path, layout.num_prefix_tokens,
                      layout.grid, layout.has_class_token, errors, out_err, TOLERANCE.get(dtype, 1e-5),
                      prunable, note)


def load_model(spec: str, *, pretrained: bool = False) -> nn.Module:
    """A model from ``spec``: ``torchvision:NAME`` (a torchvision builder), ``open_clip:NAME`` (the image tower
    of an open_clip architecture), an existing local folder or a ``org/name`` id (Hugging Face), else a timm
    name. Random initialisation unless ``pretrained`` (which may download).

    Raises:
        ValueError: an unknown name, or a Hugging Face config that cannot be read offline.
    """
    if spec.startswith("torchvision:"):
        import torchvision
        name = spec.split(":", 1)[1]
        try:
            return torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None)
        except ValueError as e:
            raise ValueError(f"model: {e}") from None
    if spec.startswith("open_clip:"):
        import open_clip
        name = spec.split(":", 1)[1]
        try:
            return open_clip.create_model(name, pretrained="openai" if pretrained else None).visual
        except RuntimeError as e:
            raise ValueError(f"model: {e}") from None
    from pathlib import Path
    if Path(spec).is_dir() or ("/" in spec and not Path(spec).exists()):
        import transformers
        try:
            if pretrained:
                return _hf_pretrained(transformers, spec)
            cfg = transformers.AutoConfig.from_pretrained(spec)
        except OSError as e:
            raise ValueError(f"model: cannot read a Hugging Face config for {spec!r}: {str(e).splitlines()[0]}") \
                from None
        for auto in (transformers.AutoModelForImageClassification, transformers.AutoModel):
            try:
                return auto.from_config(cfg)
            except ValueError:
                continue
        raise ValueError(f"model: no Hugging Face vision model class for config {type(cfg).__name__}")
    import timm
    if spec not in timm.list_models() and spec.split(".")[0] not in timm.list_models():
        raise ValueError(f"model: {spec!r} is not a timm model name, torchvision:NAME, open_clip:NAME or a "
                         "Hugging Face id / folder")
    return timm.create_model(spec, pretrained=pretrained)


def _hf_pretrained(transformers, spec: str) -> nn.Module:
    try:
        return transformers.AutoModelForImageClassification.from_pretrained(spec)
    except ValueError:
        return transformers.AutoModel.from_pretrained(spec)


def main(argv: list[str] | None = None) -> int:
    """``python -m rollout_fast.check MODEL [--pretrained] [--image-size H W]``: print the report; exit 0
    when the fast capture matches the eager attention, 1 when it does not, 2 for a model it refuses."""
    p = argparse.ArgumentParser(prog="python -m rollout_fast.check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="timm name, Hugging Face id or folder, torchvision:NAME or open_clip:NAME")
    p.add_argument("--pretrained", action="store_true", help="load pretrained weights (may download)")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None)
    p.add_argument("--capture", default="auto")
    args = p.parse_args(argv)
    try:
        model = load_model(args.model, pretrained=args.pretrained).eval()
        images = None
        if args.image_size:
            images = torch.randn(2, 3, *args.image_size, generator=torch.Generator().manual_seed(0))
        report = check_model(model, images, name=args.model, capture=args.capture)
    except (UnsupportedModelError, ValueError) as e:
        sys.stderr.write(f"rollout_fast.check: {e}\n")
        return 2
    sys.stdout.write(report.table() + "\n")
    return 0 if report.ok else 1
