"""Datasets of (image, caption, label) triples.

Every dataset item is ``(image, text, label)``: ``image`` a uint8 tensor ``[3, H, W]`` (RGB, 0..255),
``text`` a str (possibly empty), ``label`` an int in ``range(len(dataset.classes))``. Images stay uint8
until :class:`mmfast.data.Collator` turns a batch into floats, which keeps DataLoader workers cheap.

Every dataset also has ``classes`` (list[str]), ``texts`` (list[str]) and ``labels`` (int64 ``[N]``), so a
vocabulary can be built with ``Vocab.build(dataset.texts)`` without decoding any image.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["BuiltinShapes", "Cifar10Folder", "ManifestDataset", "load_dataset", "load_image", "SPLITS"]

SPLITS = ("train", "val", "test")
Item = tuple[Tensor, str, int]


# --------------------------------------------------------------------------------------------------
# BuiltinShapes
# --------------------------------------------------------------------------------------------------

_SHAPES = ("circle", "square", "triangle", "cross")
_MATERIALS = ("wooden", "metal")
# Synonyms the captions draw from; none of them names a shape, and no distractor hints at a material.
_MATERIAL_WORDS = (
    ("wood", "wooden", "oak", "pine", "timber", "bamboo"),
    ("metal", "metallic", "steel", "iron", "copper", "brass"),
)
_ADJECTIVES = ("nice", "old", "new", "odd", "lovely", "simple", "cheap", "fancy", "clean", "dusty", "plain")
_PLACES = ("on the table", "in the box", "near the window", "on the floor", "at home", "in the garden")
_TEMPLATES = (
    "something made of {m}, {p}.",
    "look! the {m} one is {a}.",
    "{p}: this piece is {m} and quite {a}...",
    "i think it's {m}; {a} too!",
    "is it {m}? yes, {m} -- {a}, and {p}.",
    "a {a} object (made of {m}) {p}",
    "{m}!!!",
    "the picture shows something {a}, made of {m}, {p}.",
)


def _shape_masks(kind: int, dy: Tensor, dx: Tensor, r: Tensor) -> Tensor:
    """Boolean masks [n, S, S] of shape ``kind`` with half-extent ``r`` [n, 1, 1]; dy [n, S, 1], dx [n, 1, S]
    are offsets from each shape's centre."""
    if kind == 0:  # circle
        return dx**2 + dy**2 <= r**2
    if kind == 1:  # axis-aligned square
        return torch.maximum(dx.abs(), dy.abs()) <= 0.85 * r
    if kind == 2:  # triangle, apex up, base at dy = +r
        return (dy <= r) & (dx.abs() <= 0.6 * (dy + r))
    arm = r / 3  # plus-shaped cross
    return ((dx.abs() <= arm) & (dy.abs() <= r)) | ((dy.abs() <= arm) & (dx.abs() <= r))


