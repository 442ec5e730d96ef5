"""Options and helpers shared by the commands (model options of ``rollout`` and ``eval-teacher``; KEY=VALUE lists)."""

from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser, default: str = "cifar10-vit") -> None:
    """``--model`` (default ``default``), ``--pretrained`` | ``--checkpoint``, ``--device``, ``--batch-size``."""
    p.add_argument("--model", default=default,
                   help=f"an embedded teacher ('{default}', the default; 'imagenette-vit' for photos of "
                        "any size, 'cifar10-vit' for 32 px CIFAR-10 images), a timm model name, or a "
                        "rollout_fast .safetensors file with its .json card")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--pretrained", action="store_true", help="timm pretrained weights (needs internet)")
    g.add_argument("--checkpoint", help="local weights for a timm model (.safetensors or torch file)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--batch-size", type=int, default=64)


def device(name: str | None) -> str:
    """``name``, or cuda when available else cpu; exits with a message when cuda is asked for but absent."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("rollout-fast: --device cuda requested but CUDA is not available")
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def load_model(args):
    """``(model, data_config)`` for the options of :func:`add_model_args`."""
    from ..zoo import load_teacher

    return load_teacher(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint,
                        device=device(args.device))


def key_values(items: list[str], option: str) -> dict:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}``: each VALUE read as JSON, else kept as a string.

    Raises:
        ValueError: an item without ``KEY=`` (the message names ``option``).
    """
    import json

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{option}: expected KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
