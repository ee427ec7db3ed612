#!/usr/bin/env bash
# Every check that needs an NVIDIA GPU, in one go, with results in one folder:
#   the GPU-marked tests; DALI `mixed` decoding vs the fallback at 224 px (loader benchmark);
#   the training benchmark and a short real ResNet-32 run on the GPU, exported to ONNX; the
#   serving benchmark with the CUDA execution provider.
#
#   bash tools/gpu_check.sh              # results in $OUT (default runs/gpu_check)
#   bash tools/gpu_check.sh stage        # only copy .whl/* to /tmp/gala-wheels (see gpu_wheels.sh)
#
# Uses the python3 on PATH (PYTHON to override) with this checkout on PYTHONPATH, so an image
# that already has torch and accelerate needs only what it lacks: wheel parts staged under
# /tmp/gala-wheels or lying in .whl/ are joined and installed into /tmp/gala-site. A check whose
# packages are missing is skipped and says so. $OUT gets gpu_check.log (everything) and
# results.jsonl (the last JSON line of each benchmark, one a line).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STAGE=/tmp/gala-wheels SITE=/tmp/gala-site WORK=/tmp/gala-gpu-check

stage() {
    mkdir -p "$STAGE"
    find .whl -type f -exec cp {} "$STAGE/" \; 2>/dev/null
    echo "staged: $(ls "$STAGE" 2>/dev/null | wc -l) files, $(du -sh "$STAGE" | cut -f1)"
}
if [ "${1:-}" = stage ]; then
    stage
    exit 0
fi

OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT" "$WORK"
LOG=$OUT/gpu_check.log RESULTS=$OUT/results.jsonl
: >"$RESULTS"
exec > >(tee -a "$LOG") 2>&1
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

[ -d .whl ] && stage
if ls "$STAGE"/*.part-000 >/dev/null 2>&1 || ls "$STAGE"/*.whl >/dev/null 2>&1; then
    (
        cd "$STAGE"
        for first in *.part-000; do
            [ -e "$first" ] && cat "${first%.part-000}".part-* >"${first%.part-000}"
        done
    )
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$STAGE"/*.whl ||
        echo "warning: installing the staged wheels failed"
fi
export PYTHONPATH=$ROOT:$ROOT/serve:$SITE${PYTHONPATH:+:$PYTHONPATH}

has() { "$PY" -c "import $1" 2>/dev/null; }
ort_cuda() {  # the CUDA provider actually starts on this artifact (listing it is not enough)
    "$PY" -c "from gala_serve.model import Model; Model('$1', 'cuda')" >/dev/null 2>&1
}
step() {  # step NAME SECONDS COMMAND...: run, log, keep the last JSON line
    local name=$1 seconds=$2
    shift 2
    echo "=== $name: $*"
    local start=$SECONDS
    timeout "$seconds" "$@" | tee "$WORK/$name.out"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
    local last
    last=$(grep '^{' "$WORK/$name.out" | tail -1)
    echo "{\"check\": \"$name\", \"exit\": $rc${last:+, \"result\": $last}}" >>"$RESULTS"
}

echo "=== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "accelerate", "onnxruntime", "nvidia.dali", "deepspeed", "webdataset"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except ImportError as err:
        print(name, "MISSING", err)
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF

LOADER=torch
has nvidia.dali && LOADER=dali
LEAVE_OUT=()  # GPU tests whose packages are missing here, left out and said so
has nvidia.dali || LEAVE_OUT+=("not dali")
"$PY" -c "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers()" \
    2>/dev/null || LEAVE_OUT+=("not cuda_provider")
SELECT=()
if [ ${#LEAVE_OUT[@]} -gt 0 ]; then
    SELECT=(-k "$(printf '%s and ' "${LEAVE_OUT[@]}" | sed 's/ and $//')")
    echo "=== GPU tests left out for missing packages: ${SELECT[1]}"
fi
step tests 300 "$PY" -m pytest -m gpu -q -p no:cacheprovider -rs "${SELECT[@]}" tests

step shards 120 "$PY" -m gala_scale.shards build synthetic --out "$WORK/syn32" --force
step shards224 180 "$PY" -m gala_scale.shards build synthetic --out "$WORK/syn224" \
    --image-size 224 --max-per-class 100 --force
if has nvidia.dali; then
    step loader 240 "$PY" -m gala_scale.bench loader --shards "$WORK/syn224" --preset imagenet
else
    echo "=== loader: skipped (no DALI here; WITH_DALI=1 bash tools/gpu_wheels.sh)"
fi
step train_bench 300 "$PY" -m gala_scale.bench train --shards "$WORK/syn32" --loader "$LOADER" \
    --epochs "${BENCH_EPOCHS:-3}" --passes "${BENCH_PASSES:-2}"

rm -rf "$WORK/r32"
step train 300 "$PY" -m gala_scale.train --config configs/quickstart.yaml \
    run_dir="$WORK/r32" data.shards="$WORK/syn32" model.name=resnet32 \
    train.epochs="${TRAIN_EPOCHS:-5}" data.loader="$LOADER"
cp "$WORK/r32/results.json" "$OUT/train_results.json" 2>/dev/null
cp "$WORK/r32/ranks/rank0.json" "$OUT/train_rank0.json" 2>/dev/null
step export 180 "$PY" -m gala_scale.export --run "$WORK/r32"
if ort_cuda "$WORK/r32/export"; then
    step serve_bench 420 "$PY" -m gala_serve.bench --artifact "$WORK/r32/export" --providers cuda
else
    echo "=== serve_bench: the CUDA provider does not start here; measuring the CPU provider"
    step serve_bench_cpu 420 "$PY" -m gala_serve.bench --artifact "$WORK/r32/export" \
        --providers cpu
fi
echo "=== done: $OUT"
