"""Class-specific gradient rollout (REFERENCE.md section 2) against an independent computation.

The independent computation here shares no code with rollout_fast's capture: a deep copy of the model
runs timm's explicit (non-fused) attention path with trainable parameters, its post-softmax attention is
kept at ``attn_drop`` with ``retain_grad()``, ``y = sum_b logits[b, target_b]`` is back-propagated with
``y.backward()``, and the rollout is a plain per-sample loop (vit-explain's ``grad_rollout`` with its
defects fixed: each layer's attention with its own layer's gradient, keepdim row normalisation, discard
per sample). rollout_fast instead answers SDPA with the explicit float32 attention inside the user's model
and calls ``torch.autograd.grad``. Both are float32, so maps agree to ~1e-6; tolerance 1e-4 relative,
1e-5 absolute (maps are max-normalised to 1).

The documented difference from vit-explain: its backward hooks fire last layer first, so it pairs layer i's
attention with layer L-1-i's gradient (vit-explain issue #6). The test reproduces that collection order with
vit-explain's own hook mechanism and shows our maps match the correct pairing and not the reversed one.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import rollout_fast
from rollout_fast import AttentionRollout, reference
from rollout_fast.capture import capture_attention_grad
from rollout_fast.cli import main

RTOL, ATOL = 1e-4, 1e-5

# name -> (builder, input (H, W), prefix tokens, grid)
ARCHS = {
    "vit": (lambda: timm.create_model("vit_tiny_patch16_224", img_size=64, depth=3, num_classes=10),
            (64, 64), 1, (4, 4)),
    "deit_distilled": (lambda: timm.create_model("deit_tiny_distilled_patch16_224", img_size=48, depth=3,
                                                 num_classes=10), (48, 48), 2, (3, 3)),
    "registers_qknorm_layerscale": (
        lambda: timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4,
                                              qk_norm=True, init_values=0.5, reg_tokens=2, num_classes=7),
        (32, 32), 3, (4, 4)),
    "nonsquare": (lambda: timm.models.VisionTransformer(img_size=(48, 32), patch_size=8, embed_dim=64, depth=2,
                                                        num_heads=2, num_classes=5), (48, 32), 1, (6, 4)),
}


def _build(name):
    builder, size, P, grid = ARCHS[name]
    torch.manual_seed(1)
    model = builder()
    with torch.no_grad():  # peakier attention and larger logits than timm's init: informative gradients
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(8.0)
        model.head.weight.mul_(20.0)
    return model.eval(), size, P, grid


def _independent_attention_and_grads(model, images, targets):
    """(logits, A, G) from a non-fused deep copy: A kept at attn_drop, G by y.backward() (retain_grad)."""
    twin = copy.deepcopy(model).eval()
    kept = []

    def keep(module, args, out):
        out.retain_grad()
        kept.append(out)

    for p in twin.parameters():
        p.requires_grad_(True)
    for blk in twin.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(keep)
    logits = twin(images)
    logits[torch.arange(len(targets)), torch.as_tensor(targets)].sum().backward()
    return logits.detach(), torch.stack([a.detach() for a in kept]), torch.stack([a.grad for a in kept])


def _loop_grad_rollout(att, grads, discard_ratio, P, grid):
    """Plain per-sample loop: F = relu(mean_h(A * G)), drop the k smallest (topk, nothing protected),
    M = (F + I) / rowsum, R = M_L ... M_1, map = R[0, P:] / max."""
    L, B, _, N, _ = att.shape
    maps = []
    for b in range(B):
        result = torch.eye(N, dtype=torch.float64)
        for layer in range(L):
            fused = (att[layer, b].double() * grads[layer, b].double()).mean(dim=0)
            fused[fused < 0] = 0
            k = math.floor(discard_ratio * N * N)
            if k:
                flat = fused.view(-1)
                flat[flat.topk(k, largest=False).indices] = 0
            m = fused + torch.eye(N, dtype=torch.float64)
            m = m / m.sum(dim=-1, keepdim=True)
            result = m @ result
        row = result[0, P:]
        maps.append((row / row.max()).reshape(grid))
    return torch.stack(maps).float()


def _targets(B, C):
    return torch.tensor([(3 * i + 1) % C for i in range(B)])


@pytest.mark.parametrize("name", list(ARCHS))
@pytest.mark.parametrize("discard", [0.0, 0.9])
def test_grad_rollout_equals_independent_autograd(name, discard):
    model, (H, W), P, grid = _build(name)
    images = torch.randn(3, 3, H, W)
    targets = _targets(3, model.num_classes)
    logits_ref, att, grads = _independent_attention_and_grads(model, images, targets)
    want = _loop_grad_rollout(att, grads, discard, P, grid)

    explainer = AttentionRollout(model, discard_ratio=discard)
    maps, logits = explainer.explain_grad(images, targets)
    assert maps.shape == (3, *grid) and maps.dtype == torch.float32
    torch.testing.assert_close(maps, want, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-4, atol=1e-4)
    assert explainer.info["last_capture"] == "grad:sdpa-explicit"
    assert maps.std() > 0.01  # informative maps, not uniform

    cap = capture_attention_grad(model, images, targets)  # the captured tensors themselves
    torch.testing.assert_close(cap.attentions, att, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cap.gradients, grads, rtol=1e-3, atol=1e-6 * float(grads.abs().max()))


def _vit_explain_collection(model, images, category_index):
    """vit-explain's VITAttentionGradRollout collection: forward hooks append attn_drop outputs, backward
    hooks append grad_input[0] (backward runs last layer first), one class for all samples."""
    twin = copy.deepcopy(model).eval()
    attentions, gradients = [], []
    for p in twin.parameters():
        p.requires_grad_(True)
    for blk in twin.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(lambda m, i, o: attentions.append(o.detach()))
        blk.attn.attn_drop.register_full_backward_hook(lambda m, gi, go: gradients.append(gi[0].detach()))
    output = twin(images)
    category_mask = torch.zeros(output.size())
    category_mask[:, category_index] = 1
    (output * category_mask).sum().backward()
    return torch.stack(attentions), torch.stack(gradients)


def test_differs_from_vit_explain_layer_pairing():
    """vit-explain zips attentions (layer order) with gradients (backward order): layer i with gradient
    L-1-i. Our maps equal the correct pairing and differ clearly from vit-explain's."""
    model, (H, W), P, grid = _build("vit")
    images = torch.randn(2, 3, H, W)
    att, grads_backward_order = _vit_explain_collection(model, images, category_index=4)
    _, att_ref, grads = _independent_attention_and_grads(model, images, torch.tensor([4, 4]))
    torch.testing.assert_close(att, att_ref)
    # the hooks really collected the gradients last layer first
    torch.testing.assert_close(grads_backward_order, grads.flip(0))

    ours = AttentionRollout(model).grad_rollout(images, 4)
    correct = _loop_grad_rollout(att, grads, 0.0, P, grid)
    vit_explain = _loop_grad_rollout(att, grads_backward_order, 0.0, P, grid)  # its zip(attentions, gradients)
    torch.testing.assert_close(ours, correct, rtol=RTOL, atol=ATOL)
    assert (ours - vit_explain).abs().max() > 0.05, "the reversed pairing should give visibly different maps"


