"""fastrec.nn.RNN / GRU / LSTM against torch.nn's modules.

Reference: the torch module in float64 with the same state_dict. fp32 fastrec vs that
reference: relative error ``||fast - ref|| / ||ref|| <= 1e-5`` on output, h_n, c_n and the
gradients of input, every weight and bias, h0 and c0 under random upstream gradients on the
output and on the final states.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastrec
from fastrec import backends
from fastrec import functional as FF
from fastrec import nn as fnn
from fastrec.ops import rnn as rnn_ops

BOUND = 1e-5
KINDS = ("tanh", "relu", "gru", "lstm")


@pytest.fixture(autouse=True)
def _fused_backend(request):
    """Every test runs with the cpp backend forced (where built), so that CPU LSTM and packed
    input, which the default dispatch routes to torch, are checked on the fused path too;
    tests marked ``default_dispatch`` see the default routing."""
    if not rnn_ops.HAVE_CPP or request.node.get_closest_marker("default_dispatch"):
        yield
        return
    with backends.use_backend("cpp"):
        yield


@pytest.mark.default_dispatch
def test_default_dispatch_routes_padded_cpu_lstm_to_torch_and_packed_input_to_the_fused_path():
    x = torch.randn(3, 7, 5)
    backends.stats(reset=True)
    fnn.LSTM(5, 6, batch_first=True)(x)
    packed = pack_padded_sequence(x, torch.tensor([7, 2, 5]), batch_first=True, enforce_sorted=False)
    fnn.GRU(5, 6, batch_first=True)(packed)
    fnn.GRU(5, 6, batch_first=True)(x)
    fnn.LSTM(5, 6, batch_first=True)(packed)
    counts = backends.stats()
    assert counts[("LSTM", "torch", "LSTM on CPU (torch's oneDNN LSTM is as fast)")] == 1
    assert not any(op == "GRU" and backend == "torch" for (op, backend, _) in counts)
    if rnn_ops.HAVE_CPP:
        assert sum(n for (op, backend, _), n in counts.items() if op == "rnn" and backend == "cpp") == 3


def make(kind: str, input_size: int, hidden: int, **kwargs) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(fastrec fp32 module, torch fp64 module) with the same weights."""
    if kind == "lstm":
        fast, ref = fnn.LSTM(input_size, hidden, **kwargs), torch.nn.LSTM(input_size, hidden, **kwargs)
    elif kind == "gru":
        fast, ref = fnn.GRU(input_size, hidden, **kwargs), torch.nn.GRU(input_size, hidden, **kwargs)
    else:
        fast = fnn.RNN(input_size, hidden, nonlinearity=kind, **kwargs)
        ref = torch.nn.RNN(input_size, hidden, nonlinearity=kind, **kwargs)
    ref.load_state_dict(fast.state_dict())
    return fast, ref.double()


