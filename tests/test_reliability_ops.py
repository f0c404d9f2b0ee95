"""Reliability of the ops and modules on edge inputs, against torch on every backend.

- empty batches (the cells, their functional forms and their C++ ops, ``MultiheadAttention``,
  ``TransformerEncoderLayer``): torch's empty result forward and backward, no crash. These run in
  a subprocess, so a segfault is a test failure and not a dead test run;
- ``MultiheadAttention``'s mask shapes: torch's forms are accepted, every other shape raises
  (nothing is reshaped into a form that fits);
- NaN in q, k or v propagates as in torch (forward, backward and the returned weights), while
  fully masked rows stay exactly zero with no gradient;
- head_dim 0 gives torch's result; ``LSTMCell`` with a tensor for ``hx`` raises torch's error.
"""

from __future__ import annotations

import pytest
import torch
from isolated import PRELUDE, assert_all_ok, run_isolated

import fastrec
from fastrec import functional as FF
from fastrec import nn as fnn

BACKENDS = ("cpp", "torch", "triton")


# --------------------------------------------------------------------------- empty batches
EMPTY_SCRIPT = (
    PRELUDE
    + """


def check_module(ours, ref, inputs, grad, call=lambda m, *a: m(*a), ref_call=None):
    ours.load_state_dict(ref.state_dict())
    leaves = [t.detach().clone().requires_grad_(grad) for t in inputs]
    ref_leaves = [t.detach().clone().requires_grad_(grad) for t in inputs]
    with torch.set_grad_enabled(grad):
        out, expected = call(ours, *leaves), (ref_call or call)(ref, *ref_leaves)
    outs = out if isinstance(out, tuple) else (out,)
    exps = expected if isinstance(expected, tuple) else (expected,)
    for i, (a, b) in enumerate(zip(outs, exps)):
        if a is None or b is None:
            assert a is None and b is None, f"output {i}: {a} vs torch's {b}"
            continue
        same(a, b, f"output {i}")
    if grad:
        loss = sum(a.sum() for a in outs if a is not None)
        ref_loss = sum(b.sum() for b in exps if b is not None)
        loss.backward()
        ref_loss.backward()
        for i, (a, b) in enumerate(zip(leaves, ref_leaves)):
            same(a.grad, b.grad, f"grad of input {i}")
        for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
            if q.grad is None:
                assert p.grad is None or not p.grad.any(), name
            else:
                same(p.grad, q.grad, f"grad of {name}")


for grad in (True, False):
    for name in ("RNNCell", "GRUCell", "LSTMCell"):
        for with_hx in (False, True):

            @case(f"{name} grad={grad} hx={with_hx}")
            def _():
                ref = getattr(torch.nn, name)(4, 6)
                ours = getattr(fnn, name)(4, 6)
                inputs = [torch.randn(0, 4)]
                if with_hx:
                    inputs += [torch.randn(0, 6)] + ([torch.randn(0, 6)] if name == "LSTMCell" else [])
                if name == "LSTMCell" and with_hx:
                    call = lambda m, x, h, c: m(x, (h, c))
                else:
                    call = lambda m, *a: m(*a)
                check_module(ours, ref, inputs, grad, call)

    for mode, ours, ref, gates in (
        ("gru", FF.gru_cell, torch.gru_cell, 3),
        ("tanh", FF.rnn_tanh_cell, torch.rnn_tanh_cell, 1),
        ("relu", FF.rnn_relu_cell, torch.rnn_relu_cell, 1),
        ("lstm", FF.lstm_cell, torch.lstm_cell, 4),
    ):

        @case(f"functional {mode} cell grad={grad}")
        def _():
            x, h = torch.randn(0, 4), torch.randn(0, 6)
            ws = [torch.randn(gates * 6, 4), torch.randn(gates * 6, 6), torch.randn(gates * 6), torch.randn(gates * 6)]
            a = [t.clone().requires_grad_(grad) for t in [x, h, *ws]]
            b = [t.clone().requires_grad_(grad) for t in [x, h, *ws]]
            with torch.set_grad_enabled(grad):
                if mode == "lstm":
                    c = torch.randn(0, 6)
                    out, expected = ours(a[0], (a[1], c), *a[2:]), ref(b[0], (b[1], c), *b[2:])
                else:
                    out, expected = (ours(*a),), (ref(*b),)
            for o, e in zip(out, expected):
                same(o, e, f"{mode} output")
            if grad:
                sum(o.sum() for o in out).backward()
                sum(e.sum() for e in expected).backward()
                for i, (p, q) in enumerate(zip(a, b)):
                    same(p.grad, q.grad, f"grad {i}")

if backend == "cpp":
    for mode, gates, slots in (("tanh", 1, 1), ("gru", 3, 4), ("lstm", 4, 5)):

        @case(f"rnn_cell_forward_cpp / backward_cpp {mode} B=0")
        def _():
            x, h = torch.randn(0, 4), torch.randn(0, 6)
            c = torch.randn(0, 6) if mode == "lstm" else None
            w_ih, w_hh = torch.randn(gates * 6, 4), torch.randn(gates * 6, 6)
            b_ih, b_hh = torch.randn(gates * 6), torch.randn(gates * 6)
            h_new, c_new, ws = torch.ops.fastrec.rnn_cell_forward_cpp(x, h, c, w_ih, w_hh, b_ih, b_hh, mode)
            assert h_new.shape == (0, 6) and ws.shape == (0, slots * 6), (h_new.shape, ws.shape)
            grads = torch.ops.fastrec.rnn_cell_backward_cpp(
                torch.zeros(0, 6), torch.zeros(0, 6) if c is not None else None, ws, x, h, c, w_ih, w_hh, True, mode
            )
            dx, dh, _, dw_ih, dw_hh, db_ih, db_hh = grads
            assert dx.shape == (0, 4) and dh.shape == (0, 6)
            for g, ref in ((dw_ih, w_ih), (dw_hh, w_hh), (db_ih, b_ih), (db_hh, b_hh)):
                same(g, torch.zeros_like(ref), "weight gradient")

for grad in (True, False):
    for batch_first in (True, False):
        for mask in ("none", "kpm", "causal"):

            @case(f"MultiheadAttention batch 0 grad={grad} batch_first={batch_first} mask={mask}")
            def _():
                ref = torch.nn.MultiheadAttention(8, 2, batch_first=batch_first)
                ours = fnn.MultiheadAttention(8, 2, batch_first=batch_first)
                x = torch.randn(0, 5, 8) if batch_first else torch.randn(5, 0, 8)
                kwargs = {"need_weights": False}
                if mask == "causal":
                    kwargs["attn_mask"] = torch.ones(5, 5, dtype=torch.bool).triu(1)
                ref_call = lambda m, t: m(t, t, t, **kwargs)[0]
                if mask == "kpm":  # torch's own forward fails here: its result without the mask
                    kpm = torch.zeros(0, 5, dtype=torch.bool)
                    call = lambda m, t: m(t, t, t, key_padding_mask=kpm, **kwargs)[0]
                    check_module(ours, ref, [x], grad, call, ref_call)
                else:
                    check_module(ours, ref, [x], grad, ref_call)

            @case(f"TransformerEncoderLayer batch 0 grad={grad} batch_first={batch_first} mask={mask}")
            def _():
                kw = dict(dim_feedforward=16, dropout=0.0, batch_first=batch_first)
                ref = torch.nn.TransformerEncoderLayer(8, 2, **kw)
                ours = fnn.TransformerEncoderLayer(8, 2, **kw)
                ref.eval(), ours.eval()
                x = torch.randn(0, 5, 8) if batch_first else torch.randn(5, 0, 8)
                kwargs = {}
                if mask == "causal":
                    kwargs["src_mask"] = torch.ones(5, 5, dtype=torch.bool).triu(1)
                ref_call = lambda m, t: m(t, **kwargs)
                if mask == "kpm":  # torch's own forward fails here: its result without the mask
                    kpm = torch.zeros(0, 5, dtype=torch.bool)
                    check_module(ours, ref, [x], grad, lambda m, t: m(t, src_key_padding_mask=kpm, **kwargs), ref_call)
                else:
                    check_module(ours, ref, [x], grad, ref_call)

print(json.dumps(results))
"""
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batches_match_torch_without_crashing(backend):
    assert_all_ok(run_isolated(EMPTY_SCRIPT, backend))


# --------------------------------------------------------------------------- attention masks
def _mha(batch_first=True):
    ref = torch.nn.MultiheadAttention(8, 2, batch_first=batch_first)
    ours = fnn.MultiheadAttention(8, 2, batch_first=batch_first)
    ours.load_state_dict(ref.state_dict())
    return ours.eval(), ref.eval()


VALID_MASKS = {  # batch 2, heads 2, L 5, S 6
    "2-D bool": lambda: torch.rand(5, 6) < 0.3,
    "2-D float": lambda: torch.randn(5, 6),
    "3-D bool": lambda: torch.rand(4, 5, 6) < 0.3,
    "3-D float": lambda: torch.randn(4, 5, 6),
}
INVALID_MASKS = {
    "3-D (B, heads*L, S)": lambda: torch.zeros(2, 10, 6, dtype=torch.bool),
    "3-D (1, L, S)": lambda: torch.zeros(1, 5, 6, dtype=torch.bool),
    "3-D (B, L, S)": lambda: torch.zeros(2, 5, 6),
    "3-D (B*heads, L, S+1)": lambda: torch.zeros(4, 5, 7, dtype=torch.bool),
    "3-D (B*heads, L+1, S)": lambda: torch.zeros(4, 6, 6),
    "2-D (L, S+1)": lambda: torch.zeros(5, 7, dtype=torch.bool),
    "2-D (S, L)": lambda: torch.zeros(6, 5),
    "1-D": lambda: torch.zeros(6, dtype=torch.bool),
    "4-D": lambda: torch.zeros(2, 2, 5, 6, dtype=torch.bool),
}


@pytest.mark.parametrize("backend", ("cpp", "torch"))
@pytest.mark.parametrize("need_weights", (False, True))
@pytest.mark.parametrize("form", VALID_MASKS)
def test_mha_valid_attn_masks_match_torch(form, need_weights, backend):
    ours, ref = _mha()
    q, kv = torch.randn(2, 5, 8), torch.randn(2, 6, 8)
    mask = VALID_MASKS[form]()
    with fastrec.use_backend(backend):
        out, w = ours(q, kv, kv, attn_mask=mask, need_weights=need_weights)
    out_ref, w_ref = ref(q, kv, kv, attn_mask=mask, need_weights=need_weights)
    rows = ~mask.view(-1, 5, 6).all(-1) if mask.dtype == torch.bool else torch.ones(mask.numel() // 30, 5).bool()
    rows = rows.view(2, 2, 5).all(1) if mask.dim() == 3 else rows.expand(2, 5)  # torch: NaN where no key
    torch.testing.assert_close(out[rows], out_ref[rows], atol=1e-5, rtol=1e-5)
    if need_weights:
        torch.testing.assert_close(w[rows], w_ref[rows], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_first", (True, False))
@pytest.mark.parametrize("form", INVALID_MASKS)
def test_mha_invalid_attn_masks_raise_as_torch(form, batch_first, backend):
    ours, ref = _mha(batch_first)
    q, kv = torch.randn(2, 5, 8), torch.randn(2, 6, 8)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    mask = INVALID_MASKS[form]()
    with pytest.raises(Exception) as expected:
        ref(q, kv, kv, attn_mask=mask, need_weights=False)
    with fastrec.use_backend(backend), pytest.raises((type(expected.value), ValueError), match="attn_mask"):
        ours(q, kv, kv, attn_mask=mask, need_weights=False)


def test_mha_3d_mask_of_another_layout_raises_with_shapes():
    ours, _ = _mha()
    x = torch.randn(2, 5, 8)
    with pytest.raises(RuntimeError, match=r"attn_mask must be \(batch\*heads, L, S\) = \(4, 5, 5\), got \(2, 10, 5\)"):
        ours(x, x, x, attn_mask=torch.zeros(2, 10, 5, dtype=torch.bool))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 7), (3, 6), (6,), (2, 1, 6)])
