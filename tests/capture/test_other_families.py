"""Hugging Face transformers, torchvision and open_clip ViTs (issue 12 item 3), and ``check_model`` (item 4).

Small random-init models (depth 2, 48 px, 8 px patches: a 6 x 6 grid), attention sharpened so maps are far
from uniform, real photographs from ../shared/data/imagenet-sample where present (else fixed random images).
The independent computation is each library's own explicit attention on a deep copy: Hugging Face with
``attn_implementation="eager"`` and ``output_attentions=True`` (also the autograd reference for gradient
rollout: its attentions are the tensors the model multiplies with v), ``nn.MultiheadAttention`` called with
``need_weights=True, average_attn_weights=False``. Every capture equals it within 1e-5 (float32), maps equal
the reference rollout of it, the model is left exactly as it was, pruning at keep 1.0 equals the model and
at 0.5 equals the model's own layers run on the kept tokens.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from paths import IMAGENET_SAMPLE

from rollout_fast import AttentionRollout, check_model, prune_tokens, reference
from rollout_fast.capture import UnsupportedModelError, capture_attention, capture_attention_grad, describe_model
from rollout_fast.check import main as check_main

transformers = pytest.importorskip("transformers", reason="transformers not installed (the test extra)")
tv_vit = pytest.importorskip("torchvision.models.vision_transformer")
open_clip = pytest.importorskip("open_clip", reason="open_clip_torch not installed (the test extra)")

ATOL = 1e-5
SIZE = 48
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=SIZE,
             patch_size=8)
# name -> (model class, config class, extra config, prefix tokens, class token, classifier)
HF = {
    "vit": ("ViTForImageClassification", "ViTConfig", dict(num_labels=5), 1, True, True),
    "deit-distilled": ("DeiTForImageClassificationWithTeacher", "DeiTConfig", dict(num_labels=5), 2, True, True),
    "dinov2": ("Dinov2ForImageClassification", "Dinov2Config", dict(num_labels=5), 1, True, True),
    "dinov2-registers": ("Dinov2WithRegistersForImageClassification", "Dinov2WithRegistersConfig",
                         dict(num_labels=5, num_register_tokens=4), 5, True, True),
    "beit": ("BeitForImageClassification", "BeitConfig", dict(num_labels=5, use_relative_position_bias=True), 1,
             True, True),
    "clip-vision": ("CLIPVisionModel", "CLIPVisionConfig", {}, 1, True, False),
    "siglip-vision": ("SiglipVisionModel", "SiglipVisionConfig", {}, 0, False, False),
}
FAMILIES = [f"hf-{n}-{impl}" for n in HF for impl in ("sdpa", "eager")] + ["torchvision", "open_clip"]


def _sharpen(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("query.weight", "key.weight", "q_proj.weight", "k_proj.weight", "in_proj_weight")):
                p.mul_(4.0)
            elif "relative_position_bias_table" in name:
                p.normal_(0.0, 1.0)  # zero-initialised: the bias would be a no-op
    return model.eval()


def build(name):
    torch.manual_seed(0)
    if name == "torchvision":
        return _sharpen(tv_vit.VisionTransformer(image_size=SIZE, patch_size=8, num_layers=2, num_heads=4,
                                                 hidden_dim=64, mlp_dim=128, num_classes=5))
    if name == "open_clip":
        return _sharpen(open_clip.transformer.VisionTransformer(image_size=SIZE, patch_size=8, width=64, layers=2,
                                                                heads=4, mlp_ratio=2.0, output_dim=32))
    family, impl = name[3:].rsplit("-", 1)
    cls, cfg_cls, extra, *_ = HF[family]
    cfg = getattr(transformers, cfg_cls)(**SMALL, **extra, attn_implementation=impl)
    return _sharpen(getattr(transformers, cls)(cfg))


@pytest.fixture(scope="module")
def images():
    files = sorted((IMAGENET_SAMPLE / "images").glob("*"))[:3] if IMAGENET_SAMPLE.is_dir() else []
    if not files:
        return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    from PIL import Image
    from torchvision.transforms.functional import normalize, pil_to_tensor, resize
    out = [normalize(pil_to_tensor(resize(Image.open(f).convert("RGB"), [SIZE, SIZE])).float() / 255,
                     [0.5] * 3, [0.5] * 3) for f in files]
    return torch.stack(out)


def library_attention(model, images, grad: bool = False):
    """``(output, (L, B, H, N, N) attention)`` from the library's own explicit path on a deep copy; with
    ``grad`` the attention tensors stay in the autograd graph (Hugging Face only)."""
    twin = copy.deepcopy(model).eval()
    with torch.set_grad_enabled(grad):
        if isinstance(twin, transformers.PreTrainedModel):
            twin.set_attn_implementation("eager")
            out = twin(pixel_values=images, output_attentions=True)
            return out, list(out.attentions) if grad else torch.stack(out.attentions)
        got = []
        for mha in describe_model(twin).attentions:
            mha.register_forward_pre_hook(lambda m, a, kw: (a, {**kw, "need_weights": True,
                                                                "average_attn_weights": False}), with_kwargs=True)
            mha.register_forward_hook(lambda m, a, o: (got.append(o[1]), (o[0], None))[1])
        return twin(images), torch.stack(got)


def _state(model):
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return {k: v.clone() for k, v in model.state_dict().items()}, hooks, [m.training for m in model.modules()]


def _main(spec, output):
    out = spec.logits(output)
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


@pytest.mark.parametrize("name", FAMILIES)
def test_captured_attention_is_the_libraries_own(name, images):
    model = build(name)
    spec = describe_model(model)
    before = _state(model)
    plain, eager = library_attention(model, images)
    fused = capture_attention(model, images)
    per_head = capture_attention(model, images, head_fusion=None)
    torch.testing.assert_close(fused.attention[:, :, 0], eager.mean(2), atol=ATOL, rtol=0)
    torch.testing.assert_close(per_head.attention, eager, atol=ATOL, rtol=0)
    torch.testing.assert_close(_main(spec, fused.output), _main(spec, plain), atol=1e-4, rtol=1e-4)
    expected_path = "eager-softmax" if name.endswith("eager") else "fused-chunked"
    assert fused.path == expected_path
    after = _state(model)
    assert after[1:] == before[1:] and all(torch.equal(before[0][k], v) for k, v in after[0].items())


@pytest.mark.parametrize("name", FAMILIES)
def test_layout_read_from_the_model(name, images):
    spec = describe_model(build(name))
    layout = spec.layout((SIZE, SIZE))
    if name.startswith("hf-"):
        _, _, _, P, cls, classifier = HF[name[3:].rsplit("-", 1)[0]]
    else:
        P, cls, classifier = 1, True, name == "torchvision"
    assert (layout.num_prefix_tokens, layout.grid, layout.has_class_token, spec.classifier) == \
        (P, (SIZE // 8, SIZE // 8), cls, classifier)


@pytest.mark.parametrize("name", [n for n in FAMILIES if n.endswith("sdpa")] + ["torchvision", "open_clip"])
@pytest.mark.parametrize("head_fusion,discard", [("mean", 0.0), ("max", 0.5), ("min", 0.9)])
def test_maps_equal_reference_rollout(name, head_fusion, discard, images):
    model = build(name)
    layout = describe_model(model).layout((SIZE, SIZE))
    _, eager = library_attention(model, images)
    readout = "cls" if layout.has_class_token else "mean"
    expected = reference.attention_rollout(eager, head_fusion=head_fusion, discard_ratio=discard,
                                           num_prefix_tokens=layout.num_prefix_tokens, grid=layout.grid,
                                           readout=readout, normalize="max")
    maps = AttentionRollout(model, head_fusion=head_fusion, discard_ratio=discard)(images)
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", [f"hf-{n}-{impl}" for n in HF if HF[n][5] for impl in ("sdpa", "eager")])
def test_grad_rollout_equals_autograd(name, images):
    model = build(name)
    spec = describe_model(model)
    out, attns = library_attention(model, images, grad=True)
    target = out.logits.argmax(-1)
    y = out.logits.gather(1, target[:, None]).sum()
    grads = torch.autograd.grad(y, attns)
    cap = capture_attention_grad(model, images)
    att, grad = torch.stack(attns).detach(), torch.stack(grads)
    torch.testing.assert_close(cap.attentions, att, atol=ATOL, rtol=0)
    torch.testing.assert_close(cap.gradients, grad, atol=1e-5, rtol=1e-4)
    assert bool(grad.abs().amax() > 1e-6)  # the comparison is not between zeros
    layout = spec.layout((SIZE, SIZE))
    expected = reference.grad_rollout(att, grad, num_prefix_tokens=layout.num_prefix_tokens, grid=layout.grid,
                                      normalize="max")
    torch.testing.assert_close(AttentionRollout(model).grad_rollout(images), expected, atol=1e-5, rtol=1e-5)


def test_grad_rollout_of_multihead_attention_models(images):
    """torchvision: the captured attention is torch's own; its gradient equals a finite difference."""
    model = build("torchvision").double()
    x = images.double()
    cap = capture_attention_grad(model, x, targets=2)
    _, eager = library_attention(model, x)
    torch.testing.assert_close(cap.attentions, eager.float(), atol=ATOL, rtol=0)
    # d logit / d A at one entry, by perturbing that probability inside the block (central difference)
    layer, b, h, i, j, eps = 1, 0, 1, 3, 5, 1e-6

    def logit_with(delta):
        from rollout_fast.capture.hooks import Tap

        def sdpa(idx, q, k, v, attn_mask=None, **kw):
            if idx != layer:
                return None
            p = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1).clone()
            p[b, h, i, j] += delta
            return p @ v
        with torch.no_grad(), Tap(describe_model(model).attentions, sdpa=sdpa):
            return model(x)[b, 2]
    fd = (logit_with(eps) - logit_with(-eps)) / (2 * eps)
    assert float(cap.gradients[layer, b, h, i, j]) == pytest.approx(float(fd), rel=1e-4, abs=1e-7)


