"""Fused dropout: ``fastrec.functional.dropout`` / ``fastrec.nn.Dropout`` on the ``cpp`` and
``triton`` backends (Triton in its interpreter when there is no CUDA device).

References and bounds:
- Exact: each backend's op equals ``dropout_torch`` (the readable reference: the Philox uniforms
  of ``fastrec._philox`` for counter (n & 0xffffffff, n >> 32), keep iff u >= p, kept elements
  scaled by 1 / (1 - p)) bit for bit, over shapes that are not multiples of 16, 0-dim, empty,
  non-contiguous inputs and float64; the backward equals ``grad * keep / (1 - p)`` bit for bit
  under random upstream gradients; a seed gives the same output twice; torch.manual_seed makes
  the module reproducible.
- gradcheck (and gradgradcheck) in float64 with a fixed seed.
- Statistics: over 2**20 elements the kept fraction is within 5 binomial standard deviations of
  1 - p, and the mean of dropout(ones) within 5 standard deviations of 1.
- Semantics as torch: eval mode and p = 0 return the input itself, p = 1 gives zeros, a p outside
  [0, 1] raises a ValueError naming p; fastrec.nn.Dropout's state_dict and repr are torch's.
- opcheck on the registered ops; torch.compile(fullgraph=True) of a module using
  fastrec.nn.Dropout equals eager under the same seed.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastrec
from fastrec import functional as FF
from fastrec._philox import philox_uniform
from fastrec.ops import dropout as dropout_ops

BACKENDS = ("cpp", "triton")


def _unavailable(name: str) -> str | None:
    reason = fastrec.backends.available()[name]
    if reason is None and name == "cpp" and not dropout_ops.HAVE_CPP:
        reason = "fastrec._C has no dropout_cpp"
    return reason


@pytest.fixture(params=BACKENDS)
def backend(request):
    reason = _unavailable(request.param)
    if reason is not None:
        pytest.skip(f"{request.param} backend unavailable: {reason}")
    with fastrec.use_backend(request.param):
        yield request.param


def _device(backend: str) -> torch.device:
    return torch.device("cuda") if backend == "triton" and torch.cuda.is_available() else torch.device("cpu")


def _op(backend: str):
    return getattr(torch.ops.fastrec, f"dropout_{backend}")


def _seed(value: int, device) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64, device=device)


def _keep(seed: torch.Tensor, shape, p: float) -> torch.Tensor:
    """The keep mask, written independently of dropout_torch."""
    numel = math.prod(shape)
    n = torch.arange(numel, dtype=torch.int64, device=seed.device)
    return (philox_uniform(seed, n % 2**32, n // 2**32) >= p).view(shape)


SHAPES = [(), (0,), (1,), (15,), (17,), (3, 5, 7), (33, 31), (512, 50, 3)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_op_is_bit_exact_with_reference(backend, shape, dtype):
    device = _device(backend)
    if backend == "triton" and math.prod(shape) > 4096 and device.type == "cpu":
        shape = (7, 300)  # keep the interpreter quick
    x = torch.randn(shape, dtype=dtype, device=device)
    for p, seed in ((0.2, 12345), (0.5, -7), (0.9, 2**62 + 3)):
        s = _seed(seed, device)
        out = _op(backend)(x, s, p)
        ref = dropout_ops.dropout_torch(x, s, p)
        assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
        assert torch.equal(out, ref), f"p={p} seed={seed}"
        # the reference itself: x * keep * (1 / (1 - p)) with torch's rounding of the factor
        keep = _keep(s, shape, p)
        assert torch.equal(ref, x * keep.to(dtype) * (1.0 / (1.0 - p)))


def test_reference_mask_for_a_flat_index_past_2_to_the_32():
    # c1 = n >> 32 takes part: counters (n mod 2^32, 1) differ from (n mod 2^32, 0)
    seed = _seed(99, "cpu")
    n = torch.tensor([5, 2**32 + 5], dtype=torch.int64)
    u = philox_uniform(seed, n & 0xFFFFFFFF, n >> 32)
    assert u[0] != u[1]


@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded"])
def test_non_contiguous_input_uses_the_row_major_index(backend, layout):
    device = _device(backend)
    base = torch.randn(24, 40, device=device, dtype=torch.float64)
    x = {"transposed": base.t(), "strided": base[::2, 1::3], "expanded": base[:1].expand(5, 40)}[layout]
    s = _seed(2024, device)
    out = _op(backend)(x, s, 0.3)
    assert torch.equal(out, _op(backend)(x.contiguous(), s, 0.3))
    assert torch.equal(out, dropout_ops.dropout_torch(x, s, 0.3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_dtypes_are_bit_exact(dtype):
    if _unavailable("triton"):
        pytest.skip("triton unavailable")
    device = _device("triton")
    x = torch.randn(9, 37, device=device).to(dtype)
    s = _seed(5, device)
    out = torch.ops.fastrec.dropout_triton(x, s, 0.25)
    ref = dropout_ops.dropout_torch(x, s, 0.25)
    if dtype == torch.bfloat16 and device.type == "cpu":
        # Triton's interpreter truncates fp32 -> bf16 at the store (a GPU rounds to nearest even):
        # the reference product, truncated the same way.
        product = x.float() * (_keep(s, x.shape, 0.25).float() * (1.0 / 0.75))
        ref = (product.view(torch.int32) & -65536).view(torch.float32).to(dtype)
    assert torch.equal(out, ref)


def test_cpp_and_triton_draw_the_same_mask():
    for name in BACKENDS:
        if _unavailable(name):
            pytest.skip(f"{name} unavailable")
    x = torch.randn(5, 101, dtype=torch.float64)
    s = _seed(31337, "cpu")
    cpp = torch.ops.fastrec.dropout_cpp(x, s, 0.4)
    triton_out = torch.ops.fastrec.dropout_triton(x.to(_device("triton")), s.to(_device("triton")), 0.4)
    assert torch.equal(cpp, triton_out.cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_is_grad_times_mask_over_keep(backend, dtype):
    device = _device(backend)
    p = 0.35
    x = torch.randn(6, 53, dtype=dtype, device=device, requires_grad=True)
    s = _seed(77, device)
    out = dropout_ops.dropout(x, p, True, seed=s)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    keep = _keep(s, x.shape, p)
    assert torch.equal(grad, grad_out * keep.to(dtype) * (1.0 / (1.0 - p)))
    assert torch.equal(out, x.detach() * keep.to(dtype) * (1.0 / (1.0 - p)))


def test_gradcheck_float64(backend):
    device = _device(backend)
    x = torch.randn(3, 21, dtype=torch.float64, device=device, requires_grad=True)
    s = _seed(4242, device)

    def fn(t):
        return dropout_ops.dropout(t, 0.3, True, seed=s)

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_keep_rate_and_mean_match_p(backend):
    device = _device(backend)
    numel = 2**20 if device.type == "cuda" or backend == "cpp" else 2**14
    x = torch.ones(numel, device=device)
    for p in (0.1, 0.5, 0.8):
        out = FF.dropout(x, p)
        kept = (out != 0).double().mean().item()
        sd = math.sqrt(p * (1 - p) / numel)
        assert abs(kept - (1 - p)) < 5 * sd, f"p={p}: kept {kept}"
        assert torch.all((out == 0) | (out == torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)))
        mean_sd = math.sqrt(p / (1 - p) / numel)
        assert abs(out.double().mean().item() - 1.0) < 5 * mean_sd, f"p={p}"


def test_seeds_differ_and_manual_seed_reproduces(backend):
    device = _device(backend)
    module = fastrec.nn.Dropout(0.5)
    x = torch.randn(4, 300, device=device)
    torch.manual_seed(0)
    first, second = module(x), module(x)
    assert not torch.equal(first, second)
    torch.manual_seed(0)
    assert torch.equal(module(x), first)
    assert torch.equal(module(x), second)


def test_eval_and_p_zero_return_the_input(backend):
    x = torch.randn(3, 4, device=_device(backend))
    assert FF.dropout(x, 0.5, training=False) is x
    assert FF.dropout(x, 0.0) is x
    module = fastrec.nn.Dropout(0.3).eval()
    assert module(x) is x


def test_p_one_gives_zeros(backend):
    x = torch.randn(3, 4, device=_device(backend), requires_grad=True)
    out = FF.dropout(x, 1.0)
    assert torch.equal(out, torch.zeros_like(x))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), "0.5"])
def test_bad_p_raises_value_error_naming_p(p):
    x = torch.randn(3)
    with pytest.raises(ValueError, match=r"\bp\b"):
        FF.dropout(x, p)
    with pytest.raises(ValueError, match=r"\bp\b"):
        _module_with_p(p)(x)


def _module_with_p(p) -> fastrec.nn.Dropout:
    module = fastrec.nn.Dropout(0.5)  # torch's constructor rejects a bad p itself
    module.p = p
    return module


def test_fallbacks_are_counted():
    fastrec.backends.stats(reset=True)
    x = torch.randn(10)
    fastrec.nn.Dropout(0.5, inplace=True)(x.clone())
    FF.dropout(x, 1.0)
    with fastrec.use_dropout_stream("fastrec"):
        FF.dropout(torch.randn(10).half(), 0.5)
    stats = fastrec.backends.stats(reset=True)
    assert stats[("Dropout", "torch", "inplace=True")] == 1
    assert stats[("dropout", "torch", "p == 1")] == 1
    if fastrec.backends.forced() is None:
        assert stats[("dropout", "torch", "torch.float16 on CPU (the cpp kernel takes float32 / float64)")] == 1


def test_forced_torch_backend_draws_the_same_bits():
    if _unavailable("cpp"):
        pytest.skip("cpp unavailable")
    x = torch.randn(7, 33, requires_grad=True)
    s = _seed(8, "cpu")
    with fastrec.use_backend("torch"):
        ref = dropout_ops.dropout(x, 0.4, True, seed=s)
    with fastrec.use_backend("cpp"):
        fast = dropout_ops.dropout(x, 0.4, True, seed=s)
    assert torch.equal(ref, fast)


def test_torch_stream_draws_torchs_own_masks():
    """Under use_dropout_stream("torch") the op is F.dropout itself (same seed, same output,
    same generator state after); an explicit seed still draws fastrec's Philox mask."""
    x = torch.randn(6, 50, 16)
    torch.manual_seed(4)
    expected = torch.nn.functional.dropout(x, 0.3, True)
    after = torch.rand(3)
    fastrec.backends.stats(reset=True)
    with fastrec.use_dropout_stream("torch"):
        torch.manual_seed(4)
        got = FF.dropout(x, 0.3)
        assert torch.equal(torch.rand(3), after)
        seeded = dropout_ops.dropout(x, 0.3, True, seed=_seed(8, "cpu"))
    assert torch.equal(got, expected)
    assert fastrec.backends.stats(reset=True)[("dropout", "cpp", dropout_ops.TORCH_STREAM)] == 1
    with fastrec.use_backend("torch"):
        assert torch.equal(seeded, dropout_ops.dropout(x, 0.3, True, seed=_seed(8, "cpu")))


