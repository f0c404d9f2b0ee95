"""Host-side integer helpers for the launchers.

``triton.cdiv`` and ``triton.next_power_of_2`` are ConstexprFunction objects whose calls cost
~3 us each (triton 3.6 and 3.9, measured on this project's CPU); a launch uses several, on every
call. These are the plain-int equivalents. ``Launcher`` caches triton's choice of compiled
kernel so that a repeat launch costs a few microseconds of Python instead of tens.
"""

import os

import torch
import triton


def cdiv(a: int, b: int) -> int:
    """Ceiling of a / b for non-negative a and positive b."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


class Launcher:
    """A launched ``@triton.jit`` kernel whose repeat launches skip most of ``JITFunction.run``.

    ``JITFunction.run`` re-binds the arguments, re-derives the cache key (including ``str`` of the
    options) and builds launch metadata on every call: ~30-70 us of Python a launch on the H200
    host, against a few microseconds of GPU work for recommender shapes. This keeps triton's own
    compiled kernel and its launcher; it only remembers, per argument specialisation, which
    compiled kernel triton chose. The key is finer than triton's (triton's own per-argument
    specialisation with value and alignment specialisation on, plus the keyword arguments by name
    and value, plus the device), so a hit always names the kernel triton would have picked.

    The first launch of a key, launches under the interpreter, launches with triton's launch
    hooks set (profilers) and kernels called with a constexpr passed positionally take triton's
    normal path. ``FASTREC_FAST_LAUNCH=0`` turns the fast path off.
    """

    def __init__(self, jit) -> None:
        self.jit = jit
        self.__name__ = getattr(jit, "__name__", type(jit).__name__)
        self.__doc__ = getattr(jit, "__doc__", None)
        params = getattr(jit, "params", None)
        self._fast = params is not None and _native_specialize is not None
        self._params = [(p.name, p.is_constexpr, p.default if p.has_default else _MISSING) for p in params or ()]
        self._cache: dict = {}

    def __getattr__(self, name: str):
        """Everything else is the jit function's (``arg_names`` for the compile check, ...)."""
        if name == "jit":
            raise AttributeError(name)
        return getattr(self.jit, name)

    def __getitem__(self, grid):
        if not (self._fast and FAST_LAUNCH):
            return self.jit[grid]
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid: tuple, args: tuple, kwargs: dict):
        """Launch on ``grid`` (a tuple of ints); the same arguments as ``jit[grid](*args, **kwargs)``."""
        device = _current_device()
        key = (device, *[_native_specialize(_Backend, a, False, True, True) for a in args], *kwargs.items())
        entry = self._cache.get(key)
        if entry is None or _launch_hooks():
            compiled = self.jit[grid](*args, **kwargs)
            if key not in self._cache:
                self._cache[key] = self._entry(compiled, len(args), kwargs)
            return compiled
        if entry is _SLOW:
            return self.jit[grid](*args, **kwargs)
        run, function, metadata, tail = entry
        full = args + tuple([kwargs[name] if passed else default for name, passed, default in tail])
        run(
            grid[0],
            grid[1] if len(grid) > 1 else 1,
            grid[2] if len(grid) > 2 else 1,
            _current_stream(device),
            function,
            metadata,
            None,
            None,
            None,
            *full,
        )
        return None

    def _entry(self, compiled, positional: int, kwargs: dict):
        """What a hit needs: the compiled kernel's launcher, handle and packed metadata, and how to
        complete the arguments in signature order; _SLOW where this cannot be done safely."""
        if any(is_constexpr for _, is_constexpr, _ in self._params[:positional]):
            return _SLOW
        tail = []
        for name, _, default in self._params[positional:]:
            if name not in kwargs and default is _MISSING:
                return _SLOW
            tail.append((name, name in kwargs, default))
        try:
            return compiled.run, compiled.function, compiled.packed_metadata, tuple(tail)
        except AttributeError:  # another triton's CompiledKernel
            return _SLOW


_MISSING = object()
_SLOW = object()
FAST_LAUNCH = os.environ.get("FASTREC_FAST_LAUNCH", "1") != "0"
try:
    from triton.backends.compiler import BaseBackend as _Backend
    from triton.runtime.jit import native_specialize_impl as _native_specialize
except ImportError:  # another triton: every launch takes triton's path
    _Backend, _native_specialize = None, None


def _current_device() -> int:
    return torch.cuda.current_device()


def _current_stream(device: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device)


def _launch_hooks() -> bool:
    """Whether a profiler hooked triton's launches (those need triton's own launch path). Triton
    3.6 keeps the hooks as a HookChain (empty: ``calls == []``), older versions as None."""
    runtime = triton.knobs.runtime
    return any(
        hook is not None and bool(getattr(hook, "calls", True))
        for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook)
    )


def launcher(jit) -> Launcher:
    """Decorator for launched kernels, above ``@triton.jit``: see :class:`Launcher`."""
    return Launcher(jit)
