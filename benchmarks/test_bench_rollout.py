"""pytest-benchmark variant of bench_rollout.py (not collected by the default run: testpaths = tests).

    pytest benchmarks/test_bench_rollout.py --benchmark-group-by=param:model,param:batch
    ROLLOUT_BENCH_BATCHES=1,8,32 ROLLOUT_BENCH_DEVICE=cuda pytest benchmarks/ --benchmark-save=rollout

Attention shaped like DeiT-S, ViT-B, ViT-L and ViT-B/384 (``bench_rollout.MODELS``); providers as in
bench_rollout.py: the reference, the vit-explain-style loop, each fused backend available on the device,
and the memory floor (``attentions.sum()``). Environment: ROLLOUT_BENCH_DEVICE (cpu), ROLLOUT_BENCH_DTYPE
(float32 on CPU, float16 on CUDA), ROLLOUT_BENCH_BATCHES (8), ROLLOUT_BENCH_MODELS (all),
ROLLOUT_BENCH_DISCARD (0.9).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_rollout as br  # noqa: E402

DEVICE = os.environ.get("ROLLOUT_BENCH_DEVICE", "cpu")
DTYPE = getattr(torch, os.environ.get("ROLLOUT_BENCH_DTYPE", "float16" if DEVICE == "cuda" else "float32"))
BATCHES = [int(b) for b in os.environ.get("ROLLOUT_BENCH_BATCHES", "8").split(",")]
MODELS = os.environ.get("ROLLOUT_BENCH_MODELS", ",".join(br.MODELS)).split(",")
DISCARD = float(os.environ.get("ROLLOUT_BENCH_DISCARD", "0.9"))
PROVIDERS = ["reference", "loop", "cpu", "cpu-op", "cuda", "cuda-op", "triton", "floor"]

pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason="ROLLOUT_BENCH_DEVICE=cuda but no CUDA device is available")


@pytest.fixture(scope="module", autouse=True)
def _no_tf32():
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = prev


@pytest.fixture(scope="module")
def available():
    return br.providers(DEVICE, "mean", DISCARD, "cls")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("model", MODELS)
def test_rollout(benchmark, available, model, batch, provider):
    if provider not in available:
        pytest.skip(f"provider {provider!r} is not available on {DEVICE} in this install")
    L, H, N = br.MODELS[model]
    att = br.make_attention(L, batch, H, N, DTYPE, DEVICE)
    fn = available[provider]
    benchmark.extra_info.update(model=model, batch=batch, provider=provider, dtype=str(DTYPE),
                                bytes=att.numel() * att.element_size())
    slow = provider in ("reference", "loop")

    def call():
        fn(att)
        br._sync(DEVICE)

    benchmark.pedantic(call, rounds=3 if slow else 10, iterations=1, warmup_rounds=1)
