#!/usr/bin/env bash
# Download the wheels a GPU machine's image may lack, for its Python, into .whl/ (ignored by
# git), split into parts of at most PART_MIB so that each fits one upload to a machine that
# takes a limited amount of files a call. tools/gpu_check.sh joins and installs them.
#
#   bash tools/gpu_wheels.sh                 # onnxruntime-gpu and webdataset, for Python 3.12
#   WITH_DALI=1 bash tools/gpu_wheels.sh     # DALI too (about 300 MiB more)
#   PY_VERSION=3.11 PART_MIB=30 bash tools/gpu_wheels.sh
#
# Afterwards .whl/ holds part folders p01, p02, ...; send them one at a time and run
# `bash tools/gpu_check.sh stage` after each (it copies .whl/ to /tmp/gala-wheels there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${PY_VERSION:-3.12}
PART_MIB=${PART_MIB:-60}
wheels=(onnxruntime-gpu==1.31.1 webdataset==1.0.2 braceexpand)
if [ "${WITH_DALI:-0}" = 1 ]; then
    wheels+=(nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13 nvidia-libnvcomp-cu13 nvtx
        astunparse gast libcst makefun optree)
fi

download=$(mktemp -d)
trap 'rm -rf "$download"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$download" "${wheels[@]}"

rm -rf .whl && mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
(cd "$download" && for w in *.whl; do split -b "${PART_MIB}M" -d -a 3 "$w" "$w.part-"; rm "$w"; done)
part=1 used=0 limit=$((PART_MIB * 1024 * 1024))
for piece in $(ls -S "$download"); do  # largest first, packed into folders of <= PART_MIB
    size=$(stat -c %s "$download/$piece")
    if [ $((used + size)) -gt "$limit" ] && [ "$used" -gt 0 ]; then
        part=$((part + 1)) used=0
    fi
    folder=.whl/$(printf 'p%02d' "$part")
    mkdir -p "$folder" && mv "$download/$piece" "$folder/" && used=$((used + size))
done
du -sh .whl/p* | sed 's/^/  /'
echo "send each .whl/pNN (carry it) and run 'bash tools/gpu_check.sh stage', then the checks"
