"""The encoder layer: ``fastrec.nn.TransformerEncoderLayer`` against torch's layer, and the
encoder op at inference (``fastrec.ops.encoder``: the C++ op ``encoder_inference_cpp`` and the
torch composite ``encoder_torch``) against torch's layers.

Reference and bound: torch's ``TransformerEncoderLayer`` with the same weights in float64; fastrec
in fp32, output (and in training every gradient) within ``‖fast − ref‖ / ‖ref‖ <= 1e-5``, as in
tests/test_nn_attention.py. Padding positions (past a row's length) are not compared.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from attention_reference import (
    assert_matches_torch_in_training,
    assert_module_matches,
    assert_rel_close,
    assert_two_reference,
    device_of,
    perturb,
    run_forced,
)

import fastrec
from fastrec import nn as fnn
from fastrec.models import SASRec
from fastrec.nn.encoder import encoder_layer_weights
from fastrec.ops import encoder as encoder_ops

EMBED, HEADS = 32, 4
HAVE_LAYER_OP = encoder_ops.HAVE_CPP


@pytest.fixture(params=["torch", "cpp", "triton"])
def backend(request):
    """Each backend, forced; skipped with the reason when it cannot run here."""
    yield from run_forced(request.param)


@pytest.fixture(params=["torch", "cpp"])
def stream_backend(request):
    """The backends that take torch's attention-dropout masks (CPU)."""
    yield from run_forced(request.param)


# --------------------------------------------------------------------------- module
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_transformer_encoder_layer_matches_torch(backend, norm_first):
    kwargs = dict(d_model=EMBED, nhead=HEADS, dim_feedforward=48, dropout=0.0, batch_first=True, norm_first=norm_first)
    torch_layer = perturb(torch.nn.TransformerEncoderLayer(**kwargs))
    fast = fnn.TransformerEncoderLayer(**kwargs)
    assert isinstance(fast.self_attn, fnn.MultiheadAttention)
    fast.load_state_dict(torch_layer.state_dict())
    fast.to(device_of(backend))
    ref = copy.deepcopy(torch_layer).double()
    length = 12
    kpm = torch.arange(length) >= torch.tensor([12, 7, 1])[:, None]
    causal = torch.nn.Transformer.generate_square_subsequent_mask(length)
    fastrec.stats(reset=True)
    assert_module_matches(
        fast, ref, [torch.randn(3, length, EMBED)], (0,), src_mask=causal, src_key_padding_mask=kpm, is_causal=True
    )
    # triton: the whole layer is the fused training op; elsewhere torch's forward with fastrec's attention
    expected = ("encoder_layer", "triton", "") if backend == "triton" else ("attention", backend, "")
    assert fastrec.stats().get(expected, 0) == 1, fastrec.stats()


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_torch_dropout_stream_encoder_layer_matches_torch_in_training(stream_backend, norm_first):
    """Attention, residual and feed-forward dropout all draw torch's masks in torch's order
    (which needs the attention output in torch's memory layout)."""
    kwargs = dict(d_model=EMBED, nhead=HEADS, dim_feedforward=48, dropout=0.3, batch_first=True, norm_first=norm_first)
    torch_layer = perturb(torch.nn.TransformerEncoderLayer(**kwargs))
    fast = fnn.TransformerEncoderLayer(**kwargs)
    fast.load_state_dict(torch_layer.state_dict())
    ref = copy.deepcopy(torch_layer).double()
    causal = torch.nn.Transformer.generate_square_subsequent_mask(12)
    assert_matches_torch_in_training(fast, ref, [torch.randn(3, 12, EMBED)], (0,), src_mask=causal, is_causal=True)


def test_patch_transformer_encoder_and_disabled_family():
    layer = torch.nn.TransformerEncoderLayer(EMBED, HEADS, dim_feedforward=48, dropout=0.0, batch_first=True)
    encoder = perturb(torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False))
    ref = copy.deepcopy(encoder).double()

    kept = fastrec.patch(encoder, attention=False)
    assert kept.replaced == [] and all(why == "attention=False" for _, _, why in kept.left)

    report = fastrec.patch(encoder)
    replaced = sorted(name for name, _, _ in report.replaced)
    assert replaced == ["layers.0", "layers.0.self_attn", "layers.1", "layers.1.self_attn"]
    assert type(encoder.layers[0]) is fnn.TransformerEncoderLayer
    assert type(encoder.layers[0].self_attn) is fnn.MultiheadAttention
    kpm = torch.arange(8) >= torch.tensor([8, 3])[:, None]
    with fastrec.use_backend("torch"):
        assert_module_matches(encoder, ref, [torch.randn(2, 8, EMBED)], (0,), src_key_padding_mask=kpm)
    assert fastrec.unpatch(encoder) == 4
    assert type(encoder.layers[1]) is torch.nn.TransformerEncoderLayer
    assert type(encoder.layers[1].self_attn) is torch.nn.MultiheadAttention


