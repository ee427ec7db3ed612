#!/usr/bin/env bash
# The prepared GPU run: every check that needs an NVIDIA GPU, in one command of under 10 minutes
# (step budgets sum to 480 s), most important first, each step's JSON line appended to
# $OUT/results.jsonl as soon as it ends.
#
#   bash tools/gpu_stage.sh                 # here, first: .gpu/ (small wheels, CIFAR-10-LT shards)
#   bash tools/gpu_check.sh                 # there, carrying .gpu; results in $OUT (runs/gpu_check)
#   bash tools/gpu_check.sh stage           # there, carrying .gpu-big/pNN: keep those wheel parts
#   PYTHON=.venv/bin/python bash tools/gpu_check.sh   # dry run on a CPU: every step, token size
#
# Steps (budget in seconds):
#   gpu_tests     50  the GPU-marked tests (those whose packages are missing are left out, said)
#   step_bench    55  ResNet-50, 224 px, bf16: the trainer's step under DDP and DeepSpeed ZeRO-2,
#                     20 timed steps each; images/s and peak memory (python -m gala_scale.bench step)
#   paper_budget 270  CIFAR-10-LT IF 100, ResNet-32, the paper's recipe, 200 epochs: CE, balanced
#                     softmax, GALA reference, GALA paper, GALA reference on the authors'
#                     accumulation (loss.ledger=sum_of_sums) and the paper's competitors LDAM-DRW
#                     and GCL (cosine head) as seven concurrent processes on the GPU (two loader
#                     workers each: 21 processes on 16 cores), evaluating every 20 epochs; at the
#                     budget each checkpoints and stops.
#                     $OUT gets paper_summary.json (epochs done, val and test results of each) and
#                     paper_runs.tar.gz.N (the runs' last checkpoints and metrics): put those in
#                     .gpu/ and the next GPU run continues the same runs towards 200 epochs.
#   loader        45  DALI mixed decoding of 224 px JPEGs against the torch fallback, all cores
#   serve         60  export a paper run (its last checkpoint) to ONNX and benchmark the server
#                     with the CUDA execution provider (the CPU provider when it cannot start)
#
# Uses the python3 on PATH (PYTHON to override) with this checkout on PYTHONPATH, so an image that
# already has torch and accelerate needs only what it lacks; .gpu/wheels and staged parts are
# installed into /tmp/gala-site, distributions the image already has left alone. Without CUDA
# (the dry run) each step runs at a token size: a tiny model, 32 px images, one epoch of a small
# synthetic set.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STAGE=/tmp/gala-wheels SITE=/tmp/gala-site WORK=${WORK:-/tmp/gala-gpu-check}

if [ "${1:-}" = stage ]; then
    mkdir -p "$STAGE"
    find .gpu-big -type f -exec cp {} "$STAGE/" \; 2>/dev/null
    echo "staged: $(ls "$STAGE" 2>/dev/null | wc -l) files, $(du -sh "$STAGE" | cut -f1)"
    exit 0
fi

OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_check.log RESULTS=$OUT/results.jsonl
: >"$RESULTS"
exec > >(tee -a "$LOG") 2>&1
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

