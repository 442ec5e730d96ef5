"""Learn to Pay Attention (Jetley, Lord, Lee & Torr, ICLR 2018): AttnVGG and its attention maps.

A VGG-style trunk with BatchNorm computes local feature maps ``l`` at three depths and a global feature
``g``. Each of three attention estimators scores every position of its level against ``g``
(compatibility), normalises the scores over the positions into a map ``a`` and pools the level into one
attended vector ``g_a``; the three vectors are concatenated and classified by one linear layer. The maps
are the model's own explanation of its decision: :func:`ltpa_saliency` turns them into a patch-grid
saliency map like the rollout maps of the rest of the package.

Variants (``parse_ltpa_variant`` / ``LTPA_VARIANTS``), named ``"{compat}-{normalize}-{placement}"``:

- compat ``"pc"``: parametrised compatibility ``c_i = <u, l_i + g>`` (paper Sec. 3, a learnt ``u``);
  ``"dp"``: dot product ``c_i = <l_i, g>`` (paper Sec. 3, the parameter-free alternative);
- normalize ``"softmax"``: ``a_i = exp(c_i) / sum_j exp(c_j)`` and ``g_a = sum_i a_i l_i``
  (paper Sec. 3, a convex combination); ``"sigmoid"``: ``a_i = sigmoid(c_i)`` and
  ``g_a = (1/n) sum_i a_i l_i``, the mean over the ``n`` positions (not over ``sum_i a_i``), as the
  reference implementation (SaoYan/LearnToPayAttention, ``normalize_attn=False``) does;
- placement ``"before"``: ``l`` is the output of conv blocks 3, 4, 5 before their 2x2 max-pool;
  ``"after"``: the same maps after it (SaoYan's ``AttnVGG_before`` / ``AttnVGG_after``);
- ``"vgg"``: the plain VGG baseline (same trunk, ``g`` classified directly, no estimators).

``l1`` has 256 channels and ``g`` 512, so ``l1`` is projected to ``g``'s width by a bias-free 1x1
convolution (the paper's projection) before both the compatibility and the weighted sum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LTPA_VARIANTS",
    "AttnVGG",
    "LTPAAttention",
    "LTPAExplainer",
    "LTPAResult",
    "check_attention_model",
    "create_attnvgg",
    "ltpa_map_sizes",
    "ltpa_saliency",
    "parse_ltpa_variant",
]

COMPATS = ("pc", "dp")
NORMALIZES = ("softmax", "sigmoid")
PLACEMENTS = ("before", "after")
LTPA_VARIANTS = ("vgg",) + tuple(f"{c}-{n}-{p}" for c in COMPATS for n in NORMALIZES for p in PLACEMENTS)
_STEM_SIZES = (16, 20, 24, 28, 32)  # allowed sizes of the map entering conv block 3
# (output channels, number of 3x3 convs) of conv blocks 1-6 at width 1.0; g has _BLOCKS[-1][0] channels
_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3), (512, 2))
_ARCH_KEYS = ("type", "variant", "img_size", "num_classes", "in_chans", "compat", "normalize", "placement",
              "width", "attention")


def _choice(value, allowed, name: str) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


def parse_ltpa_variant(name: str) -> dict:
    """The keyword arguments of :class:`AttnVGG` for a variant name.

    ``name``: ``"vgg"`` (the plain baseline) or ``"{compat}-{normalize}-{placement}"`` with compat in
    ``pc|dp``, normalize in ``softmax|sigmoid``, placement in ``before|after``, e.g. ``"pc-softmax-after"``
    (the paper's VGG-att3-concat-pc with softmax). Returns ``{"attention", "compat", "normalize",
    "placement"}`` (the baseline gets the defaults for the last three).

    Raises:
        ValueError: ``name`` is not one of :data:`LTPA_VARIANTS`.
    """
    if name not in LTPA_VARIANTS:
        raise ValueError(f"variant must be one of {list(LTPA_VARIANTS)}, got {name!r}")
    if name == "vgg":
        return {"attention": False, "compat": "pc", "normalize": "softmax", "placement": "after"}
    compat, normalize, placement = name.split("-")
    return {"attention": True, "compat": compat, "normalize": normalize, "placement": placement}


def _stem_pools(img_size) -> int:
    """Number ``k`` of 2x2 max-pools before conv block 3: ``img_size = 2**k * m`` with ``m`` in
    ``_STEM_SIZES`` (the smallest such ``k``)."""
    if isinstance(img_size, bool) or not isinstance(img_size, int):
        raise TypeError(f"img_size must be an int (e.g. 32 or 112), got {img_size!r}")
    k = 0
    while img_size > 32 and img_size % 2 == 0:
        img_size //= 2
        k += 1
    if img_size not in _STEM_SIZES:
        raise ValueError(f"img_size must be 2**k * m with m in {list(_STEM_SIZES)} (e.g. 32, 64, 112, "
                         f"224), got {img_size * 2 ** k}")
    return k


def ltpa_map_sizes(img_size: int, placement: str = "after") -> tuple[tuple[int, int], ...]:
    """The (h_i, w_i) of the three attention maps of an :class:`AttnVGG` on ``img_size`` px inputs.

    With ``m = img_size / 2**k`` the size entering conv block 3 (``k`` stem pools, see :class:`AttnVGG`):
    ``before``: ``m, m/2, m/4``; ``after``: ``m/2, m/4, ceil(m/8)``. E.g. 32 px: before 32, 16, 8 and
    after 16, 8, 4; 112 px: before 28, 14, 7 and after 14, 7, 4.

    Raises:
        ValueError: an unsupported ``img_size`` or ``placement``.
        TypeError: ``img_size`` is not an int.
    """
    _choice(placement, PLACEMENTS, "placement")
    m = img_size // 2 ** _stem_pools(img_size)
    sizes = [m, m // 2, m // 4, -(-m // 8)]
    sizes = sizes[:3] if placement == "before" else sizes[1:]
    return tuple((s, s) for s in sizes)


def _conv_block(c_in: int, c_out: int, n: int, pool_each: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n):
        layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=False),
                   nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        if pool_each:
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
    return nn.Sequential(*layers)


class LTPAAttention(nn.Module):
    """One attention estimator of Learn to Pay Attention (Jetley et al. 2018, Sec. 3).

    ``forward(l, g)``: ``l`` (B, C, h, w) local features (already projected to ``g``'s width), ``g``
    (B, C) global feature, any float dtype. Returns ``(g_a, a)``: ``g_a`` (B, C) in ``l``'s dtype (or the
    autocast dtype) and ``a`` (B, h, w) in ``l``'s dtype promoted to at least float32 (float32 under
    autocast). Per image, over the ``n = h * w`` positions ``i``:

    - compatibility ``c_i = <u, l_i + g>`` for ``compat="pc"`` (paper Sec. 3; ``u`` (C,) learnt, the only
      parameter), ``c_i = <l_i, g>`` for ``compat="dp"`` (no parameters, ``self.u is None``);
    - ``normalize="softmax"``: ``a_i = exp(c_i) / sum_j exp(c_j)``, ``g_a = sum_i a_i l_i``:
      ``a`` sums to 1;
    - ``normalize="sigmoid"``: ``a_i = sigmoid(c_i)`` in (0, 1), ``g_a = (1/n) sum_i a_i l_i`` (divided by
      the number of positions, as in SaoYan/LearnToPayAttention; the paper gives only the softmax form).

    With softmax, ``pc`` attention does not depend on ``g``: ``<u, l_i + g> = <u, l_i> + <u, g>`` and the
    second term is the same at every position, so it cancels in the softmax (it matters with sigmoid).

    Raises:
        ValueError: ``compat``/``normalize`` not one of the names above, ``dim`` < 1, or ``l``/``g`` of
            mismatching shapes in ``forward``.
    """

    def __init__(self, dim: int, compat: str = "pc", normalize: str = "softmax"):
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.compat = _choice(compat, COMPATS, "compat")
        self.normalize = _choice(normalize, NORMALIZES, "normalize")
        self.u = None
        if compat == "pc":  # initialised like a xavier-uniform 1x1 conv dim -> 1 (the reference's default)
            bound = math.sqrt(6.0 / (dim + 1))
            self.u = nn.Parameter(torch.empty(dim).uniform_(-bound, bound))

    def forward(self, l: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if l.ndim != 4 or g.shape != l.shape[:2]:
            raise ValueError(f"l must be (B, C, h, w) and g (B, C), got l {tuple(l.shape)}, "
                             f"g {tuple(g.shape)}")
        b, _, h, w = l.shape
        if self.u is not None:
            c = torch.einsum("bchw,c->bhw", l + g[:, :, None, None], self.u.to(l.dtype))
        else:
            c = torch.einsum("bchw,bc->bhw", l, g)
        c = c.to(torch.promote_types(c.dtype, torch.float32)).reshape(b, h * w)
        if self.normalize == "softmax":
            a = torch.softmax(c, dim=1).reshape(b, h, w)
            g_a = torch.einsum("bchw,bhw->bc", l, a.to(l.dtype))
        else:
            a = torch.sigmoid(c).reshape(b, h, w)
            g_a = torch.einsum("bchw,bhw->bc", l, a.to(l.dtype)) / (h * w)
        return g_a, a


class AttnVGG(nn.Module):
    """VGG with Learn-to-Pay-Attention estimators (Jetley et al., ICLR 2018, "VGG-att3-concat"), or the
    plain VGG baseline of the same trunk (``attention=False``).

    Trunk (channels at ``width`` 1.0, 3x3 conv + BatchNorm + ReLU, bias-free convs): blocks
    64x2 | 128x2 | 256x3 (l1) | 512x3 (l2) | 512x3 (l3), a 2x2 max-pool (ceil mode) after blocks 3, 4 and
    5, block 6 = 512x2 with a max-pool after each conv, then a 1x1 conv (with bias) giving ``g`` (512) at
    1x1 (paper/SaoYan for 32 px). Inputs larger than 32 px get ``k`` extra stem max-pools so that the map
    entering block 3 is ``m = img_size / 2**k`` <= 32 (one after block 2, the other ``k - 1`` after block 1):
    112 px gives ``k = 2``, ``m = 28`` (our choice, to keep the cost of a 112 px image near that of a
    32 px one; not in the paper). ``width`` multiplies every channel count (``max(1, round(c * width))``);
    width 1.0 has 19.7 M (baseline) / 19.85 M (pc) parameters and cost about 0.45-0.5 s per image
    fwd+bwd (batch 64, bf16 autocast) on this project's shared 2-core CPU; width 0.25 (1.25 M) about
    75-110 ms per image at 32 and 112 px: use 0.25 there.

    Args:
        img_size: input height = width, ``2**k * m`` with ``m`` in 16, 20, 24, 28, 32 (32, 112, 64 ...).
        num_classes: classifier outputs. in_chans: input channels.
        compat, normalize, placement: the estimator variant (see :class:`LTPAAttention`, the module doc).
        width: channel multiplier > 0. attention: False for the plain VGG baseline.

    ``forward(x)``: ``x`` (B, in_chans, img_size, img_size) float. Returns ``(logits, maps)``: ``logits``
    (B, num_classes); ``maps`` a tuple of three (B, h_i, w_i) attention maps ``a`` (levels l1, l2, l3;
    sizes :func:`ltpa_map_sizes`; float32, or float64 for a float64 model), softmax maps summing to 1 per
    level and image, sigmoid maps in (0, 1); an empty tuple for the baseline. ``forward_features(x)``
    returns the raw (unprojected) ``(l1, l2, l3)`` and ``g`` (B, C_g).

    Raises:
        ValueError: a bad ``img_size``, variant name, ``width`` <= 0, ``num_classes``/``in_chans`` < 1,
            or in ``forward`` an ``x`` of the wrong shape.
        TypeError: ``img_size`` not an int, ``attention`` not a bool.
    """

    def __init__(self, img_size: int = 32, num_classes: int = 10, *, in_chans: int = 3, compat: str = "pc",
                 normalize: str = "softmax", placement: str = "after", width: float = 1.0,
                 attention: bool = True):
        super().__init__()
        k = _stem_pools(img_size)
        for name, v in (("num_classes", num_classes), ("in_chans", in_chans)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width < math.inf:
            raise ValueError(f"width must be a finite number > 0, got {width!r}")
        if not isinstance(attention, bool):
            raise TypeError(f"attention must be a bool, got {attention!r}")
        self.compat = _choice(compat, COMPATS, "compat")
        self.normalize = _choice(normalize, NORMALIZES, "normalize")
        self.placement = _choice(placement, PLACEMENTS, "placement")
        self.img_size, self.in_chans, self.attention = img_size, in_chans, attention
        self.arch = {"type": "attnvgg", "img_size": img_size, "num_classes": num_classes,
                     "in_chans": in_chans, "compat": compat, "normalize": normalize, "placement": placement,
                     "width": width, "attention": attention}
        ch = [max(1, round(c * width)) for c, _ in _BLOCKS]
        c_in = [in_chans] + ch[:-1]
        self.block1, self.block2, self.block3, self.block4, self.block5 = (
            _conv_block(c_in[i], ch[i], _BLOCKS[i][1]) for i in range(5))
        self.block6 = _conv_block(ch[4], ch[5], _BLOCKS[5][1], pool_each=True)
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.stem_pools = (max(k - 1, 0), min(k, 1))  # pools after block 1, after block 2
        self.global_conv = nn.Conv2d(ch[5], ch[5], 1)
        self.map_sizes = ltpa_map_sizes(img_size, placement)
        dim = ch[5]
        if attention:
            self.project = nn.Conv2d(ch[2], dim, 1, bias=False) if ch[2] != dim else None
            self.attn = nn.ModuleList(LTPAAttention(dim, compat, normalize) for _ in range(3))
        self.classifier = nn.Linear(dim * (3 if attention else 1), num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """Xavier-uniform for convs and the classifier (the reference's default), BatchNorm 1/0, biases 0."""
        for mod in self.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(mod.weight)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.BatchNorm2d):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)

    @property
    def variant(self) -> str:
        """The variant name (:data:`LTPA_VARIANTS`) of this model."""
        return f"{self.compat}-{self.normalize}-{self.placement}" if self.attention else "vgg"

    def forward_features(self, x: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """``x`` (B, in_chans, S, S) -> ``((l1, l2, l3), g)``: raw local features (B, C_i, h_i, w_i) at the
        model's placement and the global feature ``g`` (B, C_g)."""
        want = (self.in_chans, self.img_size, self.img_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x must be (B, {want[0]}, {want[1]}, {want[2]}) for this model, "
                             f"got {tuple(x.shape)}")
        x = self.block1(x)
        for _ in range(self.stem_pools[0]):
            x = self.pool(x)
        x = self.block2(x)
        for _ in range(self.stem_pools[1]):
            x = self.pool(x)
        locals_ = []
        for block in (self.block3, self.block4, self.block5):
            x = block(x)
            pooled = self.pool(x)
            locals_.append(x if self.placement == "before" else pooled)
            x = pooled
        g = self.global_conv(self.block6(x))
        return tuple(locals_), g.flatten(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        locals_, g = self.forward_features(x)
        if not self.attention:
            return self.classifier(g), ()
        projections = (self.project, None, None)  # l2, l3 have g's width at every width multiplier
        attended, maps = [], []
        for l, proj, est in zip(locals_, projections, self.attn):
            g_a, a = est(l if proj is None else proj(l), g)
            attended.append(g_a)
            maps.append(a)
        return self.classifier(torch.cat(attended, dim=1)), tuple(maps)


def create_attnvgg(arch: dict) -> AttnVGG:
    """Build an :class:`AttnVGG` from a JSON-serialisable architecture dict (like ``models.create_vit``).

    Keys: ``img_size`` and ``num_classes`` (required); ``type`` (``"attnvgg"`` if given), ``in_chans`` (3),
    ``width`` (1.0), and either ``variant`` (a name of :data:`LTPA_VARIANTS`, e.g. ``"pc-softmax-after"``
    or ``"vgg"``) or any of ``compat`` ("pc"), ``normalize`` ("softmax"), ``placement`` ("after"),
    ``attention`` (True). ``create_attnvgg(model.arch)`` rebuilds ``model``'s architecture.

    Raises:
        TypeError: ``arch`` is not a dict, or a value of the wrong type (see :class:`AttnVGG`).
        ValueError: unknown or missing keys, ``variant`` together with compat/normalize/placement/attention,
            ``type`` other than "attnvgg", or any bad value (see :class:`AttnVGG`).
    """
    if not isinstance(arch, dict):
        raise TypeError(f"arch must be a dict, got {type(arch).__name__}")
    unknown = sorted(set(arch) - set(_ARCH_KEYS))
    if unknown:
        raise ValueError(f"arch has unknown keys {unknown}; allowed: {list(_ARCH_KEYS)}")
    missing = [key for key in ("img_size", "num_classes") if key not in arch]
    if missing:
        raise ValueError(f"arch is missing required keys {missing}")
    kwargs = dict(arch)
    if kwargs.pop("type", "attnvgg") != "attnvgg":
        raise ValueError(f"arch['type'] must be 'attnvgg', got {arch['type']!r}")
    if "variant" in kwargs:
        clash = sorted({"compat", "normalize", "placement", "attention"} & set(kwargs))
        if clash:
            raise ValueError(f"arch gives 'variant' and {clash}; give one or the other")
        kwargs.update(parse_ltpa_variant(kwargs.pop("variant")))
    return AttnVGG(**kwargs)


def _grid_pair(grid) -> tuple[int, int]:
    pair = (grid, grid) if isinstance(grid, int) else tuple(grid) if isinstance(grid, Sequence) else ()
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair):
        raise ValueError(f"grid must be an int >= 1 or a pair (gh, gw) of them, got {grid!r}")
    return pair


def _check_maps(maps) -> list[torch.Tensor]:
    if isinstance(maps, torch.Tensor) or not isinstance(maps, Sequence) or len(maps) == 0:
        raise ValueError("maps must be a non-empty list/tuple of (B, h, w) or (B, 1, h, w) tensors "
                         "(AttnVGG's second output; the baseline has none)")
    out = []
    for i, m in enumerate(maps):
        if not isinstance(m, torch.Tensor) or not (m.ndim == 3 or (m.ndim == 4 and m.shape[1] == 1)):
            raise ValueError(f"maps[{i}] must be a (B, h, w) or (B, 1, h, w) tensor, got "
                             f"{tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__}")
        out.append(m if m.ndim == 3 else m[:, 0])
    if len({m.shape[0] for m in out}) != 1:
        raise ValueError(f"maps must share one batch size, got {[m.shape[0] for m in out]}")
    return out


def ltpa_saliency(maps, grid, *, levels: Sequence[int] | None = None, mode: str = "auto",
                  normalize: str = "sum") -> torch.Tensor:
    """Combine the per-level attention maps of an :class:`AttnVGG` into one (B, gh, gw) saliency map.

    Each selected level (B, h_i, w_i) or (B, 1, h_i, w_i) is resized to the grid (``mode="area"``: mean over
    the covered cells, ``"bilinear"``: align_corners=False; ``"auto"``: area where the level is at least as
    fine as the grid in both directions, else bilinear), normalised per image (``normalize="sum"``: to sum
    1 over the grid, so a softmax map area-pooled onto a grid that divides it is exactly its attention mass
    per cell; ``"max"``: to maximum 1; ``"none"``), and the levels are averaged with equal weight.

    Args:
        maps: the ``maps`` output of :class:`AttnVGG` (any float dtype, one batch size).
        grid: ``gh`` = ``gw`` int or ``(gh, gw)`` (e.g. a ViT's patch grid, (8, 8) for the CIFAR teacher).
        levels: 0-based indices of the levels to use (default: all).

    Returns: (B, gh, gw) float32 (float64 for float64 maps).

    Raises:
        ValueError: empty/ill-shaped ``maps``, a bad ``grid``, ``levels`` empty, repeated or out of range,
            or an unknown ``mode``/``normalize``.
    """
    maps = _check_maps(maps)
    gh, gw = _grid_pair(grid)
    _choice(mode, ("auto", "area", "bilinear"), "mode")
    _choice(normalize, ("sum", "max", "none"), "normalize")
    if levels is None:
        levels = range(len(maps))
    levels = list(levels)
    if not levels or len(set(levels)) != len(levels) or not all(
            isinstance(i, int) and 0 <= i < len(maps) for i in levels):
        raise ValueError(f"levels must be distinct ints in [0, {len(maps)}), got {levels!r}")
    out = 0
    for i in levels:
        m = maps[i]
        m = m.to(torch.promote_types(m.dtype, torch.float32))[:, None]
        area = mode == "area" or (mode == "auto" and m.shape[-2] >= gh and m.shape[-1] >= gw)
        m = F.interpolate(m, size=(gh, gw), mode="area") if area else \
            F.interpolate(m, size=(gh, gw), mode="bilinear", align_corners=False)
        m = m[:, 0]
        if normalize == "sum":
            m = m / m.sum(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(m.dtype).tiny)
        elif normalize == "max":
            m = m / m.amax(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(m.dtype).tiny)
        out = out + m
    return out / len(levels)


class LTPAResult(tuple):
    """``(maps, logits)`` of :meth:`LTPAExplainer.explain`, like :class:`rollout_fast.explain.RolloutResult`,
    with the per-level maps in ``levels``."""

    __slots__ = ()

    def __new__(cls, maps: torch.Tensor, logits: torch.Tensor, levels: tuple[torch.Tensor, ...]):
        return super().__new__(cls, (maps, logits, levels))

    @property
    def maps(self) -> torch.Tensor:
        return self[0]

    @property
    def logits(self) -> torch.Tensor:
        return self[1]

    @property
    def levels(self) -> tuple[torch.Tensor, ...]:
        return self[2]


class LTPAExplainer:
    """The maps of an attention-gated :class:`AttnVGG` for the rollout jobs, in the form of
    :class:`rollout_fast.AttentionRollout` (``explain(images)`` -> ``(maps, logits)``): Learn to Pay Attention's
    maps are the model's own forward output (Jetley et al., ICLR 2018), so one forward pass gives them.

    Args:
        model: an :class:`AttnVGG` with ``attention=True`` (any dtype; run in eval mode and restored).
        grid: ``(gh, gw)`` or an int of the combined map (default: the finest level's size,
            ``model.map_sizes[0]``), e.g. the ViT teacher's patch grid (8, 8) to compare them cell by cell.

    ``explain(images)``: ``images`` (B, 3, S, S) float, ``S = model.img_size``. Returns :class:`LTPAResult`:
    ``maps`` (B, gh, gw) float32, :func:`ltpa_saliency` of every level (each resized to the grid, normalised
    to sum 1 per image, averaged: the mean attention mass per cell); ``logits`` (B, num_classes) float32;
    ``levels``: the three raw attention maps ``a`` (B, h_i, w_i) float32. Runs under ``torch.no_grad``.
    ``grad_rollout`` / ``explain_grad`` do not exist for it (the jobs refuse method 'grad' first).

    Raises:
        ValueError: ``model`` is not an attention-gated AttnVGG (the plain VGG baseline has no maps) or a bad
            ``grid``; in ``explain``, an input of the wrong shape (:meth:`AttnVGG.forward_features`).
    """

    def __init__(self, model: nn.Module, grid=None):
        check_attention_model(model, "model")
        self.model = model
        self.grid = tuple(model.map_sizes[0]) if grid is None else _grid_pair(grid)

    @torch.no_grad()
    def explain(self, images: torch.Tensor, grid=None) -> LTPAResult:
        """See the class; ``grid`` (an int or (gh, gw)) overrides the explainer's grid for this call."""
        grid = self.grid if grid is None else _grid_pair(grid)
        was = self.model.training
        self.model.eval()
        try:
            logits, levels = self.model(images)
        finally:
            self.model.train(was)
        maps = ltpa_saliency(levels, grid)
        return LTPAResult(maps.float(), logits.float(), tuple(m.float() for m in levels))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.explain(images).maps


def check_attention_model(model, name: str = "model") -> AttnVGG:
    """``model`` if it is an attention-gated :class:`AttnVGG`; otherwise ValueError naming ``name`` and what
    ``model`` is (another class, or the plain VGG baseline, which has no attention maps)."""
    if not isinstance(model, AttnVGG) or not model.attention:
        what = type(model).__name__ if not isinstance(model, AttnVGG) else "AttnVGG variant 'vgg' (no attention)"
        raise ValueError(f"{name}: expected an attention-gated Learn to Pay Attention model (AttnVGG), got {what}")
    return model
