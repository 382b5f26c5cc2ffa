"""Turn a list of ``(image, text, label)`` items into one padded :class:`Batch`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .text import Vocab
from .transforms import to_float

__all__ = ["Batch", "Collator"]


class Batch(NamedTuple):
    """One training batch.

    - ``images``  float32 ``[B, 3, H, W]`` in [0, 1] (the collator converts uint8; transforms such as
      :class:`~mmfast.data.Normalize` run afterwards, typically on the device),
    - ``tokens``  int64 ``[B, T]``, right-padded with 0 (``<pad>``), ``T >= 1``,
    - ``lengths`` int64 ``[B]``, real tokens per row (0 for a caption with no tokens),
    - ``labels``  int64 ``[B]``.
    """

    images: Tensor
    tokens: Tensor
    lengths: Tensor
    labels: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Every tensor moved to ``device`` (``non_blocking`` overlaps the copy when memory is pinned)."""
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in self))

    def pin_memory(self) -> Batch:
        """Every tensor in page-locked memory; ``DataLoader(pin_memory=True)`` calls this."""
        return Batch(*(t.pin_memory() for t in self))


class Collator:
    """DataLoader ``collate_fn``: tokenizes and encodes captions with ``vocab``, keeps the first
    ``max_len`` tokens, pads to the longest caption in the batch (at least one column, so a batch of
    empty captions still has ``tokens`` of shape ``[B, 1]``), stacks images and converts them to float.

    Images must all have the same shape (resize them in the dataset, e.g. ``ManifestDataset(image_size=)``).
    For page-locked batches pass ``pin_memory=True`` to the DataLoader, which calls :meth:`Batch.pin_memory`
    in the main process.
    """

    def __init__(self, vocab: Vocab, max_len: int = 32):
        if max_len < 1:
            raise ValueError(f"Collator: max_len must be >= 1, got {max_len}")
        self.vocab = vocab
        self.max_len = max_len

    def __call__(self, items: Sequence[tuple[Tensor, str, int]]) -> Batch:
        if not items:
            raise ValueError("Collator: empty batch")
        images, texts, labels = zip(*items)
        shapes = {tuple(im.shape) for im in images}
        if len(shapes) != 1:
            raise ValueError(f"Collator: images in a batch must share one shape, got {sorted(shapes)}")
        ids = [self.vocab.encode(text)[: self.max_len] for text in texts]
        width = max(1, max(map(len, ids)))
        return Batch(
            images=to_float(torch.stack(images)),
            tokens=torch.tensor([seq + [Vocab.PAD_ID] * (width - len(seq)) for seq in ids], dtype=torch.int64),
            lengths=torch.tensor([len(seq) for seq in ids], dtype=torch.int64),
            labels=torch.tensor(labels, dtype=torch.int64),
        )
