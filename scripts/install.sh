#!/usr/bin/env bash
# Set up (or reuse) the CPU environment and build mmfast into it (`pip install --no-build-isolation -e .`),
# skipping the build when the C++ sources and build files are unchanged since the last one; print the python.
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(bash scripts/bootstrap.sh cpu)
sources=$(find csrc -type f | sort; echo setup.py pyproject.toml)
digest=$(cat $sources | sha1sum | cut -c1-16)
stamp="build/.installed-$digest-$(echo "$py" | sha1sum | cut -c1-8)"
if [ ! -f "$stamp" ] || ! "$py" -c "import mmfast" 2>/dev/null; then
  echo "mmfast: building the extension (CPU; a few minutes)" >&2
  MAX_JOBS=${MAX_JOBS:-2} "$py" -m pip install -q --disable-pip-version-check --no-build-isolation -e . >&2
  mkdir -p build && rm -f build/.installed-* && touch "$stamp"
fi
echo "$py"
