#!/usr/bin/env bash
# The bench suite on a GPU in one command (bench/gpu_suite.py has the details; bench/RESULTS.md the
# figures). On the device machine the Python there has torch, onnx, onnxruntime and scikit-image but
# not this project's other dependencies: prepare them here once with bench/gpu_wheels.sh, which
# downloads them into .whl/ (ignored), and carry .whl. Then, through the device tool:
#
#   run(command="bench/gpu_suite.sh", carry=[".whl"], timeout_s=600)
#
# Arguments go to bench/gpu_suite.py (--smoke, --device, --out); $OUT, when set, receives the log and
# the Markdown summary. Smoke run on a CPU: bench/gpu_suite.sh --device cpu --smoke
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then
  PY=.venv/bin/python  # a checkout with its own environment (here): the carried wheels are not for it
elif compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed" >&2; exit 2; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
exec "$PY" bench/gpu_suite.py "$@"
