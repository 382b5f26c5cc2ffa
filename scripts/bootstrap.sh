#!/usr/bin/env bash
# Create (once) and reuse mmfast's virtual environment, kept outside the clone so fresh clones share it;
# print its python. `cpu` (default): torch 2.13.0 CPU build; `cuda`: torch 2.14.1 CUDA 13.0 build (~5.5 GB).
set -euo pipefail
flavour=${1:-cpu}
case "$flavour" in
  cpu) torch_req="torch==2.13.0" ;;
  cuda) torch_req="torch==2.14.1" ;;
  *) echo "usage: $0 [cpu|cuda]" >&2; exit 2 ;;
esac
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${MMFAST_VENV_ROOT:-$HOME/.cache/mmfast}/venv-$flavour
stamp="$venv/.ready-$torch_req-$(sha1sum "$here/requirements-dev.txt" | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "mmfast: setting up $venv ($torch_req)" >&2
  python3 -m venv "$venv"
  # torch first and pinned, so nothing else can pull a different build of it.
  "$venv/bin/pip" install -q --disable-pip-version-check "$torch_req" >&2
  "$venv/bin/pip" install -q --disable-pip-version-check "$torch_req" -r "$here/requirements-dev.txt" >&2
  rm -f "$venv"/.ready-*
  touch "$stamp"
fi
echo "$venv/bin/python"