class BuiltinShapes(Dataset):
    """Procedural shapes with captions, where the label needs both the image and the text.

    Each image (``image_size`` square, RGB uint8) shows one of 4 shapes -- circle, square, triangle,
    cross -- filled with a random colour (one channel >= 160) at a random position and size (half-extent
    22-38 % of the side, always fully inside), over a dark random background (channels <= 70) with
    uniform +-12 pixel noise. The caption says what the object is made of, *wooden* or *metal*, using
    one of six synonyms per material inside a varied sentence with distractor adjectives, places,
    punctuation and random upper/title case (e.g. ``"IS IT STEEL? YES, STEEL -- ODD, AND AT HOME."``).
    Captions never name the shape, and images never show the material.

    ``label = shape * 2 + material`` with ``classes[label]`` like ``"metal triangle"``: 8 classes, exactly
    balanced (each label appears ``size // 8`` or ``size // 8 + 1`` times); shape and material are
    therefore independent and uniform. Best possible accuracy:

    - image only: **50 %** (the shape is known, the material is a fair coin),
    - text only: **25 %** (the material is known, the shape is one of 4),
    - image + text: **100 %**.

    Everything is generated from ``seed`` with a private ``torch.Generator`` (no download, no global
    RNG use), so the same arguments give the same data. Use :meth:`splits` for disjoint train/val/test
    sets.

    Attributes: ``images`` uint8 ``[N, 3, S, S]``, ``texts`` list[str], ``labels`` int64 ``[N]``,
    ``shape_ids`` and ``material_ids`` int64 ``[N]``, ``classes`` list[str].
    """

    shapes = _SHAPES
    materials = _MATERIALS
    material_words = _MATERIAL_WORDS
    classes = [f"{m} {s}" for s in _SHAPES for m in _MATERIALS]

    def __init__(self, size: int = 2000, seed: int = 0, image_size: int = 32):
        if size < 1:
            raise ValueError(f"BuiltinShapes: size must be >= 1, got {size}")
        if image_size < 16:
            raise ValueError(f"BuiltinShapes: image_size must be >= 16 to draw recognisable shapes, got {image_size}")
        g = torch.Generator().manual_seed(seed)
        n_classes = len(self.classes)
        self.labels = torch.randperm(size, generator=g) % n_classes
        self.shape_ids = self.labels // len(_MATERIALS)
        self.material_ids = self.labels % len(_MATERIALS)
        self.images = self._render(self.shape_ids, image_size, g)
        self.texts = self._captions(self.material_ids, g)

    @staticmethod
    def _render(shape_ids: Tensor, s: int, g: torch.Generator) -> Tensor:
        n = shape_ids.numel()
        r = s * (0.22 + 0.16 * torch.rand(n, generator=g))
        cy = r + (s - 1 - 2 * r) * torch.rand(n, generator=g)
        cx = r + (s - 1 - 2 * r) * torch.rand(n, generator=g)
        background = torch.randint(0, 71, (n, 3), generator=g, dtype=torch.int16)
        colour = torch.randint(0, 256, (n, 3), generator=g, dtype=torch.int16)
        bright = torch.randint(0, 3, (n,), generator=g)
        colour[torch.arange(n), bright] = torch.randint(160, 256, (n,), generator=g, dtype=torch.int16)

        grid = torch.arange(s, dtype=torch.float32)
        dy = grid[None, :, None] - cy[:, None, None]  # [n, S, 1]
        dx = grid[None, None, :] - cx[:, None, None]  # [n, 1, S]
        r = r[:, None, None]
        mask = torch.zeros(n, s, s, dtype=torch.bool)
        for kind in range(len(_SHAPES)):  # a loop over shape kinds, each vectorised over its samples
            idx = (shape_ids == kind).nonzero().squeeze(1)
            mask[idx] = _shape_masks(kind, dy[idx], dx[idx], r[idx])
        images = torch.where(mask[:, None], colour[:, :, None, None], background[:, :, None, None])
        images += torch.randint(-12, 13, images.shape, generator=g, dtype=torch.int16)
        return images.clamp_(0, 255).to(torch.uint8)

    @staticmethod
    def _captions(material_ids: Tensor, g: torch.Generator) -> list[str]:
        n = material_ids.numel()

        def draw(k: int) -> list[int]:
            return torch.randint(0, k, (n,), generator=g).tolist()

        templates, words = draw(len(_TEMPLATES)), draw(len(_MATERIAL_WORDS[0]))
        adjectives, places, cases = draw(len(_ADJECTIVES)), draw(len(_PLACES)), draw(6)
        texts = []
        for i, material in enumerate(material_ids.tolist()):
            word = _MATERIAL_WORDS[material][words[i]]
            text = _TEMPLATES[templates[i]].format(m=word, a=_ADJECTIVES[adjectives[i]], p=_PLACES[places[i]])
            case = cases[i]  # 0-2: sentence case, 3: all caps, 4: every word capitalised, 5: shouted material
            if case == 3:
                text = text.upper()
            elif case == 4:
                text = " ".join(w.capitalize() for w in text.split(" "))
            else:
                if case == 5:
                    text = text.replace(word, word.upper())
                text = text[0].upper() + text[1:]
            texts.append(text)
        return texts

    @classmethod
    def splits(
        cls,
        train_size: int = 2000,
        val_size: int = 500,
        test_size: int = 500,
        seed: int = 0,
        image_size: int = 32,
    ) -> tuple[BuiltinShapes, BuiltinShapes, BuiltinShapes]:
        """Disjoint ``(train, val, test)``: consecutive slices of one pool of
        ``train_size + val_size + test_size`` samples generated from ``seed``."""
        sizes = (train_size, val_size, test_size)
        if min(sizes) < 1:
            raise ValueError(f"BuiltinShapes.splits: sizes must be >= 1, got {sizes}")
        pool = cls(sum(sizes), seed=seed, image_size=image_size)
        bounds = np.cumsum((0,) + sizes).tolist()
        return tuple(pool._slice(a, b) for a, b in zip(bounds[:-1], bounds[1:]))  # type: ignore[return-value]

    def _slice(self, start: int, stop: int) -> BuiltinShapes:
        """Samples ``start:stop`` as a new dataset sharing this one's storage."""
        part = object.__new__(type(self))
        for name in ("images", "labels", "shape_ids", "material_ids", "texts"):
            setattr(part, name, getattr(self, name)[start:stop])
        return part

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> Item:
        return self.images[i], self.texts[i], int(self.labels[i])


