"""Tests for mmfast.data: tokenizer, vocab, transforms, datasets, collate."""

import csv
import json
import os
import pickle
import re
import zlib
from collections import Counter, OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close
from torch.utils.data import DataLoader

from mmfast.data import (
    Batch,
    BuiltinShapes,
    Cifar10Folder,
    Collator,
    Compose,
    ManifestDataset,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    RandomRotation,
    Resize,
    Vocab,
    default_eval_transform,
    default_train_transform,
    load_dataset,
    to_float,
    tokenize,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ------------------------------------------------------------------------------------------ tokenize


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Hello, WORLD!! It's a Test.", ["hello", "world", "its", "a", "test"]),
        ("", []),
        ("   \t\n ", []),
        ("?!... ,; -- «»", []),
        ("ＨＥＬＬＯ ﬁne", ["hello", "fine"]),  # NFKC: full-width letters, ligature
        ("Straße STRASSE", ["strasse", "strasse"]),  # casefold, not just lower()
        ("我爱猫。", ["我", "爱", "猫"]),
        ("東京タワーへ行く", ["東", "京", "タ", "ワ", "ー", "へ", "行", "く"]),
        ("中文text混合", ["中", "文", "text", "混", "合"]),
        ("I ❤️ cats🐱🐱!", ["i", "❤", "cats", "🐱", "🐱"]),
        ("a+b<c $5", ["a", "+", "b", "<", "c", "$", "5"]),
        ("zero\u200bwidth", ["zerowidth"]),
    ],
)
def test_tokenize(text, expected):
    assert tokenize(text) == expected


def test_tokenize_emoji_presentation_variants_are_one_token():
    assert tokenize("❤️") == tokenize("❤") == ["❤"]


def test_tokenize_very_long_text():
    tokens = tokenize("Word, " * 100_000)
    assert tokens == ["word"] * 100_000


# ------------------------------------------------------------------------------------------ Vocab


def test_vocab_build_orders_by_frequency_then_first_appearance():
    vocab = Vocab.build(["b a", "c A", "B d"])  # a: 2, b: 2 (b first), c: 1, d: 1 (c first)
    assert vocab.tokens == ["<pad>", "<unk>", "b", "a", "c", "d"]
    assert len(vocab) == 6 and "a" in vocab and "A" not in vocab and "e" not in vocab


def test_vocab_min_freq_and_max_size():
    texts = ["b a", "c a", "b d"]
    assert Vocab.build(texts, min_freq=2).tokens == ["<pad>", "<unk>", "b", "a"]
    assert Vocab.build(texts, max_size=3).tokens == ["<pad>", "<unk>", "b"]
    assert Vocab.build(texts, max_size=2).tokens == ["<pad>", "<unk>"]
    with pytest.raises(ValueError, match="max_size"):
        Vocab.build(texts, max_size=1)
    with pytest.raises(ValueError, match="min_freq"):
        Vocab.build(texts, min_freq=0)


def test_vocab_pretokenized_input_and_specials_not_duplicated():
    vocab = Vocab.build([["x", "<pad>", "Y"], ["x"]])
    assert vocab.tokens == ["<pad>", "<unk>", "x", "Y"]  # token lists are taken as they are


def test_vocab_encode_decode():
    vocab = Vocab.build(["the cat sat", "the dog"])
    ids = vocab.encode("The CAT, the zebra!")
    assert ids == [2, 3, 2, Vocab.UNK_ID]
    assert vocab.encode(["cat", "zebra"]) == [3, 1]
    assert vocab.encode("") == [] and vocab.encode("?!") == []
    assert vocab.decode([2, 3, 1, 0]) == ["the", "cat", "<unk>", "<pad>"]
    assert vocab.decode(torch.tensor([4])) == ["sat"]
    with pytest.raises(IndexError, match="out of range"):
        vocab.decode([len(vocab)])
    with pytest.raises(TypeError, match="expected a str or a list"):
        vocab.encode(42)