def test_per_sample_targets_equal_single_image_calls():
    model, (H, W), _, _ = _build("deit_distilled")
    images = torch.randn(4, 3, H, W)
    targets = torch.tensor([0, 7, 3, 7])
    explainer = AttentionRollout(model, discard_ratio=0.5)
    batch = explainer.grad_rollout(images, targets)
    for i in range(4):
        single = explainer.grad_rollout(images[i:i + 1], int(targets[i]))
        torch.testing.assert_close(single[0], batch[i], rtol=RTOL, atol=ATOL)
    other = explainer.grad_rollout(images, torch.tensor([1, 2, 5, 9]))
    assert (other - batch).abs().amax(dim=(1, 2)).min() > 1e-3, "another class must give another map"
    same = explainer.grad_rollout(images, 7)  # an int: one class for every image
    torch.testing.assert_close(same, explainer.grad_rollout(images, [7, 7, 7, 7]), rtol=0, atol=0)


def test_default_target_is_the_predicted_class():
    model, (H, W), _, _ = _build("vit")
    images = torch.randn(3, 3, H, W)
    explainer = AttentionRollout(model)
    maps, logits = explainer.explain_grad(images)
    torch.testing.assert_close(maps, explainer.grad_rollout(images, logits.argmax(-1)), rtol=0, atol=0)


