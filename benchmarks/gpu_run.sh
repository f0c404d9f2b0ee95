#!/usr/bin/env bash
# The GPU run (BENCHMARKS.md): on a machine with CUDA, PyTorch and Triton installed and no
# network, measure this card's tables (the Triton attention block configs, the conv path per
# shape class), run the benchmark table with them, then the CUDA correctness tests, writing to
# OUTDIR (8 files at most, what the device tool returns):
#   env.log (nvidia-smi, install), tune.log (both table writers' output), attention_tuning.json
#   (every candidate's time), attention_configs.json and conv_dispatch.json (the package's tables
#   with this card's entries), bench.json (every figure, with card and versions; written row by
#   row), bench.log (with benchmarks/host_profile.py's profile), tests.log.
# The tables are written into fastrec/ of this checkout, so the bench and the tests after them
# use them; commit the copies in OUTDIR. Builds nothing it does not need: the Triton kernels need
# no build, so the C++ extension is skipped. Without CUDA it says so and exits 0. Budget: about
# 9 minutes in all; each step has its own time limit.
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
step() {  # step SECONDS LOG COMMAND...: run with a time limit, output to the terminal and LOG
  local seconds=$1 log=$2
  shift 2
  timeout "$seconds" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "=== exit $rc: $*" | tee -a "$log"
  [ "$rc" -eq 0 ] || status=1
}

step 140 "$out/tune.log" "$python" -m fastrec bench --family attention \
  --write-configs fastrec/attention_configs.json --json "$out/attention_tuning.json"
cp fastrec/attention_configs.json "$out/attention_configs.json"
step 90 "$out/tune.log" "$python" -m fastrec bench --family conv --rounds 5 --min-round-s 0.02 \
  --write-dispatch fastrec/conv_dispatch.json
cp fastrec/conv_dispatch.json "$out/conv_dispatch.json"
step 130 "$out/bench.log" "$python" -m fastrec bench --rounds 5 --min-round-s 0.02 --json "$out/bench.json"
step 30 "$out/bench.log" "$python" benchmarks/host_profile.py  # where a small training step's host time goes

# The triton-backend and CUDA tests of every family in one session, spread over the host's cores
# when pytest-xdist is there (each test JIT-compiles its kernel variants, ~1-2 s each, so a serial
# run does not fit); -v so that a run cut at its limit still shows what passed and failed.
parallel=()
"$python" -c "import xdist" 2>/dev/null && parallel=(-n 8)
step 160 "$out/tests.log" "$python" -m pytest -v --tb=short -p no:cacheprovider "${parallel[@]}" \
  -k "triton or cuda" tests/test_attention.py tests/test_nn_attention.py tests/test_rnn_triton.py \
  tests/test_rnn_cells_triton.py tests/test_conv.py tests/test_conv_triton.py tests/test_conv_dispatch.py \
  tests/test_caser.py tests/test_dropout.py
exit $status