def test_vocab_save_load_round_trip(tmp_path):
    vocab = Vocab.build(["héllo wörld 🐱", "猫 cat"])
    path = tmp_path / "vocab.json"
    vocab.save(path)
    assert os.listdir(tmp_path) == ["vocab.json"]  # the temporary file was renamed, not left behind
    loaded = Vocab.load(path)
    assert loaded == vocab and loaded.tokens == vocab.tokens
    assert Vocab.from_dict(json.loads(path.read_text(encoding="utf-8"))) == vocab
    vocab2 = Vocab.build(["other"])
    vocab2.save(path)  # overwrite in place
    assert Vocab.load(path) == vocab2


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"format": "mmfast.vocab", "tokens": [', "not a valid vocab file.*JSON"),
        ("[1, 2, 3]", "not a valid vocab file.*format"),
        ('{"format": "mmfast.vocab", "version": 1, "tokens": ["a", "b"]}', "must start with"),
        ('{"format": "mmfast.vocab", "version": 1, "tokens": ["<pad>", "<unk>", "a", "a"]}', "unique"),
        ('{"format": "mmfast.vocab", "version": 7, "tokens": ["<pad>", "<unk>"]}', "version"),
    ],
)
def test_vocab_load_invalid_file(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=match) as info:
        Vocab.load(path)
    assert str(path) in str(info.value)


def test_vocab_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab file not found.*nope.json"):
        Vocab.load(tmp_path / "nope.json")


# ------------------------------------------------------------------------------------------ transforms


