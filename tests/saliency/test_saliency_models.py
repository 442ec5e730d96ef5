"""Saliency encoder-decoders (seed 004): shapes and normalisation, model B's second head, encoder initialisation,
saving and loading; the training inputs: flips aligned across image, density and teacher map, resized densities."""

from __future__ import annotations

import json

import pytest
import torch
from saliency_testing import TINY_SPEC, save_tiny_saliency_model

from rollout_fast.distill import distill_loss
from rollout_fast.saliency import SALIENCY_MODELS, SaliencyNet, create_saliency_model, load_saliency_model
from rollout_fast.saliency.models import STUDENT_SPEC, TEACHER_SPEC
from rollout_fast.saliency.prepare import flip_maps, flip_params, resize_density


@pytest.mark.parametrize("spec, heads", [(TINY_SPEC, 1), (TINY_SPEC, 2), (STUDENT_SPEC, 1)])
@pytest.mark.parametrize("size", [(24, 32), (50, 70)])
def test_maps_are_log_probabilities_at_the_input_size(spec, heads, size):
    torch.manual_seed(0)
    net = create_saliency_model(spec, heads=heads).eval()
    x = torch.randn(2, 3, *size)
    out = net(x, heads="all")
    assert isinstance(out, tuple) and len(out) == heads
    for m in out:
        assert m.shape == (2, *size) and m.dtype == torch.float32
        torch.testing.assert_close(m.exp().sum(dim=(1, 2)), torch.ones(2), rtol=0, atol=1e-5)
    assert torch.equal(net(x), out[0])  # the default output is the saliency head
    p = net.predict(x)
    torch.testing.assert_close(p.sum(dim=(1, 2)), torch.ones(2), rtol=0, atol=1e-5)
    assert (p >= 0).all()


def test_student_and_teacher_sizes():
    """The seed's student has about 12 M parameters; the teacher (ResNet50 encoder, wider decoder) is larger."""
    a = create_saliency_model(STUDENT_SPEC)
    b = create_saliency_model(STUDENT_SPEC, heads=2)
    t = create_saliency_model(TEACHER_SPEC)
    n = [sum(p.numel() for p in m.parameters()) for m in (a, b, t)]
    assert 12e6 < n[0] < 13.5e6 and n[1] - n[0] == 32 * 9 + 1 and n[2] > 2.5 * n[0]
    assert a.spec["input_size"] == [240, 320] and t.spec["encoder"] == "resnet50"
    a.eval()
    assert a(torch.randn(1, 3, 240, 320)).shape == (1, 240, 320)


def test_model_b_second_head_learns_only_from_the_teacher_term():
    torch.manual_seed(0)
    net = create_saliency_model(TINY_SPEC, heads=2)
    x = torch.randn(2, 3, 24, 32)
    gt = torch.rand(2, 24, 32)
    teacher = torch.rand(2, 24, 32)

    def grads(weight_gt, weight_teacher):
        net.zero_grad(set_to_none=True)
        s, t = net(x, heads="all")
        (weight_gt * distill_loss(s, gt) + weight_teacher * distill_loss(t, teacher)).backward()
        return [None if p.grad is None else p.grad.clone() for p in net.heads[1].parameters()], \
               [p.grad.clone() for p in net.heads[0].parameters()]

    t_head, s_head = grads(1.0, 0.0)  # the ground-truth term alone
    assert all(g is None or not g.any() for g in t_head) and all(g.abs().sum() > 0 for g in s_head)
    t_only, s_zero = grads(0.0, 2.5)  # the teacher term alone
    assert all(g.abs().sum() > 0 for g in t_only) and all(not g.any() for g in s_zero)
    t_both, _ = grads(1.0, 2.5)  # together: the second head's gradient is the teacher term's
    for a, b in zip(t_both, t_only):
        torch.testing.assert_close(a, b)


def test_flips_keep_image_density_and_teacher_map_aligned():
    """A hand-made asymmetric case: one bright pixel in the image, the fixation and the teacher's peak at the
    same place; after every flip combination all three still coincide, at the mirrored places."""
    H, W = 4, 6
    img = torch.zeros(4, 3, H, W)
    dens = torch.zeros(4, H, W)
    teach = torch.zeros(4, H, W)
    img[:, :, 0, 1] = 1.0
    dens[:, 0, 1] = 1.0
    teach[:, 0, 1] = 1.0
    h = torch.tensor([False, True, False, True])
    v = torch.tensor([False, False, True, True])
    fi, fd, ft = flip_maps(img, h, v), flip_maps(dens, h, v), flip_maps(teach, h, v)
    want = [(0, 1), (0, W - 2), (H - 1, 1), (H - 1, W - 2)]
    for b, (r, c) in enumerate(want):
        for m in (fi[b, 0], fi[b, 2], fd[b], ft[b]):
            assert m.nonzero().tolist() == [[r, c]], (b, m)
    assert torch.equal(flip_maps(fd, h, v), dens)  # flips undo themselves
    with pytest.raises(ValueError, match="flips: 2/2 flags for a batch of 4"):
        flip_maps(img, h[:2], v[:2])


def test_flip_draws_depend_on_seed_and_epoch_only():
    a = flip_params(0, 3, 100)
    assert all(torch.equal(x, y) for x, y in zip(a, flip_params(0, 3, 100)))
    assert not torch.equal(a[0], flip_params(0, 4, 100)[0]) and not torch.equal(a[0], flip_params(1, 3, 100)[0])
    assert 20 < int(a[0].sum()) < 80 and 20 < int(a[1].sum()) < 80 and not torch.equal(a[0], a[1])
    assert not any(f.any() for f in flip_params(0, 3, 10, enabled=False))


