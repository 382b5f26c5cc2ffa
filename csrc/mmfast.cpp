// The extension module. Importing mmfast._C loads this shared object, which runs the dispatcher
// registrations (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL) of every op compiled into it.
#include <torch/extension.h>

#include "common/blas.h"

TORCH_LIBRARY(mmfast, m) {}  // the namespace; each op adds itself with TORCH_LIBRARY_FRAGMENT(mmfast, m)

PYBIND11_MODULE(_C, m) {
  m.doc() = "mmfast: fused conv/LSTM/concat-linear ops registered as torch.ops.mmfast.*";
  m.attr("__version__") = MMFAST_VERSION;
  m.attr("with_cuda") = bool(MMFAST_WITH_CUDA);
  m.attr("cuda_arch_list") = MMFAST_CUDA_ARCH_LIST;
  m.def("cpu_gemm_backend", &mmfast::cpu_gemm_backend,
        "How the CPU kernels run their GEMMs: 'exported' (torch's BLAS, called directly) or 'aten' (at::mm_out)");
}
