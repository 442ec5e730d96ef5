"""Helpers shared by the pruning tests (tests/prune/): small random-weight timm ViTs of every kind, their
images, the hand-written pruned forward and a stand-in student. The test files import this module by name
(pytest puts their folder on sys.path)."""

from __future__ import annotations

import timm
import torch

from rollout_fast.reference import topk_gather_reference


def tiny_vit(**kw):
    from timm.models import VisionTransformer

    args = {"img_size": 32, "patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 3, "num_classes": 10}
    args.update(kw)
    torch.manual_seed(0)
    return VisionTransformer(**args).eval()


MODELS = {
    "vit": lambda: tiny_vit(),
    "deit-distilled": lambda: timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=4,
                                                depth=2, num_classes=10).eval(),
    "registers": lambda: tiny_vit(reg_tokens=4, no_embed_class=True),
    "qknorm-layerscale": lambda: tiny_vit(qk_norm=True, init_values=0.1),
    "no-class-token": lambda: tiny_vit(class_token=False, global_pool="avg"),
    "non-square": lambda: tiny_vit(img_size=(24, 40)),
    "dynamic": lambda: tiny_vit(dynamic_img_size=True),
}
IMAGE_SIZE = {"non-square": (24, 40), "dynamic": (28, 44)}


def images_for(name, B=3):
    H, W = IMAGE_SIZE.get(name, (32, 32))
    return torch.randn(B, 3, H, W, generator=torch.Generator().manual_seed(1))


def manual_forward(model, x, scores, k):
    """patch_embed -> _pos_embed -> reference top-k gather -> norm_pre -> blocks -> norm -> head."""
    P = model.num_prefix_tokens
    t = model._pos_embed(model.patch_embed(x))
    kept, _ = topk_gather_reference(t, scores, k, P)
    return model.forward_head(model.norm(model.blocks(model.norm_pre(kept))))


class StandInStudent(torch.nn.Module):
    """A stand-in student: (B, 3, h, w) -> (B, gh, gw) by average pooling the red channel."""

    def __init__(self, grid):
        super().__init__()
        self.grid = grid
        self.seen = None

    def forward(self, x):
        self.seen = tuple(x.shape[-2:])
        return torch.nn.functional.adaptive_avg_pool2d(x[:, :1], self.grid)[:, 0]

