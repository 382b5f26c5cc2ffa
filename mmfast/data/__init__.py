"""mmfast.data: from raw images and captions to padded batches.

``dataset item (uint8 image [3, H, W], caption str, label int) --Collator--> Batch --.to(device)-->
transforms (Resize, RandomCrop, ..., Normalize) on the device``.
"""

from .collate import Batch, Collator
from .datasets import SPLITS, BuiltinShapes, Cifar10Folder, ManifestDataset, load_dataset, load_image
from .text import Vocab, tokenize
from .transforms import (
    Compose,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    RandomRotation,
    Resize,
    default_eval_transform,
    default_train_transform,
    to_float,
)

__all__ = [
    "Batch",
    "BuiltinShapes",
    "Cifar10Folder",
    "Collator",
    "Compose",
    "ManifestDataset",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomRotation",
    "Resize",
    "SPLITS",
    "Vocab",
    "default_eval_transform",
    "default_train_transform",
    "load_dataset",
    "load_image",
    "to_float",
    "tokenize",
]