def test_resize_density_keeps_the_mass():
    d = torch.rand(2, 60, 80)
    d = d / d.sum(dim=(1, 2), keepdim=True)
    r = resize_density(d, (24, 32))
    assert r.shape == (2, 24, 32)
    torch.testing.assert_close(r.sum(dim=(1, 2)), torch.ones(2))
    assert torch.equal(resize_density(d, (60, 80)), d)


def test_init_from_a_classifier_checkpoint(tmp_path):
    import timm

    from rollout_fast.checkpoint import save_weights

    torch.manual_seed(1)
    clf = timm.create_model("resnet18", num_classes=10)
    save_weights(tmp_path / "clf.safetensors", clf.state_dict())
    net = create_saliency_model(TINY_SPEC, init_from=tmp_path / "clf.safetensors")
    for k, v in net.encoder.state_dict().items():
        assert torch.equal(v, clf.state_dict()[k]), k
    save_weights(tmp_path / "r34.safetensors", timm.create_model("resnet34", num_classes=10).state_dict())
    with pytest.raises(ValueError, match=r"init_from: '.*r34.safetensors' is not a timm ResNet of this depth: "
                                         r"0 encoder tensors missing .*, 0 of another shape .*, 96 unexpected "
                                         r"\(first: \['layer1\.2\."):
        create_saliency_model(TINY_SPEC, init_from=tmp_path / "r34.safetensors")  # resnet18's keys are a subset
    save_weights(tmp_path / "r50.safetensors", timm.create_model("resnet50", num_classes=10).state_dict())
    with pytest.raises(ValueError, match=r"r50.safetensors' is not a timm ResNet of this depth: 0 encoder tensors "
                                         r"missing .*, [1-9]\d* of another shape \(first: \['layer1.0.conv1.weight'"):
        create_saliency_model(TINY_SPEC, init_from=tmp_path / "r50.safetensors")
    save_weights(tmp_path / "vit.safetensors", {"blocks.0.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"tensors missing \(first: \['conv1.weight'"):
        create_saliency_model(TINY_SPEC, init_from=tmp_path / "vit.safetensors")
    with pytest.raises(ValueError, match="give pretrained or init_from, not both"):
        create_saliency_model(TINY_SPEC, pretrained=True, init_from=tmp_path / "clf.safetensors")
    with pytest.raises(FileNotFoundError):
        create_saliency_model(TINY_SPEC, init_from=tmp_path / "none.safetensors")


def test_save_and_load_round_trip(tmp_path):
    path = save_tiny_saliency_model(tmp_path / "m.safetensors", heads=2)
    model, card = load_saliency_model(str(path))
    assert isinstance(model, SaliencyNet) and not model.training and card["model"]["heads"] == 2
    torch.manual_seed(0)
    ref = create_saliency_model(TINY_SPEC, heads=2).eval()
    x = torch.randn(1, 3, 24, 32)
    torch.testing.assert_close(model(x), ref(x))


def test_load_errors_name_the_problem(tmp_path):
    from rollout_fast.zoo import ASSETS

    assert SALIENCY_MODELS["osie-resnet18"].parent == ASSETS
    if not SALIENCY_MODELS["osie-resnet18"].with_suffix(".safetensors").is_file():
        with pytest.raises(FileNotFoundError, match="'osie-resnet18' is not shipped yet"):
            load_saliency_model("osie-resnet18")
    with pytest.raises(ValueError, match="neither a shipped model"):
        load_saliency_model("nope")
    with pytest.raises(FileNotFoundError, match="no file at"):
        load_saliency_model(str(tmp_path / "none.safetensors"))
    path = save_tiny_saliency_model(tmp_path / "m.safetensors")
    card = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps({**card, "model": {**card["model"], "heads": 2}}))
    with pytest.raises(ValueError, match="does not match its card's spec"):
        load_saliency_model(str(path))
    path.with_suffix(".json").write_text("{}")
    with pytest.raises(ValueError, match="has no 'model' spec"):
        load_saliency_model(str(path))
    path.with_suffix(".json").unlink()
    with pytest.raises(FileNotFoundError, match="card .* missing"):
        load_saliency_model(str(path))


@pytest.mark.parametrize("bad, msg", [({"encoder": "vgg16"}, "encoder: expected one of"),
                                      ({"decoder": [8, 8]}, "decoder: expected four"),
                                      ({"heads": 3}, "heads: expected 1"),
                                      ({"input_size": [0, 4]}, "input_size: expected"),
                                      ({"colour": 1}, r"spec: unknown keys \['colour'\]")])
def test_bad_specs(bad, msg):
    with pytest.raises(ValueError, match=msg):
        create_saliency_model({**TINY_SPEC, **bad})


def test_bad_inputs():
    net = create_saliency_model(TINY_SPEC).eval()
    with pytest.raises(ValueError, match=r"x: expected \(B, 3, H, W\) images, got shape \(3, 24, 32\)"):
        net(torch.zeros(3, 24, 32))
    with pytest.raises(TypeError, match="floating-point"):
        net(torch.zeros(1, 3, 24, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="heads: expected 'saliency' or 'all'"):
        net(torch.zeros(1, 3, 24, 32), heads="teacher")
