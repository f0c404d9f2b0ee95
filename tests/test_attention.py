"""Numerics of fused attention: ``fastrec.functional.attention`` on the ``cpp`` and ``triton``
backends (Triton in its interpreter when there is no CUDA device), and the ``torch`` backend
that serves as the readable reference.

References and bounds (helpers in ``attention_reference.py``; recipe in docs/testing.md):
- fp32 groups (odd shapes, causal, padding, lengths, attn_mask, cross-attention, non-contiguous,
  x5 inputs, dropout with the recovered mask, compile, autocast's fp32 leaves): ``ref`` =
  ``F.scaled_dot_product_attention`` in float64 with the equivalent additive mask (explicit
  softmax x keep mask / (1 - p) with dropout); output and dq, dk, dv under a random upstream
  gradient; bound ``‖fast − ref‖ / ‖ref‖ <= 1e-5``.
- fp16 / bf16 (and autocast bf16): two references, ``maxabs(fast − ref) <= 2 (outputs) or 3
  (gradients) * maxabs(pt − ref) + 2 ulps of max|ref|``, ``pt`` = SDPA in the low dtype on the
  CPU; bf16 on the Triton interpreter gets one more ulp (it truncates fp32 -> bf16 at the store,
  where a GPU rounds to nearest even).
- Exact checks: fully masked query rows give exactly zero output and gradient; keys that no
  query sees get exactly zero dk, dv; the same seed gives bitwise the same output and gradients;
  20 repeats are bitwise equal; the dropout keep mask equals ``fastrec._philox.dropout_keep_mask``.
- Dropout statistics: the realised drop fraction is within 0.01 of p over 65536 probabilities.
- gradcheck in float64 (fast_mode on the interpreter); opcheck on the registered ops.
- The torch backend is itself checked against SDPA in float64 (relative 1e-12) and in fp32.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from attention_reference import (
    NAMES,
    allowed_mask,
    assert_rel_close,
    assert_two_reference,
    device_of,
    gradient_scales,
    interpreted,
    out_and_grads,
    reference,
    run_forced,
    unavailable,
)
from torch import Tensor

import fastrec
from fastrec import functional as FF
from fastrec._philox import dropout_keep_mask, philox_uniform
from fastrec.ops import attention as attention_ops

BACKENDS = ("cpp", "triton")
NEG_INF = float("-inf")


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each fused backend, forced; skipped with the reason when it cannot run here."""
    yield from run_forced(request.param)


def randn(*shape, dtype=torch.float32) -> Tensor:
    return torch.randn(*shape, dtype=dtype)


def qkv(batch, heads, len_q, len_k, head_dim, dtype=torch.float32, scale_by=1.0):
    return (
        randn(batch, heads, len_q, head_dim, dtype=dtype) * scale_by,
        randn(batch, heads, len_k, head_dim, dtype=dtype) * scale_by,
        randn(batch, heads, len_k, head_dim, dtype=dtype),
    )


def to(device, value):
    return value.to(device) if isinstance(value, Tensor) else value


def check_fp32(backend, q, k, v, *, allowed=None, bias=None, scale=None, **fast_kwargs):
    """Forward and dq, dk, dv of the forced backend (fp32) against the float64 SDPA reference,
    under one random upstream gradient. Returns the fused output and gradients."""
    device = device_of(backend)
    grad_out = randn(*q.shape[:-1], v.shape[-1])
    fast_kwargs = {name: to(device, value) for name, value in fast_kwargs.items()}
    fast = out_and_grads(
        lambda a, b, c: FF.attention(a, b, c, scale=scale, **fast_kwargs),
        [t.to(device) for t in (q, k, v)],
        grad_out,
    )
    ref = out_and_grads(
        lambda a, b, c: reference(a, b, c, allowed=allowed, bias=bias, scale=scale),
        [t.double() for t in (q, k, v)],
        grad_out.double(),
    )
    zero_scales = gradient_scales(q, k, v, grad_out, scale)
    for name, actual, expected in zip(NAMES, (fast[0], *fast[1]), (ref[0], *ref[1]), strict=True):
        assert_rel_close(actual, expected, name, zero_scale=zero_scales[name])
    return fast


def padding_mask(lengths: Tensor, len_k: int, side: str) -> Tensor:
    """Bool (B, Lk), True = padding, with ``lengths`` real keys on the right or left."""
    positions = torch.arange(len_k)
    if side == "right":
        return positions >= lengths[:, None]
    return positions < (len_k - lengths)[:, None]


# =========================================================================== fused backends
# --------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("head_dim", [8, 25, 32, 50, 64, 96])
@pytest.mark.parametrize("length", [1, 2, 17, 50, 97])
def test_odd_lengths_and_head_dims_match_reference(backend, length, head_dim):
    q, k, v = qkv(2, 2, length, length, head_dim)
    check_fp32(backend, q, k, v)


@pytest.mark.parametrize(("length", "head_dim"), [(1, 25), (2, 8), (17, 50), (50, 64), (97, 96)])
def test_causal_matches_reference(backend, length, head_dim):
    q, k, v = qkv(3, 2, length, length, head_dim)
    check_fp32(backend, q, k, v, causal=True, allowed=allowed_mask(3, length, length, causal=True))