def test_default_stream_is_torchs_masks_on_cpu_and_philox_under_forced_triton():
    x = torch.randn(6, 50, 16)
    torch.manual_seed(4)
    want = torch.nn.functional.dropout(x, 0.3, True)
    torch.manual_seed(4)
    assert torch.equal(FF.dropout(x, 0.3), want)
    if _unavailable("triton") is None:
        xt = x.to(_device("triton"))
        draws = []
        for stream in ("auto", "fastrec"):
            with fastrec.use_backend("triton"), fastrec.use_dropout_stream(stream):
                torch.manual_seed(4)
                draws.append(FF.dropout(xt, 0.3))
        assert torch.equal(draws[0], draws[1])  # the Triton kernels draw Philox masks


needs_torch_stream_op = pytest.mark.skipif(not dropout_ops.HAVE_TORCH_STREAM_CPP, reason="fastrec._C not built")


@needs_torch_stream_op
@pytest.mark.parametrize("keep", [0.8, 0.5, 0.123456789, 0.0, 1.0])
def test_torch_stream_mask_op_is_torchs_bernoulli_bit_for_bit(keep):
    """The mask and the generator's state after equal torch's own bernoulli_, from a fresh seed and
    from the middle of the generator's 624-word blocks (an odd number of words drawn before)."""
    for shape, words_before in (((7,), 0), ((3, 5, 11), 1), ((2, 3, 40, 40), 623), ((4000,), 2)):
        torch.manual_seed(11)
        torch.randint(0, 2, (words_before,))  # advances the engine by words_before 32-bit words
        want = torch.empty(shape, dtype=torch.bool).bernoulli_(keep)
        after = torch.rand(5)
        torch.manual_seed(11)
        torch.randint(0, 2, (words_before,))
        got = torch.ops.fastrec.torch_stream_mask_cpp(list(shape), keep)
        assert torch.equal(got, want), (shape, words_before)
        assert torch.equal(torch.rand(5), after)


