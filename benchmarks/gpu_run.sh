#!/usr/bin/env bash
# The GPU run (BENCHMARKS.md): on a machine with CUDA, PyTorch and Triton installed and no
# network, run the CUDA correctness tests, then the benchmark table, writing to OUTDIR:
#   bench.json (every figure, with card, versions and commit), bench.md (the table),
#   tests_<family>.log, bench.log, nvidia-smi.txt.
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
# The triton-backend and CUDA tests of each family, one time limit per family so that a slow
# family (each kernel variant is JIT-compiled on first use) cannot starve the others or the bench.
run_tests() {  # run_tests FAMILY SECONDS FILE... : pytest -k "triton or cuda" on the files
  local family=$1 seconds=$2
  shift 2
  timeout "$seconds" "$python" -m pytest -q -p no:cacheprovider "$@" -k "triton or cuda" 2>&1 \
    | tee "$out/tests_$family.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}
run_tests attention 90 tests/test_attention.py tests/test_nn_attention.py
run_tests rnn 60 tests/test_rnn_triton.py
run_tests rnn_cell 40 tests/test_rnn_cells_triton.py
run_tests conv 60 tests/test_conv*.py tests/test_caser.py
run_tests dropout 20 tests/test_dropout.py
timeout 140 "$python" -m fastrec bench --rounds 10 --json "$out/bench.json" --markdown "$out/bench.md" 2>&1 \
  | tee "$out/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
