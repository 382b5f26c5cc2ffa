#!/usr/bin/env bash
# One call on the GPU machine (see GPU.md): GPU and torch, an in-place CUDA build, the test suite with its CUDA
# cases, the CUDA benchmarks (mmfast next to native PyTorch, same process, same card), then a table.
# Logs, junit XML and the benchmark JSON go to $OUT, or ./gpu_check_out when OUT is unset.
# Exit status: non-zero if the build or the tests failed; every stage still reports. Stage time limits keep the
# whole run under 8 minutes (build 210 s, tests 170 s, benchmarks 90 s).
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-$PWD/gpu_check_out}
mkdir -p "$out"
py=${PYTHON:-python3}
status=0

echo "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 4
card=$("$py" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" 2>&1 | tail -n 1)
"$py" -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda)" 2>&1 | tail -n 1
echo "card: $card"

echo "== build (log: $out/build.log)"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
start=$(date +%s)
if FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    timeout -k 10 210 "$py" setup.py build_ext --inplace > "$out/build.log" 2>&1; then
  built=1
  echo "build ok ($(( $(date +%s) - start )) s)"
else
  built=0
  status=1
  echo "build FAILED or timed out ($(( $(date +%s) - start )) s); last lines:"
  tail -n 30 "$out/build.log"
fi

if [ "$built" = 1 ]; then
  echo "== tests (log: $out/tests.log, junit: $out/junit.xml)"
  start=$(date +%s)
  # The CUDA test files first and all of them (no -x: one GPU run should show every failure), then the rest.
  timeout -k 10 170 "$py" -m pytest -q -p no:cacheprovider --durations=10 --maxfail=100 \
      $(ls tests/test_*_cuda.py) tests/test_nn.py tests/test_models.py \
      --junitxml="$out/junit.xml" > "$out/tests.log" 2>&1
  rc=$?
  [ "$rc" = 0 ] || status=1
  tail -n 25 "$out/tests.log"
  echo "tests exit $rc ($(( $(date +%s) - start )) s)$([ "$rc" = 124 ] && echo ', timed out')"

  echo "== benchmarks (log: $out/bench.log, json: $out/bench.json)"
  start=$(date +%s)
  timeout -k 10 90 "$py" -m pytest benchmarks --benchmark-only -k cuda -q -p no:cacheprovider \
      --benchmark-json="$out/bench.json" > "$out/bench.log" 2>&1
  rc=$?
  tail -n 5 "$out/bench.log"
  echo "benchmarks exit $rc ($(( $(date +%s) - start )) s)"
  "$py" benchmarks/report.py "$out/bench.json" "$card"
fi
echo "gpu_check: $([ "$status" = 0 ] && echo PASSED || echo FAILED)"
exit "$status"