@needs_torch_stream_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("p", [0.2, 0.5, 0.3])
def test_torch_stream_dropout_is_f_dropout_bit_for_bit(dtype, layout, p):
    """Output, strides, gradient (and its gradient) and the generator's state after all equal
    F.dropout's; a dense transposed input draws in memory order as torch does, a sliced one runs
    F.dropout itself."""
    base = torch.randn(40, 33, dtype=dtype)
    x = {"contiguous": base, "transposed": base.t(), "sliced": base[:, ::2]}[layout]
    leaves = [x.detach().clone().requires_grad_() for _ in range(2)]
    grads = [torch.randn(x.shape, dtype=dtype).requires_grad_() for _ in range(2)]
    grads[1] = grads[0].detach().clone().requires_grad_()
    torch.manual_seed(5)
    want = torch.nn.functional.dropout(leaves[0], p, True)
    after = torch.rand(3)
    torch.manual_seed(5)
    got = dropout_ops.torch_stream_dropout(leaves[1], p)
    assert torch.equal(torch.rand(3), after)
    assert torch.equal(got, want) and got.stride() == want.stride()
    (g_want,) = torch.autograd.grad(want, leaves[0], grads[0], create_graph=True)
    (g_got,) = torch.autograd.grad(got, leaves[1], grads[1], create_graph=True)
    assert torch.equal(g_got, g_want)
    v = torch.randn(x.shape, dtype=dtype)  # the backward is linear in the gradient: d/d(grad) again
    assert torch.equal(torch.autograd.grad(g_got, grads[1], v)[0], torch.autograd.grad(g_want, grads[0], v)[0])