# --------------------------------------------------------------------------- serving op
@pytest.mark.skipif(not HAVE_LAYER_OP, reason="fastrec._C does not register encoder_inference_cpp")
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("bias", [True, False])
def test_encoder_layer_inference_op_matches_torch_layer_in_eval(norm_first, activation, bias):
    """The serving op (one TransformerEncoderLayer, eval) against torch's layer in float64:
    causal and not, per-row key lengths, and the last-query-only form used by SASRec's last
    block (each row's output at its last real position)."""
    torch.manual_seed(0)
    ref = torch.nn.TransformerEncoderLayer(
        EMBED, HEADS, 3 * EMBED, dropout=0.1, activation=activation, batch_first=True, norm_first=norm_first, bias=bias
    )
    ref = perturb(ref).double().eval()
    batch, length = 5, 11
    x = torch.randn(batch, length, EMBED, dtype=torch.float64)
    lengths = torch.tensor([11, 1, 7, 4, 11], dtype=torch.int32)
    op = torch.ops.fastrec.encoder_inference_cpp
    weights = [w.float() if w is not None else None for w in encoder_layer_weights(ref)]
    eps = (ref.norm1.eps, ref.norm2.eps)
    causal_mask = torch.ones(length, length, dtype=torch.bool).triu(1)
    key_pad = torch.arange(length)[None, :] >= lengths[:, None].long()
    with torch.no_grad():
        for causal in (False, True):
            mask = causal_mask if causal else None
            want = ref(x, src_mask=mask, src_key_padding_mask=key_pad, is_causal=causal)
            got = op(x.float(), weights, HEADS, *eps, activation == "gelu", norm_first, causal, lengths, False)
            for b in range(batch):  # rows past a length are padding: compare the real positions
                assert_rel_close(got[b, : lengths[b]], want[b, : lengths[b]], f"row {b} causal={causal}")
            plain = op(x.float(), weights, HEADS, *eps, activation == "gelu", norm_first, causal, None, False)
            assert_rel_close(plain, ref(x, src_mask=mask, is_causal=causal), f"no lengths causal={causal}")
        last = op(x.float(), weights, HEADS, *eps, activation == "gelu", norm_first, True, lengths, True)
        want = ref(x, src_mask=causal_mask, is_causal=True)
        rows = want[torch.arange(batch), lengths.long() - 1]
        assert last.shape == (batch, 1, EMBED)
        assert_rel_close(last[:, 0], rows, "last query")
        last_full = op(x.float(), weights, HEADS, *eps, activation == "gelu", norm_first, True, None, True)
        assert_rel_close(last_full[:, 0], want[:, -1], "last query, no lengths")