def rel_err(fast: Tensor, ref: Tensor) -> float:
    ref = ref.double()
    return ((fast.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _flat(result):
    out, state = result
    if isinstance(out, PackedSequence):
        out = out.data
    states = state if isinstance(state, tuple) else (state,)
    return [out, *states]


def compare(kind, fast, ref, x, states, seed=0):
    """Run both with grads on input, states and parameters; check every tensor."""
    x32 = x.clone().float().requires_grad_()
    x64 = x.double().clone().requires_grad_()
    s32 = [s.clone().float().requires_grad_() for s in states]
    s64 = [s.double().clone().requires_grad_() for s in states]

    def hx(ss):
        if not ss:
            return None
        return tuple(ss) if kind == "lstm" else ss[0]

    outs32 = _flat(fast(x32, hx(s32)))
    outs64 = _flat(ref(x64, hx(s64)))
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs64]
    torch.autograd.backward(outs32, [g.float() for g in grads])
    torch.autograd.backward(outs64, grads)
    for a, b in zip(outs32, outs64, strict=True):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert rel_err(a, b) <= BOUND
    assert rel_err(x32.grad, x64.grad) <= BOUND
    for a, b in zip(s32, s64, strict=True):
        assert rel_err(a.grad, b.grad) <= BOUND
    for (name, p32), (_, p64) in zip(fast.named_parameters(), ref.named_parameters(), strict=True):
        assert rel_err(p32.grad, p64.grad) <= BOUND, name


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("hidden,steps", [(7, 17), (50, 1)])
def test_matches_torch(kind, batch_first, hidden, steps):
    torch.manual_seed(0)
    fast, ref = make(kind, 5, hidden, batch_first=batch_first)
    batch = 3
    x = torch.randn(batch, steps, 5) if batch_first else torch.randn(steps, batch, 5)
    h0 = [torch.randn(1, batch, hidden) for _ in range(2 if kind == "lstm" else 1)]
    before = backends.stats(reset=True)
    del before
    compare(kind, fast, ref, x, h0)
    assert any(k[0] == "rnn" and k[1] == "cpp" for k in backends.stats()) or not rnn_ops.HAVE_CPP


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode"])
def test_inference_matches_torch(kind, grad_mode):
    """Under no_grad / inference_mode the fused layers run without a workspace (see
    rnn_forward_cpp's need_workspace); two bidirectional layers on a packed batch."""
    torch.manual_seed(0)
    fast, ref = make(kind, 5, 19, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(6, 11, 5)
    lengths = torch.tensor([11, 4, 9, 1, 11, 7])
    context = torch.no_grad() if grad_mode == "no_grad" else torch.inference_mode()
    with context:
        for inp in (x, pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)):
            ref_inp = inp.double() if isinstance(inp, Tensor) else inp.to(torch.float64)
            for a, b in zip(_flat(fast(inp)), _flat(ref(ref_inp)), strict=True):
                assert rel_err(a, b) <= BOUND


@pytest.mark.parametrize("kind", KINDS)
def test_two_layers_bidirectional(kind):
    torch.manual_seed(1)
    fast, ref = make(kind, 6, 7, num_layers=2, bidirectional=True, bias=kind != "relu")
    x = torch.randn(17, 4, 6)
    states = [torch.randn(4, 4, 7) for _ in range(2 if kind == "lstm" else 1)]
    compare(kind, fast, ref, x, states)
    compare(kind, fast, ref, x, [])  # zero initial state


@pytest.mark.parametrize("kind", KINDS)
def test_packed_unsorted(kind):
    torch.manual_seed(2)
    fast, ref = make(kind, 5, 50, num_layers=2, bidirectional=True, batch_first=True)
    lengths = torch.tensor([3, 17, 1, 9, 17, 5])
    x = torch.randn(6, 17, 5)
    states = [torch.randn(4, 6, 50) for _ in range(2 if kind == "lstm" else 1)]
    x32 = x.clone().float().requires_grad_()
    x64 = x.double().clone().requires_grad_()
    p32 = pack_padded_sequence(x32, lengths, batch_first=True, enforce_sorted=False)
    p64 = pack_padded_sequence(x64, lengths, batch_first=True, enforce_sorted=False)
    s32 = [s.clone().float().requires_grad_() for s in states]
    s64 = [s.double().clone().requires_grad_() for s in states]
    o32, st32 = fast(p32, tuple(s32) if kind == "lstm" else s32[0])
    o64, st64 = ref(p64, tuple(s64) if kind == "lstm" else s64[0])
    assert isinstance(o32, PackedSequence)
    assert torch.equal(o32.batch_sizes, o64.batch_sizes)
    assert torch.equal(o32.sorted_indices, o64.sorted_indices)
    assert torch.equal(o32.unsorted_indices, o64.unsorted_indices)
    outs32 = [o32.data, *(st32 if kind == "lstm" else (st32,))]
    outs64 = [o64.data, *(st64 if kind == "lstm" else (st64,))]
    grads = [torch.randn(o.shape, dtype=torch.float64) for o in outs64]
    torch.autograd.backward(outs32, [g.float() for g in grads])
    torch.autograd.backward(outs64, grads)
    for a, b in zip(outs32, outs64, strict=True):
        assert rel_err(a, b) <= BOUND
    assert rel_err(x32.grad, x64.grad) <= BOUND
    for a, b in zip(s32, s64, strict=True):
        assert rel_err(a.grad, b.grad) <= BOUND
    for (name, q32), (_, q64) in zip(fast.named_parameters(), ref.named_parameters(), strict=True):
        assert rel_err(q32.grad, q64.grad) <= BOUND, name


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_unbatched(kind):
    torch.manual_seed(3)
    fast, ref = make(kind, 5, 7, num_layers=2, bidirectional=True)
    states = [torch.randn(4, 7) for _ in range(2 if kind == "lstm" else 1)]
    compare(kind, fast, ref, torch.randn(9, 5), states)


def test_torch_backend_matches():
    """The torch reference path (forced) agrees with torch too, incl. lengths and reverse."""
    torch.manual_seed(4)
    fast, ref = make("gru", 5, 7, bidirectional=True)
    lengths = torch.tensor([4, 1, 6])
    x = torch.randn(3, 6, 5)
    with backends.use_backend("torch"):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, h = fast(packed)
    out64, h64 = ref(pack_padded_sequence(x.double(), lengths, batch_first=True, enforce_sorted=False))
    assert rel_err(out.data, out64.data) <= BOUND and rel_err(h, h64) <= BOUND


def test_dropout_between_layers():
    fast, _ = make("gru", 5, 7, num_layers=3, dropout=0.5)
    x = torch.randn(8, 4, 5)
    fast.eval()
    plain = fast(x)[0]
    fast.train()
    torch.manual_seed(5)
    a = fast(x)[0]
    torch.manual_seed(5)
    b = fast(x)[0]
    torch.manual_seed(6)
    c = fast(x)[0]
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, plain)


