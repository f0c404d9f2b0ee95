#!/usr/bin/env bash
# The GPU run (docs/gpu-run.md): on a machine with CUDA, PyTorch and Triton installed and no
# network, measure the bars (attention, GRU, packed GRU, GRU with device lengths, a GRU4Rec
# training step per GRU route, recommend() at batch 1, the 1M-item loss and top-k), one epoch per
# model, backend and eager / captured step, the conv dispatch table and the benchmark table,
# writing to OUTDIR (default benchmarks/results/gpu-<date>-<card>/):
#   env.log (nvidia-smi, install, the budget), bars.json and bars.log (gpu_diagnostics.py
#   --sections bars), graphs.log (fastrec train --epochs 1 per model x backend x eager /
#   --cuda-graphs, then the cuda tests of captured and sync-free steps), tune.log and
#   conv_dispatch.json (the package's table with this card's entry), bench.json (every figure,
#   written row by row) and bench.log; opt-in: attention_configs.json (tune), train.log, tests.log.
# GPU_RUN_STEPS picks steps (default bars,graphs,dispatch,bench: under 8 minutes, each
# step under its own limit; tune,diag,train,tests are opt-in, for another window), GPU_RUN_TESTS
# the test files of the tests step. The dispatch table is written into fastrec/ of this checkout,
# so the bench after it uses it; commit the copy in OUTDIR. Training reads MovieLens-100K from
# .data/ml-100k.inter (carried: the machine has no network; without it the epochs are skipped).
#
# Dry run: FASTREC_GPU_DRY_RUN=1 benchmarks/gpu_run.sh [OUTDIR] (or --dry-run as the first
# argument) runs every step on the CPU at toy sizes (TRITON_INTERPRET=1, synthetic data, no
# install, the table writers only checked to refuse a CPU), so that the GPU window is not spent
# on a broken script. Without CUDA and without the dry run it says so and exits 0.
set -uo pipefail
dry=${FASTREC_GPU_DRY_RUN:-0}
if [ "${1:-}" = "--dry-run" ]; then
  dry=1
  shift
fi
cd "$(dirname "$0")/.."
if [ "$dry" = 1 ]; then
  python=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
  export TRITON_INTERPRET=1
else
  python=${PYTHON:-python3}
fi

if [ "$dry" != 1 ] && ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_run: no CUDA device here; skipping the GPU run (FASTREC_GPU_DRY_RUN=1 runs it on the CPU)"
  [ -n "${1:-}" ] && mkdir -p "$1" && echo "no CUDA device" > "$1/skipped.txt"
  exit 0
fi
if [ -n "${1:-}" ]; then
  out=$1
elif [ "$dry" = 1 ]; then
  out=/tmp/gpu-run-dry
else
  card=$("$python" -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower())" 2>/dev/null)
  out=benchmarks/results/gpu-$(date +%Y-%m-%d)-${card:-gpu}
fi
mkdir -p "$out"
echo "gpu_run: writing to $out (dry run: $dry)"

if [ "$dry" = 1 ]; then
  echo "dry run on the CPU: no install, TRITON_INTERPRET=1" > "$out/env.log"
else
  nvidia-smi > "$out/env.log" 2>&1 || true
  # fastrec importable without network or compilation: an editable install of the Python parts.
  FASTREC_NO_EXTENSION=1 "$python" -m pip install -q --no-build-isolation --no-deps --no-index -e . \
    >> "$out/env.log" 2>&1 || { echo "gpu_run: install failed, see env.log"; cat "$out/env.log"; exit 1; }
