"""The CPU kernel's schedules and the row check inside its head-fusion loop (csrc/cpu/rollout_cpu_impl.h).

Schedules of the 'cls' / 'mean' readouts: 'per_sample' (batch >= threads: one pass per sample) and 'split'
(fewer samples than threads, e.g. batch 1 on 2 threads: the (layer, sample) matrices are shared out among the
threads and each sample's chain runs as they become ready). ``ROLLOUT_FAST_CPU_SCHEDULE`` forces one, or
'split_handoff' (the split schedule in which a thread running chains only waits for the matrices the other
threads prepare: the hand-over between threads in every call); the extension counts the calls of each
(``rollout_fast._C.cpu_schedule_counts()``). Both sum every entry in the same
order, so they give the same bits for any batch, thread count and ISA level (``torch.equal``), and equal the
reference within the float32 tolerance of tests/ops/test_rollout.py (quantised inputs: the fused matrices, and
so the discarded entries, ties included, are bit-identical; what is left is float32 reassociation).

Row check (``row_tolerance``): every row of every head is summed in the loop that fuses the heads (8-element
steps; a row's last step overlaps the one before it and adds only its new lanes; more than 8 heads may take two
passes). The tests put the error in every kind of place: first/last row, first/middle/last head (either pass),
the overlapping lanes and the last lane, for compiled-in and other head counts, rows shorter than 8, and every
dtype and ISA level. No timing here (benchmarks/bench_rollout.py).
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
from helpers import HAS_EXT, NO_EXT, assert_matches, make_attention

from rollout_fast import reference
from rollout_fast.ops import _ext

pytestmark = pytest.mark.skipif(not HAS_EXT, reason=NO_EXT)

CPU_ISA_LEVELS = ["avx512", "avx2", "baseline"]


@contextlib.contextmanager
def _threads(n: int):
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _counts() -> dict:
    return dict(_ext.load().cpu_schedule_counts())


def _isa_levels() -> list[str]:
    return CPU_ISA_LEVELS[CPU_ISA_LEVELS.index(_ext.load().cpu_isa()):]


def _exact_rows(att: torch.Tensor) -> torch.Tensor:
    """make_attention's grid-quantised attention with each row's largest entry moved by the row's rounding
    error, so that every row sums to exactly 1 (grid multiples: exact sums) and passes the row check."""
    wide = att.double()
    fix = 1.0 - wide.sum(-1, keepdim=True)
    top = wide.argmax(-1, keepdim=True)
    return wide.scatter_add(-1, top, fix).to(att.dtype)


def _tied(L, B, H, N, dtype, seed, draws=64):
    """Attention rows of `draws` equal parts (k / draws, k drawn from a softmax; many zeros and ties), every row
    summing to exactly 1, as a (L, B, H, N, N) tensor of `dtype` (k / 64 is exact in every float dtype)."""
    gen = torch.Generator().manual_seed(seed)
    probs = (torch.randn(L * B * H * N, N, generator=gen) * 2.0).softmax(-1)
    picks = torch.multinomial(probs, draws, replacement=True, generator=gen)
    counts = torch.zeros_like(probs).scatter_add_(-1, picks, torch.ones_like(picks, dtype=probs.dtype))
    return (counts / draws).reshape(L, B, H, N, N).to(dtype)


def _op(att, fusion="mean", ratio=0.9, P=1, protect=True, readout="cls", normalize="max", tol=None):
    return torch.ops.rollout_fast.rollout(att, fusion, ratio, P, protect, readout, normalize, tol)


# ------------------------------------------------------------------------------------------- schedules
def test_batch_smaller_than_the_threads_takes_the_split_schedule(monkeypatch):
    """Batch 1 on 2 threads runs the split schedule (the batch-1 parallel path), batch >= threads the per-sample
    one, and both give the same bits. Which threads prepare the matrices depends on when each starts, so the
    hand-over between threads is pinned down by 'split_handoff' (the chain's thread only waits, the other thread
    prepares every matrix): there both threads take part in every call, and the bits are the same again."""
    monkeypatch.delenv("ROLLOUT_FAST_CPU_SCHEDULE", raising=False)
    att = _exact_rows(make_attention(12, 1, 6, 197))
    tol = 1e-3 - 197 * 2.0 ** -22
    with _threads(1):
        before = _counts()
        want = _op(att, tol=tol)
        assert _counts()["per_sample"] == before["per_sample"] + 1
    with _threads(2):
        before = _counts()
        got = _op(att, tol=tol)
        after = _counts()
        assert after["split"] == before["split"] + 1 and after["per_sample"] == before["per_sample"]
        assert torch.equal(got, want)
        before = _counts()
        _op(make_attention(2, 2, 3, 17))  # batch 2 = threads: per sample
        assert _counts()["per_sample"] == before["per_sample"] + 1
        monkeypatch.setenv("ROLLOUT_FAST_CPU_SCHEDULE", "split_handoff")
        for _ in range(3):
            before = _counts()
            assert torch.equal(_op(att, tol=tol), want)
            after = _counts()
            assert after["split_shared"] == before["split_shared"] + 1, "one thread did all the work"
    monkeypatch.delenv("ROLLOUT_FAST_CPU_SCHEDULE")
    with _threads(3):
        before = _counts()
        _op(make_attention(2, 2, 3, 17))  # batch 2 < 3 threads: split
        assert _counts()["split"] == before["split"] + 1


# (L, B, H, N, layout, dtype): odd sizes, rows shorter than 8 and of exactly 8, compiled-in (1, 3, 12, 16) and
# other (5) head counts, batch 1 and more, every dtype, contiguous and non-contiguous rows
SCHEDULE_CASES = [
    (3, 1, 6, 197, "contiguous", torch.float32),
    (4, 1, 12, 37, "transposed", torch.bfloat16),
    (2, 3, 5, 70, "sliced", torch.float16),
    (5, 2, 16, 9, "permuted", torch.float32),
    (1, 1, 3, 5, "contiguous", torch.float64),
    (2, 3, 1, 8, "contiguous", torch.bfloat16),
]


def _case_id(c) -> str:
    return f"L{c[0]}-B{c[1]}-H{c[2]}-N{c[3]}-{c[4]}-{str(c[5])[6:]}"


@pytest.mark.parametrize("case", SCHEDULE_CASES, ids=_case_id)
def test_split_and_per_sample_schedules_give_the_same_bits(case, monkeypatch):
    """Either schedule, 1 to 4 threads, every head fusion, discard ratios with many ties (rows of 64 equal parts),
    both readouts, with and without the F[0, 0] protection and the row check: the same bits as the per-sample
    schedule on one thread, and the reference's values within the float32 tolerance."""
    L, B, H, N, layout, dtype = case
    att = _tied(L, B, H, N, dtype, seed=N)
    if layout != "contiguous":  # the same values in make_attention's other memory layouts
        strided = make_attention(L, B, H, N, dtype, layout)
        strided.copy_(att)
        att = strided
    tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-3
    P = 1 if N < 9 else 2
    for fusion, ratio, readout, protect in [("mean", 0.9, "cls", True), ("max", 0.5, "mean", False),
                                            ("min", 0.0, "cls", False), ("mean", 0.97, "mean", True)]:
        args = {"fusion": fusion, "ratio": ratio, "P": P, "protect": protect, "readout": readout,
                "normalize": "minmax"}
        monkeypatch.setenv("ROLLOUT_FAST_CPU_SCHEDULE", "per_sample")
        with _threads(1):
            want = _op(att, **args)
        schedules = ("split", "split_handoff", "per_sample")
        for schedule, threads, row_tol in itertools.product(schedules, (1, 2, 3, 4), (None, tol)):
            monkeypatch.setenv("ROLLOUT_FAST_CPU_SCHEDULE", schedule)
            with _threads(threads):
                got = _op(att, tol=row_tol, **args)
            assert torch.equal(got, want), f"{schedule}, {threads} threads, row check {row_tol}, {args}"
        ref = reference.attention_rollout(att, head_fusion=fusion, discard_ratio=ratio, num_prefix_tokens=P,
                                          grid=(1, N - P), readout=readout, normalize="minmax",
                                          protect_prefix=protect)
        assert_matches(want.reshape(ref.shape), ref)