def test_proj_size_falls_back():
    torch.manual_seed(7)
    fast, ref = make("lstm", 5, 8, proj_size=3)
    backends.stats(reset=True)
    x = torch.randn(4, 2, 5)
    out, (h, c) = fast(x)
    out64, (h64, c64) = ref(x.double())
    assert rel_err(out, out64) <= BOUND and rel_err(h, h64) <= BOUND and rel_err(c, c64) <= BOUND
    assert backends.stats()[("LSTM", "torch", "proj_size != 0")] == 1


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_keys(kind):
    fast, ref = make(kind, 5, 7, num_layers=2, bidirectional=True)
    assert list(fast.state_dict()) == list(ref.state_dict())


class GRU4Rec(torch.nn.Module):
    def __init__(self, items: int = 30, hidden: int = 16) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(items, hidden)
        self.gru = torch.nn.GRU(hidden, hidden, num_layers=2, batch_first=True)
        self.out = torch.nn.Linear(hidden, items)

    def forward(self, seq: Tensor) -> Tensor:
        return self.out(self.gru(self.emb(seq))[0])


def test_patch_gru4rec():
    torch.manual_seed(8)
    model = GRU4Rec()
    seq = torch.randint(0, 30, (4, 11))
    expected = model(seq)
    report = fastrec.patch(model)
    assert type(model.gru) is fnn.GRU
    assert ("gru", "torch.nn.GRU", "fastrec.nn.GRU") in report.replaced
    backends.stats(reset=True)
    got = model(seq)
    assert rel_err(got, expected) <= BOUND
    assert any(k[0] == "rnn" for k in backends.stats())
    fastrec.unpatch(model)
    assert type(model.gru) is torch.nn.GRU


@pytest.mark.skipif(not rnn_ops.HAVE_CPP, reason="cpp rnn ops not built")
def test_compile_fullgraph():
    """Dynamo refuses every torch.nn.RNNBase subclass unless ``allow_rnn`` is set (its own
    guard against cuDNN's flat weights); with it, the fastrec forward traces in one graph."""
    torch._dynamo.reset()
    torch.manual_seed(9)
    fast, ref = make("lstm", 5, 7, num_layers=2, batch_first=True)
    x = torch.randn(3, 6, 5, requires_grad=True)
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(allow_rnn=True), backends.use_backend("cpp"):
        out, (h, c) = compiled(x)
    (out.sum() + h.sum() + c.sum()).backward()
    x64 = x.detach().double().requires_grad_()
    out64, (h64, c64) = ref(x64)
    (out64.sum() + h64.sum() + c64.sum()).backward()
    assert rel_err(out, out64) <= BOUND and rel_err(h, h64) <= BOUND and rel_err(c, c64) <= BOUND
    assert rel_err(x.grad, x64.grad) <= BOUND


def test_bad_inputs():
    weights = [(torch.randn(21, 5), torch.randn(21, 7), None, None)]
    x = torch.randn(4, 2, 5)
    with pytest.raises(ValueError, match="input.size"):
        FF.rnn(torch.randn(4, 2, 6), weights, mode="gru")
    with pytest.raises(ValueError, match="h0"):
        FF.rnn(x, weights, torch.zeros(1, 3, 7), mode="gru")
    with pytest.raises(ValueError, match="lengths"):
        FF.rnn(x, weights, mode="gru", lengths=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="lengths"):
        FF.rnn(x, weights, mode="gru", lengths=torch.tensor([5, 4]))
    with pytest.raises(ValueError, match="mode"):
        FF.rnn(x, weights, mode="gruu")
    with pytest.raises(ValueError, match="input"):
        FF.rnn(torch.randn(4, 5), weights, mode="gru")
    module = fnn.GRU(5, 7)
    with pytest.raises(RuntimeError):  # torch's own error, via the counted fallback
        module(torch.randn(4, 2, 6))