fi
export PYTHONUNBUFFERED=1
status=0
step() {  # step SECONDS LOG COMMAND...: run with a time limit, output to the terminal and LOG
  local seconds=$1 log=$2
  shift 2
  local start=$SECONDS
  timeout "$seconds" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "=== exit $rc after $((SECONDS - start)) s (limit $seconds s): $*" | tee -a "$log"
  [ "$rc" -eq 0 ] || status=1
}
refused_on_cpu() {  # dry run of a table writer: it must refuse the CPU with exit 2, naming CUDA
  local log=$1
  shift
  "$@" > /tmp/gpu_run_refused.$$ 2>&1
  local rc=$?
  cat /tmp/gpu_run_refused.$$ >> "$log"
  if [ "$rc" -eq 2 ] && grep -q CUDA /tmp/gpu_run_refused.$$; then
    echo "=== dry run: refused the CPU as it should: $*" | tee -a "$log"
  else
    echo "=== dry run: expected exit 2 naming CUDA, got $rc: $*" | tee -a "$log"
    status=1
  fi
  rm -f /tmp/gpu_run_refused.$$
}

steps=",${GPU_RUN_STEPS:-bars,graphs,dispatch,bench},"
want() { [[ $steps == *",$1,"* ]]; }
# Per-step limits (s): the sum of the default steps' limits stays under 8 minutes with the
# install (~15 s). Estimates from the H200 runs of 2026-11-28: the bench table ~100 s, the conv
# table ~30 s, one `fastrec train` epoch of ML-100K 1-2 s plus ~8 s of start-up and evaluation.
declare -A limit=([tune]=140 [dispatch]=45 [bars]=160 [bench]=110 [diag]=90 [train]=240 [graphs]=140 [tests]=160)
total=0
for name in tune dispatch bars bench diag train graphs tests; do
  want "$name" && total=$((total + limit[$name]))
done
echo "gpu_run: steps ${steps:1:-1}; limits sum to $total s" | tee -a "$out/env.log"

data=.data/ml-100k.inter
device=cuda
if [ "$dry" = 1 ]; then
  data=synthetic
  device=cpu
fi
have_data() { [ "$data" = synthetic ] || [ -f "$data" ]; }

if want bars; then
  tiny=()
  [ "$dry" = 1 ] && tiny=(--tiny)
  step "${limit[bars]}" "$out/bars.log" "$python" benchmarks/gpu_diagnostics.py --sections bars \
    --json "$out/bars.json" "${tiny[@]}"
fi
# One epoch of each model on each backend, eager and replayed as CUDA graphs (the epoch times of
# the four lines per model are the whole-step bars' ratios), then the tests that run steps under
# torch.cuda.set_sync_debug_mode("error") and compare captured with eager steps. The runs share
# the step's limit: each gets at most 25 s and what is left (the dry run: 90 s, 10 minutes in all).
if want graphs; then
  deadline=$((SECONDS + limit[graphs]))
  modes=("" --cuda-graphs)
  epoch=(--epochs 1 --time-limit 0)
  per_run=25
  if [ "$dry" = 1 ]; then  # capture needs CUDA; the loaded CPU runs slower than the card's budget
    modes=("")
    epoch=(--epochs 1 --time-limit 3)
    per_run=90
    deadline=$((SECONDS + 600))
  fi
  if have_data; then
    for model in sasrec gru4rec caser; do
      for backend in fastrec torch; do
        for graphs in "${modes[@]}"; do
          left=$((deadline - SECONDS - 30))  # 30 s kept for the tests
          if [ "$left" -le 5 ]; then
            echo "=== graphs: out of time before $model $backend $graphs" | tee -a "$out/graphs.log"
            status=1
            continue
          fi
          # shellcheck disable=SC2086  # $graphs is one flag or none
          step $((left < per_run ? left : per_run)) "$out/graphs.log" "$python" -m fastrec train --model $model \
            --backend $backend --data "$data" --device $device "${epoch[@]}" --no-progress $graphs
        done
      done
    done
  fi
  left=$((deadline - SECONDS))
  step $((left > 10 ? left : 10)) "$out/graphs.log" "$python" -m pytest -q --tb=short -p no:cacheprovider -k cuda \
    tests/test_graphs.py tests/test_train.py
