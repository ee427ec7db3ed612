#!/usr/bin/env bash
# The peer of `python -m gala_serve_bench`: MLServer 1.7.1 in a venv of its own (its pins clash
# with gala-serve's: protobuf, uvicorn, fastapi), with ONNX Runtime for the custom runtime in
# tools/mlserver_peer/. Usage: bash tools/mlserver_venv.sh [VENV]   (default tools/.mlserver)
#
# uvloop < 0.22: MLServer's parallel inference workers crash with uvloop 0.22 and later. The
# benchmark runs MLServer with parallel_workers 0 (inference in the server process, as gala-serve
# does) all the same, so the pin only matters to someone who turns the workers on.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-tools/.mlserver}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    echo "[mlserver] creating $venv"
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip --disable-pip-version-check -q install \
    "mlserver==1.7.1" "onnxruntime==1.31.1" "uvloop<0.22"
"$venv/bin/python" -c "import mlserver, onnxruntime; print('[mlserver]', mlserver.__version__, 'onnxruntime', onnxruntime.__version__)"