def test_grad_rollout_needs_logits(images):
    with pytest.raises(UnsupportedModelError, match="grad rollout needs class logits"):
        AttentionRollout(build("hf-clip-vision-sdpa")).grad_rollout(images)


@pytest.mark.parametrize("name", ["hf-vit-sdpa", "hf-deit-distilled-eager", "hf-dinov2-registers-sdpa",
                                  "hf-siglip-vision-sdpa", "torchvision", "open_clip"])
def test_pruning(name, images):
    model = build(name)
    spec = describe_model(model)
    before = _state(model)
    with torch.no_grad():
        full = _main(spec, model(images))
        torch.testing.assert_close(_main(spec, prune_tokens(model, 1.0, "random")(images)), full, atol=0, rtol=0)
        pruned = prune_tokens(model, 0.5, "rollout")
        out = _main(spec, pruned(images))
        idx = pruned.last_indices
        assert idx.shape == (images.shape[0], 18)
        expected = _manual_pruned(name, model, images, idx, spec.layout((SIZE, SIZE)).num_prefix_tokens)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    after = _state(model)
    assert after[1:] == before[1:]


def _manual_pruned(name, model, images, idx, P):
    """The model's own embedding, layers and head run on the prefix + kept tokens, written out."""
    def keep(x):
        g = torch.gather(x[:, P:], 1, idx[..., None].expand(-1, -1, x.shape[-1]))
        return torch.cat([x[:, :P], g], 1)
    if name == "torchvision":
        x = model._process_input(images)
        x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], 1) + model.encoder.pos_embedding
        for blk in model.encoder.layers:
            x = blk(keep(x) if blk is model.encoder.layers[0] else x)
        return model.heads(model.encoder.ln(x)[:, 0])
    if name == "open_clip":
        v = model
        x = v.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], 1) + v.positional_embedding
        x = keep(v.ln_pre(x))
        for blk in v.transformer.resblocks:
            x = blk(x)
        pooled, _ = v._global_pool(v.ln_post(x))
        return pooled @ v.proj
    base = model.base_model
    x = keep(base.embeddings(images))
    for layer in describe_model(model).attentions:
        x = layer(x, None) if name.startswith("hf-siglip") else layer(x)  # SigLIP's layer takes the mask too
        x = x[0] if isinstance(x, tuple) else x
    if name.startswith("hf-siglip"):
        return base.post_layernorm(x)
    x = base.layernorm(x)
    if name.startswith("hf-vit"):
        return model.classifier(x[:, 0])
    if name.startswith("hf-deit"):
        return (model.cls_classifier(x[:, 0]) + model.distillation_classifier(x[:, 1])) / 2
    cls = x[:, 0]
    return model.classifier(torch.cat([cls, x[:, 1 + model.config.num_register_tokens:].mean(1)], -1))