# --------------------------------------------------------------------------------------------------
# CIFAR-10 (python version) from a local folder
# --------------------------------------------------------------------------------------------------

_CIFAR_LAYOUT = "the extracted 'cifar-10-batches-py' folder (data_batch_1..5, test_batch, batches.meta)"


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays: a pickle can run arbitrary code, this one cannot."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # bytes written by Python 3 with protocol 2
    }

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("numpy.core"):  # files written by numpy 1.x (the official archive)
            module = "numpy._core" + module[len("numpy.core") :]
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _load_cifar_pickle(path: Path, keys: Sequence[bytes]) -> dict[bytes, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 file not found: {path} (expected {_CIFAR_LAYOUT})")
    try:
        with open(path, "rb") as f:
            data = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as e:  # unpickling raises many types on garbage input
        raise ValueError(f"{path}: corrupt CIFAR-10 file, expected a pickled dict ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(data).__name__}")
    # Files written by Python 3 may have str keys instead of the original bytes keys.
    data = {k.encode() if isinstance(k, str) else k: v for k, v in data.items()}
    missing = [k.decode() for k in keys if k not in data]
    if missing:
        raise ValueError(f"{path}: CIFAR-10 file lacks keys {missing}")
    return data


class Cifar10Folder(Dataset):
    """CIFAR-10 from the "python version" files in a local folder (never downloads).

    ``root`` holds ``data_batch_1`` .. ``data_batch_5`` (train, 50000 images), ``test_batch`` (test,
    10000) and ``batches.meta``, as extracted from ``cifar-10-python.tar.gz``. Each batch is a pickled
    dict with ``b"data"`` uint8 ``[N, 3072]`` (1024 red, then green, then blue values, rows top to bottom)
    and ``b"labels"``; ``batches.meta`` has ``b"label_names"``. Pickles are loaded with an unpickler that
    only rebuilds numpy arrays, so a tampered file cannot run code.

    ``captions``: optional JSONL file, one object per line, ``{"index": i, "text": "..."}``, where ``i``
    is the image's position in this split (train: ``data_batch_1`` first). Images without a caption, or
    all of them when ``captions`` is None, get the empty string ``""``: the text branch then sees
    zero-length sequences and the model relies on the images alone.

    Missing folder or file, corrupt pickle or malformed captions raise FileNotFoundError/ValueError naming
    the file (and line) and what was expected.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        train: bool = True,
        captions: str | os.PathLike[str] | None = None,
    ):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"CIFAR-10 folder not found: {root} (expected {_CIFAR_LAYOUT})")
        meta = _load_cifar_pickle(root / "batches.meta", [b"label_names"])
        self.classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"label_names"]]
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        images, labels = [], []
        for name in names:
            path = root / name
            batch = _load_cifar_pickle(path, [b"data", b"labels"])
            data, y = batch[b"data"], np.asarray(batch[b"labels"])
            if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape[1:] == (3072,)):
                got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
                raise ValueError(f"{path}: expected b'data' to be a uint8 array [N, 3072], got {got}")
            if y.shape != (len(data),) or not np.issubdtype(y.dtype, np.integer):
                raise ValueError(f"{path}: expected {len(data)} integer labels, got {y.dtype} {y.shape}")
            if len(y) and (y.min() < 0 or y.max() >= len(self.classes)):
                raise ValueError(f"{path}: labels must be in [0, {len(self.classes)}), got {y.min()}..{y.max()}")
            images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
            labels.append(torch.from_numpy(y.astype(np.int64)))
        self.images = torch.cat(images)
        self.labels = torch.cat(labels)
        self.texts = [""] * len(self.labels)
        if captions is not None:
            self._read_captions(Path(captions))

    def _read_captions(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f'captions file not found: {path} (expected JSONL of {{"index": i, "text": ...}})')
        seen: set[int] = set()
        for lineno, line in _read_lines(path):
            obj = _parse_json_line(path, lineno, line)
            index, text = obj.get("index"), obj.get("text")
            if not (isinstance(index, int) and not isinstance(index, bool) and isinstance(text, str)):
                raise ValueError(f'{path}:{lineno}: expected {{"index": int, "text": str}}, got {line.strip()[:80]}')
            if not 0 <= index < len(self.texts):
                raise ValueError(f"{path}:{lineno}: index {index} out of range for {len(self.texts)} images")
            if index in seen:
                raise ValueError(f"{path}:{lineno}: duplicate caption for index {index}")
            seen.add(index)
            self.texts[index] = text

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> Item:
        return self.images[i], self.texts[i], int(self.labels[i])


# --------------------------------------------------------------------------------------------------
# Manifest (JSONL / CSV) of image files
# --------------------------------------------------------------------------------------------------


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """Non-blank lines of a UTF-8 text file with their 1-based line numbers."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: expected a UTF-8 text file ({e})") from e
    return [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]


