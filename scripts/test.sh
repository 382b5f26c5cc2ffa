#!/usr/bin/env bash
# Set up (or reuse) the CPU environment, build mmfast from source and run the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k lstm`.
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(bash scripts/install.sh)
"$py" -m pytest -q tests "$@"