def test_mha_invalid_key_padding_mask_raises(shape, backend):
    ours, ref = _mha()
    q, kv = torch.randn(2, 5, 8), torch.randn(2, 6, 8)
    mask = torch.zeros(shape, dtype=torch.bool)
    with pytest.raises((AssertionError, RuntimeError)):
        ref(q, kv, kv, key_padding_mask=mask, need_weights=False)
    with fastrec.use_backend(backend), pytest.raises(ValueError, match="key_padding_mask must be"):
        ours(q, kv, kv, key_padding_mask=mask, need_weights=False)


@pytest.mark.parametrize("backend", ("cpp", "torch"))
def test_mha_unbatched_masks(backend):
    ours, ref = _mha()
    q, kv = torch.randn(5, 8), torch.randn(6, 8)
    good = torch.rand(2, 5, 6) < 0.3
    good[..., 0] = False
    kpm = torch.tensor([False, True, False, False, False, False])
    with fastrec.use_backend(backend):
        out, _ = ours(q, kv, kv, attn_mask=good, key_padding_mask=kpm)
        with pytest.raises(RuntimeError, match="attn_mask"):
            ours(q, kv, kv, attn_mask=torch.zeros(4, 5, 6, dtype=torch.bool))
    torch.testing.assert_close(out, ref(q, kv, kv, attn_mask=good, key_padding_mask=kpm)[0], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- NaN propagation
def _reference_attention(q, k, v, key_padding_mask=None):
    """softmax(q k^T / sqrt(D)) v in plain torch ops (NaN where torch gives NaN); rows with no key
    allowed are zero (fastrec's contract)."""
    s = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if key_padding_mask is not None:
        s = s.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        empty = key_padding_mask.all(-1)[:, None, None, None]
        s = s.masked_fill(empty, 0.0)
    p = torch.softmax(s, -1)
    if key_padding_mask is not None:
        p = p.masked_fill(empty, 0.0)
    return p @ v, p


def _same_with_nan(a, b, what, atol=1e-5):
    assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{what}: NaN at {torch.isnan(a).nonzero().tolist()[:8]}"
    torch.testing.assert_close(a.nan_to_num(0.0), b.nan_to_num(0.0), atol=atol, rtol=1e-5, msg=what)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ("q", "k", "v"))
