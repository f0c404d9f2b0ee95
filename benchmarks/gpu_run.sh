#!/usr/bin/env bash
# The GPU run (BENCHMARKS.md): on a machine with CUDA, PyTorch and Triton installed and no
# network, run the CUDA correctness tests, then the benchmark table, writing to OUTDIR:
#   bench.json (every figure, with card, versions and commit), bench.md (the table),
#   tests.log, bench.log, nvidia-smi.txt; for the conv family tests_conv.log, bench_conv.{json,md,log}.
# Builds nothing it does not need: the Triton kernels need no build, so the C++ extension is
# skipped. Without CUDA it says so and exits 0. Budget: under 6 minutes in all.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_run.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}

if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_run: no CUDA device here; skipping the GPU run" | tee "$out/skipped.txt"
  exit 0
fi
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true

# fastrec importable without network or compilation: an editable install of the Python parts.
FASTREC_NO_EXTENSION=1 "$python" -m pip install -q --no-build-isolation --no-deps --no-index -e . \
  > "$out/install.log" 2>&1 || { echo "gpu_run: install failed, see install.log"; cat "$out/install.log"; exit 1; }
export PYTHONUNBUFFERED=1

status=0
timeout 150 "$python" -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_nn_attention.py \
  -k "triton or cuda" 2>&1 | tee "$out/tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
timeout 200 "$python" -m fastrec bench --family attention --rounds 10 --json "$out/bench.json" --markdown "$out/bench.md" 2>&1 \
  | tee "$out/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# conv family: the Triton launchers' own tests (all of them run natively on CUDA), the Triton
# cases of the other conv test files, then the conv benchmark rows once fastrec bench has them.
conv_tests=(tests/test_conv_triton.py)
for f in tests/test_conv*.py; do
  [ "$f" = tests/test_conv_triton.py ] || [ ! -f "$f" ] || conv_tests+=("$f")
done
timeout 120 "$python" -m pytest -q -p no:cacheprovider "${conv_tests[@]}" -k "conv_triton or triton or cuda" 2>&1 \
  | tee "$out/tests_conv.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
if "$python" -c "import sys; from fastrec.bench import CASES; sys.exit(0 if 'conv' in CASES else 1)"; then
  timeout 120 "$python" -m fastrec bench --family conv --rounds 10 --json "$out/bench_conv.json" \
    --markdown "$out/bench_conv.md" 2>&1 | tee "$out/bench_conv.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
  echo "gpu_run: fastrec bench has no conv rows yet; conv benchmark skipped" | tee "$out/bench_conv.log"
fi
exit $status