missing() {  # the wheels among $@ whose distribution this Python lacks
    "$PY" - "$@" <<'EOF'
import importlib.metadata as md, re, sys
for path in sys.argv[1:]:
    name = re.sub(r"[-_.]+", "-", path.rsplit("/", 1)[-1].split("-")[0]).lower()
    try:
        md.version(name)
    except md.PackageNotFoundError:
        print(path)
EOF
}
(cd "$STAGE" 2>/dev/null && for first in *.part-000; do
    [ -e "$first" ] && cat "${first%.part-000}".part-* >"${first%.part-000}"
done)
shopt -s nullglob
wheels=$(missing .gpu/wheels/*.whl "$STAGE"/*.whl)
shopt -u nullglob
if [ -n "$wheels" ]; then
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" $wheels ||
        echo "warning: installing the staged wheels failed"
fi
export PYTHONPATH=$ROOT:$ROOT/serve:$SITE${PYTHONPATH:+:$PYTHONPATH}

has() { "$PY" -c "import $1" 2>/dev/null; }
step() {  # step NAME SECONDS COMMAND...: run within the budget, log, append the result line
    local name=$1 seconds=$2
    shift 2
    echo "=== $name (budget $seconds s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$seconds" "$@" | tee "$WORK/$name.out"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
    local last
    last=$(grep '^{' "$WORK/$name.out" | tail -1)
    echo "{\"check\": \"$name\", \"exit\": $rc, \"seconds\": $((SECONDS - start))${last:+, \"result\": $last}}" >>"$RESULTS"
}
skip() {  # skip NAME WHY: a result line saying why the step did not run
    echo "=== $1: skipped, $2"
    echo "{\"check\": \"$1\", \"skipped\": \"$2\"}" >>"$RESULTS"
}

echo "=== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
"$PY" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "accelerate", "onnxruntime", "nvidia.dali", "deepspeed", "webdataset"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except ImportError as err:
        print(name, "MISSING", err)
EOF
CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
echo "cuda: $CUDA"
if [ "$CUDA" = 1 ]; then  # the real sizes
    STEP=(--model resnet50 --image-size 224 --classes 1000 --batch-size 128 --steps 20 --warmup 5
          --precision bf16)
    PAPER_EPOCHS=${PAPER_EPOCHS:-200} PAPER_WORKERS=2 PAPER_EVAL=20 PAPER_SET=()
    PAPER_LOSSES=ce,balanced_softmax,gala_reference,gala_paper,gala_reference_sos,ldam_drw,gcl
    LOADER_SET=(--image-size 224 --max-per-class 200 --test-per-class 1 --val-per-class 1)
    LOADER_RUN=(--batches 30 --repeats 1)
    SERVE=(--seconds 1 --rounds 2 --levels 1 16 64)
else  # the dry run on a CPU: token sizes
    # fp32 (bf16 matmuls are slow on a CPU, and fp32 lets ZeRO-2's loss be held to DDP's), two
    # processes (gloo), so that DDP and ZeRO-2's partitioning are what runs
    STEP=(--model tiny --image-size 32 --classes 10 --batch-size 16 --steps 3 --warmup 1
          --precision no --processes 2)
    PAPER_EPOCHS=${PAPER_EPOCHS:-1} PAPER_WORKERS=1 PAPER_EVAL=1 PAPER_SET=(--set model.name=tiny)
    PAPER_LOSSES=ce,gala_paper  # the step's plumbing, two concurrent runs: not every loss again
    LOADER_SET=(--image-size 224 --max-per-class 20 --test-per-class 1 --val-per-class 1)
    LOADER_RUN=(--batches 4 --repeats 1 --batch-size 8)
    SERVE=(--seconds 0.5 --rounds 1 --levels 1 --client-procs 1)
fi

# 1. The GPU tests, then the trainer's step on ResNet-50 under both launchers.
ORT_CUDA=0  # onnxruntime-gpu is installed (its CUDA provider is listed)
"$PY" -c "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers()" \
    2>/dev/null && ORT_CUDA=1
LEAVE_OUT=()  # GPU tests whose packages are missing here, left out and said so
has nvidia.dali || LEAVE_OUT+=("not dali")
[ "$ORT_CUDA" = 1 ] || LEAVE_OUT+=("not cuda_provider")
SELECT=()
if [ ${#LEAVE_OUT[@]} -gt 0 ]; then
    SELECT=(-k "$(printf '%s and ' "${LEAVE_OUT[@]}" | sed 's/ and $//')")
    echo "=== GPU tests left out for missing packages: ${SELECT[1]}"
fi
step gpu_tests 50 "$PY" -m pytest -m gpu -q -p no:cacheprovider -rs "${SELECT[@]}" tests
if has deepspeed; then
    step step_bench 55 "$PY" -m gala_scale.bench step "${STEP[@]}" --launchers ddp zero2
else
    step step_bench 55 "$PY" -m gala_scale.bench step "${STEP[@]}" --launchers ddp
fi

# 2. The paper's budget: seven concurrent runs, stopped (checkpointed) at the budget.
PAPER=$WORK/paper SHARDS=$WORK/cifar10_lt_if100
if [ "$CUDA" = 0 ]; then  # the dry run: a small synthetic set in its place
    "$PY" -m gala_scale.shards build synthetic --out "$SHARDS" --max-per-class 40 \
        --imbalance-factor 10 --val-per-class 4 --test-per-class 10 --workers 1 --force >/dev/null
elif [ -f .gpu/cifar10_lt_if100.tar.gz ] && [ ! -d "$SHARDS" ]; then
    tar -xzf .gpu/cifar10_lt_if100.tar.gz -C "$WORK"
fi
if [ -f .gpu/paper_runs.tar.gz.0 ] && [ ! -d "$PAPER" ]; then
    mkdir -p "$PAPER" && cat .gpu/paper_runs.tar.gz.* | tar -xz -C "$PAPER" &&
        echo "=== paper_budget: continuing the runs of .gpu/paper_runs.tar.gz.*"
fi
if [ -d "$SHARDS" ]; then
    step paper_budget 270 "$PY" -m gala_scale.reproduce --config configs/cifar10_lt_if100.yaml \
        --shards "$SHARDS" --losses "$PAPER_LOSSES" --concurrent \
        --time-limit 235 --out "$PAPER" --report "$OUT/paper_results.md" \
        --epochs "$PAPER_EPOCHS" --set train.eval_every="$PAPER_EVAL" \
        --set data.loader=torch --set data.num_workers="$PAPER_WORKERS" --set train.keep_checkpoints=1 \
        "${PAPER_SET[@]}"
    grep '^{' "$WORK/paper_budget.out" | tail -1 >"$OUT/paper_summary.json"
    rm -f "$OUT"/paper_runs.tar.gz.*  # in parts of 15 MiB: what comes back is 16 MiB a file
    (cd "$PAPER" && tar -cz --exclude='*/best' --exclude='*/final' --exclude='*/tensorboard' . |
        split -b 15M -d -a 1 - "$OUT/paper_runs.tar.gz.")