@pytest.mark.parametrize("need_weights", (False, True))
def test_attention_nan_propagates_as_torch(where, need_weights, backend):
    if need_weights and backend == "triton":
        pytest.skip("the triton kernels form no weights")
    inputs = {n: torch.randn(2, 2, 5, 16) for n in "qkv"}
    inputs[where][0, 1, 2, 3] = float("nan")  # one element of (batch 0, head 1, position 2)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[1] = True  # batch 1: every key masked, so every row is fully masked
    ours = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    refs = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    with fastrec.use_backend(backend):
        res = FF.attention(ours["q"], ours["k"], ours["v"], key_padding_mask=kpm, need_weights=need_weights)
    out, w = res if need_weights else (res, None)
    out_ref, w_ref = _reference_attention(refs["q"], refs["k"], refs["v"], kpm)
    assert torch.isnan(out_ref).any()
    _same_with_nan(out, out_ref, "out")
    assert torch.equal(out[1], torch.zeros_like(out[1])), "fully masked rows must be zero"
    if need_weights:
        _same_with_nan(w, w_ref, "weights")
    grad = torch.randn_like(out)
    out.backward(grad)
    out_ref.backward(grad)
    for n in "qkv":
        _same_with_nan(ours[n].grad, refs[n].grad, f"d{n}")
        assert torch.equal(ours[n].grad[1], torch.zeros_like(ours[n].grad[1])), f"d{n} of fully masked rows"


