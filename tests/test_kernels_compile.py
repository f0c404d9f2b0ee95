"""Compile-only check of the Triton kernels for the GPUs we ship to (sm_80 and sm_90), without a GPU.

What it pins: every kernel variant the launchers can pick compiles for sm_80 (A100) and sm_90
(H100) with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``, does not spill
registers (the ``N bytes spill stores, N bytes spill loads`` line of ``ptxas -v`` is 0; ``cuobjdump
-res-usage`` registers and stack frame are reported: a stack frame alone is not a spill, fp32/fp64
division slow paths are calls that use one) and fits shared memory
(``kernel.metadata.shared`` <= 163 KB on sm_80, 227 KB on sm_90; ``triton.compile`` does not check
this itself). Whether fp16/bf16 dots reach the tensor cores (HMMA / HGMMA in the SASS) is
reported, not asserted. Reference: none (a build check); bound: the hardware limits above.

How: each kernel family module exposes ``kernel_variants()`` -> list of ``KernelVariant``
(kernels/_common.py): ``name``, ``fn``, ``signature``, ``constexprs``, ``attrs``, ``options``
(num_warps, num_stages), ``dtype``, ``flags`` (the constexpr flags that are on), ``bucket`` (the
block-config key, e.g. ``"BLOCK_D=64"``), ``kernel`` (short kernel name) and ``spills_expected``
(non-empty: a known spill, with its reason; reported, not failed). Add a family by adding its
module to ``FAMILIES``. The compilation runs in a subprocess (this file run as a script) whose environment
has no ``TRITON_INTERPRET`` (the suite sets it globally) and sets ``TRITON_DEFAULT_FP_FUSION``,
with one worker per CPU core.

Sampling (``select_variants``), so that each family's check fits ~3-4 minutes on 2 cores:
- worst case per block config: for each (kernel, dtype, bucket) the variant with every flag on
  (only for the kernels a family lists in ``WORST_CASE_KERNELS``, when it does), for one compute
  capability, alternating between sm_80 and sm_90 over buckets and dtypes (fp16 and bf16 share
  their configs, so each 16-bit config is compiled for both);
- flag coverage: every flag combination of every dtype once, the kernel, bucket and compute
  capability rotating, so that over the dtypes each kernel meets each combination.
``FASTREC_COMPILE_ALL=1`` compiles every variant for both compute capabilities instead (minutes
to an hour; for release checks).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

FAMILIES = {
    "attention": "fastrec.kernels.attention",
    "rnn": "fastrec.kernels.rnn",
    "conv": "fastrec.kernels.conv",
    "caser": "fastrec.kernels.caser",
    "dropout": "fastrec.kernels.dropout",
    "encoder": "fastrec.kernels.encoder",
    "linear_cross_entropy": "fastrec.kernels.linear_cross_entropy",
    "scoring": "fastrec.kernels.scoring",
}
COMPUTE_CAPABILITIES = (80, 90)
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes per block, opt-in maximum
TIMEOUT_S = 900
REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# selection (pure Python; runs in the subprocess)
# ------------------------------------------------------------------------------------------------


def select_variants(
    variants, full: bool = False, alternate_flags=(), worst_case_kernels=None
) -> list[tuple[object, int, bool]]:
    """(variant, compute capability, worst_case) triples to compile; see the module docstring.

    ``alternate_flags``: flags (e.g. fp32's ALLOW_TF32, which only changes the dot precision) that
    are not multiplied into the flag coverage but switched on in every other combination.
    ``worst_case_kernels``: if given, only these kernels get the per-bucket worst case (a family
    whose kernels differ in a mode that only lightens them, e.g. the RNN's Elman and GRU beside
    LSTM, names its heaviest); the others are met by the flag coverage.
    """
    if full:
        return [(v, cc, True) for v in variants for cc in COMPUTE_CAPABILITIES]
    dtypes = sorted({v.dtype for v in variants})
    chosen: dict[tuple[str, int], tuple[object, int, bool]] = {}

    def pick(v, cc, worst_case):
        chosen.setdefault((v.name, cc), (v, cc, worst_case))

    # Worst case per (kernel, dtype, bucket): most flags on (alternate flags off).
    groups: dict[tuple, list] = {}
    for v in variants:
        if worst_case_kernels is None or v.kernel in worst_case_kernels:
            groups.setdefault((v.kernel, v.dtype, v.bucket), []).append(v)
    buckets: dict[str, list] = {}
    for kernel, _, bucket in groups:
        if bucket not in buckets.setdefault(kernel, []):
            buckets[kernel].append(bucket)
    for (kernel, dtype, bucket), members in sorted(groups.items()):
        heaviest = max(
            members,
            key=lambda v: (len(set(v.flags) - set(alternate_flags)), -len(set(v.flags) & set(alternate_flags)), v.name),
        )
        turn = buckets[kernel].index(bucket) + dtypes.index(dtype)
        pick(heaviest, COMPUTE_CAPABILITIES[turn % len(COMPUTE_CAPABILITIES)], True)

    # Every combination of the other flags, per dtype, once: kernel / bucket / cc rotating.
    combos: dict[tuple, list] = {}
    for v in variants:
        key = (v.dtype, tuple(sorted(set(v.flags) - set(alternate_flags))))
        combos.setdefault(key, []).append(v)
    for index, ((dtype, _), members) in enumerate(sorted(combos.items())):
        alternate_on = index % 2 == 1
        preferred = [v for v in members if bool(set(v.flags) & set(alternate_flags)) == alternate_on]
        members = preferred or members
        kernels = sorted({v.kernel for v in members})
        kernel = kernels[(index + dtypes.index(dtype)) % len(kernels)]
        of_kernel = sorted((v for v in members if v.kernel == kernel), key=lambda v: v.name)
        v = of_kernel[(index // len(kernels)) % len(of_kernel)]
        pick(v, COMPUTE_CAPABILITIES[(index // 2 + dtypes.index(dtype)) % len(COMPUTE_CAPABILITIES)], False)
    return list(chosen.values())


# ------------------------------------------------------------------------------------------------
# compilation (subprocess workers)
# ------------------------------------------------------------------------------------------------


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def _parse_res_usage(text: str) -> dict:
    """The kernel's 'REG:.. STACK:.. SHARED:.. LOCAL:..' line of ``cuobjdump -res-usage``."""
    for line in text.splitlines():
        if "REG:" in line:
            fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
            return {key.lower(): int(fields.get(key, 0)) for key in ("REG", "STACK", "LOCAL")}
    raise RuntimeError(f"no resource line in cuobjdump output: {text!r}")


def _parse_spills(ptxas_log: str) -> int | None:
    """Bytes of spill stores + loads in a ``ptxas -v`` log (None: no such line)."""
    match = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    return None if match is None else int(match.group(1)) + int(match.group(2))


def _compile_one(job):
    family, name, cc, worst_case = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    variant = _VARIANTS[(family, name)]
    result = {
        "family": family,
        "name": name,
        "cc": cc,
        "dtype": variant.dtype,
        "worst_case": worst_case,
        "spills_expected": getattr(variant, "spills_expected", ""),
    }
    start = time.time()
    try:
        # triton runs ptxas -v; with dump_ptxas_log it prints the log, which holds the spill line.
        # always_compile: a kernel from triton's cache would bring no ptxas log.
        triton.knobs.nvidia.dump_ptxas_log = True
        triton.knobs.compilation.always_compile = True
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            kernel = triton.compile(
                ASTSource(
                    fn=getattr(variant.fn, "jit", variant.fn),
                    signature=variant.signature,
                    constexprs=variant.constexprs,
                    attrs=variant.attrs,
                ),
                target=GPUTarget("cuda", cc, 32),
                options=dict(variant.options),
            )
        spills = _parse_spills(captured.getvalue())
        if spills is None:
            raise RuntimeError(f"no spill line in the ptxas log: {captured.getvalue()[-500:]!r}")
        result["spills"] = spills
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(kernel.asm["cubin"])
            cubin.flush()
            usage = subprocess.run(
                [_cuobjdump(), "-res-usage", cubin.name], capture_output=True, text=True, check=True
            ).stdout
            sass = ""
            if worst_case and variant.dtype in ("fp16", "bf16"):  # informational
                sass = subprocess.run(
                    [_cuobjdump(), "-sass", cubin.name], capture_output=True, text=True, check=True
                ).stdout
        result.update(_parse_res_usage(usage))
        result["shared"] = int(kernel.metadata.shared)
        result["num_warps"] = int(kernel.metadata.num_warps)
        result["mma"] = sorted({w.split(".")[0] for w in sass.split() if w.startswith(("HMMA", "HGMMA"))})
    except Exception as error:  # reported (and failed) by the test
        result["error"] = f"{type(error).__name__}: {error}"[:2000]
    result["seconds"] = round(time.time() - start, 2)
    return result


_VARIANTS: dict = {}


def _load_variants(families) -> dict:
    variants = {}
    for family in families:
        module = importlib.import_module(FAMILIES[family])
        for v in module.kernel_variants():
            variants[(family, v.name)] = v
    return variants


def main(argv) -> None:
    """Subprocess entry: compile the selected variants of the named families, print JSON lines."""
    import concurrent.futures
    import multiprocessing

    families = argv[1:] or list(FAMILIES)
    full = os.environ.get("FASTREC_COMPILE_ALL") == "1"
    _VARIANTS.update(_load_variants(families))
    jobs = []
    for family in families:
        variants = [v for (f, _), v in _VARIANTS.items() if f == family]
        module = importlib.import_module(FAMILIES[family])
        alternate = getattr(module, "COVERAGE_ALTERNATE_FLAGS", ())
        heaviest = getattr(module, "WORST_CASE_KERNELS", None)
        jobs += [(family, v.name, cc, worst) for v, cc, worst in select_variants(variants, full, alternate, heaviest)]
    # Heaviest first so that the pool drains evenly.
    jobs.sort(key=lambda job: -len(_VARIANTS[job[:2]].flags))
    workers = max(1, os.cpu_count() or 1)
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        for result in pool.map(_compile_one, jobs, chunksize=1):
            print(json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------
# the test
# ------------------------------------------------------------------------------------------------


def compile_in_subprocess(families) -> list[dict]:
    """Run this file as a script without TRITON_INTERPRET; return one dict per compilation."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, __file__, *families],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=REPO_ROOT,
    )
    if proc.returncode != 0:
        raise AssertionError(f"compile subprocess failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def format_report(results) -> str:
    lines = [f"{'variant':95s} {'cc':>3s} {'reg':>4s} {'spill':>5s} {'stack':>5s} {'smem KB':>7s} {'s':>5s} mma"]
    for r in sorted(results, key=lambda r: (r["name"], r["cc"])):
        if "error" in r:
            lines.append(f"{r['name']:95s} {r['cc']:>3d} ERROR {r['error'][:200]}")
        else:
            lines.append(
                f"{r['name']:95s} {r['cc']:>3d} {r['reg']:>4d} {r['spills']:>5d} {r['stack']:>5d} "
                f"{r['shared'] / 1024:>7.1f} {r['seconds']:>5.1f} {'/'.join(r['mma'])}"
            )
    return "\n".join(lines)


def _nvidia_backend_available() -> bool:
    try:
        return Path(_cuobjdump()).exists()
    except Exception:
        return False


@pytest.mark.skipif(not _nvidia_backend_available(), reason="triton's NVIDIA backend (cuobjdump) is not installed")
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_kernel_variants_compile_for_sm80_and_sm90_without_spills(family):
    start = time.time()
    results = compile_in_subprocess([family])
    elapsed = time.time() - start
    report = format_report(results)
    print(f"\n{family}: {len(results)} compilations in {elapsed:.0f} s\n{report}")
    assert results, "no variant was compiled"
    problems = []
    for r in results:
        where = f"{r['name']} sm_{r['cc']}"
        if "error" in r:
            problems.append(f"{where}: does not compile: {r['error']}")
            continue
        if r["spills"] and not r["spills_expected"]:
            problems.append(f"{where}: spills {r['spills']} B (ptxas spill stores + loads; {r['reg']} registers)")
        if r["shared"] > SHARED_MEMORY_LIMIT[r["cc"]]:
            problems.append(f"{where}: shared memory {r['shared']} B > {SHARED_MEMORY_LIMIT[r['cc']]} B")
    assert not problems, "\n".join(problems)
    # Every flag combination of every dtype was compiled at least once.
    module = importlib.import_module(FAMILIES[family])
    alternate = set(getattr(module, "COVERAGE_ALTERNATE_FLAGS", ()))
    names = {r["name"] for r in results}
    wanted, seen = set(), set()
    for v in module.kernel_variants():
        key = (v.dtype, tuple(sorted(set(v.flags) - alternate)))
        wanted.add(key)
        if v.name in names:
            seen.add(key)
    assert wanted <= seen, f"flag combinations never compiled: {sorted(wanted - seen)[:10]}"


if __name__ == "__main__":
    main(sys.argv)