fi
if want tune; then
  if [ "$dry" = 1 ]; then
    refused_on_cpu "$out/tune.log" "$python" -m fastrec bench --family attention --write-configs /tmp/gpu_run_configs.json
  else
    step "${limit[tune]}" "$out/tune.log" "$python" -m fastrec bench --family attention \
      --write-configs fastrec/attention_configs.json --json /tmp/attention_tuning.json
    cp fastrec/attention_configs.json "$out/attention_configs.json"
  fi
fi
if want dispatch; then
  if [ "$dry" = 1 ]; then
    refused_on_cpu "$out/tune.log" "$python" -m fastrec bench --family conv --write-dispatch /tmp/gpu_run_dispatch.json
  else
    step "${limit[dispatch]}" "$out/tune.log" "$python" -m fastrec bench --family conv --rounds 5 \
      --min-round-s 0.02 --write-dispatch fastrec/conv_dispatch.json
    cp fastrec/conv_dispatch.json "$out/conv_dispatch.json"
  fi
fi
if want bench; then
  if [ "$dry" = 1 ]; then  # one family on the CPU: the rows' bookkeeping, not the figures
    step "${limit[bench]}" "$out/bench.log" "$python" -m fastrec bench --family rnn --rounds 1 --min-round-s 0 \
      --json "$out/bench.json"
  else
    step "${limit[bench]}" "$out/bench.log" "$python" -m fastrec bench --rounds 5 --min-round-s 0.02 \
      --json "$out/bench.json"
  fi
fi
if want diag; then
  if [ "$dry" = 1 ]; then
    step "${limit[diag]}" "$out/bench.log" "$python" benchmarks/gpu_diagnostics.py --sections conv --trials 2
  else
    step 30 "$out/bench.log" "$python" benchmarks/host_profile.py  # where a small step's host time goes
    step $((limit[diag] - 30)) "$out/bench.log" "$python" benchmarks/gpu_diagnostics.py \
      --sections "${GPU_RUN_DIAG:-steps,kernels,convpaths}"
  fi
fi
if want train && have_data; then
  for model in sasrec gru4rec caser; do
    if [ "$dry" = 1 ]; then
      step 60 "$out/train.log" "$python" -m fastrec train --model $model --data "$data" --device $device \
        --compare --epochs 1 --time-limit 3 --no-progress
    else
      step 60 "$out/train.log" "$python" -m fastrec train --model $model --data "$data" --device $device \
        --compare --epochs 3 --time-limit 0 --no-progress
    fi
  done
fi

# The triton-backend and CUDA tests of every family in one session, spread over the host's cores
# when pytest-xdist is there (each test JIT-compiles its kernel variants, ~1-2 s each, so a serial
# run does not fit); -v so that a run cut at its limit still shows what passed and failed. The dry
# run only collects them.
if want tests; then
  parallel=()
  "$python" -c "import xdist" 2>/dev/null && parallel=(-n 8)
  tests=${GPU_RUN_TESTS:-tests/test_attention.py tests/test_nn_attention.py tests/test_encoder.py \
    tests/test_rnn_triton.py tests/test_rnn_cells_triton.py tests/test_conv.py tests/test_conv_triton.py \
    tests/test_conv_dispatch.py tests/test_caser.py tests/test_dropout.py tests/test_backends.py \
    tests/test_routing.py tests/test_bench.py tests/test_graphs.py}
  collect=()
  [ "$dry" = 1 ] && collect=(--collect-only -q) && parallel=()
  # shellcheck disable=SC2086  # the file list splits on spaces
  step "${limit[tests]}" "$out/tests.log" "$python" -m pytest -v --tb=short -p no:cacheprovider "${parallel[@]}" \
    "${collect[@]}" -k "triton or cuda or launcher" $tests
fi
echo "gpu_run: done in $SECONDS s, exit $status; outputs in $out"
exit $status