@pytest.mark.parametrize("backend", ("cpp", "torch"))
def test_mha_need_weights_nan_as_torch(backend):
    ours, ref = _mha()
    x = torch.randn(2, 5, 8)
    x[0, 3, 1] = float("nan")
    with fastrec.use_backend(backend):
        out, w = ours(x, x, x)
    out_ref, w_ref = ref(x, x, x)
    _same_with_nan(out, out_ref, "out")
    _same_with_nan(w, w_ref, "weights")


# --------------------------------------------------------------------------- smaller ones
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_head_dim_zero_as_torch(backend):
    q, k, v = torch.randn(2, 2, 4, 0), torch.randn(2, 2, 3, 0), torch.randn(2, 2, 3, 0)
    with fastrec.use_backend(backend):
        out = FF.attention(q, k, v)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert out.shape == expected.shape == (2, 2, 4, 0)


def test_attention_query_head_dim_zero_as_torch():
    q, k, v = torch.randn(1, 1, 3, 0), torch.randn(1, 1, 4, 0), torch.randn(1, 1, 4, 2)
    out = FF.attention(q, k, v)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("batched", (True, False))
def test_lstm_cell_tensor_hx_raises_as_torch(batched):
    ref = torch.nn.LSTMCell(4, 6)
    ours = fnn.LSTMCell(4, 6)
    x, h = (torch.randn(3, 4), torch.randn(3, 6)) if batched else (torch.randn(4), torch.randn(6))
    with pytest.raises(Exception) as expected:
        ref(x, h)
    with pytest.raises(type(expected.value)) as got:
        ours(x, h)
    assert "too many values" not in str(got.value)


