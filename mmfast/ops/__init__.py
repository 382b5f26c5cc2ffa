"""The Python face of mmfast's fused ops: public functions, docstrings and fake (meta) kernels."""
from .concat_linear import concat_linear
from .conv2d_relu_maxpool2d import conv2d_relu_maxpool2d
from .lstm import lstm

__all__ = ["concat_linear", "conv2d_relu_maxpool2d", "lstm"]