def _parse_json_line(path: Path, lineno: int, line: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: malformed line, invalid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}:{lineno}: malformed line, expected a JSON object, got {type(obj).__name__}")
    return obj


def _as_index(label: str | int) -> int | None:
    """The label as a class index if it is one (an int, or a string of ASCII digits), else None."""
    if isinstance(label, int):
        return label
    return int(label) if label.isascii() and label.isdigit() else None


def load_image(path: str | os.PathLike[str], image_size: int, where: str = "") -> Tensor:
    """Decode an image file with Pillow into uint8 RGB ``[3, image_size, image_size]`` (bilinear resize).

    A missing file raises FileNotFoundError, an undecodable one ValueError; both name ``path`` (and
    ``where``, e.g. the manifest line that refers to it).
    """
    path = Path(path)
    size = (image_size, image_size)
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")  # decodes the whole file, so truncation is caught here
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: image file not found{where}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot decode image{where}: {e}") from e
    if rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


class ManifestDataset(Dataset):
    """Images listed in a manifest file, one row per sample with the fields ``image``, ``text``, ``label``.

    Format by extension: ``.jsonl`` (one JSON object per line) or ``.csv`` (a header row naming the
    columns, in any order; extra columns are ignored). Blank lines are skipped. ``image`` is a path
    relative to the manifest's folder (absolute paths work too); ``text`` a string, possibly empty.

    ``label`` is a class name or an integer index (a JSON int, or a string of digits):

    - with ``classes``, a name must be in ``classes`` (a name wins over an index reading) and an index
      must be below ``len(classes)``;
    - without, either every label is an index (``classes`` becomes ``["0", ..., str(max)]``) or every
      label is a name (``classes`` becomes the sorted distinct names); mixing both is an error.

    ``split`` (None = every row, or ``"train"``/``"val"``/``"test"``) keeps a deterministic 80/10/10 part
    of the rows, chosen by ``crc32(image path as written) % 10`` (0: test, 1: val, else train): stable
    across runs and machines, and a row stays in its split when rows are added. Classes are inferred
    from all rows, so every split shares one label mapping.

    The manifest is parsed and validated on construction: an empty manifest, a malformed line (bad JSON,
    missing column, wrong number of CSV fields), a missing label or an unknown label raise ValueError
    ``"<manifest>:<line>: ..."``. Images are decoded lazily with Pillow, converted to RGB and resized
    (bilinear, aspect ratio not kept) to ``image_size`` x ``image_size``; a missing image raises
    FileNotFoundError and an undecodable one ValueError, both naming the image and the manifest line.
    :meth:`verify` decodes every image up front.
    """

    COLUMNS = ("image", "text", "label")

    def __init__(
        self,
        path: str | os.PathLike[str],
        classes: Sequence[str] | None = None,
        image_size: int = 32,
        split: str | None = None,
    ):
        self.path = Path(path)
        if image_size < 1:
            raise ValueError(f"ManifestDataset: image_size must be >= 1, got {image_size}")
        if split is not None and split not in SPLITS:
            raise ValueError(f"ManifestDataset: split must be None or one of {SPLITS}, got {split!r}")
        self.image_size = image_size
        if not self.path.is_file():
            raise FileNotFoundError(f"manifest not found: {self.path}")
        suffix = self.path.suffix.lower()
        if suffix == ".jsonl":
            rows = self._parse_jsonl()
        elif suffix == ".csv":
            rows = self._parse_csv()
        else:
            raise ValueError(f"{self.path}: unknown manifest format {suffix!r} (expected .jsonl or .csv)")
        if not rows:
            raise ValueError(f"{self.path}: empty manifest, expected at least one row with {list(self.COLUMNS)}")
        labels = self._resolve_labels(rows, classes)
        keep = [split is None or _split_of(image) == split for _, image, _, _ in rows]
        if not any(keep):
            raise ValueError(f"{self.path}: split {split!r} is empty ({len(rows)} rows in the manifest)")
        self._images = [(image, lineno) for (lineno, image, _, _), k in zip(rows, keep) if k]
        self.texts = [text for (_, _, text, _), k in zip(rows, keep) if k]
        self.labels = torch.tensor([y for y, k in zip(labels, keep) if k], dtype=torch.int64)

    # Each parser returns rows (lineno, image, text, raw label) with the label a non-empty str or an int.
    def _parse_jsonl(self) -> list[tuple[int, str, str, str | int]]:
        rows = []
        for lineno, line in _read_lines(self.path):
            obj = _parse_json_line(self.path, lineno, line)
            rows.append(self._check_row(lineno, obj))
        return rows

    def _parse_csv(self) -> list[tuple[int, str, str, str | int]]:
        try:
            with open(self.path, encoding="utf-8-sig", newline="") as f:
                lines = f.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.path}: expected a UTF-8 text file ({e})") from e
        reader = csv.reader(io.StringIO(lines))
        header, rows = None, []
        lineno = 1  # csv.reader.line_num is the *last* line of a record; report where the record starts
        try:
            for record in reader:
                if record and any(field.strip() for field in record):
                    if header is None:
                        header = [h.strip() for h in record]
                        missing = [c for c in self.COLUMNS if c not in header]
                        if missing:
                            raise ValueError(f"{self.path}:{lineno}: CSV header lacks columns {missing} (got {header})")
                    elif len(record) != len(header):
                        raise ValueError(
                            f"{self.path}:{lineno}: malformed line, expected {len(header)} fields, got {len(record)}"
                        )
                    else:
                        rows.append(self._check_row(lineno, dict(zip(header, record))))
                lineno = reader.line_num + 1
        except csv.Error as e:
            raise ValueError(f"{self.path}:{reader.line_num}: malformed line ({e})") from None
        return rows

    def _check_row(self, lineno: int, row: dict[str, Any]) -> tuple[int, str, str, str | int]:
        where = f"{self.path}:{lineno}"
        for column in ("image", "text"):
            if column not in row:
                raise ValueError(f"{where}: malformed line, missing column {column!r}")
            if not isinstance(row[column], str):
                raise ValueError(f"{where}: malformed line, {column!r} must be a string, got {row[column]!r}")
        if not row["image"].strip():
            raise ValueError(f"{where}: malformed line, empty 'image' path")
        label = row.get("label")
        if isinstance(label, str):
            label = label.strip()
        if label is None or label == "":
            raise ValueError(f"{where}: missing label")
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise ValueError(f"{where}: label must be a class name or an integer index, got {label!r}")
        return lineno, row["image"].strip(), row["text"], label

    def _resolve_labels(self, rows: list[tuple[int, str, str, str | int]], classes: Sequence[str] | None) -> list[int]:
        if classes is not None:
            self.classes = list(classes)
            position = {name: i for i, name in enumerate(self.classes)}
            labels = []
            for lineno, _, _, raw in rows:
                index = position.get(raw) if isinstance(raw, str) else None
                if index is None:
                    index = _as_index(raw)
                if index is None or not 0 <= index < len(self.classes):
                    raise ValueError(
                        f"{self.path}:{lineno}: unknown label {raw!r} "
                        f"(expected one of {self.classes} or an index below {len(self.classes)})"
                    )
                labels.append(index)
            return labels
        indices = [_as_index(raw) for _, _, _, raw in rows]
        first_is_index = indices[0] is not None
        for (lineno, _, _, raw), index in zip(rows, indices):
            if (index is not None) != first_is_index:
                kind, first_kind = ("a class name", "an index") if first_is_index else ("an index", "a class name")
                raise ValueError(
                    f"{self.path}:{lineno}: label {raw!r} is {kind} but the first label ({rows[0][3]!r}) is "
                    f"{first_kind}; pass classes= to mix names and indices"
                )
        if first_is_index:
            labels = [int(i) for i in indices]  # type: ignore[arg-type]
            if min(labels) < 0:
                lineno = rows[labels.index(min(labels))][0]
                raise ValueError(f"{self.path}:{lineno}: negative label {min(labels)}")
            self.classes = [str(i) for i in range(max(labels) + 1)]
            return labels
        self.classes = sorted({str(raw) for _, _, _, raw in rows})
        position = {name: i for i, name in enumerate(self.classes)}
        return [position[str(raw)] for _, _, _, raw in rows]

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> Item:
        return self._load_image(i), self.texts[i], int(self.labels[i])

    def _load_image(self, i: int) -> Tensor:
        image, lineno = self._images[i]
        return load_image(self.path.parent / image, self.image_size, f" (referenced by {self.path}:{lineno})")

    def verify(self) -> None:
        """Decode every image; raise ValueError listing each missing or undecodable one (with the manifest
        line) if any fails."""
        errors = []
        for i in range(len(self)):
            try:
                self._load_image(i)
            except (FileNotFoundError, ValueError) as e:
                errors.append(str(e))
        if errors:
            shown = "\n  ".join(errors[:20]) + ("\n  ..." if len(errors) > 20 else "")
            raise ValueError(f"{self.path}: {len(errors)} of {len(self)} images failed to load:\n  {shown}")


