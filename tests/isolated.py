"""Running test scripts in a fresh interpreter, so a crash (e.g. a segfault) is a test failure
and not a dead test run: ``run_isolated(PRELUDE + body, backend)``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

# The start of every isolated script: ``backend`` from argv, ``same`` (shape, dtype and values as
# torch's) and ``case`` (a decorator that runs one case under the backend and records "ok" or the
# traceback in ``results``). The script ends with ``print(json.dumps(results))``.
PRELUDE = """
import json, sys, traceback
import torch
import fastrec
from fastrec import functional as FF
from fastrec import nn as fnn

backend = sys.argv[1]
results = {}


def same(a, b, what):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs torch's {tuple(b.shape)}"
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} vs torch's {b.dtype}"
    torch.testing.assert_close(a, b, msg=what)


def case(name):
    def wrap(fn):
        try:
            with fastrec.use_backend(backend):
                fn()
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc(limit=3)
        return fn
    return wrap
"""


def run_isolated(script: str, *args: str, timeout: float = 300.0) -> dict:
    """Runs ``script`` in a fresh interpreter (Triton's interpreter on without CUDA); it prints one
    JSON dict of case -> "ok" or what went wrong. A crash fails here with its exit code."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_all_ok(results: dict) -> None:
    failed = {case: what for case, what in results.items() if what != "ok"}
    assert not failed, failed
