"""The input contract of the rollout ops (issue 12, item 6), on every backend: finite, non-negative attention;
rows summing to 1 within the dtype's tolerance unless ``check_rows=False``; scalar arguments of any real
type; exact messages. Backends: reference, the compiled CPU kernel, CUDA (GPU only) and Triton (on CUDA, or in
its interpreter on CPU tensors, small shapes). Inputs are tests/helpers.py's quantised softmax attention
(tolerance and its reasoning: tests/ops/test_rollout.py's docstring); the edits that break the contract are
exact in every dtype (a one-hot row of 1.25, a negative power of two), so the messages are asserted whole.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import HAS_EXT, HAS_GPU, NO_CUDA_BUILD, NO_EXT, NO_GPU, assert_matches, make_attention

import rollout_fast
from rollout_fast import reference
from rollout_fast.ops import _ext

BACKENDS = [
    pytest.param("reference"),
    pytest.param("cpu", marks=pytest.mark.skipif(not HAS_EXT, reason=NO_EXT)),
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_GPU, reason=NO_GPU),
                                pytest.mark.skipif(not (HAS_EXT and _ext.cuda_built()), reason=NO_CUDA_BUILD)]),
    pytest.param("triton", marks=pytest.mark.triton),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = ["f32", "f16", "bf16", "f64"]
TOL = {torch.float32: 1e-3, torch.float64: 1e-3, torch.float16: 1e-2, torch.bfloat16: 1e-2}
NEGATIVE = ("attentions: contains negative values (the first: {value} at (layer, batch, head, query, key) = {pos}); "
            "rollout needs post-softmax attention probabilities, which are >= 0")
ROW = ("attentions: row (layer, batch, head, query) = {pos} sums to {total}, not 1 (|sum - 1| > {tol}, the {dtype} "
       "tolerance); rollout needs post-softmax attention probabilities. Pass check_rows=False for non-negative "
       "weights whose rows are not normalised (e.g. heads already fused by max or min), or for attention computed "
       "in float16/bfloat16 and stored in a wider dtype (its rows sum to 1 within 1e-2 only)")
EMPTY = ("attentions: the sequence is empty (need at least one layer). Hugging Face models return an empty tuple for "
         "outputs.attentions when they run SDPA attention: load the model with attn_implementation=\"eager\", or use "
         "rollout_fast.AttentionRollout, which captures the attention from any attention implementation")


@pytest.fixture
def device(backend, request) -> str:
    """Where ``backend`` runs: Triton's device (CUDA, or CPU under its interpreter), CUDA, or CPU."""
    if backend == "triton":
        return request.getfixturevalue("triton_device")
    return "cuda" if backend == "cuda" else "cpu"


def _attention(dtype=torch.float32, device="cpu", L=3, B=2, H=4, N=17):
    return make_attention(L, B, H, N, dtype).to(device)


def _random_position(att) -> tuple[int, ...]:
    return tuple(int(torch.randint(0, size, ())) for size in att.shape)