else
    skip paper_budget "no shard set: run tools/gpu_stage.sh here and carry .gpu"
fi

# 3. DALI mixed decoding against the torch fallback at 224 px.
if has nvidia.dali; then
    step loader 45 bash -c "'$PY' -m gala_scale.shards build synthetic --out '$WORK/syn224' \
        ${LOADER_SET[*]} --force >&2 && '$PY' -m gala_scale.bench loader \
        --shards '$WORK/syn224' --preset imagenet ${LOADER_RUN[*]}"
else
    skip loader "no DALI here: WITH_DALI=1 bash tools/gpu_stage.sh, send .gpu-big parts"
fi

# 4. Serving: one paper run exported, then the server with the CUDA provider.
RUN=$(ls -d "$PAPER"/*/gala_*/seed0 2>/dev/null | head -1)  # a GALA run of the paper step
if [ -n "$RUN" ] && has onnxruntime; then
    PROVIDER=cpu
    [ "$CUDA$ORT_CUDA" = 11 ] && PROVIDER=cuda
    step serve 60 bash -c "'$PY' -m gala_scale.export --run '$RUN' --checkpoint last \
        --out '$WORK/export' >&2 && PYTHONPATH='$ROOT/serve/bench:$PYTHONPATH' \
        '$PY' -m gala_serve_bench --artifact '$WORK/export' \
        --providers $PROVIDER ${SERVE[*]}"
else
    skip serve "no paper run to export, or no onnxruntime"
fi
echo "=== done: $OUT"