def test_split_schedule_at_every_isa_level_gives_the_same_bits(monkeypatch):
    """The split schedule with the row check at each ISA level this CPU runs (AVX-512VL fusion, AVX2, baseline):
    the same bits, batch 1 and 2, on 2 and 3 threads."""
    monkeypatch.setenv("ROLLOUT_FAST_CPU_SCHEDULE", "split")
    levels, results = _isa_levels(), {}
    for isa in levels:
        monkeypatch.setenv("ROLLOUT_FAST_CPU_ISA", isa)
        results[isa] = []
        for B, threads, H, dtype in [(1, 2, 12, torch.float32), (2, 3, 16, torch.bfloat16),
                                     (1, 2, 6, torch.float16)]:
            att = _exact_rows(make_attention(3, B, H, 75, dtype, generator=torch.Generator().manual_seed(H)))
            tol = reference.ROW_SUM_TOLERANCE[dtype]
            with _threads(threads):
                results[isa] += [_op(att, fusion, 0.9, 1, True, "cls", "max", tol)
                                 for fusion in reference.HEAD_FUSIONS]
    for isa in levels[1:]:
        for got, want in zip(results[isa], results[levels[0]]):
            assert torch.equal(got, want), f"{isa} differs from {levels[0]}"


def test_unknown_cpu_schedule_value_is_refused(monkeypatch):
    monkeypatch.setenv("ROLLOUT_FAST_CPU_SCHEDULE", "per-sample")
    with pytest.raises(ValueError, match="ROLLOUT_FAST_CPU_SCHEDULE: expected 'per_sample', 'split' or "
                                         "'split_handoff'"):
        _op(make_attention(1, 1, 1, 5))


