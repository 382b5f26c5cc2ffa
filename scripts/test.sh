#!/usr/bin/env bash
# Set up (or reuse) the CPU environment, build mmfast from source and run the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k lstm`.
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(bash scripts/bootstrap.sh cpu)
echo "mmfast: building the extension (CPU)"
MAX_JOBS=${MAX_JOBS:-2} "$py" -m pip install -q --disable-pip-version-check --no-build-isolation -e .
"$py" -m pytest -q tests "$@"
