"""Backend selection: which implementation runs an op.

- ``triton``: fused Triton kernels. Native on CUDA tensors; on CPU tensors they run in
  Triton's interpreter, which must be switched on (``TRITON_INTERPRET=1``) before
  ``triton`` is first imported.
- ``cpp``: the C++ extension ``fastrec._C`` (CPU tensors).
- ``torch``: a plain composite of torch ops; the readable reference, and the path for
  anything the fused kernels do not cover.

Unless forced, CUDA tensors go to ``triton`` and CPU tensors to ``cpp``, each falling back to
``torch`` when unavailable, and the routes of ``fastrec.routing`` send the calls where torch's own
op is faster to it. ``FASTREC_BACKEND`` or ``with use_backend(name):`` forces one (and bypasses
the routes).

Dropout masks come from torch's own stream or from fastrec's Philox stream (the fused kernels
draw those in registers, with no mask tensor). torch's stream gives the very masks torch's
modules draw for the same seed, so a fastrec model trains step for step like its torch twin;
fastrec draws them bit for bit on the CPU ~10x faster than torch (csrc/dropout.cpp). The
default, ``"auto"``, takes torch's masks on the CPU and Philox where torch's cannot be reproduced
(attention dropout on CUDA, drawn inside torch's kernels); ``with use_dropout_stream(name):``
picks ``"torch"`` or ``"fastrec"`` everywhere.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import threading
from collections import Counter
from collections.abc import Iterator

import torch

BACKENDS = ("triton", "cpp", "torch")
DROPOUT_STREAMS = ("auto", "fastrec", "torch")

_state = threading.local()
_counts: Counter[tuple[str, str, str]] = Counter()


def _probe_cpp() -> str | None:
    try:
        importlib.import_module("fastrec._C")
    except ImportError as exc:  # not built, or built against another torch
        return f"extension fastrec._C not importable ({exc}); run `pip install --no-build-isolation -e .`"
    return None


def _probe_triton() -> str | None:
    try:
        importlib.import_module("triton")
    except ImportError as exc:
        return f"triton not importable ({exc})"
    if importlib.util.find_spec("fastrec.kernels") is None:  # a source tree run without installing
        return "fastrec.kernels (the Triton kernels, kernels/ in the source tree) not installed; run `pip install -e .`"
    return None


_REASONS = {"cpp": _probe_cpp(), "triton": _probe_triton(), "torch": None}


def interpreter_enabled() -> bool:
    """Whether Triton kernels run on CPU tensors (Triton's interpreter)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def available() -> dict[str, str | None]:
    """Each backend mapped to ``None`` if it can run here, else the reason it cannot."""
    reasons = dict(_REASONS)
    if reasons["triton"] is None and not torch.cuda.is_available() and not interpreter_enabled():
        reasons["triton"] = "no CUDA device (set TRITON_INTERPRET=1 before import to interpret on CPU)"
    return reasons


def _validate(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def forced() -> str | None:
    """The backend forced by ``use_backend`` (innermost) or ``FASTREC_BACKEND``, if any."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    env = os.environ.get("FASTREC_BACKEND")
    return _validate(env) if env else None


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``name`` for every fastrec op called inside the block (this thread)."""
    _validate(name)
    with _pushed("stack", name):
        yield


@contextlib.contextmanager
def _pushed(attr: str, name: str) -> Iterator[None]:
    """Push ``name`` on this thread's stack ``attr`` for the block."""
    stack = getattr(_state, attr, None)
    if stack is None:
        stack = []
        setattr(_state, attr, stack)
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def dropout_stream() -> str:
    """Where dropout masks come from now: ``"auto"`` (the default), ``"fastrec"`` or ``"torch"``."""
    stack = getattr(_state, "streams", None)
    return stack[-1] if stack else "auto"


def torch_masks(device: torch.device) -> bool:
    """Whether dropout on ``device`` draws torch's own masks now: under ``"torch"``, and under
    ``"auto"`` on the CPU (where fastrec reproduces them bit for bit) unless the triton backend
    is forced there (the Triton kernels draw Philox masks)."""
    stream = dropout_stream()
    if stream == "auto":
        return device.type == "cpu" and forced() != "triton"
    return stream == "torch"


@contextlib.contextmanager
def use_dropout_stream(name: str) -> Iterator[None]:
    """Draw every fastrec dropout mask inside the block (this thread) from ``name``'s stream.

    ``"torch"``: ``fastrec.nn.Dropout`` and ``functional.dropout`` give ``F.dropout``'s output
    (on the CPU from fastrec's copy of torch's generator loop, else ``F.dropout`` itself);
    attention dropout draws ``bernoulli_(1 - p)`` over ``(B, H, Lq, Lk)`` from torch's
    generator, as torch's CPU attention does, and the fused CPU kernels apply it. torch's CUDA
    attention draws its masks inside its own kernels, which fastrec does not reproduce: attention
    dropout on other devices is an error in this mode. ``"fastrec"``: Philox everywhere.
    ``"auto"`` (the default): ``"torch"`` on the CPU, ``"fastrec"`` elsewhere and under a forced
    triton backend.
    """
    if name not in DROPOUT_STREAMS:
        raise ValueError(f"dropout stream must be one of {DROPOUT_STREAMS}, got {name!r}")
    with _pushed("streams", name):
        yield


def select(device: torch.device, fused_reason: str | None = None) -> str:
    """The backend for one call on ``device``.

    ``fused_reason`` is why this call's options are outside what the fused kernels cover
    (``None`` if they are covered); such calls run on ``torch`` unless another is forced.
    A forced backend that cannot run on ``device`` is an error, not a silent fallback.
    """
    name = forced()
    if name is not None:
        reason = available()[name]
        if name == "cpp" and device.type != "cpu":
            reason = f"the cpp backend runs on CPU tensors, got {device.type} tensors"
        if name == "triton" and device.type == "cpu" and not interpreter_enabled():
            reason = "triton on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
        if name != "torch" and fused_reason is not None:
            reason = fused_reason
        if reason is not None:
            raise RuntimeError(f"fastrec backend {name!r} forced but unusable: {reason}")
        return name
    if fused_reason is not None:
        return "torch"
    preferred = "triton" if device.type == "cuda" else "cpp" if device.type == "cpu" else "torch"
    # available() less its interpreter caveat, which concerns CPU tensors only (per-call cost).
    return preferred if _REASONS[preferred] is None else "torch"


@functools.cache
def card_name(device_index: int) -> str:
    """``torch.cuda.get_device_name`` of a CUDA device, cached: the key of the per-card tables
    (fastrec/conv_dispatch.json, fastrec/attention_configs.json)."""
    return torch.cuda.get_device_name(device_index)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts to on ``device_type`` now, or None when it is off. CPU and CUDA
    only (where the fused kernels run): ``torch.amp.is_autocast_available``, the general check,
    breaks ``torch.compile(fullgraph=True)`` on torch 2.11 (dynamo cannot trace it there)."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def allow_tf32(t: torch.Tensor, convolution: bool = False) -> bool:
    """Whether the fused kernels may run fp32 dots on ``t`` in TF32: only where torch's own flag
    lets torch's op do so (``torch.backends.cudnn.allow_tf32`` for convolutions, as for
    ``torch.nn.functional.conv2d``; ``torch.backends.cuda.matmul.allow_tf32`` otherwise), and only
    for fp32 CUDA tensors."""
    if t.dtype != torch.float32 or not t.is_cuda:
        return False
    return torch.backends.cudnn.allow_tf32 if convolution else torch.backends.cuda.matmul.allow_tf32


def count(op: str, backend: str, reason: str = "") -> None:
    """Record one call of ``op`` on ``backend`` (``reason`` says why a fallback happened)."""
    if not torch.compiler.is_compiling():
        _counts[(op, backend, reason)] += 1


def stats(reset: bool = False) -> dict[tuple[str, str, str], int]:
    """Calls so far as ``{(op, backend, fallback_reason): n}``; eager calls only."""
    snapshot = dict(_counts)
    if reset:
        _counts.clear()
    return snapshot


class TritonOp:
    """A Triton launcher registered as the custom op ``fastrec::<name>``, callable like it.

    torch.compile must meet the registered op (opaque, with its fake), but in eager mode the
    custom-op dispatch costs ~25 us of Python per call (measured on this project's CPU), as
    much as a whole kernel at recommender shapes. Our autograd.Functions already sit below
    autograd, so outside compilation a call goes straight to the launcher.
    """

    def __init__(self, name: str, fn) -> None:
        self.fn = fn
        self.op = torch.library.custom_op(f"fastrec::{name}", mutates_args=())(fn)

    def register_fake(self, fake):
        return self.op.register_fake(fake)

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.op(*args)
        return self.fn(*args)


def triton_op(name: str):
    """Decorator: ``TritonOp(name, fn)``."""
    return lambda fn: TritonOp(name, fn)


def register_fake(fake, *triton_ops: TritonOp, cpp_op: str | None = None) -> None:
    """Register ``fake`` (the shapes of the outputs, for torch.compile) for each Triton op and, where
    the C++ extension is loaded, for its C++ twin ``fastrec::<cpp_op>`` (the same outputs)."""
    for op in triton_ops:
        op.register_fake(fake)
    if cpp_op is not None and _REASONS["cpp"] is None and hasattr(torch.ops.fastrec, cpp_op):
        torch.library.register_fake(f"fastrec::{cpp_op}")(fake)
