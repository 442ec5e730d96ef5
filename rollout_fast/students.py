"""Students: small, fast models that predict a teacher ViT's rollout map from a thumbnail.

The seeds' idea (REFERENCE.md section 5, ../seeds): instead of running the expensive teacher to learn
which patches matter, a small model looks at a low-resolution version of the image and predicts the
teacher's attention-rollout map (or its gradient rollout for the predicted class: ``rollout-fast
distill --target grad-rollout``, the better token selector) on the teacher's (gh, gw) patch grid. Its
scores then rank patches for pruning.

A :class:`RolloutStudent` takes the *teacher's own input batch* ``(B, 3, H, W)`` (normalised the
teacher's way), applies its input strategy itself, and returns ``(B, gh, gw)`` float32 scores (logits;
higher = more important). :meth:`RolloutStudent.maps` turns them into maps comparable with the
teacher's (softmax or sigmoid, then max-normalised per image).

Architectures (all built from timm modules):

- ``"resnet"``: timm ``resnet18`` (He et al., "Deep Residual Learning for Image Recognition", CVPR
  2016; BasicBlock layout 2-2-2-2, widths 64-512) adapted to small inputs: the 7x7 stem conv runs at
  stride 1 and the max-pool is removed, so ``--pretrained`` ImageNet weights still load. The seeds'
  convnet student (ResNet18 + MLP head, MSE).
- ``"resnet-cifar"``: a light CIFAR-style timm ResNet (BasicBlock, one block per stage by default,
  widths 24-48-96-192, 3x3 stride-1 stem, no max-pool; He et al.'s CIFAR variant). The shipped student.
- ``"vit-tiny"``: a small timm ``VisionTransformer`` in the deit_tiny layout (width 192, 3 heads, MLP
  ratio 4) at reduced depth (4 by default) and patch size 4 (the seeds' DeiT-tiny student).

Convnet map head: the outputs of all four stages are average-pooled (or bilinearly upsampled) to the
teacher's grid, concatenated, and mapped by 1x1 conv -> BN -> ReLU -> 1x1 conv to one score per patch,
plus a learned per-patch bias (an explicit positional prior). ViT map head: ``"tokens"`` (each patch
token predicts the block of teacher patches it covers, a linear "pixel shuffle") or ``"cls"`` (the seeds'
Linear from the class token to the whole grid; used by the ``mask`` strategy, whose tokens do not cover
the grid).

Input strategies (the seeds' ``DOWNSIZE``, 44-px "from scratch" and ``MAE`` variants); a factor F means
the student sees 1/F^2 of the teacher's pixels:

- ``"downsize"``: pixelate: resize down by F (bilinear, antialiased), then back up to (H, W). Same cost
  as full resolution; lets a pretrained full-resolution backbone be reused (the seeds' approach).
- ``"lowres"``: feed the (H/F, W/F) thumbnail directly: F^2 fewer pixels, that is where speed comes from.
- ``"mask"`` (ViT only): full resolution, but only a random 1/F^2 of the patch tokens enter the
  transformer (MAE style; He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022).
  Random per image in training; a fixed seeded subset in eval so predictions are deterministic.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "EMBEDDED_STUDENTS",
    "LOSS_ACTIVATIONS",
    "STRATEGIES",
    "STUDENT_ARCHS",
    "RolloutStudent",
    "check_student_grid",
    "count_macs",
    "create_student",
    "load_student",
    "measure_cost",
    "pruning_student_name",
    "save_student",
    "student_input_size",
]

STUDENT_ARCHS = ("resnet", "resnet-cifar", "vit-tiny")
STRATEGIES = ("downsize", "lowres", "mask")
# the output activation that turns logits into a map, for each distillation loss
LOSS_ACTIVATIONS = {"kld": "softmax", "bce": "sigmoid", "mse": "sigmoid"}

_DEFAULT_OPTIONS = {
    "resnet": {"head_width": 64},
    "resnet-cifar": {"channels": [24, 48, 96, 192], "layers": [1, 1, 1, 1], "head_width": 64},
    "vit-tiny": {"depth": 4, "patch_size": 4, "embed_dim": 192, "num_heads": 3, "head": None},
}


def _check_size(name: str, v) -> tuple[int, int]:
    if not (isinstance(v, (tuple, list)) and len(v) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in v)):
        raise ValueError(f"{name}: expected two positive ints, got {v!r}")
    return int(v[0]), int(v[1])


def _check_factor(factor) -> int:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor: expected an int >= 1, got {factor!r}")
    return factor


def student_input_size(strategy: str, factor: int, input_size: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of the image the student's backbone sees for a teacher input of ``input_size`` (H, W).

    ``lowres``: (H // F, W // F); ``downsize`` and ``mask``: (H, W).

    Raises:
        ValueError: unknown ``strategy``, ``factor`` < 1, or a thumbnail smaller than 1 pixel.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    factor = _check_factor(factor)
    H, W = _check_size("input_size", input_size)
    if strategy != "lowres":
        return H, W
    if H // factor < 1 or W // factor < 1:
        raise ValueError(f"factor: {factor} leaves no pixels of a {H}x{W} input")
    return H // factor, W // factor


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False,
                         antialias=size[0] < x.shape[-2] or size[1] < x.shape[-1])


def _to_grid(f: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) features -> (B, C, gh, gw): average pooling down, bilinear up."""
    if tuple(f.shape[-2:]) == grid:
        return f
    if f.shape[-2] >= grid[0] and f.shape[-1] >= grid[1]:
        return F.adaptive_avg_pool2d(f, grid)
    return F.interpolate(f, size=grid, mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------------------- backbones

class _ConvMapNet(nn.Module):
    """timm ResNet trunk + multi-scale map head -> (B, gh, gw) logits."""

    def __init__(self, trunk: nn.Module, channels: list[int], grid: tuple[int, int], head_width: int):
        super().__init__()
        self.trunk = trunk
        self.grid = grid
        self.head = nn.Sequential(
            nn.Conv2d(sum(channels), head_width, 1, bias=False), nn.BatchNorm2d(head_width),
            nn.ReLU(inplace=True), nn.Conv2d(head_width, 1, 1))
        self.bias_map = nn.Parameter(torch.zeros(grid))
        nn.init.normal_(self.head[-1].weight, std=1e-3)
        nn.init.zeros_(self.head[-1].bias)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        t = self.trunk
        x = t.maxpool(t.act1(t.bn1(t.conv1(x))))
        feats = []
        for layer in (t.layer1, t.layer2, t.layer3, t.layer4):
            x = layer(x)
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.cat([_to_grid(f, self.grid) for f in self.features(x)], dim=1)
        return self.head(f)[:, 0] + self.bias_map

    def head_modules(self) -> list[nn.Module]:
        return [self.head]


def _resnet_trunk(arch: str, pretrained: bool, options: dict) -> tuple[nn.Module, list[int]]:
    import timm
    from timm.models.resnet import BasicBlock, ResNet

    if arch == "resnet":
        trunk = timm.create_model("resnet18", pretrained=pretrained, num_classes=0, global_pool="")
        trunk.conv1.stride = (1, 1)  # small inputs: keep the (pretrained) 7x7 stem, stride 1
        trunk.maxpool = nn.Identity()
        return trunk, [64, 128, 256, 512]
    if pretrained:
        raise ValueError("pretrained: there are no pretrained weights for 'resnet-cifar'; use "
                         "student 'resnet' or 'vit-tiny'")
    channels, layers = list(options["channels"]), list(options["layers"])
    if len(channels) != 4 or len(layers) != 4 or min(channels + layers) < 1:
        raise ValueError(f"channels/layers: expected four positive ints each, got {channels}, {layers}")
    trunk = ResNet(BasicBlock, layers, channels=tuple(channels), stem_width=channels[0],
                   num_classes=0, global_pool="")
    trunk.conv1 = nn.Conv2d(3, channels[0], 3, stride=1, padding=1, bias=False)
    trunk.bn1 = nn.BatchNorm2d(channels[0])
    trunk.maxpool = nn.Identity()
    # timm's plain stem always has 64 channels: rebuild stage 1 at the stem's width (no projection)
    trunk.layer1 = nn.Sequential(*[BasicBlock(channels[0], channels[0]) for _ in range(layers[0])])
    for blk in trunk.layer1:
        blk.zero_init_last()
    return trunk, channels


class _ViTMapNet(nn.Module):
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
        self.keep = None if keep_ratio is None else max(1, int(round(keep_ratio * G)))
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
                out = _to_grid(s.transpose(1, 2).reshape(B, 1, sh, sw), self.grid)[:, 0]
        return out + self.bias_map

    def head_modules(self) -> list[nn.Module]:
        return [self.head]


def _vit(options: dict, img_size: tuple[int, int], pretrained: bool) -> nn.Module:
    import timm

    kw = dict(img_size=img_size, patch_size=int(options["patch_size"]), num_classes=0,
              global_pool="token")
    if pretrained:  # timm resamples the patch and position embeddings; extra blocks are dropped
        vit = timm.create_model("deit_tiny_patch16_224", pretrained=True, **kw)
        if int(options["depth"]) > len(vit.blocks):
            raise ValueError(f"depth: at most {len(vit.blocks)} with --pretrained")
        vit.blocks = vit.blocks[: int(options["depth"])]
        return vit
    from timm.models import VisionTransformer

    return VisionTransformer(embed_dim=int(options["embed_dim"]), depth=int(options["depth"]),
                             num_heads=int(options["num_heads"]), mlp_ratio=4.0, **kw)


# ----------------------------------------------------------------------------------------- student

class RolloutStudent(nn.Module):
    """A student that predicts a teacher's rollout map from the teacher's own input batch.

    ``student(images)``: ``images`` (B, 3, H, W) float (the teacher's normalised input, H, W =
    ``input_size``) -> (B, gh, gw) float32 logits, one score per teacher patch. The input strategy
    (``downsize`` / ``lowres`` / ``mask``) is applied inside.

    Build with :func:`create_student`; :attr:`spec` is the JSON-serialisable recipe that rebuilds it.

    Raises (on call):
        ValueError: ``images`` not (B, 3, H, W) with (H, W) = ``input_size``.
        TypeError: ``images`` not a floating-point tensor.
    """

    def __init__(self, net: nn.Module, spec: dict):
        super().__init__()
        self.net = net
        self.spec = spec
        self.strategy = spec["strategy"]
        self.factor = spec["factor"]
        self.input_size = tuple(spec["input_size"])
        self.grid = tuple(spec["grid"])
        self.activation = spec["activation"]
        self.thumbnail_size = student_input_size(self.strategy, self.factor, self.input_size)

    def extra_repr(self) -> str:
        return (f"arch={self.spec['arch']!r}, strategy={self.strategy!r}, factor={self.factor}, "
                f"input_size={self.input_size}, grid={self.grid}")

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Apply the input strategy: (B, 3, H, W) -> what the backbone sees (B, 3, h, w)."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images: expected a torch.Tensor, got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"images: expected a floating-point tensor, got {images.dtype}")
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != self.input_size:
            raise ValueError(f"images: expected (B, 3, {self.input_size[0]}, {self.input_size[1]}) "
                             f"(the teacher's input), got {tuple(images.shape)}")
        if self.strategy == "lowres":
            return _resize(images, self.thumbnail_size)
        if self.strategy == "downsize":
            H, W = self.input_size
            small = (max(1, H // self.factor), max(1, W // self.factor))
            return _resize(_resize(images, small), (H, W))
        return images  # mask: the ViT drops tokens itself

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.prepare(images)).float()

    @torch.no_grad()
    def maps(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted maps (B, gh, gw) float32 in [0, 1], max-normalised per image, like the teacher's.

        Softmax over the grid for students trained with KLD, sigmoid for BCE/MSE.
        """
        return logits_to_maps(self(images), self.activation)

    def head_parameters(self) -> list[nn.Parameter]:
        """The fresh map head's parameters (phase 1 of distillation trains only these)."""
        ps = [p for m in self.net.head_modules() for p in m.parameters()]
        return ps + [self.net.bias_map]

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Everything else (the timm trunk)."""
        head = {id(p) for p in self.head_parameters()}
        return [p for p in self.parameters() if id(p) not in head]

    def backbone_modules(self) -> nn.Module:
        """The timm trunk module (frozen and in eval mode during phase 1)."""
        return self.net.trunk if hasattr(self.net, "trunk") else self.net.vit


def logits_to_maps(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """(B, gh, gw) logits -> maps in [0, 1], max-normalised per image (softmax or sigmoid first)."""
    B = logits.shape[0]
    flat = logits.float().reshape(B, -1)
    if activation == "softmax":
        m = flat.softmax(dim=1)
    elif activation == "sigmoid":
        m = flat.sigmoid()
    else:
        raise ValueError(f"activation: expected 'softmax' or 'sigmoid', got {activation!r}")
    m = m / m.amax(dim=1, keepdim=True).clamp_min(1e-30)
    return m.view_as(logits)


def create_student(arch: str = "resnet-cifar", *, strategy: str = "lowres", factor: int = 2,
                   input_size: tuple[int, int] = (32, 32), grid: tuple[int, int] = (8, 8),
                   loss: str = "kld", pretrained: bool = False, **options) -> RolloutStudent:
    """Build a student for a teacher with input ``input_size`` (H, W) and patch grid ``grid`` (gh, gw).

    Args:
        arch: 'resnet' (resnet18 layout) | 'resnet-cifar' (light CIFAR ResNet) | 'vit-tiny'.
        strategy: 'downsize' | 'lowres' | 'mask' (mask: 'vit-tiny' only).
        factor: F >= 1; the student sees 1/F^2 of the pixels (see the module docstring).
        input_size: the teacher's input (H, W).
        grid: the teacher's patch grid (gh, gw): the student's output shape.
        loss: 'kld' | 'bce' | 'mse': fixes the output activation (softmax | sigmoid) used by
            :meth:`RolloutStudent.maps`.
        pretrained: timm's ImageNet weights for the trunk ('resnet', 'vit-tiny'; needs internet).
        **options: architecture options. resnet-cifar: ``channels`` (4 ints, default 24,48,96,192),
            ``layers`` (blocks per stage, default 1,1,1,1), ``head_width`` (64). resnet: ``head_width``.
            vit-tiny: ``depth`` (4), ``patch_size`` (4), ``embed_dim`` (192), ``num_heads`` (3),
            ``head`` ('tokens' | 'cls'; default 'cls' for mask, else 'tokens'), ``keep_ratio``
            (mask only; default 1/F^2), ``mask_seed`` (0).

    Returns:
        A :class:`RolloutStudent` in train mode on the CPU.

    Raises:
        ValueError: unknown arch/strategy/loss/option, bad sizes, 'mask' with a convnet, a thumbnail
            the backbone cannot take (e.g. not divisible by the ViT patch size), pretrained
            'resnet-cifar'.
    """
    if arch not in STUDENT_ARCHS:
        raise ValueError(f"student: expected one of {STUDENT_ARCHS}, got {arch!r}")
    if loss not in LOSS_ACTIVATIONS:
        raise ValueError(f"loss: expected one of {tuple(LOSS_ACTIVATIONS)}, got {loss!r}")
    input_size = _check_size("input_size", input_size)
    grid = _check_size("grid", grid)
    thumb = student_input_size(strategy, factor, input_size)
    if strategy == "mask" and arch != "vit-tiny":
        raise ValueError(f"strategy: 'mask' drops patch tokens and needs a ViT student ('vit-tiny'), "
                         f"got {arch!r}")
    opts = dict(_DEFAULT_OPTIONS[arch])
    extra = {"keep_ratio", "mask_seed"} if arch == "vit-tiny" else set()
    unknown = set(options) - set(opts) - extra
    if unknown:
        raise ValueError(f"options: unknown for {arch!r}: {sorted(unknown)}; known: "
                         f"{sorted(set(opts) | extra)}")
    opts.update(options)
    if arch in ("resnet", "resnet-cifar"):
        trunk, channels = _resnet_trunk(arch, pretrained, opts)
        net = _ConvMapNet(trunk, channels, grid, int(opts["head_width"]))
    else:
        p = int(opts["patch_size"])
        if thumb[0] % p or thumb[1] % p:
            raise ValueError(f"patch_size: the student's input {thumb} is not divisible by {p}")
        head = opts["head"] or ("cls" if strategy == "mask" else "tokens")
        opts["head"] = head
        keep = None
        if strategy == "mask":
            keep = float(opts.get("keep_ratio", 1.0 / factor ** 2))
            if not 0.0 < keep <= 1.0:
                raise ValueError(f"keep_ratio: expected a number in (0, 1], got {keep!r}")
            opts["keep_ratio"] = keep
            if head != "cls":
                raise ValueError("head: the 'mask' strategy needs head 'cls' (kept tokens do not "
                                 "cover the grid)")
        net = _ViTMapNet(_vit(opts, thumb, pretrained), grid, head, keep, int(opts.get("mask_seed", 0)))
    spec = {"arch": arch, "strategy": strategy, "factor": int(factor), "input_size": list(input_size),
            "grid": list(grid), "loss": loss, "activation": LOSS_ACTIVATIONS[loss], "options": opts}
    return RolloutStudent(net, spec)


def check_student_grid(student: RolloutStudent, grid: tuple[int, int],
                       input_size: tuple[int, int] | None = None) -> None:
    """Check that ``student`` predicts a teacher's ``grid`` (gh, gw) from its ``input_size`` (H, W).

    Raises:
        TypeError: ``student`` is not a :class:`RolloutStudent`.
        ValueError: the student's output grid or input size differs from the teacher's.
    """
    if not isinstance(student, RolloutStudent):
        raise TypeError(f"student: expected a RolloutStudent, got {type(student).__name__}")
    if tuple(student.grid) != tuple(grid):
        raise ValueError(f"student: predicts a {student.grid[0]}x{student.grid[1]} grid but the teacher's "
                         f"patch grid is {grid[0]}x{grid[1]}")
    if input_size is not None and tuple(student.input_size) != tuple(input_size):
        raise ValueError(f"student: takes {student.input_size} inputs but the teacher takes "
                         f"{tuple(input_size)}")


# -------------------------------------------------------------------------------------------- cost

def count_macs(fn: Callable[[torch.Tensor], object], example: torch.Tensor) -> int:
    """Multiply-adds of ``fn(example)`` per image: ``torch.utils.flop_counter`` FLOPs / 2 / batch.

    Counts matmuls, convolutions and attention (SDPA); element-wise work is not counted, for the
    student and the teacher alike.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        fn(example)
    return int(round(fc.get_total_flops() / 2 / example.shape[0]))


def _median_ms(fn, x, repeats: int, warmup: int) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            fn(x)
        ts = []
        for _ in range(repeats):
            if x.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn(x)
            if x.is_cuda:
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
    ts.sort()
    return 1000.0 * ts[len(ts) // 2]


def measure_cost(fn: Callable[[torch.Tensor], object], module: nn.Module, input_size: tuple[int, int],
                 *, batch_size: int = 64, repeats: int = 5, warmup: int = 1,
                 device: str | torch.device = "cpu") -> dict:
    """Parameters, multiply-adds per image and measured latency of ``fn`` (a student or a teacher).

    Args:
        fn: the callable to time on a (B, 3, H, W) batch (e.g. the student, or
            ``AttentionRollout(teacher)`` for the teacher's rollout).
        module: the module whose parameters are counted.
        input_size: (H, W) of the inputs.
        batch_size: the batch of the throughput measurement (latency is also measured at batch 1).

    Returns:
        ``{"params", "macs_per_image", "latency_ms_batch1", "ms_per_image_batch<B>", "device",
        "threads"}``; MACs from :func:`count_macs` (module in eval mode).
    """
    H, W = _check_size("input_size", input_size)
    was = module.training
    module.eval()
    try:
        x1 = torch.randn(1, 3, H, W, device=device)
        xb = torch.randn(batch_size, 3, H, W, device=device)
        macs = count_macs(fn, x1)
        lat1 = _median_ms(fn, x1, repeats, warmup)
        latb = _median_ms(fn, xb, repeats, warmup) / batch_size
    finally:
        module.train(was)
    return {"params": int(sum(p.numel() for p in module.parameters())), "macs_per_image": macs,
            "latency_ms_batch1": round(lat1, 3), f"ms_per_image_batch{batch_size}": round(latb, 4),
            "device": str(torch.device(device)), "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------- saving and loading

def _assets() -> Path:
    return Path(__file__).resolve().parent / "assets"


# Shipped students, by name: "cifar10-vit" predicts the embedded teacher's rollout at discard ratio 0 (the
# rollout people inspect; issue 5's metrics); "cifar10-vit-prune" predicts the teacher's gradient rollout for
# its predicted class (distill --target grad-rollout), the map that selects the best patch tokens to keep for
# pruned inference (rollout_fast.prune; ``prune-eval``'s default).
EMBEDDED_STUDENTS = {"cifar10-vit": _assets() / "cifar10-vit-student",
                     "cifar10-vit-prune": _assets() / "cifar10-vit-prune-student"}


def pruning_student_name(model: str) -> str:
    """The shipped student to score patch tokens of ``model`` with: ``"<model>-prune"`` when shipped, else
    ``model`` (its rollout student)."""
    return f"{model}-prune" if f"{model}-prune" in EMBEDDED_STUDENTS else model


def save_student(path: str | os.PathLike, student: RolloutStudent, card: dict) -> tuple[Path, Path]:
    """Write ``student`` as safetensors at ``path`` and ``card`` (plus its spec) as JSON beside it.

    Both writes are atomic. Returns ``(weights_path, card_path)``.
    """
    from .checkpoint import save_weights, write_json

    path = Path(path)
    card = {**card, "student": student.spec}
    w = save_weights(path, student.state_dict(), {"card": path.with_suffix(".json").name})
    c = write_json(path.with_suffix(".json"), card)
    return w, c


def load_student(name: str | os.PathLike = "cifar10-vit", *, device: str | torch.device = "cpu"
                 ) -> tuple[RolloutStudent, dict]:
    """Load a shipped or saved student in eval mode, offline.

    Args:
        name: a shipped student (``"cifar10-vit"``: the embedded teacher's rollout at discard 0;
            ``"cifar10-vit-prune"``: the same teacher's gradient rollout for its predicted class, for token
            pruning), or a path
            to a student ``.safetensors`` with its ``.json`` card beside it (as written by
            ``rollout-fast distill``).
        device: where to put it.

    Returns:
        ``(student, card)``: ``student(images)`` takes the teacher's input batch (B, 3, H, W) and
        returns (B, gh, gw) float32 scores; ``card`` records the teacher, the rollout settings the
        student was trained to predict (``card["rollout"]``: target 'rollout' or 'grad-rollout' -- absent,
        i.e. 'rollout', in cards written before targets existed -- head fusion, discard ratio), its input
        strategy and its measured metrics and cost.

    Raises:
        ValueError: unknown name, a card without a student spec, or weights that do not match it.
        FileNotFoundError: the shipped asset or the given file is missing.
    """
    from .checkpoint import load_weights

    key = str(name)
    if key in EMBEDDED_STUDENTS:
        weights = EMBEDDED_STUDENTS[key].with_suffix(".safetensors")
        if not weights.is_file():
            raise FileNotFoundError(f"embedded student for {key!r} missing at {weights}; train one with "
                                    "python/train_students.py")
    elif key.endswith(".safetensors") or os.sep in key:
        weights = Path(key)
        if not weights.is_file():
            raise FileNotFoundError(f"student: no file at {key!r}")
    else:
        raise ValueError(f"student: no shipped student for {key!r} (known: {sorted(EMBEDDED_STUDENTS)}) "
                         "and not a path to a student .safetensors")
    card_path = weights.with_suffix(".json")
    if not card_path.is_file():
        raise FileNotFoundError(f"student: card {card_path} missing beside {weights}")
    card = json.loads(card_path.read_text())
    spec = card.get("student")
    if not isinstance(spec, dict) or "arch" not in spec:
        raise ValueError(f"student: {card_path} has no 'student' spec")
    student = create_student(spec["arch"], strategy=spec["strategy"], factor=spec["factor"],
                             input_size=tuple(spec["input_size"]), grid=tuple(spec["grid"]),
                             loss=spec["loss"], **spec.get("options", {}))
    try:
        student.load_state_dict(load_weights(weights), strict=True)
    except RuntimeError as e:
        raise ValueError(f"student: {str(weights)!r} does not match its card's architecture: {e}") from e
    return student.to(device).eval(), card