@needs_torch_stream_op
def test_torch_stream_ops_reject_bad_arguments():
    with pytest.raises(RuntimeError, match="keep must be in"):
        torch.ops.fastrec.torch_stream_mask_cpp([3], 1.5)
    with pytest.raises(RuntimeError, match="x must be a float32 or float64"):
        torch.ops.fastrec.torch_stream_dropout_cpp(torch.zeros(3, dtype=torch.int32), 0.5, 2.0)
    with pytest.raises(RuntimeError, match="mask must be a contiguous bool tensor"):
        torch.ops.fastrec.masked_scale_cpp(torch.zeros(3), torch.zeros(4, dtype=torch.bool), 2.0)


def test_registered_op_passes_opcheck(backend):
    device = _device(backend)
    op = _op(backend).default
    x = torch.randn(5, 19, device=device, dtype=torch.float64)  # autograd is DropoutFunction's
    torch.library.opcheck(op, (x, _seed(3, device), 0.25))
    torch.library.opcheck(op, (torch.randn(4, 6, device=device).t(), _seed(11, device), 0.5))


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_torch_compile_fullgraph_matches_eager(backend, compiler):
    torch._dynamo.reset()
    device = _device(backend)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(16, 16, dtype=torch.float64)
            self.dropout = fastrec.nn.Dropout(0.3)

        def forward(self, x):
            return self.dropout(torch.tanh(self.linear(x))).sum(-1)

    model = Block().to(device)
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    x = torch.randn(4, 9, 16, dtype=torch.float64, device=device, requires_grad=True)
    with fastrec.use_dropout_stream("fastrec"):  # Philox: the same seed, the same masks compiled
        torch.manual_seed(1)
        out = compiled(x)
        (grad,) = torch.autograd.grad(out.sum(), x)
        torch.manual_seed(1)
        ref = model(x)
        (ref_grad,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)


