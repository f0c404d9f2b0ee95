"""Backend selection: ``use_backend`` nesting and validation, ``FASTREC_BACKEND``, forced
backends that cannot run, ``available()``, ``stats()`` counting, and ``python -m fastrec info``.

No numerics here (see test_attention.py); every check is exact. Environment-variable behaviour
runs in a subprocess, because the variables are read at import or per call.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from attention_reference import unavailable

import fastrec
from fastrec import backends
from fastrec import functional as FF

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_env_backend(monkeypatch):
    monkeypatch.delenv("FASTREC_BACKEND", raising=False)


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("FASTREC_BACKEND", "TRITON_INTERPRET")}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120
    )


def qkv(*shape, device="cpu"):
    return [torch.randn(*shape, device=device) for _ in range(3)]


# --------------------------------------------------------------------------- use_backend
def test_use_backend_nests_and_restores_on_exit_and_error():
    assert backends.forced() is None
    with fastrec.use_backend("torch"):
        assert backends.forced() == "torch"
        with fastrec.use_backend("cpp"):
            assert backends.forced() == "cpp"
            with pytest.raises(KeyError), fastrec.use_backend("triton"):
                assert backends.forced() == "triton"
                raise KeyError("inside")
            assert backends.forced() == "cpp"
        assert backends.forced() == "torch"
    assert backends.forced() is None


@pytest.mark.parametrize("name", ["gpu", "Triton", "", "c++"])
def test_use_backend_rejects_unknown_name_naming_it(name):
    with pytest.raises(ValueError, match=re.escape(f"got {name!r}")):
        with fastrec.use_backend(name):
            pass
    assert backends.forced() is None


def test_use_backend_runs_the_named_backend_and_counts_it():
    q, k, v = qkv(2, 2, 5, 8)
    fastrec.stats(reset=True)
    with fastrec.use_backend("torch"):
        FF.attention(q, k, v)
        FF.attention(q, k, v, causal=True)
    assert fastrec.stats() == {("attention", "torch", ""): 2}


def test_use_backend_is_per_thread():
    import threading

    seen = []
    with fastrec.use_backend("torch"):
        thread = threading.Thread(target=lambda: seen.append(backends.forced()))
        thread.start()
        thread.join()
    assert seen == [None]


# --------------------------------------------------------------------------- FASTREC_BACKEND
def test_env_var_forces_backend_in_a_fresh_process():
    code = (
        "import torch, fastrec\n"
        "from fastrec import functional as FF\n"
        "print(fastrec.backends.forced())\n"
        "q = torch.randn(1, 1, 3, 4)\n"
        "FF.attention(q, q, q)\n"
        "print(sorted(fastrec.stats()))\n"
    )
    result = run_python(code, FASTREC_BACKEND="torch")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["torch", "[('attention', 'torch', '')]"]


def test_env_var_with_unknown_backend_fails_naming_it():
    code = "import torch, fastrec\nq = torch.randn(1, 1, 3, 4)\nfastrec.functional.attention(q, q, q)\n"
    result = run_python(code, FASTREC_BACKEND="bogus")
    assert result.returncode != 0
    assert "ValueError" in result.stderr and "'bogus'" in result.stderr


def test_use_backend_overrides_env_var(monkeypatch):
    monkeypatch.setenv("FASTREC_BACKEND", "cpp")
    assert backends.forced() == "cpp"
    with fastrec.use_backend("torch"):
        assert backends.forced() == "torch"
    assert backends.forced() == "cpp"


# --------------------------------------------------------------------------- unusable backends
def test_forced_cpp_on_non_cpu_tensors_errors_clearly():
    q, k, v = qkv(2, 2, 5, 8, device="meta")
    with fastrec.use_backend("cpp"), pytest.raises(RuntimeError, match="cpp backend runs on CPU tensors, got meta"):
        FF.attention(q, k, v)
    with fastrec.use_backend("cpp"), pytest.raises(RuntimeError, match="'cpp' forced but unusable"):
        backends.select(torch.device("meta"))


def test_forced_triton_on_cpu_without_interpreter_errors_clearly():
    code = (
        "import torch, fastrec\n"
        "print(fastrec.backends.available()['triton'])\n"
        "q = torch.randn(1, 1, 3, 4)\n"
        "with fastrec.use_backend('triton'):\n"
        "    fastrec.functional.attention(q, q, q)\n"
    )
    result = run_python(code, CUDA_VISIBLE_DEVICES="")
    assert result.returncode != 0
    assert "TRITON_INTERPRET=1" in result.stdout  # available() gives the reason
    assert "RuntimeError" in result.stderr and "TRITON_INTERPRET=1" in result.stderr


@pytest.mark.parametrize("name", ["cpp", "triton"])
def test_forced_fused_backend_with_uncovered_option_errors_with_reason(name):
    reason = unavailable(name)
    if reason is not None:
        pytest.skip(f"{name} backend unavailable: {reason}")
    q, k = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    v = torch.randn(2, 2, 5, 6)  # value head_dim differs: not covered by the kernels
    with fastrec.use_backend(name), pytest.raises(RuntimeError, match="value head_dim differs"):
        FF.attention(q, k, v)


def test_uncovered_option_falls_back_to_torch_and_records_why():
    q, k = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    v = torch.randn(2, 2, 5, 6)
    fastrec.stats(reset=True)
    out = FF.attention(q, k, v)
    assert out.shape == (2, 2, 5, 6)
    assert fastrec.stats() == {("attention", "torch", "value head_dim differs from query head_dim"): 1}


def test_default_cpu_selection_is_cpp_when_built_else_torch():
    expected = "cpp" if backends.available()["cpp"] is None else "torch"
    assert backends.select(torch.device("cpu")) == expected
    assert backends.select(torch.device("meta")) == "torch"


# --------------------------------------------------------------------------- available, stats
def test_available_reports_every_backend_with_reasons():
    report = backends.available()
    assert sorted(report) == ["cpp", "torch", "triton"]
    assert report["torch"] is None
    for name, reason in report.items():
        assert reason is None or (isinstance(reason, str) and reason), name


def test_available_reports_missing_extension_with_a_fix():
    code = (
        "import sys; sys.modules['fastrec._C'] = None\n"  # import of fastrec._C fails
        "import fastrec\n"
        "print(fastrec.backends.available()['cpp'])\n"
    )
    result = run_python(code, TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr
    assert "fastrec._C not importable" in result.stdout and "pip install" in result.stdout


def test_available_reports_uninstalled_triton_kernels_with_a_fix():
    code = (  # a source tree used without `pip install -e .`: no fastrec.kernels package
        "import importlib.util as util\n"
        "find = util.find_spec\n"
        "util.find_spec = lambda name, *a: None if name == 'fastrec.kernels' else find(name, *a)\n"
        "import fastrec\n"
        "print(fastrec.backends.available()['triton'])\n"
    )
    result = run_python(code, TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr
    assert "fastrec.kernels" in result.stdout and "pip install -e ." in result.stdout


def test_stats_counts_calls_and_resets():
    q, k, v = qkv(1, 2, 4, 8)
    fastrec.stats(reset=True)
    with fastrec.use_backend("torch"):
        for _ in range(3):
            FF.attention(q, k, v)
    snapshot = fastrec.stats(reset=True)
    assert snapshot == {("attention", "torch", ""): 3}
    assert fastrec.stats() == {}
    snapshot[("attention", "torch", "")] = 99  # a snapshot, not the live counter
    assert fastrec.stats() == {}


def test_stats_does_not_count_while_compiling():
    torch._dynamo.reset()
    q, k, v = qkv(1, 2, 4, 8)
    fn = torch.compile(lambda a, b, c: FF.attention(a, b, c), fullgraph=True, backend="eager")
    fastrec.stats(reset=True)
    with fastrec.use_backend("torch"):
        fn(q, k, v)
    assert fastrec.stats() == {}


# --------------------------------------------------------------------------- CLI
def test_cli_info_lists_versions_and_backends():
    result = subprocess.run(
        [sys.executable, "-m", "fastrec", "info"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**{k: v for k, v in os.environ.items() if k != "FASTREC_BACKEND"}, "FASTREC_BACKEND": "torch"},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("fastrec") and any(line.startswith("torch ") for line in lines)
    assert any(line.startswith("forced") and line.split()[-1] == "torch" for line in lines)
    backend_lines = lines[lines.index("backends") + 1 :]
    listed = {line.split()[0]: line.split()[1] for line in backend_lines}
    assert sorted(listed) == ["cpp", "torch", "triton"]
    assert listed["torch"] == "available"
    for name, reason in backends.available().items():  # same verdicts as in this process
        if name != "triton":  # the subprocess has no TRITON_INTERPRET unless CUDA is present
            assert listed[name] == ("available" if reason is None else "unavailable:"), name


def test_triton_op_calls_its_launcher_directly_in_eager_mode_and_the_op_under_compile():
    """Eager calls skip the custom-op dispatcher (its Python cost); torch.compile sees the op."""
    calls = []

    def launcher(x: torch.Tensor) -> torch.Tensor:
        calls.append(torch.compiler.is_compiling())
        return x * 2

    op = backends.TritonOp("test_eager_probe", launcher)
    op.register_fake(lambda x: torch.empty_like(x))
    x = torch.randn(3)
    assert torch.equal(op(x), x * 2) and calls == [False]
    assert torch.equal(torch.ops.fastrec.test_eager_probe(x), x * 2)  # registered and callable

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    assert torch.equal(torch.compile(lambda t: op(t) + 1, fullgraph=True, backend=capture)(x), x * 2 + 1)
    assert any("test_eager_probe" in str(node.target) for node in graphs[0].graph.nodes)


# --------------------------------------------------------------------------- kernel launcher cache
class _Param:
    def __init__(self, name, is_constexpr=False, default=None, has_default=False):
        self.name, self.is_constexpr, self.default, self.has_default = name, is_constexpr, default, has_default


class _Compiled:
    """Stands in for triton's CompiledKernel: records the fast path's launcher calls."""

    def __init__(self, tag):
        self.function, self.packed_metadata, self.calls = f"function-{tag}", f"metadata-{tag}", []

    def run(self, *call):
        self.calls.append(call)


class _FakeJit:
    """A JITFunction stand-in for kernel(X, n, BLOCK: constexpr, FLAG: constexpr = 7): every slow
    launch "compiles" a kernel of its own, so a test sees which path ran."""

    params = [_Param("X"), _Param("n"), _Param("BLOCK", True), _Param("FLAG", True, 7, True)]

    def __init__(self):
        self.slow = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.slow.append((grid, args, kwargs))
            return _Compiled(len(self.slow))

        return launch


@pytest.fixture
def fast_launcher(monkeypatch):
    from fastrec.kernels import _host

    monkeypatch.setattr(_host, "FAST_LAUNCH", True)
    monkeypatch.setattr(_host, "_current_device", lambda: 0)
    monkeypatch.setattr(_host, "_current_stream", lambda device: 1234)
    monkeypatch.setattr(_host, "_launch_hooks", lambda: False)
    jit = _FakeJit()
    return _host, jit, _host.Launcher(jit)


def test_launcher_reuses_the_compiled_kernel_with_arguments_in_signature_order(fast_launcher):
    _, jit, kernel = fast_launcher
    x = torch.zeros(64)
    first = kernel[(3, 2)](x, 100, BLOCK=32, num_warps=4)
    assert len(jit.slow) == 1 and first.calls == []
    kernel[(5,)](x, 200, BLOCK=32, num_warps=4)  # same specialisation: 100 and 200 are both i32, not 16-aligned
    assert len(jit.slow) == 1
    assert first.calls == [(5, 1, 1, 1234, "function-1", "metadata-1", None, None, None, x, 200, 32, 7)]


@pytest.mark.parametrize(
    "change",
    ["misaligned tensor", "dtype", "int alignment", "int one", "int64", "constexpr", "option", "device"],
)
def test_launcher_takes_the_slow_path_when_the_specialisation_changes(fast_launcher, monkeypatch, change):
    host, jit, kernel = fast_launcher
    x = torch.zeros(64)
    args, kwargs = [x, 100], {"BLOCK": 32, "num_warps": 4}
    kernel[(1,)](*args, **kwargs)
    if change == "misaligned tensor":
        args[0] = x[1:]
    elif change == "dtype":
        args[0] = x.double()
    elif change == "int alignment":
        args[1] = 96
    elif change == "int one":
        args[1] = 1
    elif change == "int64":
        args[1] = 2**31 + 1
    elif change == "constexpr":
        kwargs["BLOCK"] = 64
    elif change == "option":
        kwargs["num_warps"] = 8
    else:
        monkeypatch.setattr(host, "_current_device", lambda: 1)
    kernel[(1,)](*args, **kwargs)
    assert len(jit.slow) == 2
    kernel[(1,)](*args, **kwargs)  # and the new key is remembered
    assert len(jit.slow) == 2


def test_launcher_keeps_triton_path_for_positional_constexpr_hooks_and_when_off(fast_launcher, monkeypatch):
    host, jit, kernel = fast_launcher
    x = torch.zeros(64)
    for _ in range(2):
        kernel[(1,)](x, 100, 32)  # BLOCK positional: the key would not see its value
    assert len(jit.slow) == 2
    kernel[(1,)](x, 100, BLOCK=32)
    monkeypatch.setattr(host, "_launch_hooks", lambda: True)
    kernel[(1,)](x, 100, BLOCK=32)
    assert len(jit.slow) == 4
    monkeypatch.setattr(host, "FAST_LAUNCH", False)
    off = host.Launcher(jit)
    for _ in range(2):
        off[(1,)](x, 100, BLOCK=32)
    assert len(jit.slow) == 6


def test_launcher_forwards_attributes_and_leaves_the_interpreter_to_triton():
    from fastrec.kernels import attention

    kernel = attention._attention_forward_kernel
    assert kernel.arg_names == kernel.jit.arg_names
    assert kernel.__name__ == kernel.jit.__name__
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert not kernel._fast  # the interpreter's function has no compiled kernels to reuse
