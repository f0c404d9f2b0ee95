"""Shared helpers of the attention and encoder tests: the references, the error bounds, backend
checks, and the comparison of a fastrec module with its torch twin.

References (docs/testing.md, "References and bounds"):
- ``reference``: ``F.scaled_dot_product_attention`` with an equivalent additive mask (or, with
  dropout, the explicit softmax times the keep mask), run in float64 on the CPU: ``ref``; run in
  the kernel's own dtype it is ``pt``. ``F.scaled_dot_product_attention`` in torch 2.13 returns
  zeros and passes no gradient for a query row with no allowed key, which is fastrec's contract.
- ``assert_rel_close``: fp32 bound, ``‖fast − ref‖ / ‖ref‖ <= 1e-5``; NaN never passes.
- ``assert_two_reference``: low precision, ``maxabs(fast − ref) <= factor * maxabs(pt − ref) +
  floor`` (factor 2 for outputs, 3 for gradients), ``floor`` = a few ulps of ``ref``'s magnitude.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import fastrec

FP32_BOUND = 1e-5
FLOOR_ULPS = 2
NAMES = ("out", "dq", "dk", "dv")


# --------------------------------------------------------------------------- backends
def run_forced(name: str):
    """Body of a ``backend`` fixture: skip with the reason if ``name`` cannot run attention
    here, else force it for the test and yield its name."""
    reason = unavailable(name)
    if reason is not None:
        pytest.skip(f"{name} backend unavailable: {reason}")
    with fastrec.use_backend(name):
        yield name


def unavailable(name: str) -> str | None:
    """Why backend ``name`` cannot run attention here (``None`` if it can)."""
    reason = fastrec.backends.available()[name]
    if reason is not None:
        return reason
    if name == "cpp":
        missing = [
            op for op in ("attention_forward_cpp", "attention_backward_cpp") if not hasattr(torch.ops.fastrec, op)
        ]
        if missing:
            return f"C++ ops torch.ops.fastrec.{missing} not registered (csrc not built or incomplete)"
    if name == "triton":
        try:
            kernels = importlib.import_module("fastrec.kernels.attention")
        except ImportError as exc:
            return f"fastrec.kernels.attention not importable ({exc})"
        missing = [fn for fn in ("attention_forward", "attention_backward") if not hasattr(kernels, fn)]
        if missing:
            return f"fastrec.kernels.attention lacks {missing}"
    return None


def device_of(backend: str) -> torch.device:
    """The device a backend's tests run on: cpp on the CPU, triton on CUDA if present (else the
    interpreter on the CPU), torch on the CPU."""
    if backend == "triton" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def interpreted(backend: str) -> bool:
    return backend == "triton" and not torch.cuda.is_available()


# --------------------------------------------------------------------------- references
def allowed_mask(
    batch: int,
    len_q: int,
    len_k: int,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    lengths: Tensor | None = None,
    attn_mask_bool: Tensor | None = None,
) -> Tensor:
    """Bool (B, 1 or H, Lq, Lk), True = the key takes part (SDPA's convention), built from
    nn.MultiheadAttention-convention masks (True = ignored / not allowed)."""
    allowed = torch.ones(batch, 1, len_q, len_k, dtype=torch.bool)
    if causal:
        allowed = allowed & torch.ones(len_q, len_k, dtype=torch.bool).tril()
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask.cpu().view(batch, 1, 1, len_k)
    if lengths is not None:
        allowed = allowed & (torch.arange(len_k) < lengths.cpu().view(batch, 1)).view(batch, 1, 1, len_k)
    if attn_mask_bool is not None:
        allowed = allowed & ~attn_mask_bool.cpu()
    return allowed


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    allowed: Tensor | None = None,
    bias: Tensor | None = None,
    scale: float | None = None,
    keep: Tensor | None = None,
    dropout_p: float = 0.0,
    explicit: bool = False,
) -> Tensor:
    """Softmax attention in q's dtype on q's device. ``allowed``: bool, True = takes part;
    ``bias``: float, added to the scaled scores; ``keep``: the dropout keep mask. Without
    dropout (and unless ``explicit``) this is ``F.scaled_dot_product_attention``."""
    batch, heads, len_q, head_dim = q.shape
    len_k = k.shape[-2]
    mask = torch.zeros(batch, heads, len_q, len_k, dtype=q.dtype, device=q.device)
    if bias is not None:
        mask = mask + bias.to(device=q.device, dtype=q.dtype)
    if allowed is not None:
        mask = torch.where(allowed.to(q.device), mask, float("-inf"))
    scale = 1.0 / head_dim**0.5 if scale is None else scale
    if keep is None and not explicit:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale + mask
    empty = torch.isneginf(scores).all(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    if keep is not None:
        probs = probs * keep.to(q.device) / (1.0 - dropout_p)
    return torch.matmul(probs, v)


def out_and_grads(fn, inputs, grad_out) -> tuple[Tensor, tuple[Tensor, ...]]:
    """``fn(*inputs)`` and the gradients of ``inputs`` for the upstream gradient ``grad_out``."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.device, out.dtype))
    return out.detach(), tuple(g.detach() for g in grads)


# --------------------------------------------------------------------------- bounds
def gradient_scales(q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor, scale: float | None) -> dict[str, float]:
    """Magnitude of the terms that cancel in dS = P (dP - Delta), per gradient: dq and dk are
    sums of ``scale * dS * k`` (``* q``), with |dP|, |Delta| <= ‖dO_i‖ max‖v_j‖. A reference
    that is exactly zero is matched within the fp32 bound of this magnitude."""
    scale = 1.0 / q.shape[-1] ** 0.5 if scale is None else scale
    row_norm = lambda t: t.detach().double().norm(dim=-1).max().item()
    common = scale * grad_out.double().norm().item() * row_norm(v)
    return {"out": 0.0, "dq": common * row_norm(k), "dk": common * row_norm(q), "dv": 0.0}


def assert_rel_close(
    actual: Tensor, expected: Tensor, name: str, bound: float = FP32_BOUND, zero_scale: float = 0.0
) -> None:
    """``‖actual − expected‖ / ‖expected‖ <= bound``; actual finite. Where ``expected`` is exactly
    zero by cancellation (dq, dk of a softmax over one key), ``‖actual‖ <= bound * zero_scale``,
    ``zero_scale`` being the magnitude of the cancelling terms (see ``gradient_scales``)."""
    actual = actual.detach().cpu().double()
    expected = expected.detach().cpu().double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values in the fused result"
    err = (actual - expected).norm().item()
    norm = expected.norm().item()
    if norm <= bound * zero_scale:  # zero up to rounding of the cancelling terms
        assert err <= bound * zero_scale, (
            f"{name}: expected zeros, got norm {err:.3e} > {bound:.0e} * {zero_scale:.3e} (max |x| ="
            f" {actual.abs().max().item():.3e})"
        )
        return
    assert err / norm <= bound, f"{name}: relative error {err / norm:.3e} > {bound:.0e}"


def assert_two_reference(fast: Tensor, pt: Tensor, ref: Tensor, name: str, factor: float, extra_ulps: int = 0) -> None:
    """``maxabs(fast − ref) <= factor * maxabs(pt − ref) + floor``, floor = (2 + extra) ulps of
    max |ref| in fast's dtype."""
    eps = torch.finfo(fast.dtype).eps
    fast, pt, ref = (t.detach().cpu().double() for t in (fast, pt, ref))
    assert torch.isfinite(fast).all(), f"{name}: non-finite values in the fused result"
    err_fast = (fast - ref).abs().max().item()
    err_pt = (pt - ref).abs().max().item()
    floor = (FLOOR_ULPS + extra_ulps) * eps * ref.abs().max().item()
    assert err_fast <= factor * err_pt + floor, (
        f"{name}: maxabs(fast - ref) = {err_fast:.3e} > {factor} * maxabs(pt - ref) = {factor * err_pt:.3e}"
        f" + floor {floor:.3e}"
    )


# --------------------------------------------------------------------------- modules
def perturb(module: torch.nn.Module) -> torch.nn.Module:
    """torch initialises biases to zero; make every parameter generic."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return module


def cast_input(x, device, dtype):
    """A module input on ``device``, floating-point tensors in ``dtype``; other values as given."""
    if not isinstance(x, torch.Tensor):
        return x
    return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)


def run_module(module, tensors, order, grad_out, **kwargs):
    """Call ``module(*(tensors[i] for i in order), **kwargs)`` on fresh leaves (so ``query is
    key`` holds exactly where ``order`` repeats an index); return the output and the gradients
    of the inputs and of every trainable parameter, by name."""
    param = next(module.parameters())
    leaves = [
        t.detach().to(device=param.device, dtype=param.dtype).requires_grad_()
        if t.is_floating_point()
        else t.to(param.device)
        for t in tensors
    ]
    kwargs = {n: cast_input(x, param.device, param.dtype) for n, x in kwargs.items()}
    result = module(*(leaves[i] for i in order), **kwargs)
    out = result[0] if isinstance(result, tuple) else result
    named = [(f"input{i}", t) for i, t in enumerate(leaves) if t.requires_grad]
    named += [(n.removeprefix("_orig_mod."), p) for n, p in module.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [t for _, t in named], grad_out.to(out.device, out.dtype), allow_unused=True)
    return out.detach(), {n: g for (n, _), g in zip(named, grads, strict=True)}, result


def random_grad_out(ref, tensors, order, **kwargs) -> Tensor:
    """A random upstream gradient shaped as the output of ``ref`` (float64, on the CPU)."""
    kwargs = {n: cast_input(x, "cpu", torch.float64) for n, x in kwargs.items()}
    probe = ref(*(tensors[i].double() for i in order), **kwargs)
    return torch.randn((probe[0] if isinstance(probe, tuple) else probe).shape)


def assert_module_matches(fast, ref, tensors, order, **kwargs):
    """Output and every gradient of ``fast`` (fp32) vs ``ref`` (float64) within 1e-5."""
    grad_out = random_grad_out(ref, tensors, order, **kwargs)
    out, grads, result = run_module(fast, tensors, order, grad_out, **kwargs)
    ref_out, ref_grads, _ = run_module(ref, tensors, order, grad_out, **kwargs)
    assert_rel_close(out, ref_out, "output")
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad is not None and ref_grads[name] is not None, f"no gradient for {name}"
        assert_rel_close(grad, ref_grads[name], f"grad of {name}")
    return result


def assert_matches_torch_in_training(fast, ref, tensors, order, **kwargs):
    """``fast`` under ``use_dropout_stream("torch")`` against ``ref`` (float64), both from the
    same torch seed with dropout active: output and every gradient within 1e-5."""
    grad_out = random_grad_out(ref, tensors, order, **kwargs)
    with fastrec.use_dropout_stream("torch"):
        torch.manual_seed(11)
        out, grads, _ = run_module(fast, tensors, order, grad_out, **kwargs)
    torch.manual_seed(11)
    ref_out, ref_grads, _ = run_module(ref, tensors, order, grad_out, **kwargs)
    assert_rel_close(out, ref_out, "output")
    for name, grad in grads.items():
        assert_rel_close(grad, ref_grads[name], f"grad of {name}")
    torch.manual_seed(11)
    with fastrec.use_dropout_stream("fastrec"):
        own, _, _ = run_module(fast, tensors, order, grad_out, **kwargs)
    assert (own - ref_out.float()).norm() > 1e-2 * ref_out.norm(), "fastrec's own stream should draw other masks"