@pytest.mark.parametrize("name", ["hf-beit-sdpa"])
def test_pruning_refused_up_front_for_relative_bias(name):
    with pytest.raises(UnsupportedModelError, match="relative-position bias"):
        prune_tokens(build(name), 0.5, "random")


def test_unsupported_models_are_refused_with_the_reason():
    swin = transformers.SwinModel(transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1],
                                                          num_heads=[2], window_size=4))
    with pytest.raises(UnsupportedModelError, match="'swin'.*windowed"):
        AttentionRollout(swin)
    clip = transformers.CLIPModel(transformers.CLIPConfig(
        vision_config=dict(SMALL), text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=32)))
    with pytest.raises(UnsupportedModelError, match="pass the vision model"):
        AttentionRollout(clip)


def test_multihead_attention_that_is_not_self_attention_is_refused(images):
    model = build("torchvision")
    mha = model.encoder.layers[0].self_attention
    forward = mha.forward
    mha.forward = lambda q, k, v, **kw: forward(q, k, v.clone(), **kw)  # key and value no longer the query
    try:
        with pytest.raises(UnsupportedModelError, match=r"blocks\[0\].*one batched \(N, B, E\) sequence"):
            capture_attention(model, images)
    finally:
        del mha.forward


@pytest.mark.parametrize("name", FAMILIES)
def test_check_model_passes(name, images):
    report = check_model(build(name), images)
    assert report.ok and report.max_error <= 1e-5 and len(report.layer_errors) == 2
    assert report.prunable == (not name.startswith("hf-beit"))


def test_check_model_reports_a_mismatch(images, monkeypatch):
    import rollout_fast.check as chk
    real = chk.eager_attention
    monkeypatch.setattr(chk, "eager_attention", lambda m, x: real(m, x) * 1.001)
    report = check_model(build("torchvision"), images)
    assert not report.ok and "MISMATCH" in report.table()


def test_check_command(tmp_path, capsys):
    folder = tmp_path / "hf-vit"
    build("hf-vit-sdpa").save_pretrained(folder)
    assert check_main([str(folder), "--image-size", str(SIZE), str(SIZE)]) == 0
    out = capsys.readouterr().out
    assert "capture path     fused-chunked" in out and "patch grid       6 x 6" in out and out.rstrip().endswith(
        "OK (tolerance 1e-05)")
    assert check_main(["swin_tiny_patch4_window7_224"]) == 2
    assert "windowed" in capsys.readouterr().err
    assert check_main(["no_such_model_name"]) == 2
    assert "is not a timm model name" in capsys.readouterr().err
