#!/usr/bin/env bash
# Here, before a borrowed GPU machine runs tools/gpu_check.sh: put what its image lacks into .gpu/
# (ignored by git), which the run carries and gpu_check.sh installs and unpacks.
#
#   bash tools/gpu_stage.sh                  # .gpu/: the small wheels and the CIFAR-10-LT set (~12 MiB)
#   WITH_ORT=1 WITH_DALI=1 bash tools/gpu_stage.sh   # also .gpu-big/pNN (see below)
#
# .gpu/wheels/: what steps 1-2 of the GPU run need beyond the image (torch, accelerate, numpy,
#   psutil, einops, msgpack, ninja, py-cpuinfo are there): deepspeed (pure Python, built here
#   from its sdist), its hjson and pydantic (with pydantic-core, annotated-types,
#   typing-inspection), webdataset and braceexpand, and gala-serve's HTTP and gRPC stack, at the
#   versions of this checkout's .venv.
# .gpu/cifar10_lt_if100.tar.gz: the paper_budget step's shard set, built from
#   ../shared/data/cifar10 (skipped with a message when that is absent).
# .gpu/paper_runs.tar.gz.N (not made here): copy a previous GPU run's $OUT/paper_runs.tar.gz.*
#   here and its paper_budget step continues those runs instead of starting again.
# .gpu-big/pNN/ (WITH_ORT=1: onnxruntime-gpu; WITH_DALI=1: DALI): too large for one call, split
#   into folders of at most PART_MIB; send each in its own call (carry .gpu-big/pNN) running
#   `bash tools/gpu_check.sh stage`, which keeps them under /tmp/gala-wheels on that machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PY_VERSION=${PY_VERSION:-3.12}
PART_MIB=${PART_MIB:-60}
for ignored in /.gpu/ /.gpu-big/; do
    grep -qx "$ignored" .git/info/exclude 2>/dev/null || echo "$ignored" >>.git/info/exclude
done

version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
download() {  # download DEST NAME==VERSION...: binary wheels for the GPU machine's Python
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: \
        --python-version "$PY_VERSION" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$@"
}

rm -rf .gpu/wheels && mkdir -p .gpu/wheels
small=()
# gala-serve's stack, for the serve step (server, gRPC, the benchmark's httpx client).
serve=(uvicorn h11 click httptools orjson prometheus-client grpcio protobuf tritonclient ml-dtypes
       python-rapidjson urllib3 httpx httpcore anyio sniffio idna certifi tenacity)
for name in webdataset braceexpand hjson pydantic pydantic-core annotated-types typing-inspection \
        "${serve[@]}"; do
    small+=("$name==$(version "$name")")
done
download .gpu/wheels "${small[@]}"
"$PY" -m pip wheel --quiet --no-deps -w .gpu/wheels "deepspeed==$(version deepspeed)"
echo "wheels: $(ls .gpu/wheels | wc -l) in .gpu/wheels, $(du -sh .gpu/wheels | cut -f1)"

cifar=../shared/data/cifar10
if [ -f "$cifar/train.tar" ] && [ -f "$cifar/test.tar" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    tar -xf "$cifar/train.tar" -C "$tmp" && tar -xf "$cifar/test.tar" -C "$tmp"
    "$PY" -m gala_scale.shards build cifar --root "$tmp" --imbalance-factor 100 \
        --out "$tmp/cifar10_lt_if100"
    tar -czf .gpu/cifar10_lt_if100.tar.gz.tmp -C "$tmp" cifar10_lt_if100
    mv .gpu/cifar10_lt_if100.tar.gz.tmp .gpu/cifar10_lt_if100.tar.gz
    echo "shards: .gpu/cifar10_lt_if100.tar.gz, $(du -sh .gpu/cifar10_lt_if100.tar.gz | cut -f1)"
else
    echo "shards: $cifar not here; the paper_budget step will have no data" >&2
fi

big=()
[ "${WITH_ORT:-0}" = 1 ] && big+=("onnxruntime-gpu==$(version onnxruntime-gpu)" flatbuffers)
if [ "${WITH_DALI:-0}" = 1 ]; then
    big+=("nvidia-dali-cuda130==$(version nvidia-dali-cuda130)" nvidia-nvimgcodec-cu13
        nvidia-libnvcomp-cu13 nvtx astunparse gast libcst makefun optree)
fi
[ ${#big[@]} -eq 0 ] && exit 0
pieces=$(mktemp -d)
download "$pieces" "${big[@]}"
(cd "$pieces" && for w in *.whl; do split -b "${PART_MIB}M" -d -a 3 "$w" "$w.part-" && rm "$w"; done)
rm -rf .gpu-big && mkdir -p .gpu-big
part=1 used=0 limit=$((PART_MIB * 1024 * 1024))
for piece in $(ls -S "$pieces"); do  # largest first, packed into folders of <= PART_MIB
    size=$(stat -c %s "$pieces/$piece")
    if [ $((used + size)) -gt "$limit" ] && [ "$used" -gt 0 ]; then
        part=$((part + 1)) used=0
    fi
    folder=.gpu-big/$(printf 'p%02d' "$part")
    mkdir -p "$folder" && mv "$pieces/$piece" "$folder/" && used=$((used + size))
done
rm -rf "$pieces"
du -sh .gpu-big/p* | sed 's/^/  /'
echo "send each .gpu-big/pNN in its own call (carry it) running 'bash tools/gpu_check.sh stage'"
