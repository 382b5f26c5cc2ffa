"""MultimodalClassifier: a CNN image branch, an LSTM text branch and a concatenation-fusion head.

``backend="mmfast"`` builds it from mmfast's fused modules, ``backend="native"`` from torch.nn modules
with the same parameter names, so a state_dict moves between backends unchanged and comparisons are
like for like.
"""
from dataclasses import asdict, dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import nn as mnn
from . import reference

__all__ = ["ModelConfig", "MultimodalClassifier", "BACKENDS"]

BACKENDS = ("mmfast", "native")


@dataclass
class ModelConfig:
    """Architecture of a MultimodalClassifier. The defaults are the seed model (one conv block on 32x32)."""

    num_classes: int
    vocab_size: int
    image_size: int = 32
    in_channels: int = 3
    channels: Tuple[int, ...] = (32,)
    kernel_size: int = 3
    padding: int = 0
    embed_dim: int = 128
    hidden_size: int = 64
    text_proj: Optional[int] = None  # optional linear + ReLU after the LSTM's last hidden state
    fusion_dim: int = 128
    dropout: float = 0.5

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        if self.num_classes < 2 or self.vocab_size < 2 or not self.channels:
            raise ValueError(f"ModelConfig: expected num_classes >= 2, vocab_size >= 2 and at least one conv "
                             f"block, got {self}")

    def image_feature_shape(self) -> Tuple[int, int, int]:
        size = self.image_size
        for _ in self.channels:
            size = (size + 2 * self.padding - self.kernel_size + 1) // 2
            if size < 1:
                raise ValueError(f"ModelConfig: {len(self.channels)} conv blocks shrink a {self.image_size}px "
                                 f"image to nothing (kernel {self.kernel_size}, padding {self.padding})")
        return self.channels[-1], size, size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**d)


class _NativeConvBlock(nn.Conv2d):
    """nn.Conv2d -> ReLU -> MaxPool2d(2), with nn.Conv2d's parameters (the fused block's twin)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(F.relu(super().forward(x)), 2)


class _NativeLSTM(nn.LSTM):
    """nn.LSTM over pack_padded_sequence with lengths (0 allowed), mmfast.nn.LSTM's forward signature."""

    def forward(self, x: Tensor, hx=None, lengths: Optional[Tensor] = None):
        h0, c0 = hx if hx is not None else (None, None)
        b_ih, b_hh = (self.bias_ih_l0, self.bias_hh_l0) if self.bias else (None, None)
        y, h_n, c_n = reference.lstm(x, lengths, h0, c0, self.weight_ih_l0, self.weight_hh_l0, b_ih, b_hh)
        return y, (h_n, c_n)


class _NativeConcatFusion(nn.Linear):
    """cat -> Dropout -> nn.Linear -> ReLU, with nn.Linear's parameters (the fused head's twin)."""

    def __init__(self, in_features, out_features, dropout=0.0, relu=True, bias=True):
        super().__init__(sum(in_features), out_features, bias)
        self.dropout, self.relu = dropout, relu

    def forward(self, *inputs: Tensor) -> Tensor:
        out = super().forward(F.dropout(torch.cat(inputs, 1), self.dropout, self.training))
        return F.relu(out) if self.relu else out


class MultimodalClassifier(nn.Module):
    """Image + text classifier.

    forward(images [B, C, S, S] float, tokens [B, T] int64 (0 = padding), lengths [B] int64) -> logits [B, classes]

    image branch: ``len(channels)`` conv(K, padding) + ReLU + 2x2 max-pool blocks, flattened
    text branch:  embedding (padding_idx 0) -> LSTM with lengths -> last hidden state (-> linear + ReLU)
    fusion head:  concat -> dropout -> linear(fusion_dim) -> ReLU -> linear(num_classes)
    """

    def __init__(self, config: ModelConfig, backend: str = "mmfast"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"MultimodalClassifier: backend must be one of {BACKENDS}, got {backend!r}")
        self.config, self.backend = config, backend
        fused = backend == "mmfast"
        conv_cls = mnn.Conv2dReLUMaxPool2d if fused else _NativeConvBlock
        in_ch = config.in_channels
        blocks = []
        for out_ch in config.channels:
            blocks.append(conv_cls(in_ch, out_ch, config.kernel_size, padding=config.padding))
            in_ch = out_ch
        self.image_blocks = nn.ModuleList(blocks)
        self.embedding = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=0)
        lstm_cls = mnn.LSTM if fused else _NativeLSTM
        self.lstm = lstm_cls(config.embed_dim, config.hidden_size, batch_first=True)
        text_dim = config.hidden_size
        self.text_proj = None
        if config.text_proj:
            self.text_proj = nn.Linear(config.hidden_size, config.text_proj)
            text_dim = config.text_proj
        c, h, w = config.image_feature_shape()
        fusion_cls = mnn.ConcatFusion if fused else _NativeConcatFusion
        self.fusion = fusion_cls([c * h * w, text_dim], config.fusion_dim, dropout=config.dropout, relu=True)
        self.classifier = nn.Linear(config.fusion_dim, config.num_classes)

    def image_features(self, images: Tensor) -> Tensor:
        x = images
        for block in self.image_blocks:
            x = block(x)
        return x.flatten(1)

    def text_features(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        _, (h_n, _) = self.lstm(self.embedding(tokens), lengths=lengths)
        h = h_n[0]
        return F.relu(self.text_proj(h)) if self.text_proj is not None else h

    def forward(self, images: Tensor, tokens: Tensor, lengths: Tensor) -> Tensor:
        fused = self.fusion(self.image_features(images), self.text_features(tokens, lengths))
        return self.classifier(fused)