@pytest.mark.skipif(not HAVE_LAYER_OP, reason="fastrec._C does not register encoder_inference_cpp")
@pytest.mark.parametrize(
    "embed, heads, ff, length, dtype",
    [
        (24, 2, 42, 70, torch.float32),  # fp32 serving path: tails in every loop, two column blocks
        (24, 2, 42, 70, torch.float64),  # the ATen path
        (16, 2, 20, 300, torch.float32),  # fp32 past the serving path's length: the ATen path
    ],
)
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_encoder_inference_op_paths_match_torch(embed, heads, ff, length, dtype, norm_first, activation):
    """Both implementations behind the op (fp32 short sequences: feature-major kernels; else
    ATen calls) against two torch layers in float64, at shapes that exercise every remainder
    loop: head size 12, E and F not multiples of 16, L spanning several 64-position blocks."""
    torch.manual_seed(1)
    layers = [
        perturb(
            torch.nn.TransformerEncoderLayer(
                embed, heads, ff, activation=activation, batch_first=True, norm_first=norm_first
            )
        )
        .double()
        .eval()
        for _ in range(2)
    ]
    x = torch.randn(3, length, embed, dtype=torch.float64)
    lengths = torch.tensor([length, 1, length // 2 + 3], dtype=torch.int32)
    mask = torch.ones(length, length, dtype=torch.bool).triu(1)
    weights = [w.to(dtype) if w is not None else None for layer in layers for w in encoder_layer_weights(layer)]
    op = torch.ops.fastrec.encoder_inference_cpp
    gelu = activation == "gelu"
    with torch.no_grad():
        want = x
        for layer in layers:
            want = layer(want, src_mask=mask, is_causal=True)
        got = op(x.to(dtype), weights, heads, 1e-5, 1e-5, gelu, norm_first, True, None, False)
        assert_rel_close(got, want, "causal, every position")
        last = op(x.to(dtype), weights, heads, 1e-5, 1e-5, gelu, norm_first, True, lengths, True)
        for b in range(3):  # a row's last position sees only its own first lengths[b] keys
            ref = x[b : b + 1, : lengths[b]]
            for layer in layers:
                ref = layer(ref, src_mask=mask[: lengths[b], : lengths[b]], is_causal=True)
            assert_rel_close(last[b, 0], ref[0, -1], f"row {b}, last query")
        plain = op(x.to(dtype), weights, heads, 1e-5, 1e-5, gelu, norm_first, False, None, False)
        want = x
        for layer in layers:
            want = layer(want)
        assert_rel_close(plain, want, "not causal")


@pytest.mark.skipif(not HAVE_LAYER_OP, reason="fastrec._C does not register encoder_inference_cpp")
def test_encoder_inference_op_runs_a_stack_of_layers():
    """Three layers' weights in one call equal the layers one after the other (torch, float64),
    the last one computing only each row's last real position."""
    torch.manual_seed(0)
    layers = [
        perturb(torch.nn.TransformerEncoderLayer(EMBED, HEADS, 2 * EMBED, activation="gelu", batch_first=True))
        .double()
        .eval()
        for _ in range(3)
    ]
    x = torch.randn(4, 9, EMBED, dtype=torch.float64)
    lengths = torch.tensor([9, 3, 1, 6], dtype=torch.int32)
    mask = torch.ones(9, 9, dtype=torch.bool).triu(1)
    weights = [w.float() if w is not None else None for layer in layers for w in encoder_layer_weights(layer)]
    with torch.no_grad():
        want = x
        for layer in layers:
            want = layer(want, src_mask=mask, is_causal=True)
        got = torch.ops.fastrec.encoder_inference_cpp(
            x.float(), weights, HEADS, 1e-5, 1e-5, True, False, True, lengths, True
        )
    assert_rel_close(got[:, 0], want[torch.arange(4), lengths.long() - 1], "three layers, last query")


@pytest.mark.skipif(not HAVE_LAYER_OP, reason="fastrec._C does not register encoder_inference_cpp")
def test_encoder_layer_inference_op_passes_opcheck():
    layer = perturb(torch.nn.TransformerEncoderLayer(EMBED, HEADS, batch_first=True)).eval()
    weights = [w.detach() for w in encoder_layer_weights(layer)]
    x = torch.randn(3, 6, EMBED)
    lengths = torch.tensor([6, 2, 4], dtype=torch.int32)
    op = torch.ops.fastrec.encoder_inference_cpp.default
    torch.library.opcheck(op, (x, weights, HEADS, 1e-5, 1e-5, True, False, True, None, False))
    torch.library.opcheck(op, (x, weights, HEADS, 1e-5, 1e-5, False, True, True, lengths, True))


@pytest.mark.skipif(not HAVE_LAYER_OP, reason="fastrec._C does not register encoder_inference_cpp")
def test_encoder_layer_inference_op_rejects_bad_weights():
    layer = torch.nn.TransformerEncoderLayer(EMBED, HEADS, batch_first=True)
    x = torch.randn(2, 3, EMBED)
    op = torch.ops.fastrec.encoder_inference_cpp
    with pytest.raises(RuntimeError, match="12 tensors per layer"):
        op(x, encoder_layer_weights(layer)[:11], HEADS, 1e-5, 1e-5, False, False, True, None, False)
    with pytest.raises(RuntimeError, match="heads must divide"):
        op(x, encoder_layer_weights(layer), 5, 1e-5, 1e-5, False, False, True, None, False)
    with pytest.raises(RuntimeError, match="in_proj_weight must be"):
        op(x[..., :16], encoder_layer_weights(layer), HEADS, 1e-5, 1e-5, False, False, True, None, False)
    with pytest.raises(RuntimeError, match="linear2.weight must be"):
        weights = encoder_layer_weights(layer)
        op(x, weights[:8] + [weights[8][:, 1:]] + weights[9:], HEADS, 1e-5, 1e-5, False, False, True, None, False)
    with pytest.raises(RuntimeError, match="of x's dtype"):
        op(x.double(), encoder_layer_weights(layer), HEADS, 1e-5, 1e-5, False, False, True, None, False)
    for lengths, last_query in (([4, 1], False), ([-1, 1], False), ([0, 2], True)):
        with pytest.raises(RuntimeError, match="lengths must lie in"):
            lengths = torch.tensor(lengths)
            op(x, encoder_layer_weights(layer), HEADS, 1e-5, 1e-5, False, False, True, lengths, last_query)


@pytest.mark.skipif(not HAVE_LAYER_OP, reason="fastrec._C does not register encoder_inference_cpp")
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_layer_inference_runs_the_serving_op(batch_first, norm_first):
    """fastrec.nn.TransformerEncoderLayer in eval under no_grad: the serving op, matching torch's
    layer (float64) with no mask, the causal mask (with or without the is_causal hint) and
    unbatched input; a key padding mask or an arbitrary mask runs torch's forward."""
    torch.manual_seed(0)
    kwargs = dict(dim_feedforward=2 * EMBED, batch_first=batch_first, norm_first=norm_first, activation="gelu")
    ref = perturb(torch.nn.TransformerEncoderLayer(EMBED, HEADS, **kwargs)).double().eval()
    ours = fnn.TransformerEncoderLayer(EMBED, HEADS, **kwargs).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 7, EMBED, dtype=torch.float64)
    x = x if batch_first else x.transpose(0, 1)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(7, dtype=torch.float64)
    with torch.no_grad():
        cases = [
            ({}, True),
            ({"src_mask": causal.float()}, True),
            ({"src_mask": causal.float(), "is_causal": True}, True),
        ]
        cases.append(({"src_key_padding_mask": torch.rand(3, 7) < 0.3}, False))
        cases.append(({"src_mask": torch.rand(7, 7) < 0.3}, False))
        for extra, fused in cases:
            fastrec.stats(reset=True)
            ref_extra = {
                k: (v.double() if v.is_floating_point() else v) if isinstance(v, torch.Tensor) else v
                for k, v in extra.items()
            }
            got = ours(x.float(), **extra)
            want = ref(x, **ref_extra)
            if "src_key_padding_mask" in extra:  # padded positions are not compared (torch's fast path may zero them)
                keep = ~extra["src_key_padding_mask"]
                keep = keep if batch_first else keep.t()
                got, want = got[keep], want[keep]
            assert_rel_close(got, want, str(extra.keys()))
            counted = ("encoder", "cpp", "") in fastrec.stats()
            assert counted == fused, extra.keys()
        assert_rel_close(
            ours(x.float()[0] if batch_first else x.float()[:, 0]), ref(x[0] if batch_first else x[:, 0]), "unbatched"
        )
    ours.train()
    ours.dropout.p = ours.dropout1.p = ours.dropout2.p = 0.0
    fastrec.stats(reset=True)
    out = ours(x.float().requires_grad_())  # autograd needed: torch's forward with the fused attention
    out.sum().backward()
    assert not any(k[0] == "encoder" for k in fastrec.stats())
    assert fastrec.stats()[("encoder_layer", "torch", encoder_ops.TRAIN_CPU_REASON)] == 1


# --------------------------------------------------------------------------- op dispatch, torch composite
def _stack(n_layers: int, activation: str, norm_first: bool) -> list[torch.nn.TransformerEncoderLayer]:
    """Float64 torch layers in eval mode, with generic weights."""
    return [
        perturb(
            torch.nn.TransformerEncoderLayer(
                EMBED, HEADS, 2 * EMBED, activation=activation, batch_first=True, norm_first=norm_first
            )
        )
        .double()
        .eval()
        for _ in range(n_layers)
    ]


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_encoder_torch_matches_torch_layers(norm_first, activation):
    """The composite (the reference of the C++ op) under the torch backend: every position,
    causal or not, with per-row key lengths, and the last-query form."""
    layers = _stack(2, activation, norm_first)
    x = torch.randn(4, 9, EMBED, dtype=torch.float64)
    lengths = torch.tensor([9, 3, 1, 6], dtype=torch.int32)
    mask = torch.ones(9, 9, dtype=torch.bool).triu(1)
    weights = [w.float() if w is not None else None for layer in layers for w in encoder_layer_weights(layer)]
    args = (HEADS, 1e-5, 1e-5, activation == "gelu", norm_first)
    with torch.no_grad(), fastrec.use_backend("torch"):
        for causal in (False, True):
            want = x
            for layer in layers:
                want = layer(want, src_mask=mask if causal else None, is_causal=causal)
            got = encoder_ops.encoder_torch(x.float(), weights, *args, causal)
            assert_rel_close(got, want, f"causal={causal}")
        got = encoder_ops.encoder_torch(x.float(), weights, *args, True, lengths, True)
        want = x
        for layer in layers:
            want = layer(want, src_mask=mask, is_causal=True)
        assert got.shape == (4, 1, EMBED)
        assert_rel_close(got[:, 0], want[torch.arange(4), lengths.long() - 1], "last query")
        got = encoder_ops.encoder_torch(x.float(), weights, *args, True, None, True)
        assert_rel_close(got[:, 0], want[:, -1], "last query, no lengths")


def test_encoder_inference_picks_the_backend_and_counts_it():
    """CPU tensors run the C++ op; a forced torch backend or autograd runs the composite (which
    is differentiable), each counted under ``encoder``."""
    layers = _stack(2, "gelu", False)
    x = torch.randn(3, 7, EMBED)
    lengths = torch.tensor([7, 2, 5])
    weights = [w.float() for layer in layers for w in encoder_layer_weights(layer)]
    args = (weights, HEADS, 1e-5, 1e-5, True, False, True, lengths, True)
    with torch.no_grad():
        fastrec.stats(reset=True)
        with fastrec.use_backend("torch"):
            want = encoder_ops.encoder_inference(x, *args)
        assert fastrec.stats().get(("encoder", "torch", ""), 0) == 1, fastrec.stats()
        if HAVE_LAYER_OP:
            fastrec.stats(reset=True)
            got = encoder_ops.encoder_inference(x, *args)
            assert fastrec.stats() == {("encoder", "cpp", ""): 1}
            assert_rel_close(got, want, "cpp against the composite")
    fastrec.stats(reset=True)
    leaf = x.clone().requires_grad_()
    out = encoder_ops.encoder_inference(leaf, *args)
    reason = "autograd (the C++ op is inference only)"
    assert fastrec.stats().get(("encoder", "torch", reason), 0) == 1, fastrec.stats()
    out.sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    assert_rel_close(out.detach(), want, "composite with autograd")


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_sasrec_serve_matches_forward_on_every_backend(backend, padding_side):
    """``SASRec.serve`` goes through the encoder op on every backend (the C++ op on cpp, the
    composite with the selected attention elsewhere) and computes forward's function."""
    torch.manual_seed(0)
    model = SASRec(50, max_len=9, dim=16, n_blocks=2, n_heads=2, dropout=0.0, padding_side=padding_side)
    model = model.to(device_of(backend)).eval()
    histories = [torch.randint(1, 51, (n,)) for n in (4, 9, 1, 12)]
    batch = model.make_input(histories, full_length=True)
    with torch.no_grad():
        expected = model(batch)
        fastrec.stats(reset=True)
        got = model.serve(batch)
    assert ("encoder", backend, "") in fastrec.stats(), fastrec.stats()
    assert_rel_close(got, expected, "serve against forward")


# --------------------------------------------------------------------------- fused training op (triton)
# E = 24 (not a power of two: BLOCK_E 32, masked), F = 40 (not a multiple of the 32-wide chunk).
T_EMBED, T_HEADS, T_FF, T_LEN = 24, 2, 40, 7
T_LENGTHS = torch.tensor([7, 3, 5])


@pytest.fixture
def triton_backend():
    yield from run_forced("triton")


def _layer(cls, dropout: float, **kwargs) -> torch.nn.TransformerEncoderLayer:
    torch.manual_seed(3)
    return perturb(cls(T_EMBED, T_HEADS, T_FF, dropout=dropout, **kwargs))


def _grads(layer, x, grad_out, forward=None, **kwargs):
    """Output and the gradients of x and every parameter (by name), from ``layer(x, **kwargs)``
    (or ``forward(layer, x, **kwargs)``)."""
    x = x.detach().requires_grad_()
    out = forward(layer, x, **kwargs) if forward is not None else layer(x, **kwargs)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    grads = torch.autograd.grad(out, [x, *layer.parameters()], grad_out)
    return out.detach(), dict(zip(names, grads, strict=True))


@pytest.mark.parametrize(
    "norm_first, activation, batch_first, masks, bias",
    [
        (False, "gelu", True, "causal+padding", True),  # SASRec
        (False, "gelu", False, "padding", True),  # BERT4Rec: bidirectional, sequence-first
        (True, "relu", True, "causal", True),
        (False, "relu", True, "none", False),
        (True, "gelu", False, "padding", False),
    ],
)
def test_fused_layer_matches_torch_layer(triton_backend, norm_first, activation, batch_first, masks, bias):
    """The fused training op (forced triton) in fp32 against torch's layer in float64, dropout 0:
    the output and the gradients of x, in_proj, out_proj, linear1/2 and norm1/2 (weights and
    biases), with a random upstream gradient."""
    kwargs = dict(activation=activation, batch_first=batch_first, norm_first=norm_first, bias=bias)
    ref = _layer(torch.nn.TransformerEncoderLayer, 0.0, **kwargs).double()
    fast = fnn.TransformerEncoderLayer(T_EMBED, T_HEADS, T_FF, dropout=0.0, **kwargs)
    fast.load_state_dict(ref.state_dict())
    fast.float()
    x = torch.randn(3, T_LEN, T_EMBED, dtype=torch.float64)
    x = x if batch_first else x.transpose(0, 1).contiguous()
    call = {}
    if "causal" in masks:
        call.update(src_mask=torch.ones(T_LEN, T_LEN, dtype=torch.bool).triu(1), is_causal=True)
    if "padding" in masks:
        call["src_key_padding_mask"] = torch.arange(T_LEN) >= T_LENGTHS[:, None]
    grad_out = torch.randn(x.shape, dtype=torch.float64)
    want, want_grads = _grads(ref, x, grad_out, **call)
    fastrec.stats(reset=True)
    got, got_grads = _grads(fast, x.float(), grad_out.float(), **call)
    assert fastrec.stats() == {("encoder_layer", "triton", ""): 1}, fastrec.stats()
    assert_rel_close(got, want, "output")
    assert len(got_grads) == (13 if bias else 7)
    for name, grad in got_grads.items():
        assert_rel_close(grad, want_grads[name], f"grad of {name}")


@pytest.mark.parametrize("norm_first, batch_first", [(False, True), (True, False)])
def test_fused_layer_with_dropout_draws_the_unfused_fastrec_layers_masks(triton_backend, norm_first, batch_first):
    """Dropout p = 0.3 (attention, dropout1, the feed-forward dropout, dropout2): the fused op and
    the unfused fastrec layer (torch's forward over fastrec's attention and Dropout, Philox masks)
    from the same torch seed draw the same masks: float64 output and every gradient equal to
    1e-12; another seed gives another output."""
    kwargs = dict(activation="gelu", batch_first=batch_first, norm_first=norm_first)
    layer = _layer(fnn.TransformerEncoderLayer, 0.3, **kwargs).double().train()
    x = torch.randn(3, T_LEN, T_EMBED, dtype=torch.float64)
    x = x if batch_first else x.transpose(0, 1).contiguous()
    call = dict(src_mask=torch.ones(T_LEN, T_LEN, dtype=torch.bool).triu(1), is_causal=True)
    call["src_key_padding_mask"] = torch.arange(T_LEN) >= T_LENGTHS[:, None]
    grad_out = torch.randn(x.shape, dtype=torch.float64)
    torch.manual_seed(7)
    fastrec.stats(reset=True)
    got, got_grads = _grads(layer, x, grad_out, **call)
    assert fastrec.stats()[("encoder_layer", "triton", "")] == 1
    torch.manual_seed(7)
    fastrec.stats(reset=True)
    unfused = torch.nn.TransformerEncoderLayer.forward  # torch's forward over fastrec's ops
    want, want_grads = _grads(layer, x, grad_out, forward=unfused, **call)
    assert not any(key[0] == "encoder_layer" for key in fastrec.stats()), fastrec.stats()
    assert fastrec.stats()[("dropout", "triton", "")] == 3
    assert_rel_close(got, want, "output", bound=1e-12)
    for name, grad in got_grads.items():
        assert_rel_close(grad, want_grads[name], f"grad of {name}", bound=1e-12)
    torch.manual_seed(8)
    other, _ = _grads(layer, x, grad_out, **call)
    assert (other - got).norm() > 1e-2 * got.norm(), "another seed should draw other masks"


def test_fused_layer_op_matches_its_torch_reference_and_gradcheck(triton_backend):
    """The op on the triton backend against its torch reference (forced torch) with the same seed
    (dropout on, per-row lengths, pre-norm), and ``gradcheck`` in float64 through the kernels with
    the seeds fixed (fast mode, tiny shape)."""
    torch.manual_seed(0)
    layer = _layer(torch.nn.TransformerEncoderLayer, 0.0, batch_first=True, norm_first=True).double()
    weights = encoder_layer_weights(layer)
    x = torch.randn(3, T_LEN, T_EMBED, dtype=torch.float64)
    args = (T_HEADS, 1e-5, 1e-5, True, True, False, None, T_LENGTHS, (0.2, 0.3, 0.1), 0.25, True)
    outs = []
    for backend in ("triton", "torch"):
        with fastrec.use_backend(backend):
            torch.manual_seed(1)
            outs.append(encoder_ops.encoder_layer(x, weights, *args))
    assert_rel_close(outs[0], outs[1], "triton against the torch reference", bound=1e-12)

    small = perturb(torch.nn.TransformerEncoderLayer(16, 2, 20, batch_first=True)).double()
    weights = [w.detach().clone().requires_grad_() for w in encoder_layer_weights(small)]
    x = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    seeds = [torch.tensor([s], dtype=torch.int64) for s in (11, 12, 13, 14)]
    config = (2, 1e-5, 1e-5, True, False, True, (0.2, 0.2, 0.2), 0.2, True)

    def fn(x, *weights):
        return encoder_ops.EncoderLayerFunction.apply(config, x, None, None, *seeds, *weights)

    assert torch.autograd.gradcheck(fn, (x, *weights), fast_mode=True)


def test_fused_backward_persistent_grid_matches_and_is_deterministic(triton_backend):
    """The backward's persistent grid: more row blocks than programs (150 rows in 64-row blocks on
    2 interpreter programs, so program 0 adds two blocks to its partial row), float64 with every
    dropout on: output and every gradient equal to the torch reference's to 1e-12; a second
    backward gives bit-identical gradients."""
    from fastrec.kernels import encoder as kernels

    rows = 3 * 50
    block_m = kernels.block_config(torch.float64, T_EMBED, rows, True, True)[0]
    blocks = -(-rows // block_m)
    assert blocks > kernels.backward_programs(blocks, torch.device("cpu")) == 2
    layer = _layer(torch.nn.TransformerEncoderLayer, 0.0, batch_first=False, norm_first=False).double()
    weights = [w.detach().requires_grad_() for w in encoder_layer_weights(layer)]
    x = torch.randn(50, 3, T_EMBED, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(x.shape, dtype=torch.float64)
    args = (T_HEADS, 1e-5, 1e-5, True, False, True, None, None, (0.1, 0.2, 0.3), 0.1, False)
    results = []
    for backend in ("triton", "triton", "torch"):
        with fastrec.use_backend(backend):
            torch.manual_seed(5)
            out = encoder_ops.encoder_layer(x, weights, *args)
            results.append((out, torch.autograd.grad(out, [x, *weights], grad_out)))
    (got, got_grads), (_, again), (want, want_grads) = results
    assert_rel_close(got, want, "output", bound=1e-12)
    for index, (grad, repeat, ref) in enumerate(zip(got_grads, again, want_grads, strict=True)):
        assert_rel_close(grad, ref, f"gradient {index}", bound=1e-12)
        assert torch.equal(grad, repeat), f"gradient {index} differs between two backward runs"


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_fused_layer_in_bf16_matches_torch_within_torchs_own_error(triton_backend, norm_first):
    """bf16 (the kernels feed their dots bf16 operands with fp32 accumulation on the GPU; the
    interpreter, whose bf16 arithmetic is broken, upcasts): the output and every gradient against
    torch's layer in float64, within 2x (output) / 3x (gradients) torch's own bf16 layer's error
    plus a floor of 3 bf16 ulps, causal with padding, dropout 0."""
    kwargs = dict(activation="gelu", batch_first=True, norm_first=norm_first)
    ref = _layer(torch.nn.TransformerEncoderLayer, 0.0, **kwargs).double()
    pt = copy.deepcopy(ref).to(torch.bfloat16)
    fast = fnn.TransformerEncoderLayer(T_EMBED, T_HEADS, T_FF, dropout=0.0, **kwargs)
    fast.load_state_dict(ref.state_dict())
    fast.to(torch.bfloat16)
    x = torch.randn(3, T_LEN, T_EMBED, dtype=torch.float64)
    call = dict(src_mask=torch.ones(T_LEN, T_LEN, dtype=torch.bool).triu(1), is_causal=True)
    call["src_key_padding_mask"] = torch.arange(T_LEN) >= T_LENGTHS[:, None]
    grad_out = torch.randn(x.shape, dtype=torch.float64)
    want, want_grads = _grads(ref, x, grad_out, **call)
    with fastrec.use_backend("torch"):
        base, base_grads = _grads(pt, x.bfloat16(), grad_out.bfloat16(), **call)
    fastrec.stats(reset=True)
    got, got_grads = _grads(fast, x.bfloat16(), grad_out.bfloat16(), **call)
    assert fastrec.stats() == {("encoder_layer", "triton", ""): 1}, fastrec.stats()
    real = (torch.arange(T_LEN) < T_LENGTHS[:, None])[..., None]  # padding positions are not compared
    assert_two_reference(got * real, base * real, want * real, "output", 2, extra_ulps=1)
    for name, grad in got_grads.items():
        assert_two_reference(grad, base_grads[name], want_grads[name], f"grad of {name}", 3, extra_ulps=1)


def test_fused_layer_rejects_bad_arguments_naming_them(triton_backend):
    layer = torch.nn.TransformerEncoderLayer(T_EMBED, T_HEADS, T_FF, batch_first=True)
    weights = encoder_layer_weights(layer)
    x = torch.randn(3, T_LEN, T_EMBED)
    call = lambda x=x, weights=weights, heads=T_HEADS, **kw: encoder_ops.encoder_layer(  # noqa: E731
        x, weights, heads, 1e-5, 1e-5, True, False, True, **kw
    )
    with pytest.raises(ValueError, match="x must be a 3-D tensor"):
        call(x=x[0])
    with pytest.raises(ValueError, match="weights must hold 12"):
        call(weights=weights[:11])
    with pytest.raises(ValueError, match="heads must be a positive divisor"):
        call(heads=5)
    with pytest.raises(ValueError, match="linear2.weight must be a tensor of shape"):
        call(weights=weights[:8] + [weights[8][:, 1:]] + weights[9:])
    with pytest.raises(TypeError, match="in_proj_weight must be torch.float64"):
        call(x=x.double())
    with pytest.raises(ValueError, match="key_padding_mask must be a bool tensor"):
        call(key_padding_mask=torch.zeros(3, T_LEN))
    with pytest.raises(ValueError, match="lengths must have shape"):
        call(lengths=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="dropout_p must be in"):
        call(dropout_p=1.0)
    with pytest.raises(ValueError, match="attention_dropout_p must be in"):
        call(attention_dropout_p=-0.1)


def test_fused_layer_routes_with_a_reason(triton_backend):
    """Calls the fused op does not cover run torch's forward, counted under ``encoder_layer``
    with the reason: torch's dropout stream, an arbitrary mask, a custom activation; eval without
    autograd never takes it."""
    layer = _layer(fnn.TransformerEncoderLayer, 0.2, batch_first=True)
    x = torch.randn(3, T_LEN, T_EMBED)
    with fastrec.use_dropout_stream("torch"):
        reason = layer._training_op_reason(x, None, None, False)
    assert reason == "torch's dropout stream (the fused layer draws Philox masks)"
    fastrec.stats(reset=True)
    layer.eval()
    layer(x, src_mask=torch.rand(T_LEN, T_LEN) < 0.3)
    assert fastrec.stats()[("encoder_layer", "torch", "a src_mask other than the causal one")] == 1
    with torch.no_grad():
        fastrec.stats(reset=True)
        layer(x)
        assert not any(key[0] == "encoder_layer" for key in fastrec.stats())
    layer.activation_relu_or_gelu = 0
    assert layer._training_op_reason(x, None, None, False) == "custom activation"


def test_fused_layer_routes_wide_embeddings_to_the_unfused_layer(triton_backend):
    """E past the widest block config that fits in registers is not the fused op's (the layer
    runs unfused, with the reason; forcing triton names it); the op's bound is the kernels' own."""
    from fastrec.kernels import encoder as kernels

    assert encoder_ops.FUSED_MAX_EMBED == kernels.MAX_EMBED == kernels.EMBED_BUCKETS[-1]
    assert encoder_ops.FUSED_MAX_EMBED_FP64 == kernels.MAX_EMBED_FP64
    assert encoder_ops.train_unfused_reason(torch.randn(2, 3, kernels.MAX_EMBED)) is None
    fp64 = torch.randn(2, 3, kernels.MAX_EMBED_FP64 + 1, dtype=torch.float64)
    assert encoder_ops.train_unfused_reason(fp64[..., :-1]) is None
    assert encoder_ops.train_unfused_reason(fp64) == (
        f"float64 with embed_dim > {kernels.MAX_EMBED_FP64} (the fused block backward would spill registers)"
    )
    wide = 2 * kernels.MAX_EMBED
    reason = f"embed_dim > {kernels.MAX_EMBED} (the fused block kernels would spill registers)"
    assert encoder_ops.train_unfused_reason(torch.randn(2, 3, wide)) == reason
    weights = encoder_layer_weights(torch.nn.TransformerEncoderLayer(wide, 2, 2 * wide, batch_first=True))
    with pytest.raises(RuntimeError, match=re.escape(reason)):
        encoder_ops.encoder_layer(torch.randn(2, 3, wide), weights, 2, 1e-5, 1e-5, False, False, True)
    with pytest.raises(ValueError, match="embed_dim must be at most"):
        kernels.block_forward(
            torch.randn(6, wide), None, True, weights[2:], [None] * 3, (0.0,) * 3, (1e-5,) * 2, False, False
        )
