#!/usr/bin/env bash
# Set up (or update) the project's virtual environment: bash tools/bootstrap.sh
#
# GALA_CUDA picks the CUDA major of the GPU stack (default 13, NVIDIA driver >= 580):
#   GALA_CUDA=12 bash tools/bootstrap.sh   # drivers R525 and later (R535, R550): the [cuda12]
#       extra (nvidia-dali-cuda120, onnxruntime-gpu 1.26.0) and, on a machine with a GPU, torch's
#       CUDA 12 build from GALA_TORCH_INDEX (default https://download.pytorch.org/whl/cu128).
#
# torch goes in first and pinned: on a machine without a GPU, torch==2.13.0 is the CPU wheel
# that lies on disk (about 30 s); a bare `torch` requirement would resolve a newer CUDA build of
# several GB. On a GPU cluster the same pin takes the CUDA build from the registry. With torch
# in place, the project's own range admits it and pip leaves it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${GALA_VENV:-.venv}"
python="${PYTHON:-python3}"
cuda="${GALA_CUDA:-13}"
torch_from=()
case "$cuda" in
    13) ;;
    12)
        # Without a GPU the pin takes the same CPU wheel as for 13; with one, the CUDA 12 build.
        if nvidia-smi -L >/dev/null 2>&1; then
            torch_from=(--index-url "${GALA_TORCH_INDEX:-https://download.pytorch.org/whl/cu128}")
        fi
        ;;
    *)
        echo "[bootstrap] GALA_CUDA=$cuda: expected 13 (driver >= 580) or 12 (R525 and later)" >&2
        exit 2
        ;;
esac

if [ ! -x "$venv/bin/python" ]; then
    echo "[bootstrap] creating $venv"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip >/dev/null
echo "[bootstrap] torch (CUDA $cuda stack)"
"${pip[@]}" install "${torch_from[@]}" "torch==${GALA_TORCH_VERSION:-2.13.0}"
# The other CUDA major's DALI and onnxruntime-gpu must go: both majors import as the same modules.
other=$([ "$cuda" = 13 ] && echo 120 || echo 130)
"${pip[@]}" uninstall -y "nvidia-dali-cuda$other" >/dev/null 2>&1 || true
echo "[bootstrap] gala-scale and its dependencies"
"${pip[@]}" install -e ".[test,cuda$cuda]"
if [ -f serve/pyproject.toml ]; then
    echo "[bootstrap] gala-serve"
    "${pip[@]}" install -e serve/
fi
"$venv/bin/python" - "$cuda" <<'PY'
import importlib.metadata as md
import sys
import torch
dali = "nvidia-dali-cuda" + {"13": "130", "12": "120"}[sys.argv[1]]
print(f"[bootstrap] torch {torch.__version__} (cuda: {torch.cuda.is_available()}), "
      f"{dali} {md.version(dali)}, deepspeed {md.version('deepspeed')}, "
      f"accelerate {md.version('accelerate')}, onnxruntime-gpu {md.version('onnxruntime-gpu')}")
PY