def _all_transforms(generator=None):
    return [
        Resize(12),
        Resize((20, 24)),
        RandomCrop(14, padding=2, generator=generator),
        RandomHorizontalFlip(generator=generator),
        RandomRotation(30, generator=generator),
        Normalize((0.5, 0.4, 0.3), (0.2, 0.25, 0.3)),
        default_train_transform(16, generator=generator),
        default_eval_transform(16),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_transforms_keep_dtype_device_and_shape(device, dtype):
    x = torch.rand(5, 3, 16, 18, device=device).to(dtype)
    expected_hw = [(12, 12), (20, 24), (14, 14), (16, 18), (16, 18), (16, 18), (16, 16), (16, 16)]
    for t, hw in zip(_all_transforms(), expected_hw):
        out = t(x)
        assert out.dtype == dtype and out.device == x.device, t
        assert tuple(out.shape) == (5, 3, *hw), t
        assert torch.isfinite(out.float()).all(), t


@pytest.mark.parametrize("device", DEVICES)
def test_random_transforms_reproducible_with_generator(device):
    x = torch.rand(8, 3, 16, 16, device=device)
    runs = [[t(x) for t in _all_transforms(torch.Generator().manual_seed(seed))] for seed in (7, 7, 8)]
    for a, b, c, t in zip(*runs, _all_transforms()):
        assert torch.equal(a, b), t
    assert not all(torch.equal(a, c) for a, c in zip(runs[0][2:5], runs[2][2:5]))


def test_random_transforms_reproducible_with_manual_seed():
    x = torch.rand(8, 3, 16, 16)
    t = default_train_transform(16)
    torch.manual_seed(3)
    a = t(x)
    torch.manual_seed(3)
    assert torch.equal(t(x), a)
    assert not torch.equal(t(x), a)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA")
def test_random_transforms_same_draws_on_cpu_and_cuda():
    x = torch.rand(8, 3, 16, 16)
    cpu_transforms = _all_transforms(torch.Generator().manual_seed(1))
    gpu_transforms = _all_transforms(torch.Generator().manual_seed(1))
    for t_cpu, t_gpu in zip(cpu_transforms, gpu_transforms):
        assert_close(t_gpu(x.cuda()).cpu(), t_cpu(x), atol=1e-5, rtol=1e-5)


def test_flip_pixels():
    x = torch.arange(12, dtype=torch.float32).reshape(2, 1, 2, 3)
    flipped = RandomHorizontalFlip(p=1.0)(x)
    assert flipped.tolist() == [[[[2, 1, 0], [5, 4, 3]]], [[[8, 7, 6], [11, 10, 9]]]]
    assert torch.equal(RandomHorizontalFlip(p=0.0)(x), x)


def test_flip_is_per_sample():
    x = torch.arange(6, dtype=torch.float32).reshape(1, 1, 2, 3).repeat(64, 3, 1, 1)
    out = RandomHorizontalFlip(generator=torch.Generator().manual_seed(0))(x)
    is_flipped = [torch.equal(o, x[0].flip(-1)) for o in out]
    assert all(f or torch.equal(o, x[0]) for f, o in zip(is_flipped, out))
    assert 10 < sum(is_flipped) < 54


def test_crop_pixels_and_per_sample_offsets():
    # values 1..9 in a 3x3 image: a 2x2 window starting at value v is [[v, v+1], [v+3, v+4]]
    x = torch.arange(1, 10, dtype=torch.float32).reshape(1, 1, 3, 3).repeat(32, 2, 1, 1)
    out = RandomCrop(2, generator=torch.Generator().manual_seed(0))(x)
    assert out.shape == (32, 2, 2, 2)
    starts = out[:, 0, 0, 0]
    expected = torch.stack([starts, starts + 1, starts + 3, starts + 4], 1).reshape(32, 1, 2, 2)
    assert torch.equal(out, expected.expand(32, 2, 2, 2))
    assert set(starts.tolist()) == {1.0, 2.0, 4.0, 5.0}  # each sample has its own offset


def test_crop_with_padding_fills_zeros():
    x = torch.ones(64, 3, 2, 2)
    out = RandomCrop(2, padding=1, generator=torch.Generator().manual_seed(0))(x)
    padded = torch.nn.functional.pad(x[0], [1, 1, 1, 1])
    windows = [padded[:, i : i + 2, j : j + 2] for i in range(3) for j in range(3)]
    assert all(any(torch.equal(o, w) for w in windows) for o in out)
    assert len({tuple(o[0].flatten().tolist()) for o in out}) == 9  # every offset occurred
    with pytest.raises(ValueError, match="larger than the padded image"):
        RandomCrop(5, padding=1)(x)


def test_rotation_zero_is_identity():
    x = torch.rand(4, 3, 9, 12)
    assert_close(RandomRotation(0)(x), x, atol=1e-6, rtol=0)


def test_rotation_direction_and_aspect():
    x = torch.rand(2, 3, 7, 7)
    # +90 degrees is counter-clockwise as displayed, like torch.rot90 over (H, W)
    assert_close(RandomRotation((90, 90))(x), torch.rot90(x, 1, (-2, -1)), atol=1e-5, rtol=0)
    y = torch.rand(2, 3, 5, 8)  # non-square: 180 degrees is a point reflection
    assert_close(RandomRotation((180, 180))(y), y.flip(-1, -2), atol=1e-5, rtol=0)
    # non-square, 90 degrees: a centred horizontal bar 5 px long turns into a vertical bar 5 px long
    bar = torch.zeros(1, 1, 5, 9)
    bar[0, 0, 2, 2:7] = 1
    expected = torch.zeros(1, 1, 5, 9)
    expected[0, 0, :, 4] = 1
    assert_close(RandomRotation((90, 90))(bar), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="empty"):
        RandomRotation((10, -10))


def test_resize_and_normalize_values():
    x = torch.full((2, 3, 8, 8), 0.5)
    assert_close(Resize(4)(x), torch.full((2, 3, 4, 4), 0.5))
    assert Resize(8)(x) is x
    out = Normalize((0.5, 0.25, 0.0), (0.5, 0.5, 0.25))(x)
    assert_close(out[:, :, 0, 0], torch.tensor([[0.0, 0.5, 2.0]] * 2))
    with pytest.raises(ValueError, match="non-zero"):
        Normalize((0, 0, 0), (1, 0, 1))
    with pytest.raises(ValueError, match="channel"):
        Normalize((0.5,), (0.5,))(x)


def test_compose_applies_in_order():
    x = torch.ones(1, 3, 2, 2)
    t = Compose([lambda a: a + 1, lambda a: a * 3])
    assert torch.equal(t(x), torch.full_like(x, 6.0))


def test_to_float_and_rejects_uint8_in_transforms():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).reshape(1, 3, 1, 1)
    assert_close(to_float(x), torch.tensor([0.0, 0.2, 1.0]).reshape(1, 3, 1, 1))
    assert to_float(x, torch.float16).dtype == torch.float16
    with pytest.raises(TypeError, match="uint8"):
        to_float(x.float())
    with pytest.raises(TypeError, match="to_float"):
        RandomHorizontalFlip()(x)
    with pytest.raises(TypeError, match=r"\[B, C, H, W\]"):
        Resize(4)(torch.rand(3, 8, 8))