def _split_of(image: str) -> str:
    bucket = zlib.crc32(image.encode("utf-8")) % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


# --------------------------------------------------------------------------------------------------
# load_dataset
# --------------------------------------------------------------------------------------------------

_SPEC_FORMS = '"builtin", "cifar10:DIR", "manifest:FILE"'


def load_dataset(spec: str, split: str, **kw: Any) -> Dataset:
    """Build a dataset from a spec string.

    - ``"builtin"``: :class:`BuiltinShapes` via :meth:`BuiltinShapes.splits`; ``kw`` may set
      ``train_size``, ``val_size``, ``test_size``, ``seed``, ``image_size``. Splits are disjoint.
    - ``"cifar10:DIR"``: :class:`Cifar10Folder` on ``DIR``; ``"train"`` reads the five training batches,
      ``"val"`` and ``"test"`` both read ``test_batch`` (CIFAR-10 defines no validation set). ``kw``:
      ``captions``.
    - ``"manifest:FILE"``: :class:`ManifestDataset` on ``FILE`` with its deterministic 80/10/10
      ``split``; ``kw``: ``classes``, ``image_size``.

    ``split`` is one of ``"train"``, ``"val"``, ``"test"``. An unknown spec raises ValueError listing the
    valid forms.
    """
    if split not in SPLITS:
        raise ValueError(f"load_dataset: split must be one of {SPLITS}, got {split!r}")
    kind, _, arg = spec.partition(":")
    if kind == "builtin" and not arg:
        return BuiltinShapes.splits(**kw)[SPLITS.index(split)]
    if kind == "cifar10" and arg:
        return Cifar10Folder(arg, train=split == "train", **kw)
    if kind == "manifest" and arg:
        return ManifestDataset(arg, split=split, **kw)
    raise ValueError(f"load_dataset: unknown dataset spec {spec!r}, expected one of {_SPEC_FORMS}")
