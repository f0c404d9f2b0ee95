#!/usr/bin/env bash
# fastrec's two entry points, each on a fresh machine or a reused one:
#   ./dev.sh bench [fastrec bench options]   the benchmark table on whatever device is present
#   ./dev.sh test  [pytest options]          ruff, then the test suite
# Both create (or reuse) the virtual environment .venv (FASTREC_VENV overrides), install what
# is missing (torch only if absent: torch==2.13.0 is the tested version), and build the C++
# extension when its sources changed.
set -euo pipefail
cd "$(dirname "$0")"

venv=${FASTREC_VENV:-.venv}
python=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
py="$venv/bin/python"
pip=("$py" -m pip -q --disable-pip-version-check)

if ! "$py" -c "import torch" 2>/dev/null; then
  "${pip[@]}" install "torch==2.13.0"
fi
missing=()
for pkg in triton numpy tqdm pytest pytest_benchmark ruff ninja setuptools wheel; do
  "$py" -c "import $pkg" 2>/dev/null || missing+=("${pkg//_/-}")
done
if [ ${#missing[@]} -gt 0 ]; then
  "${pip[@]}" install "${missing[@]}"
fi
# Data sets read from inside these wheels (ml-100k, CDNOW); --no-deps: fastrec uses only their data files.
for spec in recbole==1.2.1 lifetimes==0.11.3; do
  "$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('${spec%%==*}') is None)" ||
    "${pip[@]}" install --no-deps "$spec"
done

# Rebuild (editable install + fastrec._C) only when setup.py or csrc/ changed.
stamp="$venv/.fastrec-build"
digest=$(cat setup.py csrc/*.cpp csrc/*.h | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ] || ! "$py" -c "import torch, fastrec._C" 2>/dev/null; then
  echo "building fastrec (C++ extension, ~1-2 min on 2 cores)..."
  PATH="$PWD/$venv/bin:$PATH" "${pip[@]}" install --no-build-isolation --no-deps -e .
  echo "$digest" > "$stamp"
fi

# RecBole's model, data and trainer code (tests/test_recbole.py, benchmarks/recbole_speed.py)
# needs numpy < 2 and a few packages of its own: an environment layered over this one (its own
# site-packages first, then this one's: torch, triton, fastrec).
# Built by `test` only: the benchmark table does not need it.
recbole_env() {
  rvenv=${FASTREC_RECBOLE_VENV:-.venv-recbole}
  if [ ! -x "$rvenv/bin/python" ]; then
    "$python" -m venv "$rvenv"
  fi
  rpy="$rvenv/bin/python"
  base_site=$(cd "$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")" && pwd)
  echo "import site; site.addsitedir('$base_site')" > "$("$rpy" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/zz_fastrec_base.pth"
  if ! "$rpy" -c "import numpy, pandas, scipy, sklearn, yaml, colorlog, colorama, texttable, tensorboard; assert numpy.__version__ < '2'" 2>/dev/null; then
    "$rpy" -m pip -q --disable-pip-version-check install "numpy==1.26.4" "pandas==2.1.4" "scipy==1.17.1" \
      "scikit-learn==1.9.1" "pyyaml==6.0.4" "colorlog==4.7.2" "colorama==0.4.4" "texttable==1.7.2" "tensorboard==2.21.0"
  fi
}

command=${1:-}
shift || true
case "$command" in
  test)
    recbole_env
    "$venv/bin/ruff" check .
    "$venv/bin/ruff" format --check .
    exec "$py" -m pytest "$@"
    ;;
  bench)
    exec "$py" -m fastrec bench "$@"
    ;;
  *)
    echo "usage: ./dev.sh test [pytest options] | ./dev.sh bench [fastrec bench options]" >&2
    exit 2
    ;;
esac