# ------------------------------------------------------------------------------------------ BuiltinShapes


def _shapes_from_pixels(images):
    """Classify BuiltinShapes images [N, 3, S, S] by the geometry of their foreground (shape channels
    >= 148, background <= 82): the square fills its bounding box, the triangle has exactly 2 filled box
    corners, and the circle fills more of its box than the cross."""
    mask = images.max(1).values > 115  # [N, S, S]
    n, s = mask.shape[:2]
    rows, cols = mask.any(2), mask.any(1)  # [N, S]
    first = lambda m: m.int().argmax(1)  # noqa: E731
    top, left = first(rows), first(cols)
    bottom, right = s - 1 - first(rows.flip(1)), s - 1 - first(cols.flip(1))
    i = torch.arange(n)
    corners = mask[i, top, left].int() + mask[i, top, right] + mask[i, bottom, left] + mask[i, bottom, right]
    fill = mask.sum((1, 2)) / ((bottom - top + 1) * (right - left + 1))
    names = BuiltinShapes.shapes
    circle_or_cross = torch.where(fill > 0.65, names.index("circle"), names.index("cross"))
    return torch.where(
        corners == 4, names.index("square"), torch.where(corners == 2, names.index("triangle"), circle_or_cross)
    )


def _material_from_text(text):
    found = {m for m, words in enumerate(BuiltinShapes.material_words) for w in tokenize(text) if w in words}
    assert len(found) == 1, text
    return found.pop()


def test_builtin_items_and_determinism():
    a, b, c = BuiltinShapes(64, seed=3), BuiltinShapes(64, seed=3), BuiltinShapes(64, seed=4)
    image, text, label = a[5]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert isinstance(text, str) and text and isinstance(label, int) and 0 <= label < len(a.classes) == 8
    assert torch.equal(a.images, b.images) and a.texts == b.texts and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images) and a.texts != c.texts
    assert BuiltinShapes(4, image_size=48)[0][0].shape == (3, 48, 48)


def test_builtin_balanced_and_varied_captions():
    ds = BuiltinShapes(803, seed=0)
    assert set(torch.bincount(ds.labels).tolist()) == {100, 101}
    assert len(set(ds.texts)) > 400
    assert any(t.isupper() for t in ds.texts) and any(t != t.upper() for t in ds.texts)
    assert any(re.search(r"[!?.,;:()]", t) for t in ds.texts)


def test_builtin_label_needs_both_modalities():
    ds = BuiltinShapes(2000, seed=1)
    shapes = _shapes_from_pixels(ds.images)
    materials = torch.tensor([_material_from_text(t) for t in ds.texts])
    # The image determines the shape and the caption the material; together they give the label ...
    assert torch.equal(shapes, ds.shape_ids) and torch.equal(materials, ds.material_ids)
    assert torch.equal(ds.labels, shapes * 2 + materials)
    assert all(ds.classes[y] == f"{ds.materials[m]} {ds.shapes[s]}" for y, s, m in zip(ds.labels, shapes, materials))
    # ... but neither does alone: captions never name the shape, and the best guess of the label from
    # one modality (the majority label per shape / per material) reaches the documented ceilings.
    assert not {w for t in ds.texts for w in tokenize(t)} & set(ds.shapes)

    def best_accuracy(feature):
        counts = Counter(zip(feature.tolist(), ds.labels.tolist()))
        return sum(max(n for (f, _), n in counts.items() if f == v) for v in set(feature.tolist())) / len(ds)

    assert best_accuracy(shapes) == pytest.approx(0.5, abs=0.005)
    assert best_accuracy(materials) == pytest.approx(0.25, abs=0.005)
    assert best_accuracy(ds.labels) == 1.0