def _reference_with_reset(kind, ref, x, states, reset):
    """float64 loop over torch's own cells with ref's weights (one layer, one direction), the
    state of row b zeroed before step t where reset[t, b]; x (T, B, I) time-major."""
    w = [getattr(ref, f"{n}_l0") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    cells = {"tanh": torch.rnn_tanh_cell, "relu": torch.rnn_relu_cell, "gru": torch.gru_cell}
    h = states[0][0]
    c = states[1][0] if kind == "lstm" else None
    outs = []
    for t in range(x.shape[0]):
        keep = (~reset[t])[:, None].double()
        h = h * keep
        if kind == "lstm":
            h, c = torch.lstm_cell(x[t], (h, c * keep), *w)
        else:
            h = cells[kind](x[t], h, *w)
        outs.append(h)
    return [torch.stack(outs), h[None]] + ([c[None]] if kind == "lstm" else [])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_reset_keyword_restarts_the_state_of_marked_rows(kind, batch_first):
    fast, ref = make(kind, 5, 7, batch_first=batch_first)
    steps, batch = 9, 4
    reset = torch.rand(steps, batch) < 0.3
    reset[0, 0] = reset[4, 1] = True
    x = torch.randn(steps, batch, 5)
    states = [torch.randn(1, batch, 7) for _ in range(2 if kind == "lstm" else 1)]
    x32 = (x.transpose(0, 1) if batch_first else x).clone().requires_grad_()
    s32 = [s.clone().requires_grad_() for s in states]
    x64 = x.double().requires_grad_()
    s64 = [s.double().requires_grad_() for s in states]
    out, state = fast(x32, tuple(s32) if kind == "lstm" else s32[0], reset=reset.t() if batch_first else reset)
    outs32 = [out.transpose(0, 1) if batch_first else out, *(state if kind == "lstm" else (state,))]
    outs64 = _reference_with_reset(kind, ref, x64, s64, reset)
    grads = [torch.randn(o.shape, dtype=torch.float64) for o in outs64]
    d32 = torch.autograd.grad(outs32, [x32, *s32, *fast.parameters()], [g.float() for g in grads])
    d64 = torch.autograd.grad(outs64, [x64, *s64, *ref.parameters()], grads)
    for a, b in zip(outs32, outs64, strict=True):
        assert rel_err(a, b) <= BOUND
    d32 = [d32[0].transpose(0, 1) if batch_first else d32[0], *d32[1:]]
    for a, b in zip(d32, d64, strict=True):
        assert rel_err(a, b) <= BOUND


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_reset_keyword_in_deep_bidirectional_modules_matches_the_torch_backend(kind):
    fast, _ = make(kind, 5, 6, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(3, 8, 5, requires_grad=True)
    reset = torch.rand(3, 8) < 0.25
    out, _ = fast(x, reset=reset)
    (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    with backends.use_backend("torch"):
        ref_out, _ = fast(x, reset=reset)
    (ref_gx,) = torch.autograd.grad(ref_out, x, torch.ones_like(ref_out))
    assert rel_err(out, ref_out) <= BOUND and rel_err(gx, ref_gx) <= BOUND
    assert not torch.allclose(out, fast(x)[0])  # the resets change the result


@pytest.mark.parametrize("kind", KINDS)
def test_lengths_keyword_matches_torch_on_the_packed_batch(kind):
    fast, ref = make(kind, 5, 6, num_layers=2, bidirectional=True, batch_first=True)
    lengths = torch.tensor([4, 9, 1, 9, 6])
    x = torch.randn(5, 9, 5)
    x32, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    out, state = fast(x32, lengths=lengths)
    out64, state64 = ref(pack_padded_sequence(x64, lengths, batch_first=True, enforce_sorted=False))
    out64, _ = torch.nn.utils.rnn.pad_packed_sequence(out64, batch_first=True, total_length=9)
    outs32 = [out, *(state if kind == "lstm" else (state,))]
    outs64 = [out64, *(state64 if kind == "lstm" else (state64,))]
    grads = [torch.randn(o.shape, dtype=torch.float64) for o in outs64]
    d32 = torch.autograd.grad(outs32, [x32, *fast.parameters()], [g.float() for g in grads])
    d64 = torch.autograd.grad(outs64, [x64, *ref.parameters()], grads)
    assert torch.all(out[2, 1:] == 0)  # past the row's length
    for a, b in zip([*outs32, *d32], [*outs64, *d64], strict=True):
        assert rel_err(a, b) <= BOUND


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("lengths", [[1, 1, 1], [8, 8, 8], [8, 3, 1]], ids=["all1", "allT", "mixed"])
def test_packed_sorted_input_with_initial_states(kind, lengths):
    fast, ref = make(kind, 4, 5, num_layers=2)
    lengths = torch.tensor(lengths)
    x = torch.randn(8, 3, 4)
    states = [torch.randn(2, 3, 5) for _ in range(2 if kind == "lstm" else 1)]
    x32, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    s32 = [s.clone().requires_grad_() for s in states]
    s64 = [s.double().requires_grad_() for s in states]
    o32, st32 = fast(pack_padded_sequence(x32, lengths), tuple(s32) if kind == "lstm" else s32[0])
    o64, st64 = ref(pack_padded_sequence(x64, lengths), tuple(s64) if kind == "lstm" else s64[0])
    outs32 = [o32.data, *(st32 if kind == "lstm" else (st32,))]
    outs64 = [o64.data, *(st64 if kind == "lstm" else (st64,))]
    grads = [torch.randn(o.shape, dtype=torch.float64) for o in outs64]
    d32 = torch.autograd.grad(outs32, [x32, *s32, *fast.parameters()], [g.float() for g in grads])
    d64 = torch.autograd.grad(outs64, [x64, *s64, *ref.parameters()], grads)
    for a, b in zip([*outs32, *d32], [*outs64, *d64], strict=True):
        assert rel_err(a, b) <= BOUND


def test_bad_extension_keywords():
    module = fnn.GRU(5, 7, batch_first=True)
    x = torch.randn(3, 4, 5)
    with pytest.raises(ValueError, match=r"reset must be \(B, T\)"):
        module(x, reset=torch.zeros(4, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="reset"):
        module(x, reset=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="lengths"):
        module(x, lengths=torch.tensor([1, 5, 2]))
    with pytest.raises(ValueError, match="PackedSequence"):
        module(pack_padded_sequence(x, torch.tensor([4, 2, 1]), batch_first=True), lengths=torch.tensor([4, 2, 1]))
    with pytest.raises(ValueError, match="batched"):
        module(x[0], reset=torch.zeros(4, 1, dtype=torch.bool))


@pytest.mark.skipif(not rnn_ops.HAVE_CPP, reason="cpp rnn ops not built")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["batch_first", "packed"])
def test_layer_function_gradcheck_float64(kind, layout):
    """gradcheck through the one autograd.Function in the batch-major and packed layouts."""
    g = {"tanh": 1, "relu": 1, "gru": 3, "lstm": 4}[kind]
    batch, steps, size, hidden = 3, 4, 3, 4

    def leaf(*shape):
        return (torch.randn(*shape, dtype=torch.float64) * 0.5).requires_grad_()

    if layout == "packed":
        batch_sizes = torch.tensor([3, 2, 2, 1])
        x, batch_first = leaf(int(batch_sizes.sum()), size), False
    else:
        batch_sizes, x, batch_first = None, leaf(batch, steps, size), True
    h0 = leaf(batch, hidden)
    c0 = leaf(batch, hidden) if kind == "lstm" else None
    weights = (leaf(g * hidden, size), leaf(g * hidden, hidden), leaf(g * hidden), leaf(g * hidden))

    def fn(x, h0, c0, w_ih, w_hh, b_ih, b_hh):
        out, h_n, c_n = rnn_ops.RNNLayerFunction.apply(
            x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, None, kind, True, batch_first, batch_sizes, "cpp"
        )
        return (out, h_n, c_n) if kind == "lstm" else (out, h_n)

    assert torch.autograd.gradcheck(fn, (x, h0, c0, *weights))


def test_bad_packed_inputs_name_the_argument():
    weights = [(torch.randn(21, 5), torch.randn(21, 7), None, None)]
    with pytest.raises(ValueError, match="batch_sizes"):
        FF.rnn_packed(torch.randn(6, 5), torch.tensor([3, 2]), weights, mode="gru")
    with pytest.raises(ValueError, match="input"):
        FF.rnn_packed(torch.randn(6, 2, 5), torch.tensor([3, 3]), weights, mode="gru")
    with pytest.raises(ValueError, match="h0"):
        FF.rnn_packed(torch.randn(6, 5), torch.tensor([3, 3]), weights, torch.zeros(1, 2, 7), mode="gru")
