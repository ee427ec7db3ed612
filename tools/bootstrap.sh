#!/usr/bin/env bash
# Set up (or update) the project's virtual environment: bash tools/bootstrap.sh
#
# torch goes in first and pinned: on a machine without a GPU, torch==2.13.0 is the CPU wheel
# that lies on disk (about 30 s); a bare `torch` requirement would resolve a newer CUDA build of
# several GB. On a GPU cluster the same pin takes the CUDA build from the registry. With torch
# in place, the project's own range admits it and pip leaves it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${GALA_VENV:-.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "[bootstrap] creating $venv"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip >/dev/null
echo "[bootstrap] torch"
"${pip[@]}" install "torch==${GALA_TORCH_VERSION:-2.13.0}"
echo "[bootstrap] gala-scale and its dependencies"
"${pip[@]}" install -e ".[test]"
if [ -f serve/pyproject.toml ]; then
    echo "[bootstrap] gala-serve"
    "${pip[@]}" install -e serve/
fi
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import torch
print(f"[bootstrap] torch {torch.__version__} (cuda: {torch.cuda.is_available()}), "
      f"nvidia-dali {md.version('nvidia-dali-cuda130')}, deepspeed {md.version('deepspeed')}, "
      f"accelerate {md.version('accelerate')}, onnxruntime-gpu {md.version('onnxruntime-gpu')}")
PY