@pytest.mark.parametrize(("len_q", "len_k"), [(1, 97), (17, 50), (50, 2), (97, 17)])
def test_cross_attention_with_different_lengths_matches_reference(backend, len_q, len_k):
    q, k, v = qkv(3, 2, len_q, len_k, 32)
    lengths = torch.tensor([len_k, 1, max(1, len_k // 2)])
    kpm = padding_mask(lengths, len_k, "right")
    check_fp32(backend, q, k, v, key_padding_mask=kpm, allowed=allowed_mask(3, len_q, len_k, key_padding_mask=kpm))


def test_custom_scale_matches_reference(backend):
    q, k, v = qkv(2, 3, 19, 23, 25)
    check_fp32(backend, q, k, v, scale=0.37)


# --------------------------------------------------------------------------- padding
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_key_padding_mask_matches_reference(backend, side, causal):
    batch, length = 4, 23
    lengths = torch.tensor([23, 1, 10, 17])
    kpm = padding_mask(lengths, length, side)
    q, k, v = qkv(batch, 2, length, length, 32)
    allowed = allowed_mask(batch, length, length, causal=causal, key_padding_mask=kpm)
    check_fp32(backend, q, k, v, causal=causal, key_padding_mask=kpm, allowed=allowed)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_lengths_match_reference_and_right_padding_mask(backend, dtype):
    batch, length = 5, 29
    lengths = torch.tensor([29, 0, 1, 7, 28], dtype=dtype)
    q, k, v = qkv(batch, 2, length, length, 25)
    allowed = allowed_mask(batch, length, length, lengths=lengths)
    out, grads = check_fp32(backend, q, k, v, lengths=lengths, allowed=allowed)
    kpm = padding_mask(lengths.long(), length, "right")
    out_kpm, _ = out_and_grads(
        lambda a, b, c: FF.attention(a, b, c, key_padding_mask=kpm.to(a.device)),
        [t.to(device_of(backend)) for t in (q, k, v)],
        randn(*out.shape),
    )
    assert_rel_close(out, out_kpm, "out(lengths) vs out(key_padding_mask)")


def test_lengths_combine_with_causal_and_key_padding_mask(backend):
    batch, length = 3, 21
    lengths = torch.tensor([21, 12, 5], dtype=torch.int32)
    kpm = torch.rand(batch, length) < 0.2
    q, k, v = qkv(batch, 2, length, length, 32)
    allowed = allowed_mask(batch, length, length, causal=True, key_padding_mask=kpm, lengths=lengths)
    check_fp32(backend, q, k, v, causal=True, lengths=lengths, key_padding_mask=kpm, allowed=allowed)


def _fully_masked_case(how: str, batch: int, length: int):
    """Fused kwargs, the reference's allowed mask, and the (b, i) query rows with no key."""
    if how == "key_padding_mask":
        kpm = torch.rand(batch, length) < 0.3
        kpm[1] = True  # batch row 1: every key is padding
        kwargs = {"key_padding_mask": kpm}
        allowed = allowed_mask(batch, length, length, key_padding_mask=kpm)
    elif how == "lengths":
        lengths = torch.tensor([length, 0, 3], dtype=torch.int32)
        kwargs = {"lengths": lengths}
        allowed = allowed_mask(batch, length, length, lengths=lengths)
    elif how == "left_padded_causal":  # SASRec: the first queries of a left-padded row see no key
        kpm = padding_mask(torch.tensor([length, 4, 1]), length, "left")
        kwargs = {"key_padding_mask": kpm, "causal": True}
        allowed = allowed_mask(batch, length, length, causal=True, key_padding_mask=kpm)
    else:  # float attn_mask with -inf rows
        attn_mask = randn(batch, 1, length, length)
        attn_mask[:, :, 2] = NEG_INF
        attn_mask[0, :, 5] = NEG_INF
        kwargs = {"attn_mask": attn_mask}
        allowed = None
        return kwargs, allowed, attn_mask
    return kwargs, allowed, None


@pytest.mark.parametrize("how", ["key_padding_mask", "lengths", "left_padded_causal", "attn_mask_neg_inf"])
def test_fully_masked_rows_are_zero_and_pass_no_gradient(backend, how):
    batch, heads, length = 3, 2, 13
    kwargs, allowed, bias = _fully_masked_case(how, batch, length)
    q, k, v = qkv(batch, heads, length, length, 25)
    out, (dq, dk, dv) = check_fp32(backend, q, k, v, allowed=allowed, bias=bias, **kwargs)
    if bias is not None:
        allowed = ~torch.isneginf(bias)
    allowed = allowed.expand(batch, heads, length, length)
    empty_rows = ~allowed.any(-1)  # (B, H, Lq)
    unseen_keys = ~allowed.any(-2)  # (B, H, Lk)
    assert empty_rows.any() and unseen_keys.any() or how == "attn_mask_neg_inf"
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert not t.isnan().any(), f"NaN in {name}"
    assert torch.equal(out.cpu()[empty_rows], torch.zeros_like(out.cpu()[empty_rows])), "masked rows not zero"
    assert torch.equal(dq.cpu()[empty_rows], torch.zeros_like(dq.cpu()[empty_rows])), "masked rows have dq"
    assert torch.equal(dk.cpu()[unseen_keys], torch.zeros_like(dk.cpu()[unseen_keys])), "unseen keys have dk"
    assert torch.equal(dv.cpu()[unseen_keys], torch.zeros_like(dv.cpu()[unseen_keys])), "unseen keys have dv"


def test_batch_whose_lengths_are_all_one_returns_first_value(backend):
    batch, heads, length = 6, 2, 17
    lengths = torch.ones(batch, dtype=torch.int32)
    q, k, v = qkv(batch, heads, length, length, 32)
    device = device_of(backend)
    grad_out = randn(batch, heads, length, 32)
    out, (dq, dk, dv) = out_and_grads(
        lambda a, b, c: FF.attention(a, b, c, lengths=lengths.to(device)),
        [t.to(device) for t in (q, k, v)],
        grad_out,
    )
    # One allowed key: the output is that key's value for every query, and dv[0] sums dO.
    assert_rel_close(out, v[:, :, :1].expand_as(out), "out")
    assert_rel_close(dv[:, :, 0], grad_out.sum(2), "dv of the single key")
    assert torch.equal(dv.cpu()[:, :, 1:], torch.zeros_like(dv.cpu()[:, :, 1:])), "padding keys have dv"
    assert torch.equal(dk.cpu()[:, :, 1:], torch.zeros_like(dk.cpu()[:, :, 1:])), "padding keys have dk"
    # softmax over one key is constant: dq and dk vanish up to fp32 rounding of Delta - dP.
    zero_scales = gradient_scales(q, k, v, grad_out, None)
    assert_rel_close(dq, torch.zeros_like(dq), "dq", zero_scale=zero_scales["dq"])
    assert_rel_close(dk, torch.zeros_like(dk), "dk", zero_scale=zero_scales["dk"])


# --------------------------------------------------------------------------- attn_mask
ATTN_MASK_CASES = ["bool_2d", "bool_4d", "bool_b1", "float_2d", "float_4d", "float_1h", "float_with_kpm"]


@pytest.mark.parametrize("case", ATTN_MASK_CASES)
def test_attn_mask_matches_reference(backend, case):
    batch, heads, len_q, len_k = 2, 3, 19, 21
    q, k, v = qkv(batch, heads, len_q, len_k, 32)
    shape = {
        "bool_2d": (len_q, len_k),
        "bool_4d": (batch, heads, len_q, len_k),
        "bool_b1": (batch, 1, len_q, len_k),
        "float_2d": (len_q, len_k),
        "float_4d": (batch, heads, len_q, len_k),
        "float_1h": (1, heads, len_q, len_k),
        "float_with_kpm": (len_q, len_k),
    }[case]
    kwargs: dict = {}
    if case.startswith("bool"):
        attn_mask = torch.rand(shape) < 0.3
        attn_mask[..., 4, :] = True  # one query row with no key
        allowed, bias = allowed_mask(batch, len_q, len_k, attn_mask_bool=attn_mask), None
    else:
        attn_mask = randn(*shape) * 2
        attn_mask[torch.rand(shape) < 0.2] = NEG_INF
        attn_mask[..., 6, :] = NEG_INF
        allowed, bias = None, attn_mask
    if case == "float_with_kpm":
        kwargs["key_padding_mask"] = torch.rand(batch, len_k) < 0.3
        allowed = allowed_mask(batch, len_q, len_k, key_padding_mask=kwargs["key_padding_mask"])
    check_fp32(backend, q, k, v, attn_mask=attn_mask, allowed=allowed, bias=bias, **kwargs)


@pytest.mark.parametrize("kind", ["zero_neg_inf", "general"])
def test_float_key_padding_mask_matches_reference(backend, kind):
    batch, length = 3, 18
    q, k, v = qkv(batch, 2, length, length, 32)
    if kind == "zero_neg_inf":
        kpm = torch.zeros(batch, length).masked_fill(torch.rand(batch, length) < 0.4, NEG_INF)
    else:  # finite values are added to the scores
        kpm = randn(batch, length).masked_fill(torch.rand(batch, length) < 0.2, NEG_INF)
    check_fp32(
        backend,
        q,
        k,
        v,
        causal=True,
        key_padding_mask=kpm,
        allowed=allowed_mask(batch, length, length, causal=True),
        bias=kpm[:, None, None, :],
    )


# --------------------------------------------------------------------------- layout, range
@pytest.mark.parametrize("layout", ["transposed", "sliced_batch", "packed_qkv"])
def test_non_contiguous_inputs_match_reference(backend, layout):
    """Views as models make them: (B, L, H, D) transposed to (B, H, L, D), every other batch
    row, and q, k, v sliced out of one packed (B, L, 3, H, D) projection."""
    batch, heads, length, head_dim = 4, 3, 23, 25
    device = device_of(backend)
    kpm = padding_mask(torch.tensor([23, 5]), length, "left")
    if layout == "packed_qkv":
        bases = [randn(2, length, 3 * heads * head_dim)]

        def views(packed):
            packed = packed.view(2, length, 3, heads, head_dim)
            return [packed[:, :, i].transpose(1, 2) for i in range(3)]

    else:
        rows = batch if layout == "sliced_batch" else 2
        bases = [randn(rows, length, heads, head_dim) for _ in range(3)]

        def views(*xs):
            xs = [x.transpose(1, 2) for x in xs]
            return [x[::2] for x in xs] if layout == "sliced_batch" else xs

    grad_out = randn(2, heads, length, head_dim)
    fast = out_and_grads(
        lambda *xs: FF.attention(*views(*xs), causal=True, key_padding_mask=kpm.to(device)),
        [b.to(device) for b in bases],
        grad_out,
    )
    assert not any(t.is_contiguous() for t in views(*bases))
    allowed = allowed_mask(2, length, length, causal=True, key_padding_mask=kpm)
    ref = out_and_grads(
        lambda *xs: reference(*views(*xs), allowed=allowed), [b.double() for b in bases], grad_out.double()
    )
    assert_rel_close(fast[0], ref[0], "out")
    for i, (actual, expected) in enumerate(zip(fast[1], ref[1], strict=True)):
        assert_rel_close(actual, expected, f"grad of input {i}")


def test_inputs_scaled_by_5_do_not_overflow(backend):
    batch, length, head_dim = 3, 50, 64
    q, k, v = qkv(batch, 2, length, length, head_dim, scale_by=5.0)
    kpm = padding_mask(torch.tensor([50, 20, 3]), length, "right")
    allowed = allowed_mask(batch, length, length, causal=True, key_padding_mask=kpm)
    check_fp32(backend, q, k, v, causal=True, key_padding_mask=kpm, allowed=allowed)


# --------------------------------------------------------------------------- low precision
LOW_PRECISION_CASES = ["odd_shape", "causal_left_padded", "float_attn_mask_cross"]


@pytest.mark.parametrize("case", LOW_PRECISION_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_within_two_reference_bound(backend, dtype, case):
    batch, heads = 3, 2
    kwargs: dict = {}
    allowed = bias = None
    if case == "odd_shape":
        len_q = len_k = 37
        head_dim = 50
    elif case == "causal_left_padded":
        len_q = len_k = 45
        head_dim = 64
        kpm = padding_mask(torch.tensor([45, 30, 2]), len_k, "left")
        kwargs = {"causal": True, "key_padding_mask": kpm}
        allowed = allowed_mask(batch, len_q, len_k, causal=True, key_padding_mask=kpm)
    else:
        len_q, len_k, head_dim = 21, 33, 25
        bias = randn(batch, 1, len_q, len_k)
        bias[torch.rand(bias.shape) < 0.2] = NEG_INF
        kwargs = {"attn_mask": bias}
    q, k, v = qkv(batch, heads, len_q, len_k, head_dim, dtype=dtype)
    grad_out = randn(batch, heads, len_q, head_dim, dtype=dtype)
    device = device_of(backend)
    fast = out_and_grads(
        lambda a, b, c: FF.attention(a, b, c, **{n: to(device, x) for n, x in kwargs.items()}),
        [t.to(device) for t in (q, k, v)],
        grad_out,
    )
    pt = out_and_grads(lambda a, b, c: reference(a, b, c, allowed=allowed, bias=bias), (q, k, v), grad_out)
    ref = out_and_grads(
        lambda a, b, c: reference(a, b, c, allowed=allowed, bias=bias),
        [t.double() for t in (q, k, v)],
        grad_out.double(),
    )
    assert fast[0].dtype == dtype and all(g.dtype == dtype for g in fast[1])
    extra = 1 if dtype == torch.bfloat16 and interpreted(backend) else 0
    for i, name in enumerate(NAMES):
        pick = (lambda r: r[0]) if i == 0 else (lambda r, i=i: r[1][i - 1])
        assert_two_reference(pick(fast), pick(pt), pick(ref), name, 2 if i == 0 else 3, extra)


def test_autocast_bf16_runs_in_bf16_within_two_reference_bound(backend):
    device = device_of(backend)
    batch, heads, length, head_dim = 2, 2, 31, 32
    q, k, v = qkv(batch, heads, length, length, head_dim)
    kpm = padding_mask(torch.tensor([31, 9]), length, "right")
    grad_out = randn(batch, heads, length, head_dim).bfloat16()

    def fused(a, b, c):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = FF.attention(a, b, c, causal=True, key_padding_mask=kpm.to(device))
        assert out.dtype == torch.bfloat16
        return out

    fast = out_and_grads(fused, [t.to(device) for t in (q, k, v)], grad_out)
    assert all(g.dtype == torch.float32 for g in fast[1]), "autocast must return fp32 grads to fp32 leaves"
    allowed = allowed_mask(batch, length, length, causal=True, key_padding_mask=kpm)
    low = [t.bfloat16() for t in (q, k, v)]
    pt = out_and_grads(lambda a, b, c: reference(a, b, c, allowed=allowed), low, grad_out)
    ref = out_and_grads(
        lambda a, b, c: reference(a, b, c, allowed=allowed), [t.double() for t in low], grad_out.double()
    )
    extra = 1 if interpreted(backend) else 0
    assert_two_reference(fast[0], pt[0], ref[0], "out", 2, extra)
    for name, f, p, r in zip(NAMES[1:], fast[1], pt[1], ref[1], strict=True):
        # fp32 leaves receive the bf16 gradient upcast; measure it in bf16.
        assert_two_reference(f.bfloat16(), p, r, name, 3, extra)


# --------------------------------------------------------------------------- dropout
def fused_with_seed(backend, q, k, v, seed, dropout_p, *, key_padding_mask=None, causal=False):
    """The backend's autograd.Function with an explicit dropout seed (the functional API draws it
    from torch's RNG)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    return attention_ops.AttentionFunction.apply(
        q, k, v, key_padding_mask, None, None, seed, causal, scale, dropout_p, None, False, backend
    )[0]


@pytest.mark.parametrize("dropout_p", [0.2, 0.5])
def test_dropout_matches_reference_with_philox_keep_mask(backend, dropout_p):
    batch, heads, length, head_dim = 2, 3, 37, 25
    device = device_of(backend)
    seed = torch.tensor([123456789012345], dtype=torch.int64)
    kpm = padding_mask(torch.tensor([37, 11]), length, "left")
    q, k, v = qkv(batch, heads, length, length, head_dim)
    grad_out = randn(batch, heads, length, head_dim)
    fast = out_and_grads(
        lambda a, b, c: fused_with_seed(
            backend, a, b, c, seed.to(device), dropout_p, key_padding_mask=kpm.to(device), causal=True
        ),
        [t.to(device) for t in (q, k, v)],
        grad_out,
    )
    keep = dropout_keep_mask(seed, batch, heads, length, length, dropout_p)
    assert_matches_reference_with_keep(fast, q, k, v, grad_out, kpm, True, keep, dropout_p)


def assert_matches_reference_with_keep(fast, q, k, v, grad_out, kpm, causal, keep, dropout_p):
    """``fast`` (out, grads) against the float64 reference dropping by ``keep``."""
    batch, _, len_q, len_k = keep.shape
    allowed = allowed_mask(batch, len_q, len_k, causal=causal, key_padding_mask=kpm)
    ref = out_and_grads(
        lambda a, b, c: reference(a, b, c, allowed=allowed, keep=keep, dropout_p=dropout_p),
        [t.double() for t in (q, k, v)],
        grad_out.double(),
    )
    for name, actual, expected in zip(NAMES, (fast[0], *fast[1]), (ref[0], *ref[1]), strict=True):
        assert_rel_close(actual, expected, name)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("backend", ["torch", "cpp"])  # the Triton kernels draw their own masks
def test_given_dropout_mask_replaces_the_philox_draw(backend, causal):
    """cpp and torch take a bool keep mask (B, H, Lq, Lk) instead of a seed (torch's own draw,
    under use_dropout_stream("torch")): forward and gradients against the reference with it."""
    if unavailable(backend):
        pytest.skip(f"{backend} unavailable: {unavailable(backend)}")
    batch, heads, length, head_dim, dropout_p = 2, 3, 37, 25, 0.3
    keep = torch.rand(batch, heads, length, length) >= dropout_p
    kpm = padding_mask(torch.tensor([37, 11]), length, "left")
    q, k, v = qkv(batch, heads, length, length, head_dim)
    grad_out = randn(batch, heads, length, head_dim)
    scale = 1.0 / math.sqrt(head_dim)

    def fused(a, b, c):
        if backend == "torch":
            return attention_ops.attention_torch(a, b, c, kpm, None, None, None, causal, scale, dropout_p, keep)
        return attention_ops.AttentionFunction.apply(
            a, b, c, kpm, None, None, None, causal, scale, dropout_p, keep, False, backend
        )[0]

    fast = out_and_grads(fused, [q, k, v], grad_out)
    assert_matches_reference_with_keep(fast, q, k, v, grad_out, kpm, causal, keep, dropout_p)
    if backend == "cpp":
        forward = torch.ops.fastrec.attention_forward_cpp
        with pytest.raises(RuntimeError, match=r"dropout_mask must be a contiguous CPU bool tensor of shape \(B, H"):
            forward(q, k, v, None, None, None, None, causal, scale, dropout_p, keep[:, :, :-1])
        torch.library.opcheck(forward.default, (q, k, v, kpm, None, None, None, causal, scale, dropout_p, keep))


def identity_value_probe(backend, dropout_p, seed, batch=2, heads=4, len_q=128, len_k=64):
    """With v = identity (Lk = D), out = P * keep / (1 - p): the realised keep mask is out != 0
    (every P > 0 here). Returns (out, P in float64, keep)."""
    device = device_of(backend)
    q, k, _ = qkv(batch, heads, len_q, len_k, len_k)
    v = torch.eye(len_k).expand(batch, heads, len_k, len_k)
    with torch.no_grad():
        out = fused_with_seed(backend, q.to(device), k.to(device), v.to(device), seed.to(device), dropout_p)
    probs = torch.softmax(q.double() @ k.double().transpose(-2, -1) / math.sqrt(len_k), -1)
    assert (probs > 0).all()
    return out.cpu(), probs, out.cpu() != 0


@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
def test_dropout_drop_fraction_and_mask_follow_philox(backend, dropout_p):
    seed = torch.tensor([2**61 + 12345], dtype=torch.int64)
    out, probs, kept = identity_value_probe(backend, dropout_p, seed)
    dropped = 1.0 - kept.double().mean().item()
    assert abs(dropped - dropout_p) <= 0.01, f"dropped {dropped:.4f}, p = {dropout_p}"
    expected_keep = dropout_keep_mask(seed, *out.shape, dropout_p)
    assert torch.equal(kept, expected_keep), f"{(kept != expected_keep).sum().item()} entries differ from philox"
    assert_rel_close(out, probs * expected_keep / (1 - dropout_p), "out = P * keep / (1 - p)")


def test_dropout_same_torch_seed_gives_bitwise_same_output_and_grads(backend):
    device = device_of(backend)
    q, k, v = qkv(2, 2, 33, 33, 32)
    grad_out = randn(2, 2, 33, 32)
    kpm = padding_mask(torch.tensor([33, 20]), 33, "right").to(device)

    def run(torch_seed):
        torch.manual_seed(torch_seed)
        return out_and_grads(
            lambda a, b, c: FF.attention(a, b, c, key_padding_mask=kpm, dropout_p=0.3),
            [t.to(device) for t in (q, k, v)],
            grad_out,
        )

    first, again, other = run(7), run(7), run(8)
    for name, a, b in zip(NAMES, (first[0], *first[1]), (again[0], *again[1]), strict=True):
        assert torch.equal(a, b), f"{name} differs between two runs with the same seed"
    assert not torch.equal(first[0], other[0]), "another seed must drop other probabilities"


def test_dropout_is_off_when_not_training(backend):
    q, k, v = qkv(2, 2, 20, 20, 32)
    check_fp32(backend, q, k, v, dropout_p=0.4, training=False)


def test_cpp_and_triton_drop_the_same_probabilities():
    for name in BACKENDS:
        reason = unavailable(name)
        if reason is not None:
            pytest.skip(f"needs both fused backends; {name} unavailable: {reason}")
    seed = torch.tensor([987654321], dtype=torch.int64)
    results = {}
    for name in BACKENDS:
        torch.manual_seed(0)  # same q, k for both
        with fastrec.use_backend(name):
            results[name] = identity_value_probe(name, 0.3, seed, batch=2, heads=2, len_q=64, len_k=32)
    (out_cpp, _, kept_cpp), (out_triton, _, kept_triton) = results["cpp"], results["triton"]
    assert torch.equal(kept_cpp, kept_triton)
    assert_rel_close(out_triton, out_cpp, "triton out vs cpp out")


@pytest.mark.parametrize("len_q, len_k", [(21, 37), (9, 64), (40, 6)])
def test_reference_cpp_and_triton_masks_are_bit_for_bit_equal(len_q, len_k):
    """Lk not a multiple of 4 (a partial last group of keys), several key blocks, cross attention:
    the realised masks of every backend equal the reference, counter (i * ceil(Lk / 4) + j // 4)."""
    seed = torch.tensor([2**45 + 77], dtype=torch.int64)
    expected = dropout_keep_mask(seed, 2, 3, len_q, len_k, 0.4)
    ran = []
    for name in BACKENDS:
        if unavailable(name) is not None:
            continue
        torch.manual_seed(0)
        _, _, kept = identity_value_probe(name, 0.4, seed, batch=2, heads=3, len_q=len_q, len_k=len_k)
        assert torch.equal(kept, expected), f"{name}: {(kept != expected).sum().item()} entries differ"
        ran.append(name)
    if not ran:
        pytest.skip("no fused backend available")


def test_dropout_keep_mask_statistics_per_word_and_across_words():
    """Keep rate 1 - p overall and for each of the four words of a Philox call (key j % 4), and
    no correlation between keys that share a call or sit in neighbouring calls."""
    p = 0.2
    keep = dropout_keep_mask(torch.tensor([31337]), 4, 4, 128, 200, p).double()  # 409600 draws
    n_groups = keep.numel() // 4
    tol = 5 / math.sqrt(n_groups)  # 5 sigma of a rate or a correlation estimated from n_groups
    assert abs(keep.mean().item() - (1 - p)) <= 5 / math.sqrt(keep.numel())
    words = keep.view(-1, 4)  # (groups of four adjacent keys, word)
    for word in range(4):
        assert abs(words[:, word].mean().item() - (1 - p)) <= tol, f"word {word}"
    corr = torch.corrcoef(words.T)
    off_diagonal = corr[~torch.eye(4, dtype=torch.bool)]
    assert off_diagonal.abs().max().item() <= tol, f"correlation between words {corr}"
    rows = keep.view(-1, 200)  # neighbouring calls: the last key of a group and the next one
    across = torch.corrcoef(torch.stack([rows[:, 3:-1:4].flatten(), rows[:, 4::4].flatten()]))[0, 1]
    assert abs(across.item()) <= tol
    assert not torch.equal(words[:, 0], words[:, 1])


# --------------------------------------------------------------------------- determinism
def test_forward_and_backward_bitwise_deterministic_over_20_repeats(backend):
    device = device_of(backend)
    batch, heads, length, head_dim = 2, 2, 40, 32
    q, k, v = (t.to(device) for t in qkv(batch, heads, length, length, head_dim))
    kpm = padding_mask(torch.tensor([40, 13]), length, "left").to(device)
    seed = torch.tensor([42], dtype=torch.int64, device=device)
    grad_out = randn(batch, heads, length, head_dim)
    results = [
        out_and_grads(
            lambda a, b, c: fused_with_seed(backend, a, b, c, seed, 0.25, key_padding_mask=kpm, causal=True),
            (q, k, v),
            grad_out,
        )
        for _ in range(20)
    ]
    first = results[0]
    for repeat, result in enumerate(results[1:], 1):
        for name, a, b in zip(NAMES, (first[0], *first[1]), (result[0], *result[1]), strict=True):
            assert torch.equal(a, b), f"{name} of repeat {repeat} differs from the first run"


# --------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("case", ["masks", "causal", "dropout"])
def test_gradcheck_float64(backend, case):
    device = device_of(backend)
    len_q, len_k = (5, 5) if case != "masks" else (4, 6)
    q, k, v = (t.to(device) for t in qkv(1, 2, len_q, len_k, 3, dtype=torch.float64))
    if case == "masks":
        kpm = torch.tensor([[False, False, True, False, False, True]], device=device)
        attn_mask = torch.randn(len_q, len_k, dtype=torch.float64, device=device)
        attn_mask[1, 0] = NEG_INF
        fn = lambda a, b, c: FF.attention(a, b, c, key_padding_mask=kpm, attn_mask=attn_mask)
    elif case == "causal":
        lengths = torch.tensor([4], dtype=torch.int32, device=device)
        fn = lambda a, b, c: FF.attention(a, b, c, causal=True, lengths=lengths)
    else:
        seed = torch.tensor([5], dtype=torch.int64, device=device)
        fn = lambda a, b, c: fused_with_seed(backend, a, b, c, seed, 0.3, causal=True)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=interpreted(backend))


# --------------------------------------------------------------------------- need_weights
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["no_dropout", "dropout"])
def test_need_weights_returns_reference_probabilities_and_their_gradients(backend, dropout_p):
    """``need_weights=True``: the probabilities after dropout (zero where masked or dropped) and
    gradients through them and the output, against the float64 reference; triton forms none."""
    batch, heads, length, head_dim = 2, 3, 21, 25
    q, k, v = qkv(batch, heads, length, length, head_dim)
    kpm = padding_mask(torch.tensor([21, 8]), length, "right")
    if backend == "triton":
        with pytest.raises(RuntimeError, match="need_weights"):
            FF.attention(q, k, v, key_padding_mask=kpm, need_weights=True)
        return
    seed = torch.tensor([2024], dtype=torch.int64)
    grad_out, grad_probs = randn(batch, heads, length, head_dim), randn(batch, heads, length, length)
    scale = 1.0 / math.sqrt(head_dim)
    masks = (kpm, None, None, seed, True, scale, dropout_p, None)

    def out_probs_grads(fn, tensors):
        leaves = [t.detach().requires_grad_() for t in tensors]
        out, probs = fn(*leaves)
        loss = (out * grad_out.to(out)).sum() + (probs * grad_probs.to(probs)).sum()
        return out.detach(), probs.detach(), torch.autograd.grad(loss, leaves)

    if backend == "torch":
        fused = lambda a, b, c: attention_ops.attention_torch(a, b, c, *masks, need_weights=True)
    else:
        fused = lambda a, b, c: attention_ops.AttentionFunction.apply(a, b, c, *masks, True, backend)[::2]
    ref = lambda a, b, c: attention_ops.attention_torch(a, b, c, *masks, need_weights=True)
    out, probs, grads = out_probs_grads(fused, (q, k, v))
    ref_out, ref_probs, ref_grads = out_probs_grads(ref, [t.double() for t in (q, k, v)])
    assert probs.dtype == q.dtype and probs.shape == (batch, heads, length, length)
    allowed = allowed_mask(batch, length, length, causal=True, key_padding_mask=kpm)
    assert (probs[~allowed.expand_as(probs)] == 0).all(), "masked keys must have probability 0"
    for name, actual, expected in zip(
        ("out", "probs", "dq", "dk", "dv"), (out, probs, *grads), (ref_out, ref_probs, *ref_grads), strict=True
    ):
        assert_rel_close(actual, expected, name)
    if dropout_p > 0:
        keep = dropout_keep_mask(seed, batch, heads, length, length, dropout_p)
        assert torch.equal(probs != 0, keep & allowed.expand_as(keep)), "dropped where Philox drops"


@pytest.mark.parametrize("outputs", ["probs_only", "out_and_probs"])
def test_need_weights_gradcheck_float64(outputs):
    """The cpp forward with probabilities; the gradient through them is the torch recomputation
    in AttentionFunction.backward (an output left unused gets no gradient: the probs-only case)."""
    if unavailable("cpp"):
        pytest.skip(f"cpp unavailable: {unavailable('cpp')}")
    q, k, v = qkv(1, 2, 5, 5, 3, dtype=torch.float64)
    kpm = torch.tensor([[False, False, True, False, False]])
    seed = torch.tensor([7], dtype=torch.int64)

    def fn(a, b, c):
        out, _, probs = attention_ops.AttentionFunction.apply(
            a, b, c, kpm, None, None, seed, True, 0.6, 0.3, None, True, "cpp"
        )
        return probs if outputs == "probs_only" else (out, probs)

    inputs = [t.requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(fn, inputs)


# --------------------------------------------------------------------------- compile, ops
@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_torch_compile_fullgraph_matches_reference(backend, compiler):
    torch._dynamo.reset()
    batch, length = 2, 19
    kpm = padding_mask(torch.tensor([19, 6]), length, "left")
    attn_mask = randn(length, length)

    @torch.compile(fullgraph=True, backend=compiler)
    def block(q, k, v, kpm, attn_mask):
        # (B, L, H, D) -> (B, H, L, D) views, as a model's head split makes them
        q, k, v = torch.tanh(q).transpose(1, 2), k.transpose(1, 2), (v * 2).transpose(1, 2)
        return FF.attention(q, k, v, causal=True, key_padding_mask=kpm, attn_mask=attn_mask).transpose(1, 2)

    device = device_of(backend)
    q, k, v = (t.transpose(1, 2) for t in qkv(batch, 2, length, length, 32))
    grad_out = randn(batch, length, 2, 32)
    fast = out_and_grads(
        lambda a, b, c: block(a, b, c, kpm.to(device), attn_mask.to(device)),
        [t.to(device) for t in (q, k, v)],
        grad_out,
    )
    allowed = allowed_mask(batch, length, length, causal=True, key_padding_mask=kpm)
    ref = out_and_grads(
        lambda a, b, c: reference(
            torch.tanh(a).transpose(1, 2), b.transpose(1, 2), (c * 2).transpose(1, 2), allowed=allowed, bias=attn_mask
        ).transpose(1, 2),
        [t.double() for t in (q, k, v)],
        grad_out.double(),
    )
    for name, actual, expected in zip(NAMES, (fast[0], *fast[1]), (ref[0], *ref[1]), strict=True):
        assert_rel_close(actual, expected, name)


def test_torch_compile_inductor_matches_reference(backend):
    torch._dynamo.reset()
    device = device_of(backend)
    length = 16

    @torch.compile(fullgraph=True, backend="inductor")
    def block(q, k, v, lengths):
        q, k, v = (q * 0.5).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        return FF.attention(q, k, v, causal=True, lengths=lengths).relu()

    lengths = torch.tensor([16, 9], dtype=torch.int32)
    q, k, v = (t.transpose(1, 2) for t in qkv(2, 2, length, length, 16))
    grad_out = randn(2, 2, length, 16)
    fast = out_and_grads(
        lambda a, b, c: block(a, b, c, lengths.to(device)), [t.to(device) for t in (q, k, v)], grad_out
    )
    allowed = allowed_mask(2, length, length, causal=True, lengths=lengths)
    ref = out_and_grads(
        lambda a, b, c: reference(
            (a * 0.5).transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2), allowed=allowed
        ).relu(),
        [t.double() for t in (q, k, v)],
        grad_out.double(),
    )
    for name, actual, expected in zip(NAMES, (fast[0], *fast[1]), (ref[0], *ref[1]), strict=True):
        assert_rel_close(actual, expected, name)


def _op_samples(device):
    """(forward args after q, k, v) for: no mask; every mask; dropout."""
    batch, heads, length, head_dim = 2, 2, 9, 8
    q, k, v = (t.to(device) for t in qkv(batch, heads, length, length, head_dim))
    kpm = padding_mask(torch.tensor([9, 4]), length, "left").to(device)
    lengths = torch.tensor([9, 7], dtype=torch.int32, device=device)
    bias = randn(1, heads, length, length).to(device).expand(batch, heads, length, length)
    seed = torch.tensor([11], dtype=torch.int64, device=device)
    scale = 1.0 / math.sqrt(head_dim)
    q_t, k_t, v_t = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))  # (B, L, H, D) storage
    return [
        (q, k, v, None, None, None, None, False, scale, 0.0),
        (q_t, k_t, v_t, kpm, None, None, None, True, scale, 0.0),
        (q, k, v, kpm, lengths, bias, None, True, scale, 0.0),
        (q, k, v, kpm, None, None, seed, False, scale, 0.25),
    ]


def test_registered_ops_pass_opcheck(backend):
    device = device_of(backend)
    forward = getattr(torch.ops.fastrec, f"attention_forward_{backend}").default
    backward = getattr(torch.ops.fastrec, f"attention_backward_{backend}").default
    extra = (False,) if backend == "triton" else ()  # the Triton ops take allow_tf32
    for args in _op_samples(device):
        q, k, v, kpm, lengths, bias, seed, causal, scale, dropout_p = args
        torch.library.opcheck(forward, (*args, *extra))
        if backend == "cpp":  # with the probabilities (need_weights)
            torch.library.opcheck(forward, (*args, None, True))
        out, lse = forward(*args, *extra)[:2]
        assert out.shape == q.shape and lse.shape == q.shape[:-1] and lse.dtype == torch.float32
        grad_out = torch.randn_like(out)
        torch.library.opcheck(
            backward, (grad_out, q, k, v, out, lse, kpm, lengths, bias, seed, causal, scale, dropout_p, *extra)
        )


def test_forward_op_returns_logsumexp_and_inf_for_empty_rows(backend):
    device = device_of(backend)
    batch, heads, length, head_dim = 2, 2, 11, 25
    q, k, v = qkv(batch, heads, length, length, head_dim)
    kpm = padding_mask(torch.tensor([11, 3]), length, "left")
    forward = getattr(torch.ops.fastrec, f"attention_forward_{backend}")
    scale = 0.3
    extra = (False,) if backend == "triton" else ()
    lse = forward(*(t.to(device) for t in (q, k, v)), kpm.to(device), None, None, None, True, scale, 0.0, *extra)[1]
    scores = (q.double() @ k.double().transpose(-2, -1)) * scale
    allowed = allowed_mask(batch, length, length, causal=True, key_padding_mask=kpm)
    expected = torch.logsumexp(scores.masked_fill(~allowed, NEG_INF), -1)
    empty = torch.isneginf(expected)
    lse = lse.cpu()
    assert torch.isposinf(lse[empty]).all(), "rows with no key must have lse = +inf"
    assert_rel_close(lse[~empty], expected[~empty], "lse")


# =========================================================================== bad input
def _bad_inputs():
    q, k, v = qkv(2, 3, 5, 7, 8)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    return [
        ("q_rank", dict(q=q[0]), ValueError, "q must be 4-D"),
        ("k_rank", dict(k=k[:, 0]), ValueError, "k must be 4-D"),
        ("q_not_tensor", dict(q=q.tolist()), TypeError, "q must be a torch.Tensor"),
        ("v_not_tensor", dict(v=3.0), TypeError, "v must be a torch.Tensor"),
        ("k_batch", dict(k=k[:1]), ValueError, "k must have q's (batch, heads)"),
        ("v_heads", dict(v=v[:, :2]), ValueError, "v must have q's (batch, heads)"),
        ("k_head_dim", dict(k=k[..., :4]), ValueError, "k must have q's head_dim"),
        ("v_length", dict(v=v[:, :, :6]), ValueError, "v must have k's length"),
        ("v_dtype", dict(v=v.double()), TypeError, "v must have q's dtype"),
        ("q_int", dict(q=q.long(), k=k.long(), v=v.long()), TypeError, "q must be float16"),
        ("k_device", dict(k=k.to("meta")), ValueError, "k must be on q's device"),
        ("kpm_shape", dict(key_padding_mask=kpm[:, :6]), ValueError, "key_padding_mask must be (batch, L_k)"),
        ("kpm_dtype", dict(key_padding_mask=kpm.long()), TypeError, "key_padding_mask must be bool or floating"),
        ("kpm_not_tensor", dict(key_padding_mask=[[True] * 7] * 2), TypeError, "key_padding_mask must be a torch"),
        ("attn_mask_shape", dict(attn_mask=torch.zeros(5, 6)), ValueError, "attn_mask must broadcast"),
        ("attn_mask_rank", dict(attn_mask=torch.zeros(1, 2, 3, 5, 7)), ValueError, "attn_mask must have at most 4"),
        ("dropout_negative", dict(dropout_p=-0.1), ValueError, "dropout_p must be in [0, 1)"),
        ("dropout_one", dict(dropout_p=1.0), ValueError, "dropout_p must be in [0, 1)"),
        ("lengths_high", dict(lengths=torch.tensor([7, 8])), ValueError, "lengths must lie in [0, L_k = 7]"),
        ("lengths_negative", dict(lengths=torch.tensor([-1, 3])), ValueError, "lengths must lie in [0, L_k = 7]"),
        ("lengths_shape", dict(lengths=torch.tensor([7, 7, 7])), ValueError, "lengths must be (batch,)"),
        ("lengths_float", dict(lengths=torch.tensor([7.0, 7.0])), TypeError, "lengths must be an integer tensor"),
        ("scale_type", dict(scale="0.5"), TypeError, "scale must be a float"),
    ], (q, k, v)


BAD_INPUTS, _QKV_SHAPES = _bad_inputs()


@pytest.mark.parametrize(("argument", "exc", "message"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_error_naming_the_argument(argument, exc, message):
    q, k, v = qkv(2, 3, 5, 7, 8)
    kwargs = {"q": q, "k": k, "v": v, **argument}
    with fastrec.use_backend("torch"), pytest.raises(exc, match=_literal(message)):
        FF.attention(kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v"), **kwargs)


def _literal(message: str) -> str:
    import re

    return re.escape(message)


# =========================================================================== torch backend
TORCH_BACKEND_CASES = ["plain_cross", "causal_kpm_left", "lengths", "bool_attn_mask", "float_attn_mask_kpm", "empty"]


def _torch_backend_case(case: str):
    batch, heads = 3, 2
    len_q, len_k = (13, 17) if case in ("plain_cross", "bool_attn_mask", "float_attn_mask_kpm") else (15, 15)
    kwargs: dict = {}
    allowed = bias = None
    if case == "causal_kpm_left":
        kpm = padding_mask(torch.tensor([15, 4, 1]), len_k, "left")
        kwargs = {"causal": True, "key_padding_mask": kpm}
        allowed = allowed_mask(batch, len_q, len_k, causal=True, key_padding_mask=kpm)
    elif case == "lengths":
        lengths = torch.tensor([15, 0, 2])
        kwargs = {"lengths": lengths}
        allowed = allowed_mask(batch, len_q, len_k, lengths=lengths)
    elif case == "bool_attn_mask":
        mask = torch.rand(batch, heads, len_q, len_k) < 0.4
        kwargs = {"attn_mask": mask}
        allowed = allowed_mask(batch, len_q, len_k, attn_mask_bool=mask)
    elif case == "float_attn_mask_kpm":
        bias = randn(len_q, len_k).masked_fill(torch.rand(len_q, len_k) < 0.2, NEG_INF)
        kpm = torch.rand(batch, len_k) < 0.3
        kwargs = {"attn_mask": bias, "key_padding_mask": kpm}
        allowed = allowed_mask(batch, len_q, len_k, key_padding_mask=kpm)
    elif case == "empty":
        kpm = torch.ones(batch, len_k, dtype=torch.bool)
        kpm[0, 3] = kpm[0, 7] = False  # two keys: one would make dq vanish by cancellation
        kwargs = {"key_padding_mask": kpm}
        allowed = allowed_mask(batch, len_q, len_k, key_padding_mask=kpm)
    return (batch, heads, len_q, len_k), kwargs, allowed, bias


@pytest.mark.parametrize("case", TORCH_BACKEND_CASES)
def test_torch_backend_matches_sdpa_and_explicit_softmax_in_float64(case):
    (batch, heads, len_q, len_k), kwargs, allowed, bias = _torch_backend_case(case)
    q, k, v = qkv(batch, heads, len_q, len_k, 12, dtype=torch.float64)
    grad_out = randn(batch, heads, len_q, 12, dtype=torch.float64)
    with fastrec.use_backend("torch"):
        fast = out_and_grads(lambda a, b, c: FF.attention(a, b, c, **kwargs), (q, k, v), grad_out)
    sdpa = out_and_grads(lambda a, b, c: reference(a, b, c, allowed=allowed, bias=bias), (q, k, v), grad_out)
    explicit = out_and_grads(
        lambda a, b, c: reference(a, b, c, allowed=allowed, bias=bias, explicit=True), (q, k, v), grad_out
    )
    for name, f, s, e in zip(NAMES, (fast[0], *fast[1]), (sdpa[0], *sdpa[1]), (explicit[0], *explicit[1]), strict=True):
        assert_rel_close(f, s, f"{name} (torch backend vs SDPA)", bound=1e-12)
        assert_rel_close(e, s, f"{name} (explicit softmax vs SDPA)", bound=1e-12)


@pytest.mark.parametrize("case", TORCH_BACKEND_CASES)
def test_torch_backend_fp32_within_bound(case):
    (batch, heads, len_q, len_k), kwargs, allowed, bias = _torch_backend_case(case)
    q, k, v = qkv(batch, heads, len_q, len_k, 25)
    with fastrec.use_backend("torch"):
        check_fp32("torch", q, k, v, allowed=allowed, bias=bias, **kwargs)


def test_torch_backend_dropout_matches_explicit_keep_mask():
    q, k, v = qkv(2, 3, 16, 16, 8, dtype=torch.float64)
    seed = torch.tensor([31337], dtype=torch.int64)
    kpm = padding_mask(torch.tensor([16, 5]), 16, "right")
    grad_out = randn(2, 3, 16, 8, dtype=torch.float64)
    fast = out_and_grads(
        lambda a, b, c: attention_ops.attention_torch(a, b, c, kpm, None, None, seed, True, 0.4, 0.3),
        (q, k, v),
        grad_out,
    )
    keep = dropout_keep_mask(seed, 2, 3, 16, 16, 0.3)
    allowed = allowed_mask(2, 16, 16, causal=True, key_padding_mask=kpm)
    ref = out_and_grads(
        lambda a, b, c: reference(a, b, c, allowed=allowed, keep=keep, dropout_p=0.3, scale=0.4), (q, k, v), grad_out
    )
    for name, actual, expected in zip(NAMES, (fast[0], *fast[1]), (ref[0], *ref[1]), strict=True):
        assert_rel_close(actual, expected, name, bound=1e-12)


@pytest.mark.parametrize("case", ["masks", "dropout"])
def test_torch_backend_gradcheck_float64(case):
    q, k, v = qkv(2, 2, 5, 6, 3, dtype=torch.float64)
    if case == "masks":
        kpm = torch.tensor([[False, True, False, False, False, False], [True] * 6])
        bias = torch.randn(5, 6, dtype=torch.float64)
        fn = lambda a, b, c: FF.attention(a, b, c, key_padding_mask=kpm, attn_mask=bias)
    else:
        seed = torch.tensor([3], dtype=torch.int64)
        fn = lambda a, b, c: attention_ops.attention_torch(a, b, c, None, None, None, seed, False, 0.5, 0.4)
    with fastrec.use_backend("torch"):
        assert torch.autograd.gradcheck(fn, [t.requires_grad_() for t in (q, k, v)])


# --------------------------------------------------------------------------- dropout stream
def _philox_python(seed: int, c0: int, c1: int, word: int = 0) -> int:
    """Philox4x32-10 on Python ints (Salmon et al.); returns output word ``word``."""
    mask = 0xFFFFFFFF
    k0, k1 = seed & mask, (seed >> 32) & mask
    c = [c0, c1, 0, 0]
    for _ in range(10):
        prod0, prod1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(prod1 >> 32) ^ c[1] ^ k0, prod1 & mask, (prod0 >> 32) ^ c[3] ^ k1, prod0 & mask]
        k0, k1 = (k0 + 0x9E3779B9) & mask, (k1 + 0xBB67AE85) & mask
    return c[word]


def test_philox_stream_matches_known_answer_and_python_reference():
    # Random123 known-answer vector: philox4x32-10, counter 0, key 0 ->
    # 6627e8d5 e169c58d bc57ac4c 9b00dbd8.
    known = [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert [_philox_python(0, 0, 0, word) for word in range(4)] == known
    zero = torch.zeros(1, dtype=torch.int64)
    assert philox_uniform(0, zero, zero).item() == (0x6627E8D5 >> 8) * 2.0**-24
    seeds = [1, 2**32 + 5, 2**62 - 1, 123456789012345]
    c0 = torch.randint(0, 2**32, (50,), dtype=torch.int64)
    c1 = torch.randint(0, 2**32, (50,), dtype=torch.int64)
    for seed in seeds:
        got = philox_uniform(torch.tensor([seed]), c0, c1)
        expected = torch.tensor(
            [(_philox_python(seed, a, b) >> 8) * 2.0**-24 for a, b in zip(c0.tolist(), c1.tolist(), strict=True)]
        )
        assert torch.equal(got, expected), f"seed {seed}"


def test_dropout_keep_mask_uses_documented_counters_and_drop_rate():
    # Counter (i * ceil(Lk / 4) + j // 4, b * H + h), output word j % 4; Lk = 7 leaves a partial
    # last group of keys, whose fourth word no key uses.
    seed, batch, heads, len_q, len_k, p = 2**40 + 3, 2, 3, 5, 7, 0.3
    keep = dropout_keep_mask(torch.tensor([seed]), batch, heads, len_q, len_k, p)
    for b in range(batch):
        for h in range(heads):
            for i in range(len_q):
                for j in range(len_k):
                    u = (_philox_python(seed, i * 2 + j // 4, b * heads + h, j % 4) >> 8) * 2.0**-24
                    assert keep[b, h, i, j].item() == (u >= p), (b, h, i, j)
    big = dropout_keep_mask(torch.tensor([seed]), 4, 4, 128, 128, p)
    assert abs((1 - big.double().mean().item()) - p) <= 0.01


# --------------------------------------------------------------------------- measured block configs
def test_tuned_config_table_parses_and_names_what_is_wrong():
    from fastrec.kernels import attention as K

    entry = {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3, "ms": 1.0, "default_ms": 2.0}
    table = {"version": 1, "cards": {"Card X": {"configs": {"forward/16/32": entry}}}}
    assert K.parse_configs(table) == {"Card X": {"forward/16/32": K.BlockConfig(128, 64, 8, 3)}}
    with pytest.raises(ValueError, match="version must be 1"):
        K.parse_configs({**table, "version": 2})
    with pytest.raises(ValueError, match=r"cards\['Card X'\].configs must be an object"):
        K.parse_configs({"version": 1, "cards": {"Card X": {}}})
    bad = {"version": 1, "cards": {"Card X": {"configs": {"dkdv/16/32": entry}}}}  # dK/dV needs BLOCK_M | BLOCK_N
    with pytest.raises(ValueError, match=r"configs\['dkdv/16/32'\] is not a valid config"):
        K.parse_configs(bad)
    missing = {"version": 1, "cards": {"Card X": {"configs": {"dq/16/32": {"block_m": 64}}}}}
    with pytest.raises(ValueError, match="needs integer block_m"):
        K.parse_configs(missing)
    shipped = json.loads(Path(fastrec.__file__).with_name("attention_configs.json").read_text())
    assert K.tuned_configs() == K.parse_configs(shipped)  # the package's own table parses


def test_tuned_configs_serve_light_variants_of_their_card_only(monkeypatch):
    """A card's measured config replaces the default for variants without dropout or bias, on
    that card; the compile check's variant list gains exactly those."""
    from fastrec.kernels import attention as K

    tuned = K.BlockConfig(128, 64, 8, 3)
    monkeypatch.setattr(K, "_TABLE", {"Card X": {"forward/16/32": tuned}})
    default = K.block_config("forward", torch.bfloat16, 32, False)
    assert default != tuned
    assert K.block_config("forward", torch.bfloat16, 25, False, dropout_or_bias=False, card="Card X") == tuned
    assert K.block_config("forward", torch.float16, 32, False, dropout_or_bias=False, card="Card X") == tuned
    assert K.block_config("forward", torch.bfloat16, 32, False, dropout_or_bias=True, card="Card X") == default
    assert K.block_config("forward", torch.bfloat16, 32, False, dropout_or_bias=False, card="Card Y") == default
    assert K.block_config("dq", torch.bfloat16, 32, False, dropout_or_bias=False, card="Card X") == K.block_config(
        "dq", torch.bfloat16, 32, False
    )
    assert K.block_config("forward", torch.bfloat16, 32, True, dropout_or_bias=False, card="Card X").block_m == 64
    extra = [v for v in K.kernel_variants() if "Card X" in v.bucket]
    assert {v.dtype for v in extra} == {"fp16", "bf16"} and {v.kernel for v in extra} == {"forward"}
    assert len(extra) == 2 * 8  # fp16 and bf16 x the 8 combinations of CAUSAL, key padding, lengths
    assert all(not {"DROPOUT", "HAS_BIAS"} & set(v.flags) for v in extra)
    assert all(
        (v.constexprs["BLOCK_M"], v.constexprs["BLOCK_N"], v.constexprs["BLOCK_D"]) == (128, 64, 32) for v in extra
    )


def test_tuner_keeps_only_candidates_that_beat_the_default(monkeypatch, tmp_path):
    """The tuner on the interpreter with a made-up clock: the candidate it is told is fastest wins
    where it beats the default by the margin, and the table it writes round-trips."""
    from fastrec.kernels import attention as K

    from fastrec.bench import harness, tables

    fast = K.BlockConfig(32, 16, 4, 3)  # dq: BLOCK_N | BLOCK_M
    candidates = {"forward": ((32, 32, 4, 3),), "dkdv": ((16, 32, 4, 3),), "dq": ((32, 16, 4, 3),)}
    monkeypatch.setattr(tables, "_TUNE_CANDIDATES", {("32", 16): candidates})
    monkeypatch.setattr(tables, "TUNE_SHAPES", ((1, 1, 20),))
    monkeypatch.setattr(tables, "TUNE_HEAD_DIMS", (16,))
    seen = []

    def clock(fn):  # a launch with dq_config=fast takes 1 ms, any other 2 ms
        seen.append(fn.keywords)
        return 1.0 if fn.keywords.get("dq_config") == fast else 2.0

    monkeypatch.setattr(tables, "_median_ms", clock)
    configs, rows = tables.tune_attention(torch.device("cpu"), [torch.float32])
    assert len(rows) == 3 * 2  # per kernel: the default and the one candidate
    assert len(seen) == len(rows) * tables.TUNE_ROUNDS and all(
        len(row["rounds_ms"]) == tables.TUNE_ROUNDS for row in rows
    )
    assert all("ms" in row for row in rows), rows
    assert list(configs) == ["dq/32/16"] and configs["dq/32/16"]["block_m"] == 32
    path = tmp_path / "configs.json"
    tables.write_configs(path, "Card X", configs, harness.environment(torch.device("cpu")))
    assert K.parse_configs(json.loads(path.read_text())) == {"Card X": {"dq/32/16": fast}}


def test_config_writer_refuses_the_cpu_and_other_families(capsys):
    from fastrec.bench import tables

    class Args:
        family = ["attention"]
        write_configs = "unused.json"

    assert tables.configs_main(Args, torch.device("cpu"), [torch.float32]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
    Args.family = ["conv"]
    assert tables.configs_main(Args, torch.device("cuda"), [torch.float32]) == 2
    assert "belongs to --family attention" in capsys.readouterr().err