def _message(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text, "the message must be one line"
    return text


# ------------------------------------------------------------------------------------------- negatives
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("check_rows", [True, False])
def test_negative_value_at_a_random_position_is_refused(backend, device, dtype, check_rows):
    att = _attention(dtype, device)
    pos = _random_position(att)
    value = -(2.0 ** -int(torch.randint(1, 12, ())))  # exact in every dtype
    att[pos] = value
    with pytest.raises(ValueError) as info:
        rollout_fast.attention_rollout(att, check_rows=check_rows, grid=(4, 4), backend=backend)
    assert _message(info) == NEGATIVE.format(value=f"{value:.6g}", pos=pos)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_row_of_f_plus_identity_summing_to_zero_is_refused_everywhere(backend, device):
    """The issue's input: head-mean F with F[b, i, i] = -1 and the rest of row i zero, so rowsum(F + I) = 0
    (the reference returned values in -0.11..1, the CPU kernel all zeros). It needs negative attention, which
    every backend now refuses with the same message, whatever check_rows says."""
    att = _attention(device=device, L=2, B=1, H=2, N=10)
    att[1, 0, :, 3] = 0.0
    att[1, 0, :, 3, 3] = -1.0
    for check_rows in (True, False):
        with pytest.raises(ValueError) as info:
            rollout_fast.attention_rollout(att, grid=(3, 3), check_rows=check_rows, backend=backend)
        assert _message(info) == NEGATIVE.format(value="-1", pos=(1, 0, 0, 3, 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_is_reported_before_a_negative_value(backend, device):
    att = _attention(device=device)
    att[0, 0, 0, 0, 0] = -0.5
    att[2, 1, 3, 16, 16] = float("nan")
    for check_rows in (True, False):
        with pytest.raises(ValueError) as info:
            rollout_fast.attention_rollout(att, grid=(4, 4), check_rows=check_rows, backend=backend)
        assert _message(info) == "attentions: contains NaN or infinite values"


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_zero_is_not_negative(backend, device):
    att = _attention(device=device)
    want = rollout_fast.attention_rollout(att, grid=(4, 4), readout="full", backend=backend)
    zeros = att == 0
    assert int(zeros.sum()) > 0, "the input has no zero to flip"
    att[zeros] = -0.0
    got = rollout_fast.attention_rollout(att, grid=(4, 4), readout="full", backend=backend)
    assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------- row sums
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rows_off_by_more_than_the_tolerance_are_refused(backend, device, dtype):
    tol = TOL[dtype]
    assert reference.ROW_SUM_TOLERANCE[dtype] == tol
    att = _attention(dtype, device)
    l, b, h, i, _ = _random_position(att)
    for total in (1.25, 0.5, 0.0, 1 + 2 * tol, 1 - 2 * tol):
        bad = att.clone()
        bad[l, b, h, i] = 0.0
        bad[l, b, h, i, 0] = total  # a one-hot row: its sum is the stored value, exactly
        stored = float(bad[l, b, h, i, 0])
        assert abs(stored - 1) > tol
        with pytest.raises(ValueError) as info:
            rollout_fast.attention_rollout(bad, grid=(4, 4), backend=backend)
        assert _message(info) == ROW.format(pos=(l, b, h, i), total=f"{stored:.6g}", tol=f"{tol:g}",
                                            dtype=str(dtype)[6:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rows_within_the_tolerance_are_accepted_and_check_rows_false_accepts_any(backend, device, dtype):
    """Rows off by half the tolerance pass the check; rows off by any amount pass with check_rows=False; every
    backend gives the reference's answer on both."""
    tol = TOL[dtype]
    att = _attention(dtype, device)
    l, b, h, i, _ = _random_position(att)
    for total, check_rows in ((1 + tol / 2, True), (1 - tol / 2, True), (1.25, False), (0.0, False)):
        edited = att.clone()
        edited[l, b, h, i] = 0.0
        edited[l, b, h, i, 0] = total
        for kw in (dict(discard_ratio=0.9, readout="cls"), dict(head_fusion="max", readout="full"),
                   dict(head_fusion="min", discard_ratio=0.5, readout="mean", normalize="minmax")):
            got = rollout_fast.attention_rollout(edited, grid=(4, 4), check_rows=check_rows, backend=backend, **kw)
            assert_matches(got, reference.attention_rollout(edited, grid=(4, 4), **kw))


@pytest.mark.parametrize("backend", BACKENDS)
def test_heads_fused_by_max_need_check_rows_false(backend, device):
    """Pre-fused attention (what AttentionRollout's capture hands over for head_fusion 'max'): its rows sum to
    more than 1, so the op refuses it by default; with check_rows=False it gives rollout with max fusion."""
    att = _attention(device=device)
    fused = att.amax(dim=2, keepdim=True)
    with pytest.raises(ValueError, match=r"sums to .*Pass check_rows=False"):
        rollout_fast.attention_rollout(fused, grid=(4, 4), backend=backend)
    got = rollout_fast.attention_rollout(fused, grid=(4, 4), discard_ratio=0.5, check_rows=False, backend=backend)
    assert_matches(got, reference.attention_rollout(att, grid=(4, 4), discard_ratio=0.5, head_fusion="max"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_discarded_to_zero_give_identity_rows_on_every_backend(backend, device):
    """With non-negative input rowsum(F + I) >= 1, so the '~0 row sum' case of the issue cannot arise; its
    closest accepted cousin, a row of F that is all zero (the input's, or the discard's), gives M's row e_i
    exactly. Here row 0 is one-hot on the class token and rows 1..7 uniform 1/8; discarding 63 of the 64
    entries zeroes every uniform row: M = I, so R = I and the class-token map is all zero."""
    att = torch.full((2, 1, 1, 8, 8), 0.125)
    att[:, :, :, 0] = 0.0
    att[:, :, :, 0, 0] = 1.0
    att = att.to(device)
    eye = torch.eye(8, device=device).expand(1, 8, 8)
    for protect in (True, False):
        full = rollout_fast.attention_rollout(att, discard_ratio=63 / 64, readout="full", protect_prefix=protect,
                                              backend=backend)
        assert torch.equal(full, eye)
        maps = rollout_fast.attention_rollout(att, discard_ratio=63 / 64, num_prefix_tokens=4, grid=(2, 2),
                                              protect_prefix=protect, backend=backend)
        assert torch.equal(maps, torch.zeros(1, 2, 2, device=device))
    zero = torch.zeros(2, 3, 2, 10, 10, device=device)  # all-zero weights: F = 0, M = I
    full = rollout_fast.attention_rollout(zero, readout="full", check_rows=False, backend=backend)
    assert torch.equal(full, torch.eye(10, device=device).expand(3, 10, 10))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_negative_weights_with_zero_rows_agree_with_the_reference(backend, device):
    """Random non-negative weights (rows scaled by powers of two, so the values stay exact in the tests'
    quantised scheme; some rows zeroed) with check_rows=False: every backend gives the reference's answer."""
    for trial in range(3):
        att = _attention(device=device, L=3, B=2, H=3, N=26)
        scale = 2.0 ** torch.randint(-2, 3, att.shape[:-1] + (1,), device=device)
        att = att * scale * (torch.rand(att.shape[:-1] + (1,), device=device) > 0.2)
        for kw in (dict(discard_ratio=0.9, protect_prefix=trial == 0), dict(head_fusion="max", readout="full"),
                   dict(head_fusion="min", discard_ratio=0.5, readout="mean", normalize=None)):
            got = rollout_fast.attention_rollout(att, grid=(5, 5), check_rows=False, backend=backend, **kw)
            assert_matches(got, reference.attention_rollout(att, grid=(5, 5), **kw))


@pytest.mark.skipif(not HAS_EXT, reason=NO_EXT)
def test_cpu_kernel_row_check_accepts_exactly_what_the_reference_accepts():
    """The CPU kernel checks its float32 row sums against the tolerance narrowed by their rounding margin
    (N * 2**-22). A row between the two is refused by the kernel and accepted by the reference: the op then
    runs again without the kernel's row check, so the CPU backend accepts exactly what the reference does."""
    from rollout_fast.ops import rollout as rollout_ops

    assert rollout_ops.kernel_row_tolerance(torch.float32, 17) == 1e-3 - 17 * 2.0 ** -22
    assert rollout_ops.kernel_row_tolerance(torch.float32, 2097) is not None
    assert rollout_ops.kernel_row_tolerance(torch.float32, 2098) is None  # the op checks in Python instead
    assert rollout_ops.kernel_row_tolerance(torch.bfloat16, 20971) is not None
    assert rollout_ops.kernel_row_tolerance(torch.bfloat16, 20972) is None
    att = _attention()
    kernel_tol = rollout_ops.kernel_row_tolerance(torch.float32, 17)
    between = att.clone()
    between[2, 1, 3, 7] = 0.0
    between[2, 1, 3, 7, 2] = 1 + (1e-3 + kernel_tol) / 2
    assert kernel_tol < float(between[2, 1, 3, 7, 2]) - 1 < 1e-3
    with pytest.raises(RuntimeError, match="contains a row that does not sum to 1"):
        torch.ops.rollout_fast.rollout(between, "mean", 0.0, 1, True, "cls", "max", kernel_tol)
    for kw in (dict(discard_ratio=0.9), dict(readout="full")):
        assert_matches(rollout_fast.attention_rollout(between, grid=(4, 4), backend="cpu", **kw),
                       rollout_fast.attention_rollout(between, grid=(4, 4), backend="reference", **kw))


@pytest.mark.skipif(not HAS_EXT, reason=NO_EXT)
def test_cpu_backend_checks_rows_in_python_beyond_the_kernels_token_count():
    """N = 2100 > 2097: the kernel's rounding margin would take more than half the tolerance, so the op checks
    the rows in Python; the messages are the same. (Plain softmax: the tests' 2**-16 grid is too coarse for
    rows of 2100 entries.)"""
    att = torch.randn(1, 1, 1, 2100, 2100).softmax(-1)
    assert_matches(rollout_fast.attention_rollout(att, grid=(1, 2099), backend="cpu"),
                   reference.attention_rollout(att, grid=(1, 2099)))
    att[0, 0, 0, 1234] = 0.0
    att[0, 0, 0, 1234, 5] = 1.25
    with pytest.raises(ValueError) as info:
        rollout_fast.attention_rollout(att, grid=(1, 2099), backend="cpu")
    assert _message(info) == ROW.format(pos=(0, 0, 0, 1234), total="1.25", tol="0.001", dtype="float32")


# -------------------------------------------------------------------------------------- scalar arguments
@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_and_0d_tensor_scalars_give_the_python_numbers_result(backend, device):
    """N = 10: k = floor(r * 100) is 90 for r = 0.9 but 89 for float32(0.9) = 0.89999998 taken literally, so the
    test sees whether a float32 0.9 counts as the 0.9 it was written as."""
    att = _attention(device=device, L=2, B=2, H=3, N=10)
    want = rollout_fast.attention_rollout(att, discard_ratio=0.9, num_prefix_tokens=1, grid=(3, 3), readout="full",
                                          protect_prefix=True, backend=backend)
    literal = rollout_fast.attention_rollout(att, discard_ratio=float(np.float32(0.9)), readout="full",
                                             backend=backend)
    assert not torch.equal(literal, want), "float32(0.9) taken literally discards the same: the test proves nothing"
    combos = [(np.float32(0.9), np.int64(1), np.bool_(True)), (np.float64(0.9), np.int32(1), torch.tensor(True)),
              (torch.tensor(0.9), torch.tensor(1), True), (torch.tensor(0.9, dtype=torch.float64), np.uint8(1), True),
              (torch.tensor(0.9, dtype=torch.float16), torch.tensor(1, dtype=torch.uint8), np.bool_(True)),
              (torch.tensor(0.9, dtype=torch.bfloat16), 1, True)]
    for ratio, prefix, protect in combos:
        got = rollout_fast.attention_rollout(att, discard_ratio=ratio, num_prefix_tokens=prefix,
                                             grid=(np.int64(3), torch.tensor(3)), readout="full",
                                             protect_prefix=protect, check_rows=np.bool_(True), backend=backend)
        assert torch.equal(got, want), (ratio, prefix, protect)
    maps = rollout_fast.attention_rollout(att, discard_ratio=np.float16(0.5), num_prefix_tokens=np.uint8(1),
                                          grid=(3, 3), backend=backend)
    assert torch.equal(maps, rollout_fast.attention_rollout(att, discard_ratio=0.5, grid=(3, 3), backend=backend))


BAD_SCALARS = [
    (dict(num_prefix_tokens=True), TypeError, "num_prefix_tokens: expected an int, got True"),
    (dict(num_prefix_tokens=np.bool_(True)), TypeError, f"num_prefix_tokens: expected an int, got {np.bool_(True)!r}"),
    (dict(num_prefix_tokens=torch.tensor(True)), TypeError,
     "num_prefix_tokens: expected an int, got a tensor of shape () and dtype torch.bool"),
    (dict(num_prefix_tokens=1.0), TypeError, "num_prefix_tokens: expected an int, got 1.0"),
    (dict(num_prefix_tokens=torch.tensor(1.0)), TypeError,
     "num_prefix_tokens: expected an int, got a tensor of shape () and dtype torch.float32"),
    (dict(num_prefix_tokens=torch.ones(1, dtype=torch.int64)), TypeError,
     "num_prefix_tokens: expected an int, got a tensor of shape (1,) and dtype torch.int64"),
    (dict(discard_ratio=True), TypeError, "discard_ratio: expected a float in [0, 1), got True"),
    (dict(discard_ratio="0.5"), TypeError, "discard_ratio: expected a float in [0, 1), got '0.5'"),
    (dict(discard_ratio=torch.rand(50, 50)), TypeError,
     "discard_ratio: expected a float in [0, 1), got a tensor of shape (50, 50) and dtype torch.float32"),
    (dict(discard_ratio=np.full(3, 0.5)), TypeError,
     "discard_ratio: expected a float in [0, 1), got a numpy array of shape (3,) and dtype float64"),
    (dict(discard_ratio=float("nan")), ValueError, "discard_ratio: expected a value in [0, 1), got nan"),
    (dict(discard_ratio=np.float32(1.0)), ValueError, "discard_ratio: expected a value in [0, 1), got 1.0"),
    (dict(grid=(True, 16)), TypeError, "grid: expected an int, got True"),
    (dict(grid=(4, 4.0)), TypeError, "grid: expected an int, got 4.0"),
    (dict(grid=(torch.tensor(2), np.int64(8))), None, None),
    (dict(grid=(2, 9)), ValueError, "grid: (2, 9) holds 18 patches but N - num_prefix_tokens = 17 - 1 = 16"),
    (dict(protect_prefix=1), TypeError, "protect_prefix: expected True or False, got 1"),
    (dict(protect_prefix=None), TypeError, "protect_prefix: expected True or False, got None"),
    (dict(check_rows="no"), TypeError, "check_rows: expected True or False, got 'no'"),
    (dict(check_rows=torch.tensor([True])), TypeError,
     "check_rows: expected True or False, got a tensor of shape (1,) and dtype torch.bool"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs, exc, message", BAD_SCALARS)
def test_bad_scalars_are_refused_naming_the_argument(backend, device, kwargs, exc, message):
    att = _attention(device=device)
    kwargs = {"grid": (4, 4), **kwargs}
    if exc is None:
        assert rollout_fast.attention_rollout(att, backend=backend, **kwargs).shape == (2, 2, 8)
        return
    with pytest.raises(exc) as info:
        rollout_fast.attention_rollout(att, backend=backend, **kwargs)
    assert _message(info) == message


# ------------------------------------------------------------------------------------------------ layouts
@pytest.mark.parametrize("empty", [(), []], ids=["tuple", "list"])
def test_empty_sequence_says_how_to_get_attention_from_hugging_face(empty):
    for fn in (rollout_fast.attention_rollout, reference.attention_rollout):
        with pytest.raises(ValueError) as info:
            fn(empty)
        assert _message(info) == EMPTY
    with pytest.raises(ValueError) as info:
        rollout_fast.grad_attention_rollout(empty, empty)
    assert _message(info) == EMPTY


def test_layouts_the_docstring_names():
    """Layers first: a (L, B, H, N, N) tensor equals the sequence of its L (B, H, N, N) layers; a 4-D tensor
    is refused, saying how to pass one layer or one image."""
    att = _attention()
    want = rollout_fast.attention_rollout(att, grid=(4, 4))
    assert torch.equal(rollout_fast.attention_rollout(list(att), grid=(4, 4)), want)
    assert torch.equal(rollout_fast.attention_rollout(tuple(att), grid=(4, 4)), want)
    with pytest.raises(ValueError) as info:
        rollout_fast.attention_rollout(att[0], grid=(4, 4))
    assert _message(info) == ("attentions: expected a (L, B, H, N, N) tensor or a sequence of (B, H, N, N) tensors, "
                              "got a tensor of shape (2, 4, 17, 17) (one layer: pass [attention]; one image's "
                              "(L, H, N, N): attentions.unsqueeze(1))")


# ---------------------------------------------------------------------------------------- gradient rollout
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_rollout_checks_the_attention_rows_not_the_gradient_weighted_ones(backend, device):
    """The rows of A_l are checked (check_rows, default True); F_l = relu(mean_h A_l * G_l) never is (its rows
    are not normalised), and the gradients may have any sign."""
    att = _attention(device=device, L=2, B=2, H=3, N=10)
    grads = torch.randn(att.shape, device=device) * 40
    want = reference.grad_rollout(att, grads, discard_ratio=0.5, grid=(3, 3))
    assert_matches(rollout_fast.grad_attention_rollout(att, grads, discard_ratio=0.5, grid=(3, 3), backend=backend),
                   want)
    bad = att.clone()
    bad[1, 0, 2, 4] = 0.0
    bad[1, 0, 2, 4, 0] = 1.25
    with pytest.raises(ValueError) as info:
        rollout_fast.grad_attention_rollout(bad, grads, grid=(3, 3), backend=backend)
    assert _message(info) == ROW.format(pos=(1, 0, 2, 4), total="1.25", tol="0.001", dtype="float32")
    assert_matches(rollout_fast.grad_attention_rollout(bad, grads, grid=(3, 3), check_rows=False, backend=backend),
                   reference.grad_rollout(bad, grads, grid=(3, 3)))
    bad[0, 1, 0, 2, 3] = -0.25
    for check_rows in (True, False):
        with pytest.raises(ValueError) as info:
            rollout_fast.grad_attention_rollout(bad, grads, grid=(3, 3), check_rows=check_rows, backend=backend)
        assert _message(info) == NEGATIVE.format(value="-0.25", pos=(0, 1, 0, 2, 3))


def test_the_reference_checks_rows_only_when_asked():
    """The specification is defined for any non-negative weights (rowsum(F + I) >= 1): reference.attention_rollout
    and reference.grad_rollout check rows with check_rows=True only; the public ops check them by default."""
    att = _attention()
    att[0, 0, 0, 5] = 0.0
    att[0, 0, 0, 5, 0] = 1.25
    assert reference.attention_rollout(att, grid=(4, 4)).shape == (2, 4, 4)
    for fn in (reference.attention_rollout, rollout_fast.attention_rollout):
        kw = {"check_rows": True} if fn is reference.attention_rollout else {}
        with pytest.raises(ValueError) as info:
            fn(att, grid=(4, 4), **kw)
        assert _message(info) == ROW.format(pos=(0, 0, 0, 5), total="1.25", tol="0.001", dtype="float32")
