"""mmfast: fused C++/CUDA ops and drop-in modules for small multimodal (image + text) classifiers."""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # registers torch.ops.mmfast.* with the dispatcher
from . import ops, reference  # noqa: E402  (ops registers the fake kernels, so _C must come first)
from . import nn  # noqa: E402

__version__: str = _C.__version__
with_cuda: bool = bool(_C.with_cuda)
WITH_CUDA = with_cuda

__all__ = ["ops", "reference", "nn", "with_cuda", "WITH_CUDA", "__version__"]