def test_gru_cell_tuple_hx_raises_as_torch():
    ref, ours = torch.nn.GRUCell(4, 6), fnn.GRUCell(4, 6)
    x, h = torch.randn(3, 4), torch.randn(3, 6)
    with pytest.raises(Exception) as expected:
        ref(x, (h, h))
    with pytest.raises(type(expected.value)):
        ours(x, (h, h))


# --------------------------------------------------------------------------- recurrent NaN / Inf
RNN_MODULES = ("RNNCell", "RNNCell-relu", "GRUCell", "LSTMCell", "RNN", "RNN-relu", "GRU", "LSTM")


def _rnn_twins(name):
    name, _, relu = name.partition("-")
    kwargs = {"nonlinearity": "relu"} if relu else {}
    ref = getattr(torch.nn, name)(3, 4, **kwargs)
    ours = getattr(fnn, name)(3, 4, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", RNN_MODULES)
@pytest.mark.parametrize("value", ("nan", "1e3", "-1e3"))
def test_rnn_nan_and_saturation_as_torch(value, name, backend):
    """A NaN input propagates as in torch; a huge one saturates the gates (sigmoid 0 or 1) as in
    torch instead of turning into NaN (fp32, forward and backward). The weight gradients carry x
    itself: their bound is fp32's relative one times |x|."""
    ours, ref = _rnn_twins(name)
    x = torch.randn(5, 3) if "Cell" in name else torch.randn(4, 5, 3)
    x[1, 2] = float(value)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    with fastrec.use_backend(backend):
        out = _first(ours(a))
    expected = _first(ref(b))
    _same_with_nan(out, expected, "output")
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    _same_with_nan(a.grad, b.grad, "input gradient")
    for (pname, p), q in zip(ours.named_parameters(), ref.parameters(), strict=True):
        _same_with_nan(p.grad, q.grad, f"gradient of {pname}", atol=1e-5 * max(1.0, abs(float(value))))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", RNN_MODULES)
def test_rnn_infinite_input_as_torch(name, backend):
    ours, ref = _rnn_twins(name)
    x = torch.randn(6, 3) if "Cell" in name else torch.randn(4, 6, 3)
    x[1, 2], x[3, 0] = float("inf"), float("-inf")
    with fastrec.use_backend(backend), torch.no_grad():
        out = _first(ours(x))
    with torch.no_grad():
        _same_with_nan(out, _first(ref(x)), "output")
