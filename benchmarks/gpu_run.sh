#!/usr/bin/env bash
# The GPU run (BENCHMARKS.md): on a machine with CUDA, PyTorch and Triton installed and no
# network, tune the Triton attention block configs for this card, run the benchmark table, then
# the CUDA correctness tests, writing to OUTDIR (8 files at most, what the device tool returns):
#   env.log (nvidia-smi, install), tune.log, attention_tuning.json (every candidate's time),
#   attention_configs.json (the package's table with this card's entry), bench.json (every
#   figure, with card and versions; written row by row), bench.md, bench.log, tests.log.
# The tuned table is written into fastrec/attention_configs.json of this checkout, so the bench
# and the tests after it run with it; commit the copy in OUTDIR. Builds nothing it does not
# need: the Triton kernels need no build, so the C++ extension is skipped. Without CUDA it says
# so and exits 0. Budget: about 7 minutes in all; each step has its own time limit.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_run.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}

if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_run: no CUDA device here; skipping the GPU run" | tee "$out/skipped.txt"
  exit 0
fi
nvidia-smi > "$out/env.log" 2>&1 || true

# fastrec importable without network or compilation: an editable install of the Python parts.
FASTREC_NO_EXTENSION=1 "$python" -m pip install -q --no-build-isolation --no-deps --no-index -e . \
  >> "$out/env.log" 2>&1 || { echo "gpu_run: install failed, see env.log"; cat "$out/env.log"; exit 1; }
export PYTHONUNBUFFERED=1
status=0

timeout 150 "$python" -m fastrec bench --family attention --write-configs fastrec/attention_configs.json \
  --json "$out/attention_tuning.json" 2>&1 | tee "$out/tune.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
cp fastrec/attention_configs.json "$out/attention_configs.json"

timeout 130 "$python" -m fastrec bench --rounds 5 --min-round-s 0.02 --json "$out/bench.json" \
  --markdown "$out/bench.md" 2>&1 | tee "$out/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# The triton-backend and CUDA tests of each family, one time limit per family so that a slow
# family (each kernel variant is JIT-compiled on first use) cannot starve the others; -v so that
# a family cut at its limit still shows which tests passed and failed.
run_tests() {  # run_tests FAMILY SECONDS FILE... : pytest -k "triton or cuda" on the files
  local family=$1 seconds=$2
  shift 2
  echo "=== $family (limit ${seconds} s)" >> "$out/tests.log"
  timeout "$seconds" "$python" -m pytest -v --tb=short -p no:cacheprovider "$@" -k "triton or cuda" \
    >> "$out/tests.log" 2>&1
  local rc=$?
  echo "=== $family: exit $rc" | tee -a "$out/tests.log"
  [ $rc -eq 0 ] || status=1
}
run_tests attention 50 tests/test_attention.py tests/test_nn_attention.py
run_tests rnn 35 tests/test_rnn_triton.py
run_tests rnn_cell 15 tests/test_rnn_cells_triton.py
run_tests conv 35 tests/test_conv*.py tests/test_caser.py
run_tests dropout 10 tests/test_dropout.py
exit $status
