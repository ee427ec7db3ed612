#!/usr/bin/env bash
# Set up a fresh machine and run the main job end to end: bash tools/quickstart.sh
# (synthetic shards -> CE and GALA with 2 processes -> PN -> ONNX export -> server -> batch
# inference -> a results table and plots under runs/quickstart/). About 3 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/bootstrap.sh
exec "${GALA_VENV:-.venv}/bin/python" -m gala_scale.quickstart "$@"
