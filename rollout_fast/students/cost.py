"""Cost of a student or a teacher: parameters, multiply-adds per image, measured latency."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from .inputs import check_size

__all__ = ["count_macs", "measure_cost"]


def count_macs(fn: Callable[[torch.Tensor], object], example: torch.Tensor) -> int:
    """Multiply-adds of ``fn(example)`` per image: ``torch.utils.flop_counter`` FLOPs / 2 / batch.

    Counts matmuls, convolutions and attention (SDPA); element-wise work is not counted, for the
    student and the teacher alike.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        fn(example)
    return round(fc.get_total_flops() / 2 / example.shape[0])


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
    H, W = check_size("input_size", input_size)
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
