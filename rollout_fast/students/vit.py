"""ViT student ``"vit-tiny"``: a small timm ``VisionTransformer`` in the deit_tiny layout (width 192, 3 heads,
MLP ratio 4) at reduced depth (4 by default) and patch size 4 (the seeds' DeiT-tiny student).

Map head: ``"tokens"`` (each patch token predicts the block of teacher patches it covers, a linear "pixel
shuffle") or ``"cls"`` (the seeds' Linear from the class token to the whole grid; used by the ``mask``
strategy, whose tokens do not cover the grid). With ``mask`` only a random ``keep_ratio`` of the patch
tokens enter the blocks in training, a fixed seeded subset in eval.
"""

from __future__ import annotations

import torch
from torch import nn

from .inputs import to_grid
from .registry import BuildContext, register_student

__all__ = ["ViTMapNet"]


class ViTMapNet(nn.Module):
    """timm VisionTransformer (optionally fed a subset of patch tokens) + map head."""

    def __init__(self, vit: nn.Module, grid: tuple[int, int], head: str, keep_ratio: float | None,
                 seed: int = 0):
        super().__init__()
        self.vit = vit
        self.grid = grid
        self.head_type = head
        sg = tuple(int(g) for g in vit.patch_embed.grid_size)
        self.student_grid = sg
        D = vit.embed_dim
        G = sg[0] * sg[1]
        self.keep = None if keep_ratio is None else max(1, round(keep_ratio * G))
        if self.keep is not None:
            g = torch.Generator().manual_seed(seed)
            self.register_buffer("eval_keep", torch.randperm(G, generator=g)[: self.keep].sort().values,
                                 persistent=False)
        if head == "cls":
            self.head = nn.Linear(D, grid[0] * grid[1])
            self.block = None
        elif head == "tokens":
            if grid[0] % sg[0] == 0 and grid[1] % sg[1] == 0:
                self.block = (grid[0] // sg[0], grid[1] // sg[1])
            else:
                self.block = None  # one score per token, then resized to the grid
            self.head = nn.Linear(D, (self.block[0] * self.block[1]) if self.block else 1)
        else:
            raise ValueError(f"head: expected 'tokens' or 'cls', got {head!r}")
        nn.init.normal_(self.head.weight, std=1e-3)
        nn.init.zeros_(self.head.bias)
        self.bias_map = nn.Parameter(torch.zeros(grid))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        v = self.vit
        x = v.patch_embed(x)
        x = v._pos_embed(x)
        if self.keep is not None:
            P = v.num_prefix_tokens
            B, N, D = x.shape
            if self.training:
                idx = torch.rand(B, N - P, device=x.device).argsort(dim=1)[:, : self.keep]
            else:
                idx = self.eval_keep.to(x.device).expand(B, -1)
            x = torch.cat([x[:, :P], x[:, P:].gather(1, idx[..., None].expand(-1, -1, D))], dim=1)
        x = v.norm_pre(x)
        x = v.blocks(x)
        return v.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)
        B = t.shape[0]
        gh, gw = self.grid
        if self.head_type == "cls":
            out = self.head(t[:, 0]).view(B, gh, gw)
        else:
            patches = t[:, self.vit.num_prefix_tokens:]
            sh, sw = self.student_grid
            s = self.head(patches)  # (B, sh*sw, rh*rw) or (B, sh*sw, 1)
            if self.block is not None:
                rh, rw = self.block
                out = s.view(B, sh, sw, rh, rw).permute(0, 1, 3, 2, 4).reshape(B, gh, gw)
            else:
                out = to_grid(s.transpose(1, 2).reshape(B, 1, sh, sw), self.grid)[:, 0]
        return out + self.bias_map

    def head_modules(self) -> list[nn.Module]:
        return [self.head]

    def backbone(self) -> nn.Module:
        return self.vit


def _timm_vit(options: dict, img_size: tuple[int, int], pretrained: bool) -> nn.Module:
    import timm

    kw = {"img_size": img_size, "patch_size": int(options["patch_size"]), "num_classes": 0,
          "global_pool": "token"}
    if pretrained:  # timm resamples the patch and position embeddings; extra blocks are dropped
        vit = timm.create_model("deit_tiny_patch16_224", pretrained=True, **kw)
        if int(options["depth"]) > len(vit.blocks):
            raise ValueError(f"depth: at most {len(vit.blocks)} with --pretrained")
        vit.blocks = vit.blocks[: int(options["depth"])]
        return vit
    from timm.models import VisionTransformer

    return VisionTransformer(embed_dim=int(options["embed_dim"]), depth=int(options["depth"]),
                             num_heads=int(options["num_heads"]), mlp_ratio=4.0, **kw)


@register_student("vit-tiny", options={"depth": 4, "patch_size": 4, "embed_dim": 192, "num_heads": 3, "head": None},
                  extra_options=("keep_ratio", "mask_seed"))
def vit_tiny_student(ctx: BuildContext) -> nn.Module:
    """Options: ``depth``, ``patch_size``, ``embed_dim``, ``num_heads``, ``head`` ('tokens' | 'cls'; default
    'cls' for mask, else 'tokens'), ``keep_ratio`` (mask only; default 1/F^2), ``mask_seed`` (0)."""
    opts, thumb = ctx.options, ctx.thumbnail_size
    p = int(opts["patch_size"])
    if thumb[0] % p or thumb[1] % p:
        raise ValueError(f"patch_size: the student's input {thumb} is not divisible by {p}")
    head = opts["head"] or ("cls" if ctx.strategy == "mask" else "tokens")
    opts["head"] = head
    keep = None
    if ctx.strategy == "mask":
        keep = float(opts.get("keep_ratio", 1.0 / ctx.factor ** 2))
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep_ratio: expected a number in (0, 1], got {keep!r}")
        opts["keep_ratio"] = keep
        if head != "cls":
            raise ValueError("head: the 'mask' strategy needs head 'cls' (kept tokens do not "
                             "cover the grid)")
    vit = _timm_vit(opts, thumb, ctx.pretrained)
    return ViTMapNet(vit, ctx.grid, head, keep, int(opts.get("mask_seed", 0)))