def test_builtin_splits_disjoint():
    train, val, test = BuiltinShapes.splits(train_size=100, val_size=30, test_size=20, seed=2)
    assert (len(train), len(val), len(test)) == (100, 30, 20)
    keys = [{im.numpy().tobytes() for im in part.images} for part in (train, val, test)]
    assert sum(map(len, keys)) == 150 and len(keys[0] | keys[1] | keys[2]) == 150
    pool = BuiltinShapes(150, seed=2)
    assert torch.equal(val.images, pool.images[100:130]) and test.texts == pool.texts[130:]
    assert val.classes == pool.classes and val[0][2] == int(pool.labels[100])


# ------------------------------------------------------------------------------------------ Cifar10Folder


def _write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


@pytest.fixture
def cifar_dir(tmp_path):
    """A fake CIFAR-10 folder in the real format: 5 training batches of 4 images, a test batch of 3."""
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _write_pickle(root / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    for i, n in enumerate([4, 4, 4, 4, 4, 3]):
        name = f"data_batch_{i + 1}" if i < 5 else "test_batch"
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        _write_pickle(root / name, {b"batch_label": name.encode(), b"data": data, b"labels": labels})
    return root


def test_cifar_reads_real_format(cifar_dir):
    train, test = Cifar10Folder(cifar_dir), Cifar10Folder(cifar_dir, train=False)
    assert len(train) == 20 and len(test) == 3 and train.classes[3] == "cat" and len(train.classes) == 10
    with open(cifar_dir / "data_batch_2", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    image, text, label = train[5]  # second image of data_batch_2
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert image[0].flatten().tolist() == batch[b"data"][1, :1024].tolist()  # red plane, row-major
    assert image[2, 31, 31] == batch[b"data"][1, 3071]
    assert label == batch[b"labels"][1] and text == ""


def test_cifar_captions(cifar_dir, tmp_path):
    captions = tmp_path / "captions.jsonl"
    captions.write_text('{"index": 0, "text": "a red car"}\n\n{"index": 2, "text": "Bird!"}\n', encoding="utf-8")
    test = Cifar10Folder(cifar_dir, train=False, captions=captions)
    assert [test[i][1] for i in range(3)] == ["a red car", "", "Bird!"]
    captions.write_text('{"index": 0, "text": "ok"}\n{"index": 3, "text": "out"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"captions\.jsonl:2: index 3 out of range"):
        Cifar10Folder(cifar_dir, train=False, captions=captions)
    captions.write_text('{"index": 0, "text": "ok"}\n{"index": 0, "text": 5}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"captions\.jsonl:2: expected"):
        Cifar10Folder(cifar_dir, train=False, captions=captions)
    with pytest.raises(FileNotFoundError, match="captions file not found"):
        Cifar10Folder(cifar_dir, train=False, captions=tmp_path / "none.jsonl")


def test_cifar_errors(cifar_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="CIFAR-10 folder not found.*data_batch_1"):
        Cifar10Folder(tmp_path / "missing")
    (cifar_dir / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        Cifar10Folder(cifar_dir)
    (cifar_dir / "test_batch").write_bytes(b"\x80\x02garbage that is not a pickle")
    with pytest.raises(ValueError, match="test_batch: corrupt CIFAR-10 file"):
        Cifar10Folder(cifar_dir, train=False)
    _write_pickle(cifar_dir / "test_batch", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(ValueError, match=r"test_batch: expected b'data' to be a uint8 array \[N, 3072\]"):
        Cifar10Folder(cifar_dir, train=False)
    _write_pickle(cifar_dir / "test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})
    with pytest.raises(ValueError, match=r"test_batch: labels must be in \[0, 10\)"):
        Cifar10Folder(cifar_dir, train=False)
    _write_pickle(cifar_dir / "batches.meta", {b"label_names": OrderedDict()})  # needs a non-numpy global
    with pytest.raises(ValueError, match="batches.meta.*refusing to load global collections.OrderedDict"):
        Cifar10Folder(cifar_dir, train=False)


# ------------------------------------------------------------------------------------------ ManifestDataset

COLOURS = {"red.png": (255, 0, 0), "green.png": (0, 200, 0), "blue.png": (0, 0, 255)}


@pytest.fixture
def image_dir(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 30), COLOURS["red.png"]).save(images / "red.png")
    Image.new("RGBA", (8, 8), (*COLOURS["green.png"], 255)).save(images / "green.png")  # converted to RGB
    Image.new("RGB", (32, 32), COLOURS["blue.png"]).save(images / "blue.png")
    return tmp_path


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [
    {"image": "images/red.png", "text": "A red one", "label": "red"},
    {"image": "images/green.png", "text": "", "label": "green"},
    {"image": "images/blue.png", "text": "blue, surely", "label": "blue"},
]


def _check_items(ds, size=32):
    assert ds.classes == ["blue", "green", "red"] and len(ds) == 3
    for i, row in enumerate(ROWS):
        image, text, label = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, size, size)
        colour = torch.tensor(COLOURS[row["image"].split("/")[1]], dtype=torch.uint8)
        assert torch.equal(image, colour[:, None, None].expand(3, size, size))
        assert text == row["text"] and ds.classes[label] == row["label"]


def test_manifest_jsonl(image_dir):
    _check_items(ManifestDataset(_write_jsonl(image_dir / "m.jsonl", ROWS)))
    _check_items(ManifestDataset(image_dir / "m.jsonl", image_size=12), size=12)


def test_manifest_csv(image_dir):
    path = image_dir / "m.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["label", "extra", "image", "text"])  # any column order
        writer.writeheader()
        writer.writerows({**r, "extra": "x"} for r in ROWS)
    ds = ManifestDataset(path)
    _check_items(ds)
    ds.verify()


def test_manifest_labels_names_indices_and_classes(image_dir):
    rows = [{**r, "label": i} for i, r in enumerate(ROWS)]
    assert ManifestDataset(_write_jsonl(image_dir / "ints.jsonl", rows)).classes == ["0", "1", "2"]
    classes = ["red", "green", "blue", "unused"]
    mixed = [ROWS[0], {**ROWS[1], "label": 1}, {**ROWS[2], "label": "2"}]
    ds = ManifestDataset(_write_jsonl(image_dir / "mixed.jsonl", mixed), classes=classes)
    assert ds.classes == classes and [ds[i][2] for i in range(3)] == [0, 1, 2]


def _bad_manifest(image_dir, name, rows):
    path = image_dir / name
    if name.endswith(".jsonl"):
        return _write_jsonl(path, rows)
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


R0, R1, R2 = ROWS
RED = "images/red.png"
CSV_HEAD = "image,text,label"


@pytest.mark.parametrize(
    "name, rows, classes, match",
    [
        ("m.jsonl", [R0, f'{{"image": "{RED}", "text": "x", "label": }}'], None, ":2: malformed line, invalid JSON"),
        ("m.jsonl", [R0, R1, f'["{RED}", "x", "red"]'], None, ":3: malformed line, expected a JSON object"),
        ("m.jsonl", [R0, {"text": "x", "label": "red"}], None, ":2: malformed line, missing column 'image'"),
        ("m.jsonl", [R0, {"image": RED, "label": "red"}], None, ":2: malformed line, missing column 'text'"),
        ("m.jsonl", [R0, {"image": RED, "text": "x"}], None, ":2: missing label"),
        ("m.jsonl", [R0, {**R1, "label": None}], None, ":2: missing label"),
        ("m.jsonl", [R0, {**R1, "label": 1.5}], None, ":2: label must be a class name or an integer"),
        ("m.jsonl", [R0, R1, {**R2, "label": "purple"}], ["red", "green"], ":3: unknown label 'purple'"),
        ("m.jsonl", [R0, {**R1, "label": 5}], ["red", "green"], ":2: unknown label 5"),
        ("m.jsonl", [R0, {**R1, "label": 1}], None, ":2: label 1 is an index but the first label"),
        ("m.jsonl", ["", "   "], None, r"m\.jsonl: empty manifest"),
        ("m.csv", [CSV_HEAD], None, r"m\.csv: empty manifest"),
        ("m.csv", ["image,label", f"{RED},red"], None, r"m\.csv:1: CSV header lacks columns \['text'\]"),
        ("m.csv", [CSV_HEAD, f"{RED},hi,red", f"{RED},hi"], None, r"m\.csv:3: malformed line, expected 3 fields"),
        ("m.csv", [CSV_HEAD, "", f"{RED},hi,"], None, r"m\.csv:3: missing label"),
        # a quoted field spanning lines 2-3: the next record starts on line 4
        ("m.csv", [CSV_HEAD, f'"{RED}","multi', 'line",red', f"{RED},x,blue"], ["red"], r"m\.csv:4: unknown label"),
        ("m.txt", ["whatever"], None, r"m\.txt: unknown manifest format '\.txt'"),
    ],
)
def test_manifest_validation_errors_name_file_and_line(image_dir, name, rows, classes, match):
    path = _bad_manifest(image_dir, name, rows)
    with pytest.raises(ValueError, match=match) as info:
        ManifestDataset(path, classes=classes)
    assert str(path) in str(info.value)


def test_manifest_missing_and_corrupt_images(image_dir):
    (image_dir / "images" / "garbage.png").write_bytes(b"definitely not a png")
    full = (image_dir / "images" / "red.png").read_bytes()
    (image_dir / "images" / "truncated.png").write_bytes(full[: len(full) // 2])
    rows = [
        ROWS[0],
        {**ROWS[0], "image": "images/missing.png"},
        {**ROWS[0], "image": "images/garbage.png"},
        {**ROWS[0], "image": "images/truncated.png"},
    ]
    ds = ManifestDataset(_write_jsonl(image_dir / "m.jsonl", rows))  # images are not read yet
    assert ds[0][0].shape == (3, 32, 32)
    with pytest.raises(FileNotFoundError, match=r"missing\.png: image file not found \(referenced by .*m\.jsonl:2\)"):
        ds[1]
    with pytest.raises(ValueError, match=r"garbage\.png: cannot decode image \(referenced by .*m\.jsonl:3\)"):
        ds[2]
    with pytest.raises(ValueError, match=r"truncated\.png: cannot decode image \(referenced by .*m\.jsonl:4\)"):
        ds[3]
    with pytest.raises(ValueError, match=r"3 of 4 images failed to load") as info:
        ds.verify()
    assert all(name in str(info.value) for name in ("missing.png", "garbage.png", "truncated.png"))


def test_manifest_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        ManifestDataset(tmp_path / "none.jsonl")


# ------------------------------------------------------------------------------------------ load_dataset


def test_load_dataset_builtin_and_cifar(cifar_dir):
    sizes = dict(train_size=40, val_size=10, test_size=5, seed=1)
    parts = [load_dataset("builtin", s, **sizes) for s in ("train", "val", "test")]
    assert [len(p) for p in parts] == [40, 10, 5]
    assert torch.equal(parts[1].images, BuiltinShapes.splits(40, 10, 5, seed=1)[1].images)
    assert len(load_dataset(f"cifar10:{cifar_dir}", "train")) == 20
    assert len(load_dataset(f"cifar10:{cifar_dir}", "val")) == len(load_dataset(f"cifar10:{cifar_dir}", "test")) == 3


def test_load_dataset_manifest_split(image_dir):
    rows = [{"image": f"images/img{i}.png", "text": f"t{i}", "label": ["a", "b", "c"][i % 3]} for i in range(100)]
    path = _write_jsonl(image_dir / "all.jsonl", rows)
    parts = {s: load_dataset(f"manifest:{path}", s) for s in ("train", "val", "test")}
    # documented rule: crc32(image path as written) % 10 == 0 -> test, 1 -> val, else train
    expected = {"train": set(), "val": set(), "test": set()}
    for r in rows:
        bucket = zlib.crc32(r["image"].encode()) % 10
        expected["test" if bucket == 0 else "val" if bucket == 1 else "train"].add(r["text"])
    assert {s: set(d.texts) for s, d in parts.items()} == expected
    assert 70 <= len(parts["train"]) <= 90 and sum(map(len, parts.values())) == 100
    assert all(d.classes == ["a", "b", "c"] for d in parts.values())
    again = load_dataset(f"manifest:{path}", "val")
    assert again.texts == parts["val"].texts and torch.equal(again.labels, parts["val"].labels)
    for d in parts.values():
        assert all(d.classes[y] == ["a", "b", "c"][int(t[1:]) % 3] for t, y in zip(d.texts, d.labels))


@pytest.mark.parametrize("spec", ["cifar100:/data", "builtin:x", "manifest:", "cifar10", "mnist"])
def test_load_dataset_unknown_spec(spec):
    with pytest.raises(ValueError, match=r'"builtin", "cifar10:DIR", "manifest:FILE"'):
        load_dataset(spec, "train")


def test_load_dataset_bad_split():
    with pytest.raises(ValueError, match="split must be one of"):
        load_dataset("builtin", "validation")


# ------------------------------------------------------------------------------------------ collate


def _items(texts, size=4):
    return [(torch.full((3, size, size), 10 * i, dtype=torch.uint8), t, i) for i, t in enumerate(texts)]


def test_collate_pads_truncates_and_counts():
    vocab = Vocab.build(["a b c d e f"])
    batch = Collator(vocab, max_len=4)(_items(["a b", "", "a b c d e f", "zzz ?!"]))
    assert isinstance(batch, Batch)
    assert batch.tokens.dtype == batch.lengths.dtype == batch.labels.dtype == torch.int64
    assert batch.tokens.tolist() == [[2, 3, 0, 0], [0, 0, 0, 0], [2, 3, 4, 5], [1, 0, 0, 0]]
    assert batch.lengths.tolist() == [2, 0, 4, 1]
    assert batch.labels.tolist() == [0, 1, 2, 3]
    assert batch.images.dtype == torch.float32 and batch.images.shape == (4, 3, 4, 4)
    assert_close(batch.images[:, 0, 0, 0], torch.tensor([0, 10, 20, 30]) / 255)


def test_collate_pads_to_longest_in_batch_and_at_least_one_column():
    vocab = Vocab.build(["a b"])
    assert Collator(vocab, max_len=32)(_items(["a", "a b"])).tokens.shape == (2, 2)
    empty = Collator(vocab)(_items(["", "!!!"]))
    assert empty.tokens.tolist() == [[0], [0]] and empty.lengths.tolist() == [0, 0]


def test_collate_errors():
    vocab = Vocab.build(["a"])
    with pytest.raises(ValueError, match="max_len"):
        Collator(vocab, max_len=0)
    with pytest.raises(ValueError, match="empty batch"):
        Collator(vocab)([])
    with pytest.raises(ValueError, match="share one shape"):
        Collator(vocab)(_items(["a"], size=4) + _items(["a"], size=5))


@pytest.mark.parametrize("device", DEVICES)
def test_batch_from_dataloader_to_device(device):
    ds = BuiltinShapes(10, seed=0)
    loader = DataLoader(ds, batch_size=4, collate_fn=Collator(Vocab.build(ds.texts)), pin_memory=device == "cuda")
    batch = next(iter(loader))
    assert isinstance(batch, Batch) and batch.images.shape == (4, 3, 32, 32)
    moved = batch.to(device, non_blocking=True)
    assert isinstance(moved, Batch) and all(t.device.type == device for t in moved)
    assert torch.equal(moved.tokens.cpu(), batch.tokens)
    if device == "cuda":
        assert all(t.is_pinned() for t in batch)
