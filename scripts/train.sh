#!/usr/bin/env bash
# The main job on a fresh machine: set up, build, and train the multimodal classifier on the built-in data
# (CPU), printing accuracy and throughput. Extra arguments go to `mmfast train`, e.g. `--epochs 10`.
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(bash scripts/install.sh)
"$py" -m mmfast train "$@"
