#!/usr/bin/env bash
# Compile and link the CUDA kernels against the CUDA build of torch on a machine without a GPU, import the
# result, and run the op tests on that build (their CUDA cases need a GPU and are not collected here).
# Builds in a scratch copy of the tree, so the CPU build in the checkout is left alone.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "mmfast: nvcc not found at $CUDA_HOME/bin/nvcc (set CUDA_HOME)" >&2
  exit 1
fi
py=$(bash "$here/scripts/bootstrap.sh" cuda)
scratch=$(mktemp -d "${TMPDIR:-/tmp}/mmfast-cuda-build.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
(cd "$here" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$scratch")
cd "$scratch"
echo "mmfast: building the CUDA extension ($($py -c 'import torch; print(torch.__version__)'), $("$CUDA_HOME/bin/nvcc" --version | tail -1))"
FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-2} \
  "$py" setup.py build_ext --inplace > build-cuda.log 2>&1 || { tail -n 80 build-cuda.log; echo "mmfast: CUDA build failed" >&2; exit 1; }
"$py" -c "import mmfast; assert mmfast.with_cuda, 'extension built without CUDA'; print('mmfast: CUDA build imports, arch', mmfast._C.cuda_arch_list)"
# The op-level tests (the pipeline's tests already ran on the CPU build; the kernels are what differ).
if [ "$#" -eq 0 ]; then
  set -- tests/test_concat_linear.py tests/test_conv2d_relu_maxpool2d.py tests/test_lstm.py tests/test_nn.py
fi
"$py" -m pytest -q -p no:cacheprovider "$@"