def test_split_schedule_stops_at_a_bad_matrix(monkeypatch):
    """A bad value or row in any (layer, sample) matrix -- the first one prepared, the last, one in the middle --
    stops the split schedule with the kernel's error, on 1 to 4 threads (no thread waits for a matrix that
    nobody prepares)."""
    att = _exact_rows(make_attention(6, 2, 3, 33))
    for layer, sample in [(5, 0), (0, 1), (2, 1)]:
        for value, match in [(float("nan"), "NaN or infinite"), (-0.25, "negative values"),
                             (0.5, "row that does not sum to 1")]:
            bad = att.clone()
            bad[layer, sample, 1, 7, 3] += value
            for schedule, threads in itertools.product(("split", "split_handoff"), (1, 2, 4)):
                monkeypatch.setenv("ROLLOUT_FAST_CPU_SCHEDULE", schedule)
                with _threads(threads), pytest.raises(RuntimeError, match=match):
                    _op(bad, tol=1e-3)


# ------------------------------------------------------------------------------------------ row check
def _row_cases(N: int, H: int):
    """(head, row, key) places for the error: first/middle/last head, first/last row, the first lane of a row's
    overlapping last step (N - 8: the step before already summed it), the last lane, and the first."""
    keys = sorted({0, N // 2, max(0, N - 8), N - 1})
    return [(h, i, j) for h in sorted({0, H // 2, H - 1}) for i in sorted({0, N - 1}) for j in keys]


@pytest.mark.parametrize("H", [1, 3, 5, 6, 12, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_row_check_in_the_fusion_loop_finds_every_bad_row(H, dtype, monkeypatch):
    """With a row tolerance the kernel refuses a row summing to 1 +- 2 tol wherever it is and accepts rows
    summing to exactly 1 whose mass sits in any single lane (a lane counted twice or not at all would refuse or
    pass them), at every ISA level, for compiled-in head counts (one or two passes) and others, N from 5 to 70;
    the check changes no bit of the result."""
    tol = reference.ROW_SUM_TOLERANCE[dtype]
    for isa in _isa_levels():
        monkeypatch.setenv("ROLLOUT_FAST_CPU_ISA", isa)
        for N in (5, 8, 19, 70):
            gen = torch.Generator().manual_seed(N + H)
            att = _exact_rows(make_attention(1, 1, H, N, dtype, generator=gen))
            plain = _op(att, "max", 0.5, 1, True, "mean", None)
            assert torch.equal(_op(att, "max", 0.5, 1, True, "mean", None, tol), plain)
            for h, i, j in _row_cases(N, H):
                one_hot = att.clone()
                one_hot[0, 0, h, i] = 0.0
                one_hot[0, 0, h, i, j] = 1.0
                _op(one_hot, "max", 0.5, 1, True, "mean", None, tol)  # sums to exactly 1: accepted
                for total in (1 + 2 * tol, 1 - 2 * tol):
                    bad = one_hot.clone()
                    bad[0, 0, h, i, j] = total
                    with pytest.raises(RuntimeError, match="contains a row that does not sum to 1"):
                        _op(bad, "max", 0.5, 1, True, "mean", None, tol)
                    _op(bad, "max", 0.5, 1, True, "mean", None)  # no row check: accepted


@pytest.mark.parametrize("H", [3, 12, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bad_values_are_found_with_and_without_the_row_check(H, dtype, monkeypatch):
    """NaN, +-inf and negative values in any head (either pass) and in the overlapping last lanes raise the
    value errors (NaN/inf first) with or without the row check; -0.0 is accepted and gives +0.0's result."""
    N = 21
    att = _exact_rows(make_attention(2, 1, H, N, dtype, generator=torch.Generator().manual_seed(H)))
    for isa in _isa_levels():
        monkeypatch.setenv("ROLLOUT_FAST_CPU_ISA", isa)
        for tol in (None, reference.ROW_SUM_TOLERANCE[dtype]):
            for pos in [(1, 0, H - 1, N - 1, N - 1), (0, 0, H // 2, 3, N - 6), (1, 0, 0, 0, 0)]:
                for value, match in [(float("nan"), "NaN or infinite"), (float("inf"), "NaN or infinite"),
                                     (-float("inf"), "NaN or infinite"), (-1e-3, "negative values")]:
                    bad = att.clone()
                    bad[pos] = value
                    with pytest.raises(RuntimeError, match=match):
                        _op(bad, tol=tol)
                row = pos[:4]  # a row summing to exactly 1 in lane 1, and -0.0 at pos (or in lane 2)
                one_hot = att.clone()
                one_hot[row] = 0.0
                one_hot[row + (1,)] = 1.0
                negative_zero = one_hot.clone()
                negative_zero[pos if pos[4] != 1 else row + (2,)] = -0.0
                assert torch.equal(_op(negative_zero, "min", 0.5, tol=tol), _op(one_hot, "min", 0.5, tol=tol))
