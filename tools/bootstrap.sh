#!/usr/bin/env bash
# Set up (or update) the project's virtual environment: bash tools/bootstrap.sh
#
# GALA_CUDA picks the CUDA major of the GPU stack (default 13, NVIDIA driver >= 580):
#   GALA_CUDA=12 bash tools/bootstrap.sh   # drivers R525 and later (R535, R550): the [cuda12]
#       extra (nvidia-dali-cuda120, onnxruntime-gpu 1.26.0) and, on a machine with a GPU, torch's
#       CUDA 12 build from GALA_TORCH_INDEX (default https://download.pytorch.org/whl/cu128).
#
# torch and torchvision go in first, pinned as a pair built together: the registry's torch==2.13.0
# (a CUDA 13.0 build, which runs on the CPU where there is no GPU) and torchvision==0.28.0 (built
# against it; timm needs it). A machine whose pip config points at a CPU-only torch wheel on disk
# is told to look elsewhere for this one call: the registry's torchvision links libtorch_cuda.so
# and fails to import beside a CPU-only torch ("operator torchvision::nms does not exist"), and the
# registry has no CPU-only torchvision. Measured, and why this pair: docs/pretrained.md, "The
# torch and torchvision install". With torch in place, the project's own ranges admit it and pip leaves
# it alone.
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

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    # A fresh install holds 6.4 GB in the venv and 2.6 GB of downloads on the way
    # (docs/pretrained.md): say so now, not in pip's "No space left on device" a minute in.
    need_gib="${GALA_MIN_FREE_GIB:-10}"
    case "$need_gib" in
        '' | *[!0-9]*)
            echo "[bootstrap] GALA_MIN_FREE_GIB=$need_gib: expected a whole number of GiB" >&2
            exit 2
            ;;
    esac
    parent=$(dirname "$(realpath -m "$venv")")
    mkdir -p "$parent"
    free_kib=$(df -Pk "$parent" 2>/dev/null | awk 'NR == 2 {print $4}') || free_kib=""
    if [ -z "$free_kib" ]; then
        echo "[bootstrap] could not read the free space of $parent (df); not checked" >&2
    elif [ "$free_kib" -lt $((need_gib * 1024 * 1024)) ]; then
        echo "[bootstrap] $parent has $((free_kib / 1024 / 1024)) GiB free; a fresh $venv needs" \
            "about $need_gib GiB (torch's CUDA stack). Free some space, or set GALA_VENV to a" \
            "folder on a larger disk (GALA_MIN_FREE_GIB=0 skips this check)." >&2
        exit 1
    fi
fi
if [ ! -x "$venv/bin/python" ]; then
    echo "[bootstrap] creating $venv"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip >/dev/null
echo "[bootstrap] torch (CUDA $cuda stack)"
# A CPU-only torch left by an earlier set-up satisfies the pin: take it out first.
if "$venv/bin/python" -c "import torch, sys; sys.exit(not torch.__version__.endswith('+cpu'))" \
    2>/dev/null; then
    echo "[bootstrap] replacing the CPU-only torch $("$venv/bin/python" -c \
        'import torch; print(torch.__version__)') (no torchvision matches it)"
    "${pip[@]}" uninstall -y torch torchvision >/dev/null
fi
no_local_wheels=$(mktemp -d)  # an empty find-links folder: pip config's CPU wheel is not seen
PIP_FIND_LINKS=$no_local_wheels "${pip[@]}" install "${torch_from[@]}" \
    "torch==${GALA_TORCH_VERSION:-2.13.0}" "torchvision==${GALA_TORCHVISION_VERSION:-0.28.0}"
rmdir "$no_local_wheels"
# The other CUDA major's DALI and onnxruntime-gpu must go: both majors import as the same modules.
other=$([ "$cuda" = 13 ] && echo 120 || echo 130)
"${pip[@]}" uninstall -y "nvidia-dali-cuda$other" >/dev/null 2>&1 || true
echo "[bootstrap] gala-scale and its dependencies"
"${pip[@]}" install -e ".[test,cuda$cuda]"
if [ -f serve/pyproject.toml ]; then
    echo "[bootstrap] gala-serve"
    "${pip[@]}" install -e serve/
fi
if [ -f serve/bench/pyproject.toml ]; then
    echo "[bootstrap] gala-serve-bench (the serving benchmark, not part of the server wheel)"
    "${pip[@]}" install -e serve/bench/
fi
"$venv/bin/python" - "$cuda" <<'PY'
import importlib.metadata as md
import sys
import torch
dali = "nvidia-dali-cuda" + {"13": "130", "12": "120"}[sys.argv[1]]
import timm
import torchvision
print(f"[bootstrap] torch {torch.__version__} (cuda: {torch.cuda.is_available()}), "
      f"torchvision {torchvision.__version__}, timm {timm.__version__}, "
      f"{dali} {md.version(dali)}, deepspeed {md.version('deepspeed')}, "
      f"accelerate {md.version('accelerate')}, onnxruntime-gpu {md.version('onnxruntime-gpu')}")
PY
