#!/usr/bin/env bash
# The GPU run (docs/gpu-run.md): on a machine with CUDA, PyTorch and Triton installed and no
# network, measure this card's tables (the Triton attention block configs, the conv path per
# shape class), run the benchmark table with them, the diagnostics, a short training run of the
# three models on both backends, then the CUDA correctness tests, writing to OUTDIR (at most 8
# files, what the device tool returns):
#   env.log (nvidia-smi, install), tune.log (both table writers' output), attention_configs.json
#   and conv_dispatch.json (the package's tables with this card's entries), bench.json (every
#   figure, with card and versions; written row by row), bench.log (with host_profile.py's
#   profile and gpu_diagnostics.py's report), train.log (fastrec train --compare per model),
#   tests.log; graphs.log (one epoch per model, backend and eager / --cuda-graphs, and the
#   tests that no training step synchronises the host).
# GPU_RUN_STEPS picks steps (default all: tune,dispatch,bench,diag,train,graphs,tests), GPU_RUN_TESTS the
# test files (default: every family's). The tables are written
# into fastrec/ of this checkout, so the bench and the tests after them use them; commit the
# copies in OUTDIR. Training reads MovieLens-100K from .data/ml-100k.inter (carried: the machine
# has no network and no recbole; the step is skipped without it). Builds nothing it does not
# need: the Triton kernels need no build, so the C++ extension is skipped. Without CUDA it says so
# and exits 0. Budget: about 10 minutes for all steps; each has its own time limit.
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

steps=",${GPU_RUN_STEPS:-tune,dispatch,bench,diag,train,graphs,tests},"
want() { [[ $steps == *",$1,"* ]]; }

if want tune; then
step 140 "$out/tune.log" "$python" -m fastrec bench --family attention \
  --write-configs fastrec/attention_configs.json --json /tmp/attention_tuning.json
cp fastrec/attention_configs.json "$out/attention_configs.json"
fi
if want dispatch; then
step 90 "$out/tune.log" "$python" -m fastrec bench --family conv --rounds 5 --min-round-s 0.02 \
  --write-dispatch fastrec/conv_dispatch.json
cp fastrec/conv_dispatch.json "$out/conv_dispatch.json"
fi
if want bench; then
step 170 "$out/bench.log" "$python" -m fastrec bench --rounds 5 --min-round-s 0.02 --json "$out/bench.json"
step 30 "$out/bench.log" "$python" benchmarks/host_profile.py  # where a small training step's host time goes
fi
want diag && step 90 "$out/bench.log" "$python" benchmarks/gpu_diagnostics.py --sections "${GPU_RUN_DIAG:-steps,kernels,conv}"
if want train && [ -f .data/ml-100k.inter ]; then
  for model in sasrec gru4rec caser; do
    step 60 "$out/train.log" "$python" -m fastrec train --model $model --data .data/ml-100k.inter --device cuda \
      --compare --epochs 3 --time-limit 0 --no-progress
  done
  step 60 "$out/train.log" "$python" -m fastrec train --model sasrec --data .data/ml-100k.inter --device cuda \
    --compare --epochs 2 --amp bf16 --time-limit 0 --no-progress
fi
# One epoch of each model on each backend, eager and replayed as CUDA graphs (the epoch times of
# the four lines per model are the whole-step bars' ratios), then the tests that run steps under
# torch.cuda.set_sync_debug_mode("error") and compare captured with eager steps.
if want graphs; then
  if [ -f .data/ml-100k.inter ]; then
    for model in sasrec gru4rec caser; do
      for backend in fastrec torch; do
        for graphs in "" --cuda-graphs; do
          # shellcheck disable=SC2086  # $graphs is one flag or none
          step 40 "$out/graphs.log" "$python" -m fastrec train --model $model --backend $backend \
            --data .data/ml-100k.inter --device cuda --epochs 1 --time-limit 0 --no-progress $graphs
        done
      done
    done
  fi
  step 90 "$out/graphs.log" "$python" -m pytest -v --tb=short -p no:cacheprovider -k cuda \
    tests/test_graphs.py tests/test_train.py
fi

# The triton-backend and CUDA tests of every family in one session, spread over the host's cores
# when pytest-xdist is there (each test JIT-compiles its kernel variants, ~1-2 s each, so a serial
# run does not fit); -v so that a run cut at its limit still shows what passed and failed.
parallel=()
"$python" -c "import xdist" 2>/dev/null && parallel=(-n 8)
tests=${GPU_RUN_TESTS:-tests/test_attention.py tests/test_nn_attention.py tests/test_encoder.py tests/test_rnn_triton.py \
  tests/test_rnn_cells_triton.py tests/test_conv.py tests/test_conv_triton.py tests/test_conv_dispatch.py \
  tests/test_caser.py tests/test_dropout.py tests/test_backends.py tests/test_routing.py tests/test_bench.py}
# shellcheck disable=SC2086  # the file list splits on spaces
want tests && step 160 "$out/tests.log" "$python" -m pytest -v --tb=short -p no:cacheprovider "${parallel[@]}" \
  -k "triton or cuda or launcher" $tests
exit $status