def _hooks(model):
    return [(n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for n, m in model.named_modules()]


def test_state_cleared_and_model_unchanged():
    model, (H, W), _, _ = _build("registers_qknorm_layerscale")
    model.train()
    model.head.train(False)
    images = torch.randn(2, 3, H, W)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = _hooks(model)
    flags = [m.training for m in model.modules()]
    req = [p.requires_grad for p in model.parameters()]
    with torch.no_grad():
        before = model(images)
    explainer = AttentionRollout(model, discard_ratio=0.9)
    first = explainer.grad_rollout(images, [1, 2])
    explainer.grad_rollout(images, [3, 4])  # a different call in between must leave nothing behind
    again = explainer.grad_rollout(images, [1, 2])
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    with torch.no_grad():
        after = model(images)
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert _hooks(model) == hooks
    assert [m.training for m in model.modules()] == flags
    assert [p.requires_grad for p in model.parameters()] == req
    assert all(p.grad is None for p in model.parameters()), "parameter .grad must stay untouched"
    assert torch._C._len_torch_function_stack() == 0
    assert not first.requires_grad


def test_frozen_model_under_no_grad_and_unfused_fallback():
    model, (H, W), _, _ = _build("vit")
    images = torch.randn(2, 3, H, W)
    want = AttentionRollout(model, discard_ratio=0.5).grad_rollout(images, [2, 5])
    frozen = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        got = AttentionRollout(frozen, discard_ratio=0.5).grad_rollout(images, [2, 5])
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    unfused = copy.deepcopy(model)
    for blk in unfused.blocks:
        blk.attn.fused_attn = False
    explainer = AttentionRollout(unfused, discard_ratio=0.5)
    torch.testing.assert_close(explainer.grad_rollout(images, [2, 5]), want, rtol=RTOL, atol=ATOL)
    assert explainer.info["last_capture"] == "grad:attn-drop"


@pytest.mark.parametrize("targets, exc, match", [
    ([1, 2, 3], ValueError, r"targets: expected one class index per image, shape \(2,\)"),
    (torch.tensor([[1], [2]]), ValueError, "targets: expected one class index per image"),
    (10, ValueError, r"targets: class indices must lie in \[0, 10\)"),
    ([0, -1], ValueError, r"targets: class indices must lie in \[0, 10\), got \[-1\] at position\(s\) \[1\]"),
    (torch.tensor([0.0, 1.0]), TypeError, "targets: expected an integer tensor"),
    (torch.tensor([True, False]), TypeError, "targets: expected an integer tensor"),
    (True, TypeError, "targets: .*bool"),
    ("cat", TypeError, "targets: expected an int"),
    ([1.5, 2], TypeError, "targets: expected a sequence of int"),
])
def test_bad_targets_are_rejected(targets, exc, match):
    model, (H, W), _, _ = _build("vit")
    with pytest.raises(exc, match=match):
        AttentionRollout(model).grad_rollout(torch.randn(2, 3, H, W), targets)


def test_numpy_targets_and_bad_model_output():
    model, (H, W), _, _ = _build("vit")
    images = torch.randn(2, 3, H, W)
    explainer = AttentionRollout(model)
    torch.testing.assert_close(explainer.grad_rollout(images, np.array([3, 4])),
                               explainer.grad_rollout(images, [3, 4]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="model: grad rollout needs"):
        capture_attention_grad(model, images, forward=lambda m, x: m.forward_features(x))


# ------------------------------------------------------------------------------ the functional form
def _random_pair(L=3, B=2, H=3, N=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    att = torch.randn(L, B, H, N, N, generator=g).softmax(-1)
    grads = torch.randn(L, B, H, N, N, generator=g)
    return att, grads


def test_grad_fuse_heads_by_hand():
    att = torch.tensor([[[[0.5, 0.5], [0.2, 0.8]], [[1.0, 0.0], [0.4, 0.6]]]])  # (1, 2, 2, 2)
    grads = torch.tensor([[[[2.0, -4.0], [1.0, 1.0]], [[0.0, 3.0], [-3.0, 0.5]]]])
    want = torch.tensor([[[0.5, 0.0], [0.0, 0.55]]])  # mean of A*G: [[0.5, -1], [-0.5, 0.55]], negatives -> 0
    got = reference.grad_fuse_heads(att, grads)
    torch.testing.assert_close(got, want)
    assert not torch.signbit(got).any(), "zeros must be +0.0"


@pytest.mark.parametrize("discard", [0.0, 0.5, 0.9])
def test_reference_grad_rollout_equals_loop(discard):
    att, grads = _random_pair(N=10)
    want = _loop_grad_rollout(att, grads, discard, 1, (3, 3))
    torch.testing.assert_close(reference.grad_rollout(att, grads, discard_ratio=discard), want,
                               rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("backend", rollout_fast.available_backends())
@pytest.mark.parametrize("kwargs", [{"discard_ratio": 0.9},
                                    {"discard_ratio": 0.5, "num_prefix_tokens": 2, "grid": (2, 4),
                                     "normalize": "minmax"},
                                    {"readout": "full", "normalize": None}])
def test_functional_equals_reference(backend, kwargs):
    att, grads = _random_pair(N=10)
    want = reference.grad_rollout(att, grads, **kwargs)
    got = rollout_fast.grad_attention_rollout(list(att), list(grads), backend=backend, **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_prefix_self_attention_is_not_protected():
    """Section 2 discards F[b, 0, 0] like any entry (vit-explain's grad variant), unlike plain rollout."""
    att = torch.full((1, 1, 1, 5, 5), 0.2)
    grads = 50 + 50 * torch.rand(1, 1, 1, 5, 5)  # F in [10, 20]: a positive discard threshold
    grads[0, 0, 0, 0, 0] = 20.0  # F[0, 0] = 4: the smallest entry, large enough to matter in M
    fused = reference.grad_fuse_heads(att[0], grads[0])[None, :, None]
    full = reference.grad_rollout(att, grads, discard_ratio=0.5, readout="full", normalize=None)
    unprotected = reference.attention_rollout(fused, discard_ratio=0.5, readout="full", protect_prefix=False)
    protected = reference.attention_rollout(fused, discard_ratio=0.5, readout="full", protect_prefix=True)
    torch.testing.assert_close(full, unprotected)
    assert (full - protected).abs().max() > 1e-2


@pytest.mark.parametrize("make, exc, match", [
    (lambda a, g: (a, g[:, :1]), ValueError, "gradients: shape"),
    (lambda a, g: (a, g.round().long()), TypeError, "gradients: expected a floating-point dtype"),
    (lambda a, g: (a, g.index_fill(0, torch.tensor([1]), float("nan"))), ValueError, "gradients: contains NaN"),
    (lambda a, g: (a, "grads"), TypeError, "gradients: expected a tensor or a sequence"),
    (lambda a, g: (a, [g[0], g[1][:, :1]]), ValueError, r"gradients\[1\]: shape"),
    (lambda a, g: (a, []), ValueError, "gradients: the sequence is empty"),
    (lambda a, g: (a[..., :9], g[..., :9]), ValueError, "attentions: the last two dimensions"),
    (lambda a, g: (a, g), ValueError, "discard_ratio"),
])
def test_functional_errors(make, exc, match):
    att, grads = _random_pair(N=10)
    a, g = make(att, grads)
    kw = {"discard_ratio": 1.0} if match == "discard_ratio" else {}
    with pytest.raises(exc, match=match):
        rollout_fast.grad_attention_rollout(a, g, **kw)
    with pytest.raises(exc, match=match):
        reference.grad_rollout(a, g, **kw)


# ------------------------------------------------------------------------------------------ the CLI
@pytest.fixture
def two_images(tmp_path):
    rng = np.random.default_rng(0)
    files = []
    for i in range(2):
        f = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(f)
        files.append(str(f))
    return files


def test_cli_grad_method_with_and_without_target(two_images, tmp_path, capsys):
    common = ["--model", "vit_tiny_patch16_224", "--no-progress", "--no-overlays", "--batch-size", "2"]
    out = tmp_path / "grad3"
    assert main(["rollout", *two_images, "--out", str(out), "--method", "grad", "--target", "3", *common]) == 0
    assert "gradient rollout of 2 image(s)" in capsys.readouterr().out
    data = np.load(out / "rollout.npz")
    assert data["maps"].shape == (2, 14, 14) and np.isfinite(data["maps"]).all()
    assert str(data["method"]) == "grad" and data["target_class"].tolist() == [3, 3]
    np.testing.assert_allclose(data["maps"].max(axis=(1, 2)), 1.0, rtol=1e-6)

    out = tmp_path / "grad_pred"
    assert main(["rollout", *two_images, "--out", str(out), "--method", "grad", *common]) == 0
    data = np.load(out / "rollout.npz")
    assert data["target_class"].tolist() == data["predicted_class"].tolist()


def test_cli_rejects_bad_targets(two_images, tmp_path, capsys):
    common = ["--model", "vit_tiny_patch16_224", "--no-progress", "--no-overlays"]
    assert main(["rollout", *two_images, "--out", str(tmp_path / "a"), "--target", "3", *common]) == 2
    assert "--target CLASS is used only with --method grad" in capsys.readouterr().err
    assert main(["rollout", *two_images, "--out", str(tmp_path / "b"), "--method", "grad", "--target", "1000",
                 *common]) == 1
    assert "target: class 1000 is outside the model's classes [0, 1000)" in capsys.readouterr().err
    assert not (tmp_path / "b" / "rollout.npz").exists()
