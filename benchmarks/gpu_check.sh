#!/usr/bin/env bash
# One call on the GPU machine (see GPU.md): GPU and torch, an in-place CUDA build, the test suite with its CUDA
# cases, the CUDA benchmarks (mmfast next to native PyTorch, same process, same card), then a table.
# Logs and the benchmark JSON go to $OUT, or ./gpu_check_out when OUT is unset.
# Exit status: non-zero if the build or the tests failed; every stage still reports. Stage time limits keep the
# whole run under 8 minutes (build 210 s, tests 120 s per file, about 130 s in all, kernel profile 90 s, benchmarks 150 s); the
# torch.compile baselines, whose compilation alone would take minutes, are left to a longer run.
#   bash benchmarks/gpu_check.sh            (SANITIZE=1 adds compute-sanitizer memcheck and racecheck; NCU=1
#                                            Nsight Compute on mmfast's kernels; TESTS="tests/a.py tests/b.py"
#                                            runs those test files only)
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
# The GPU image sets CXX to /opt/gcc/bin/g++. A _C.so built with it (2026-11-27, H200) crashed (SIGSEGV in
# std::ostream::_M_insert<long>, with libstdc++'s own codecvt symbols defined inside _C.so) on every error message
# that prints a number: two copies of libstdc++'s locale code in one process. Build with the system compiler,
# which links libstdc++ dynamically as torch does, where there is one; MMFAST_KEEP_CXX=1 keeps the image's.
if [ "${MMFAST_KEEP_CXX:-0}" != 1 ] && [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then
  export CC=/usr/bin/gcc CXX=/usr/bin/g++ LDSHARED="/usr/bin/g++ -shared" LDCXXSHARED="/usr/bin/g++ -shared"
fi
echo "compiler: ${CXX:-c++} ($("${CXX:-c++}" --version 2>&1 | head -n 1))"
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
  so=$(ls mmfast/_C*.so | head -n 1)
  echo "libstdc++ internals defined in $so: $(nm -D --defined-only "$so" 2>/dev/null | grep -c codecvt) (0 expected)"
  # An error message that prints numbers: this crashed the process with the image's compiler (see above).
  "$py" -c "
import torch, mmfast
x = torch.randn(2, 3, 8, 8, device='cuda')
try:
    mmfast.ops.conv2d_relu_maxpool2d(x, torch.randn(4, 2, 3, 3, device='cuda'))
except RuntimeError as e:
    print('error messages with numbers: ok')
" 2>&1 | tail -n 2
  echo "== tests (log: $out/tests.log)"
  start=$(date +%s)
  # One pytest process per file, so a crash in one file cannot hide the results of the others; no -x: one GPU
  # run should show every failure. The CUDA files first, then the module-level comparisons.
  : > "$out/tests.log"
  for f in ${TESTS:-$(ls tests/test_*_cuda.py) tests/test_nn.py tests/test_models.py}; do
    name=$(basename "$f" .py)
    timeout -k 10 120 "$py" -X faulthandler -m pytest -q -p no:cacheprovider --maxfail=100 "$f" >> "$out/tests.log" 2>&1
    rc=$?
    [ "$rc" = 0 ] || status=1
    echo "$name: exit $rc $(grep -E '^[0-9]+ (passed|failed)|[0-9]+ (passed|failed|error)' "$out/tests.log" | tail -n 1)"
  done
  grep -E '^(FAILED|ERROR) ' "$out/tests.log" | head -n 40
  echo "tests done ($(( $(date +%s) - start )) s)"

  if [ "${SANITIZE:-0}" = 1 ]; then
    # Opt-in (SANITIZE=1): memcheck and racecheck over every kernel at small shapes, 90 s each at most. Both go to
    # one log: the device returns at most 8 files from $OUT, and SANITIZE=1 with NCU=1 would otherwise make 9.
    sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    : > "$out/sanitize.log"
    for tool in memcheck racecheck; do
      echo "== compute-sanitizer $tool (log: $out/sanitize.log)"
      echo "== $tool" >> "$out/sanitize.log"
      PYTHONPATH=$PWD timeout -k 10 90 "$sanitizer" --tool "$tool" --error-exitcode 3 "$py" benchmarks/sanitize_ops.py \
          >> "$out/sanitize.log" 2>&1
      rc=$?
      [ "$rc" = 0 ] || status=1
      tail -n 3 "$out/sanitize.log"
      echo "$tool exit $rc$([ "$rc" = 124 ] && echo ', timed out')"
    done
  fi

  if [ "${NCU:-0}" = 1 ]; then
    # Opt-in (NCU=1): Nsight Compute on mmfast's own kernels, one fwd+bwd of each op at the GPU shapes; the full
    # report goes to ncu.txt, and a few lines per kernel (duration, throughputs, occupancy, main stalls) here.
    ncu_bin=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
    echo "== Nsight Compute (log: $out/ncu.txt)"
    PYTHONPATH=$PWD timeout -k 10 180 "$ncu_bin" --profile-from-start off --clock-control none -k regex:mmfast \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --log-file "$out/ncu.txt" "$py" benchmarks/kernel_workload.py 2>&1 | tail -n 5
    echo "ncu exit ${PIPESTATUS[0]}"
    grep -E "^  [^ ].*\(([0-9]+, ){2}[0-9]+\)x\(|^ +(Duration|Compute \(SM\) Throughput|Memory Throughput|Achieved Occupancy|Registers Per Thread) |being stalled" \
        "$out/ncu.txt" | sed -E 's/^ +/  /' | cut -c1-200 | head -n 120
  fi

  echo "== kernel profile (log: $out/profile.log)"
  PYTHONPATH=$PWD timeout -k 10 90 "$py" benchmarks/profile_ops.py > "$out/profile.log" 2>&1
  echo "profile exit $?"; grep -E '^(### |\| )' "$out/profile.log"  # case headers and the host-floor table

  echo "== benchmarks (log: $out/bench.log, json: $out/bench.json)"
  start=$(date +%s)
  timeout -k 10 150 "$py" -m pytest benchmarks --benchmark-only -k "cuda and not compile" -q -p no:cacheprovider \
      --benchmark-json="$out/bench.json" > "$out/bench.log" 2>&1
  rc=$?
  tail -n 5 "$out/bench.log"
  echo "benchmarks exit $rc ($(( $(date +%s) - start )) s)"
  "$py" benchmarks/report.py "$out/bench.json" "$card" --png "$out/bench.png"
fi
echo "gpu_check: $([ "$status" = 0 ] && echo PASSED || echo FAILED)"
exit "$status"
