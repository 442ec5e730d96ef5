"""One model explained from several threads at once (a web service, data-loader workers): every call gives
the single-threaded map, no hook is left on the model, its train/eval flags are restored, and other
threads' plain forwards are neither tapped nor changed (issue 18: before, 'pop from empty mode stack',
spurious UnsupportedModelError, maps off by up to 0.57 and hundreds of hooks left behind)."""

from __future__ import annotations

import threading

import timm
import torch
from helpers import peaky_vit

from rollout_fast import AttentionRollout

THREADS, CALLS = 4, 50


def _hooks(model):
    return [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()]


def _run(workers):
    errors = []

    def guard(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
        return run

    threads = [threading.Thread(target=guard(w)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


def test_concurrent_calls_on_one_model_are_each_correct():
    torch.set_num_threads(1)
    model = peaky_vit(lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                                                num_classes=5))
    model.train()
    model.head.train(False)
    hooks, flags = _hooks(model), [m.training for m in model.modules()]
    images = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(THREADS)]
    explainer = AttentionRollout(model, discard_ratio=0.5)
    want = [explainer(im) for im in images]
    want_grad = [explainer.grad_rollout(im, targets=1) for im in images]
    with torch.no_grad():
        model.eval()
        plain = model(images[0])
    model.train()
    model.head.train(False)
    worst = [0.0]

    def worker(i):
        def run():
            for c in range(CALLS):
                if c % 10 == 9:
                    got, ref = explainer.grad_rollout(images[i], targets=1), want_grad[i]
                else:
                    got, ref = explainer(images[i]), want[i]
                worst[0] = max(worst[0], (got - ref).abs().max().item())
        return run

    _run([worker(i) for i in range(THREADS)])
    assert worst[0] <= 1e-6, f"a concurrent call differed from the single-threaded map by {worst[0]:.3g}"
    assert _hooks(model) == hooks, "hooks left on the model"
    assert [m.training for m in model.modules()] == flags
    assert torch._C._len_torch_function_stack() == 0
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images[0]), plain, rtol=0, atol=0)


def test_other_threads_plain_forward_is_not_tapped():
    """While one thread explains, another runs the model plainly: its SDPA calls are not intercepted (no
    mode entered on its thread, no attention recorded for it) and its outputs are the plain ones."""
    torch.set_num_threads(1)
    model = peaky_vit(lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                                                num_classes=5))
    images = torch.randn(2, 3, 32, 32)
    explainer = AttentionRollout(model)
    want = explainer(images)
    with torch.no_grad():
        plain = model(images)
    bad = []

    def explain():
        for _ in range(CALLS):
            bad.append((explainer(images) - want).abs().max().item())

    def forward():
        for _ in range(CALLS):
            with torch.no_grad():
                bad.append((model(images) - plain).abs().max().item())

    _run([explain, forward, explain, forward])
    assert max(bad) <= 1e-5
