"""AttnVGG (Learn to Pay Attention, Jetley et al. 2018) against plain re-implementations of its equations.

Tiny widths and batch 2 throughout: the CPU is shared with training jobs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rollout_fast.ltpa import (
    LTPA_VARIANTS,
    AttnVGG,
    LTPAAttention,
    create_attnvgg,
    ltpa_map_sizes,
    ltpa_saliency,
    parse_ltpa_variant,
)

ATTN_VARIANTS = [v for v in LTPA_VARIANTS if v != "vgg"]
TINY = 1 / 16  # channels 4, 8, 16, 32, 32, 32


def _model(variant: str, img_size: int = 32, width: float = TINY, num_classes: int = 5) -> AttnVGG:
    model = create_attnvgg({"type": "attnvgg", "img_size": img_size, "num_classes": num_classes,
                            "variant": variant, "width": width}).double().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics and biases, so no term is silently zero
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.1, 0.1)
        model.global_conv.bias.uniform_(-0.1, 0.1)
        model.classifier.bias.uniform_(-0.1, 0.1)
    return model


def _paper_level(l, g, compat, normalize, u=None, proj=None):
    """One image, one level, written from the paper's equations with explicit loops over positions.
    l (C_l, h, w), g (C,), u (C,) or None, proj (C, C_l) or None -> (g_a (C,), a (h, w))."""
    _c_l, h, w = l.shape
    vectors = [l[:, y, x] for y in range(h) for x in range(w)]           # l_i, i = 1..n
    if proj is not None:                                                 # projection to g's width
        vectors = [proj @ v for v in vectors]
    if compat == "pc":
        scores = [torch.dot(u, v + g) for v in vectors]                      # <u, l_i + g>
    else:
        scores = [torch.dot(v, g) for v in vectors]                          # <l_i, g>
    scores = torch.stack(scores)
    if normalize == "softmax":
        e = torch.exp(scores - scores.max())
        a = e / e.sum()                                                  # Eq. 1
        g_a = sum(a[i] * vectors[i] for i in range(len(vectors)))        # Eq. 2
    else:
        a = 1 / (1 + torch.exp(-scores))
        g_a = sum(a[i] * vectors[i] for i in range(len(vectors))) / len(vectors)
    return g_a, a.reshape(h, w)


@pytest.mark.parametrize("variant", ATTN_VARIANTS)
def test_estimators_match_the_paper_equations(variant):
    compat, normalize, _ = variant.split("-")
    model = _model(variant)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        logits, maps = model(x)
        locals_, g = model.forward_features(x)
    proj = model.project.weight[:, :, 0, 0]
    assert proj.shape == (32, 16)  # l1 (256 * width) projected to g's width (512 * width)
    for b in range(2):
        attended = []
        for level, l in enumerate(locals_):
            u = model.attn[level].u if compat == "pc" else None
            g_a, a = _paper_level(l[b], g[b], compat, normalize, u, proj if level == 0 else None)
            torch.testing.assert_close(maps[level][b], a, rtol=1e-10, atol=1e-12)
            attended.append(g_a)
        expected = model.classifier.weight @ torch.cat(attended) + model.classifier.bias
        torch.testing.assert_close(logits[b], expected, rtol=1e-10, atol=1e-12)
    assert all(a.dtype == torch.float64 for a in maps)
    if normalize == "softmax":  # softmax maps are not uniform (the test would not see a wrong axis)
        assert all(float(a.std()) > 1e-6 for a in maps)


def test_baseline_classifies_g_directly():
    model = _model("vgg")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        logits, maps = model(x)
        _, g = model.forward_features(x)
    assert maps == () and not hasattr(model, "attn") and model.variant == "vgg"
    torch.testing.assert_close(logits, g @ model.classifier.weight.T + model.classifier.bias)


@pytest.mark.parametrize("variant", ATTN_VARIANTS)
def test_map_ranges_and_dtype_under_autocast(variant):
    model = create_attnvgg({"img_size": 32, "num_classes": 3, "variant": variant, "width": TINY}).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, maps = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 3) and len(maps) == 3
    for a in maps:
        assert a.dtype == torch.float32
        if "softmax" in variant:
            torch.testing.assert_close(a.sum(dim=(1, 2)), torch.ones(2), rtol=0, atol=1e-5)
            assert bool((a >= 0).all())
        else:
            assert bool(((a > 0) & (a < 1)).all())


@pytest.mark.parametrize("img_size,before,after", [
    (32, [(32, 32), (16, 16), (8, 8)], [(16, 16), (8, 8), (4, 4)]),
    (112, [(28, 28), (14, 14), (7, 7)], [(14, 14), (7, 7), (4, 4)]),
    (64, [(32, 32), (16, 16), (8, 8)], [(16, 16), (8, 8), (4, 4)]),
])
def test_before_after_shapes_and_after_is_the_pooled_before(img_size, before, after):
    m_before = _model("dp-softmax-before", img_size, width=1 / 32)
    m_after = _model("dp-softmax-after", img_size, width=1 / 32)
    m_after.load_state_dict(m_before.state_dict())  # same parameters: only the placement differs
    x = torch.randn(2, 3, img_size, img_size, dtype=torch.float64)
    with torch.no_grad():
        l_before, g_before = m_before.forward_features(x)
        l_after, g_after = m_after.forward_features(x)
        maps_before, maps_after = m_before(x)[1], m_after(x)[1]
    assert [tuple(a.shape[1:]) for a in maps_before] == before == list(ltpa_map_sizes(img_size, "before"))
    assert [tuple(a.shape[1:]) for a in maps_after] == after == list(m_after.map_sizes)
    assert g_before.shape == (2, 16)
    torch.testing.assert_close(g_before, g_after, rtol=0, atol=0)
    for lb, la in zip(l_before, l_after):
        torch.testing.assert_close(la, F.max_pool2d(lb, 2, 2, ceil_mode=True), rtol=0, atol=0)


def test_gradients_flow_to_u_and_the_projection():
    model = create_attnvgg({"img_size": 32, "num_classes": 4, "variant": "pc-sigmoid-before", "width": TINY})
    logits, maps = model(torch.randn(2, 3, 32, 32))
    (logits.sum() + sum(a.sum() for a in maps)).backward()
    for est in model.attn:
        assert est.u.grad is not None and float(est.u.grad.abs().sum()) > 0
    assert float(model.project.weight.grad.abs().sum()) > 0
    dp = create_attnvgg({"img_size": 32, "num_classes": 4, "variant": "dp-softmax-after", "width": TINY})
    assert all(est.u is None for est in dp.attn)


def test_estimator_module_matches_paper_on_fixed_weights():
    est = LTPAAttention(3, "pc", "softmax").double()
    with torch.no_grad():
        est.u.copy_(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    l = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]], [[2.0, 2.0]]]], dtype=torch.float64)  # (1, 3, 1, 2)
    g = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    g_a, a = est(l, g)
    # c_1 = <u, (1,0,2) + (1,1,0)> = 2 - 2 + 1 = 1; c_2 = <u, (0,1,2) + (1,1,0)> = 1 - 4 + 1 = -2
    a1 = 1 / (1 + torch.exp(torch.tensor(-3.0, dtype=torch.float64)))
    torch.testing.assert_close(a, torch.stack([a1, 1 - a1]).reshape(1, 1, 2))
    torch.testing.assert_close(g_a[0], a1 * l[0, :, 0, 0] + (1 - a1) * l[0, :, 0, 1])


def test_parameter_counts():
    def conv(ci, co, k):
        return ci * co * k * k

    def expected(width, attention, compat, num_classes=10):
        ch = [max(1, round(c * width)) for c in (64, 128, 256, 512, 512, 512)]
        n = 0
        for ci, co, reps in zip([3] + ch[:5], ch, (2, 2, 3, 3, 3, 2)):
            n += conv(ci, co, 3) + 2 * co + (reps - 1) * (conv(co, co, 3) + 2 * co)   # convs + BatchNorm
        n += conv(ch[5], ch[5], 1) + ch[5]                                             # g
        if attention:
            n += conv(ch[2], ch[5], 1) + (3 * ch[5] if compat == "pc" else 0)          # projection, u
        return n + ch[5] * (3 if attention else 1) * num_classes + num_classes

    counted = {}
    for variant in ("vgg", "pc-softmax-after", "dp-sigmoid-before"):
        for width in (1.0, 0.25):
            model = create_attnvgg({"img_size": 32, "num_classes": 10, "variant": variant, "width": width})
            counted[variant, width] = sum(p.numel() for p in model.parameters())
            kw = parse_ltpa_variant(variant)
            assert counted[variant, width] == expected(width, kw["attention"], kw["compat"])
    assert counted["vgg", 1.0] == 19_707_338
    assert counted["pc-softmax-after", 1.0] == 19_850_186
    assert counted["dp-sigmoid-before", 1.0] == 19_848_650


def test_arch_dict_round_trip_and_variants():
    model = create_attnvgg({"type": "attnvgg", "img_size": 112, "num_classes": 10, "compat": "dp",
                            "normalize": "sigmoid", "placement": "before", "width": 0.125, "attention": True})
    assert model.variant == "dp-sigmoid-before"
    again = create_attnvgg(model.arch)
    assert again.arch == model.arch
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in again.state_dict().items()} == shapes
    assert len(LTPA_VARIANTS) == 9
    for v in LTPA_VARIANTS:
        assert create_attnvgg({"img_size": 32, "num_classes": 2, "variant": v, "width": TINY}).variant == v


@pytest.mark.parametrize("call,match", [
    (lambda: parse_ltpa_variant("pc-softmax-middle"), "variant must be one of"),
    (lambda: AttnVGG(32, 10, compat="bilinear"), "compat must be one of"),
    (lambda: AttnVGG(32, 10, normalize="relu"), "normalize must be one of"),
    (lambda: AttnVGG(32, 10, placement="inside"), "placement must be one of"),
    (lambda: AttnVGG(100, 10), "img_size must be 2\\*\\*k \\* m"),
    (lambda: AttnVGG(36, 10), "img_size must be 2\\*\\*k \\* m"),
    (lambda: AttnVGG(8, 10), "img_size must be 2\\*\\*k \\* m"),
    (lambda: AttnVGG(32, 10, width=0), "width must be"),
    (lambda: AttnVGG(32, 0), "num_classes must be"),
    (lambda: create_attnvgg({"img_size": 32, "num_classes": 10, "depth": 3}), "unknown keys \\['depth'\\]"),
    (lambda: create_attnvgg({"img_size": 32}), "missing required keys \\['num_classes'\\]"),
    (lambda: create_attnvgg({"type": "vit", "img_size": 32, "num_classes": 2}), "arch\\['type'\\]"),
    (lambda: create_attnvgg({"img_size": 32, "num_classes": 2, "variant": "vgg", "compat": "dp"}),
     "give one or the other"),
    (lambda: create_attnvgg({"img_size": 32, "num_classes": 2, "variant": "dp"}), "variant must be one of"),
])
def test_bad_arguments_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_input_size_and_types():
    with pytest.raises(TypeError, match="img_size must be an int"):
        AttnVGG(32.0, 10)
    with pytest.raises(TypeError, match="attention must be a bool"):
        AttnVGG(32, 10, attention="yes")
    model = AttnVGG(32, 10, width=TINY)
    with pytest.raises(ValueError, match=r"x must be \(B, 3, 32, 32\)"):
        model(torch.randn(2, 3, 112, 112))
    with pytest.raises(TypeError, match="arch must be a dict"):
        create_attnvgg("pc-softmax-after")


def test_saliency_exact_values():
    fine = torch.arange(16, dtype=torch.float64).reshape(1, 4, 4)
    fine = fine / fine.sum()                                     # a softmax-like map, sums to 1
    coarse = torch.tensor([[[1.0, 3.0], [0.0, 4.0]]], dtype=torch.float64)
    # level 0 area-pooled to 2x2 and sum-normalised = its mass per 2x2 cell
    mass = torch.tensor([[0 + 1 + 4 + 5, 2 + 3 + 6 + 7], [8 + 9 + 12 + 13, 10 + 11 + 14 + 15]],
                        dtype=torch.float64) / 120
    out = ltpa_saliency([fine], 2, levels=[0])
    torch.testing.assert_close(out[0], mass)
    both = ltpa_saliency((fine, coarse[:, None]), (2, 2))       # (B, 1, h, w) accepted; equal weights
    torch.testing.assert_close(both[0], (mass + coarse[0] / 8) / 2)
    assert both.dtype == torch.float64
    # max normalisation, only the coarse level
    by_max = ltpa_saliency([fine, coarse], 2, levels=[1], normalize="max")
    torch.testing.assert_close(by_max[0], coarse[0] / 4)
    # upsampling a 2x2 map to 4x4 uses bilinear (align_corners=False): corners keep their values
    up = ltpa_saliency([coarse.float()], 4, normalize="none")
    expected = F.interpolate(coarse.float()[:, None], size=(4, 4), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(up, expected, rtol=0, atol=0)
    torch.testing.assert_close(up[0, 0], torch.tensor([1.0, 1.5, 2.5, 3.0]))


def test_saliency_from_model_maps_on_the_teacher_grid():
    model = create_attnvgg({"img_size": 32, "num_classes": 3, "variant": "pc-softmax-before", "width": TINY})
    with torch.no_grad():
        _, maps = model(torch.randn(2, 3, 32, 32))
    sal = ltpa_saliency(maps, 8)
    assert sal.shape == (2, 8, 8) and sal.dtype == torch.float32
    torch.testing.assert_close(sal.sum(dim=(1, 2)), torch.ones(2))
    # the 8x8 level alone is returned unchanged (it already sums to 1 on the grid)
    torch.testing.assert_close(ltpa_saliency(maps, 8, levels=[2]), maps[2])


@pytest.mark.parametrize("kwargs,match", [
    ({"maps": [], "grid": 8}, "maps must be a non-empty"),
    ({"maps": torch.rand(2, 4, 4), "grid": 8}, "maps must be a non-empty"),
    ({"maps": [torch.rand(2, 2, 4, 4)], "grid": 8}, r"maps\[0\] must be"),
    ({"maps": [torch.rand(2, 4, 4), torch.rand(3, 2, 2)], "grid": 8}, "one batch size"),
    ({"maps": [torch.rand(2, 4, 4)], "grid": 0}, "grid must be"),
    ({"maps": [torch.rand(2, 4, 4)], "grid": (2, 2, 2)}, "grid must be"),
    ({"maps": [torch.rand(2, 4, 4)], "grid": 2, "levels": [1]}, "levels must be"),
    ({"maps": [torch.rand(2, 4, 4)], "grid": 2, "levels": [0, 0]}, "levels must be"),
    ({"maps": [torch.rand(2, 4, 4)], "grid": 2, "mode": "nearest"}, "mode must be one of"),
    ({"maps": [torch.rand(2, 4, 4)], "grid": 2, "normalize": "l2"}, "normalize must be one of"),
])
def test_saliency_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ltpa_saliency(**kwargs)
