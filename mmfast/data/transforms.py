"""Batched image transforms.

Every transform takes and returns a floating tensor ``[B, C, H, W]`` (C is 3 for RGB) on any device, and
works on the whole batch at once, so it can run on the GPU after the batch is moved there. Output dtype
equals input dtype (float32, float16, bfloat16, float64).

Random transforms draw their random numbers on the CPU, from ``generator`` if given or else from torch's
default CPU generator, and only then move them to the images' device: the same seed gives the same
augmentation on every device, and ``torch.manual_seed`` makes a run reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "to_float",
    "Resize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomRotation",
    "Normalize",
    "Compose",
    "default_train_transform",
    "default_eval_transform",
]

Size = int | tuple[int, int]


def _pair(size: Size, name: str) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h < 1 or w < 1:
        raise ValueError(f"{name}: size must be positive, got {size}")
    return int(h), int(w)


def _check_images(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        desc = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{name}: expected a floating tensor [B, C, H, W] (use to_float for uint8), got {desc}")


def _sampling_dtype(x: Tensor) -> torch.dtype:
    # Interpolation runs in float32 for half/bfloat16 input: the CPU antialias kernels lack those dtypes, and
    # an 8-bit mantissa cannot address sampling positions precisely enough.
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def to_float(images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 images ``[..., H, W]`` in 0..255 -> ``dtype`` in [0, 1] (same shape and device)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"to_float: expected uint8 images, got {images.dtype}")
    return images.to(dtype).div_(255)


class Resize:
    """Bilinear resize of ``[B, C, H, W]`` to ``[B, C, *size]`` (antialiased when shrinking)."""

    def __init__(self, size: Size):
        self.size = _pair(size, "Resize")

    def __call__(self, x: Tensor) -> Tensor:
        _check_images(x, "Resize")
        if tuple(x.shape[-2:]) == self.size:
            return x
        shrink = x.shape[-2] > self.size[0] or x.shape[-1] > self.size[1]
        out = F.interpolate(
            x.to(_sampling_dtype(x)), size=self.size, mode="bilinear", align_corners=False, antialias=shrink
        )
        return out.to(x.dtype)

    def __repr__(self) -> str:
        return f"Resize(size={self.size})"


class RandomCrop:
    """Zero-pad each side by ``padding`` pixels, then cut a ``size`` window at an independent random
    offset per sample: ``[B, C, H, W]`` -> ``[B, C, *size]``."""

    def __init__(self, size: Size, padding: int = 0, generator: torch.Generator | None = None):
        if padding < 0:
            raise ValueError(f"RandomCrop: padding must be >= 0, got {padding}")
        self.size = _pair(size, "RandomCrop")
        self.padding = padding
        self.generator = generator

    def __call__(self, x: Tensor) -> Tensor:
        _check_images(x, "RandomCrop")
        if self.padding:
            x = F.pad(x, [self.padding] * 4)
        b, c, h, w = x.shape
        ch, cw = self.size
        if ch > h or cw > w:
            raise ValueError(f"RandomCrop: crop {self.size} larger than the padded image {(h, w)}")
        top = torch.randint(0, h - ch + 1, (b,), generator=self.generator).to(x.device)
        left = torch.randint(0, w - cw + 1, (b,), generator=self.generator).to(x.device)
        rows = top[:, None] + torch.arange(ch, device=x.device)  # [B, ch]
        cols = left[:, None] + torch.arange(cw, device=x.device)  # [B, cw]
        # Advanced indexing broadcasts to [B, C, ch, cw]: one gather for the whole batch.
        return x[
            torch.arange(b, device=x.device)[:, None, None, None],
            torch.arange(c, device=x.device)[None, :, None, None],
            rows[:, None, :, None],
            cols[:, None, None, :],
        ]

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size}, padding={self.padding})"


class RandomHorizontalFlip:
    """Mirror each sample left-right with probability ``p``, independently per sample."""

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHorizontalFlip: p must be in [0, 1], got {p}")
        self.p = p
        self.generator = generator

    def __call__(self, x: Tensor) -> Tensor:
        _check_images(x, "RandomHorizontalFlip")
        flip = torch.rand(x.shape[0], generator=self.generator) < self.p
        return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomRotation:
    """Rotate each sample about its centre by an angle drawn uniformly from ``degrees`` (a number ``d``
    means ``[-d, d]``); positive angles turn the picture counter-clockwise as displayed. Bilinear
    sampling; pixels that come from outside the image are zero. ``[B, C, H, W]`` -> same shape."""

    def __init__(self, degrees: float | tuple[float, float], generator: torch.Generator | None = None):
        lo, hi = (-abs(degrees), abs(degrees)) if isinstance(degrees, (int, float)) else degrees
        if lo > hi:
            raise ValueError(f"RandomRotation: degrees range ({lo}, {hi}) is empty")
        self.degrees = (float(lo), float(hi))
        self.generator = generator

    def __call__(self, x: Tensor) -> Tensor:
        _check_images(x, "RandomRotation")
        b, _, h, w = x.shape
        lo, hi = self.degrees
        angle = (lo + (hi - lo) * torch.rand(b, generator=self.generator, dtype=torch.float64)) * (math.pi / 180)
        cos, sin = angle.cos(), angle.sin()
        # affine_grid maps *output* to *input* positions in [-1, 1] coordinates; the H/W ratios undo the
        # normalisation so that non-square images turn rigidly instead of shearing.
        theta = torch.stack(
            [
                torch.stack([cos, -sin * (h / w), torch.zeros_like(cos)], 1),
                torch.stack([sin * (w / h), cos, torch.zeros_like(cos)], 1),
            ],
            1,
        )  # [B, 2, 3]
        dtype = _sampling_dtype(x)
        grid = F.affine_grid(theta.to(x.device, dtype), [b, x.shape[1], h, w], align_corners=False)
        out = F.grid_sample(x.to(dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return out.to(x.dtype)

    def __repr__(self) -> str:
        return f"RandomRotation(degrees={self.degrees})"


class Normalize:
    """``(x - mean) / std`` per channel; ``mean`` and ``std`` have one value per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float64).reshape(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float64).reshape(-1, 1, 1)
        if self.mean.shape != self.std.shape:
            raise ValueError(f"Normalize: mean has {self.mean.numel()} values but std has {self.std.numel()}")
        if (self.std == 0).any():
            raise ValueError(f"Normalize: std must be non-zero, got {list(std)}")

    def __call__(self, x: Tensor) -> Tensor:
        _check_images(x, "Normalize")
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"Normalize: statistics for {self.mean.shape[0]} channels, images have {x.shape[1]}")
        return (x - self.mean.to(x.device, x.dtype)) / self.std.to(x.device, x.dtype)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


class Compose:
    """Apply ``transforms`` in order."""

    def __init__(self, transforms: Sequence[Callable[[Tensor], Tensor]]):
        self.transforms = list(transforms)

    def __call__(self, x: Tensor) -> Tensor:
        for t in self.transforms:
            x = t(x)
        return x

    def __repr__(self) -> str:
        return "Compose([" + ", ".join(map(repr, self.transforms)) + "])"


def default_train_transform(
    image_size: Size,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    generator: torch.Generator | None = None,
) -> Compose:
    """Resize, random crop with 1/8 zero padding, random horizontal flip, normalize."""
    h, w = _pair(image_size, "default_train_transform")
    return Compose(
        [
            Resize((h, w)),
            RandomCrop((h, w), padding=max(1, min(h, w) // 8), generator=generator),
            RandomHorizontalFlip(generator=generator),
            Normalize(mean, std),
        ]
    )


def default_eval_transform(
    image_size: Size,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
) -> Compose:
    """Resize and normalize (deterministic)."""
    return Compose([Resize(image_size), Normalize(mean, std)])