def test_module_is_torch_dropout_with_the_same_state_dict_and_repr():
    fast, ref = fastrec.nn.Dropout(0.3, inplace=False), torch.nn.Dropout(0.3, inplace=False)
    assert isinstance(fast, torch.nn.Dropout)
    assert fast.state_dict() == ref.state_dict() == {}
    assert repr(fast) == repr(ref)
    fast.load_state_dict(ref.state_dict())


def test_models_use_fastrec_dropout_only_on_the_fastrec_backend():
    from fastrec.models import SASRec

    fast, ref = (
        SASRec(20, max_len=5, dim=8, n_heads=2, backend="fastrec"),
        SASRec(20, max_len=5, dim=8, n_heads=2, backend="torch"),
    )
    fast_dropouts = [m for m in fast.modules() if isinstance(m, torch.nn.Dropout)]
    assert fast_dropouts and all(isinstance(m, fastrec.nn.Dropout) for m in fast_dropouts)
    assert not any(isinstance(m, fastrec.nn.Dropout) for m in ref.modules())
    assert fast.state_dict().keys() == ref.state_dict().keys()


@pytest.mark.cuda
def test_cuda_unseeded_dropout_runs_torchs_kernel_unless_forced():
    x = torch.randn(64, 50, device="cuda")
    fastrec.backends.stats(reset=True)
    torch.manual_seed(5)
    out = FF.dropout(x, 0.3)
    torch.manual_seed(5)
    assert torch.equal(out, torch.nn.functional.dropout(x, 0.3))  # torch's masks, torch's generator
    assert fastrec.backends.stats(reset=True)[("dropout", "torch", dropout_ops.CUDA_ROUTE)] == 1
    with fastrec.use_backend("triton"):
        FF.dropout(x, 0.3)
    seed = torch.tensor([7], device="cuda")
    assert torch.equal(dropout_ops.dropout(x, 0.3, True, seed), dropout_ops.dropout_torch(x, seed, 0.3))
    stats = fastrec.backends.stats()
    assert stats[("dropout", "triton", "")] == 2  # forced, and seeded: the Philox kernel


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["dropout", "attention"])
def test_cuda_graph_replays_draw_new_philox_masks_the_same_as_eager_calls(op):
    """The fused kernels' seed comes from torch.randint on the device, which CUDA graph capture
    registers with torch's generator: each replay draws new masks, and replay i draws the masks
    of the i-th eager call after the same torch.manual_seed."""
    x = torch.randn(2, 2, 16, 8, device="cuda")

    def call() -> torch.Tensor:
        with fastrec.use_backend("triton"):
            if op == "dropout":
                return FF.dropout(x, 0.4)
            return FF.attention(x, x, x, causal=True, dropout_p=0.4)

    call()  # compile the kernel outside the capture
    torch.manual_seed(11)
    eager = [call().clone() for _ in range(3)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    torch.manual_seed(11)
    replayed = []
    for _ in range(3):
        graph.replay()
        replayed.append(out.clone())
    assert not torch.equal(replayed[0], replayed[1])
    for a, b in zip(eager, replayed, strict=True):
        assert torch.equal(a, b)
