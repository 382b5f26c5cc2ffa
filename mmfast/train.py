"""Training and evaluation of a MultimodalClassifier: data -> model -> fused AdamW -> metrics and checkpoints.

Everything a run writes goes to ``TrainConfig.out``:

- ``checkpoint.pt``   model, optimizer, grad scaler, RNG states, epoch, model config, vocab (atomic writes)
- ``vocab.json``      the vocabulary built from the training texts
- ``config.json``     the run's TrainConfig and ModelConfig
- ``metrics.jsonl``   one JSON line per epoch (loss, accuracy, macro-F1, samples/s, seconds)
- ``eval.json``       the final evaluation report on the test split (with its confusion matrix)

Runs are reproducible on the CPU: the data order and augmentation of epoch ``e`` are drawn from
generators seeded with ``(seed, e)``, so resuming from an epoch's checkpoint continues exactly.
Under ``torchrun`` (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel (gloo on the CPU,
nccl on CUDA) and each process reads its shard through a DistributedSampler; rank 0 writes the files.
"""
import json
import math
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from .data import Batch, Collator, Vocab, load_dataset, load_image
from .data.transforms import Compose, Normalize, RandomCrop, RandomHorizontalFlip, RandomRotation, Resize
from .models import BACKENDS, ModelConfig, MultimodalClassifier

__all__ = ["TrainConfig", "fit", "evaluate", "EvalReport", "save_checkpoint", "load_checkpoint", "load_model",
           "MODALITIES", "AMP_MODES"]

MODALITIES = ("both", "image", "text")
AMP_MODES = ("none", "bf16", "fp16")
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    data: str = "builtin"               # builtin | cifar10:DIR | manifest:FILE
    backend: str = "mmfast"             # mmfast | native
    device: str = "cpu"
    epochs: int = 5
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    max_len: int = 32                   # tokens kept per caption
    min_freq: int = 1
    max_vocab: Optional[int] = 20000
    image_size: int = 32
    channels: Tuple[int, ...] = (32,)
    padding: int = 0
    embed_dim: int = 128
    hidden_size: int = 64
    fusion_dim: int = 128
    dropout: float = 0.5
    augment: bool = True
    amp: str = "none"                   # none | bf16 | fp16 (CUDA only)
    modality: str = "both"              # both | image | text: ablations blank the other input
    seed: int = 0
    out: str = "runs/latest"
    resume: bool = False                # continue from out/checkpoint.pt when it exists
    num_workers: int = 0
    train_size: int = 4000              # sizes of the built-in dataset's splits
    val_size: int = 500
    test_size: int = 500
    max_steps: Optional[int] = None     # stop each epoch after this many steps (smoke runs, benchmarks)
    progress: bool = True

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        for name, value, allowed in [("backend", self.backend, BACKENDS), ("amp", self.amp, AMP_MODES),
                                     ("modality", self.modality, MODALITIES)]:
            if value not in allowed:
                raise ValueError(f"TrainConfig: {name} must be one of {allowed}, got {value!r}")
        if self.epochs < 0 or self.batch_size < 1:
            raise ValueError(f"TrainConfig: expected epochs >= 0 and batch_size >= 1, got {self.epochs}, "
                             f"{self.batch_size}")
        if self.amp != "none" and not self.device.startswith("cuda"):
            raise ValueError(f"TrainConfig: amp={self.amp!r} needs a CUDA device, got device={self.device!r}")


@dataclass
class EvalReport:
    loss: float
    accuracy: float
    macro_f1: float
    samples: int
    confusion: List[List[int]] = field(repr=False)  # confusion[true][predicted]
    classes: List[str] = field(repr=False)

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        width = max(len(c) for c in self.classes)
        lines = [f"accuracy {self.accuracy:.4f}  macro-F1 {self.macro_f1:.4f}  loss {self.loss:.4f}  "
                 f"({self.samples} samples)", "confusion matrix (rows: true, columns: predicted):"]
        lines.append(" " * (width + 3) + "".join(f"{i:>6}" for i in range(len(self.classes))))
        for i, (name, row) in enumerate(zip(self.classes, self.confusion)):
            lines.append(f"{i:>2} {name:<{width}}" + "".join(f"{v:>6}" for v in row))
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- data

def _dataset_kwargs(cfg: TrainConfig) -> dict:
    if cfg.data == "builtin":
        return dict(train_size=cfg.train_size, val_size=cfg.val_size, test_size=cfg.test_size, seed=cfg.seed,
                    image_size=cfg.image_size)
    if cfg.data.startswith("manifest:"):
        return dict(image_size=cfg.image_size)
    return {}


def load_split(cfg: TrainConfig, split: str) -> Dataset:
    return load_dataset(cfg.data, split, **_dataset_kwargs(cfg))


def _classes(dataset: Dataset) -> List[str]:
    return list(dataset.classes)


def image_transform(cfg: TrainConfig, train: bool, generator: Optional[torch.Generator] = None) -> Compose:
    size = cfg.image_size
    steps = [Resize((size, size))]
    if train and cfg.augment:
        steps += [RandomCrop((size, size), padding=max(1, size // 16), generator=generator),
                  RandomHorizontalFlip(generator=generator),
                  RandomRotation(10.0, generator=generator)]
    return Compose(steps + [Normalize(MEAN, STD)])


def _blank(batch: Batch, modality: str) -> Batch:
    """The ablations: an image-only model sees no tokens, a text-only model sees blank images."""
    if modality == "image":
        return batch._replace(tokens=torch.zeros_like(batch.tokens[:, :1]), lengths=torch.zeros_like(batch.lengths))
    if modality == "text":
        return batch._replace(images=torch.zeros_like(batch.images))
    return batch


# ------------------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, state: dict) -> None:
    """torch.save to a temporary file in the same folder, fsync, then atomically rename over ``path``:
    a crash while saving leaves the previous checkpoint intact, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_json_atomic(path: Path, obj) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or foreign file
        raise ValueError(f"checkpoint {path}: not a readable mmfast checkpoint ({type(e).__name__}: {e})") from e
    missing = {"model", "model_config", "vocab", "classes", "epoch"} - set(state) if isinstance(state, dict) else {"*"}
    if missing:
        raise ValueError(f"checkpoint {path}: not an mmfast checkpoint (missing {sorted(missing)})")
    return state


def load_model(path, backend: Optional[str] = None, device="cpu") -> Tuple[MultimodalClassifier, Vocab, dict]:
    """(model in eval mode, vocab, checkpoint) from a checkpoint written by :func:`fit`."""
    state = load_checkpoint(path)
    model = MultimodalClassifier(ModelConfig.from_dict(state["model_config"]), backend or state["backend"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), Vocab.from_dict(state["vocab"]), state


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------- distributed

def _init_distributed(cfg: TrainConfig) -> Tuple[int, int, torch.device]:
    """(rank, world size, device); starts the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device(cfg.device)
    if not dist.is_initialized():
        on_cuda = cfg.device.startswith("cuda")
        dist.init_process_group("nccl" if on_cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    return rank, world, device


# ------------------------------------------------------------------------------------------ metrics

def _confusion(preds: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    idx = labels.to(torch.int64) * num_classes + preds.to(torch.int64)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _macro_f1(confusion: Tensor) -> float:
    """Mean F1 over the classes that occur in the labels or the predictions."""
    tp = confusion.diag().double()
    support, predicted = confusion.sum(1).double(), confusion.sum(0).double()
    present = (support + predicted) > 0
    f1 = 2 * tp / (support + predicted).clamp_min(1)
    return float(f1[present].mean()) if present.any() else 0.0


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device, classes: List[str], modality: str = "both",
             transform: Optional[Compose] = None, amp: str = "none") -> EvalReport:
    """Loss, accuracy, macro-F1 and confusion matrix of ``model`` over ``loader``."""
    model.eval()
    n = len(classes)
    confusion = torch.zeros(n, n, dtype=torch.int64)
    total_loss, count = 0.0, 0
    for batch in loader:
        batch = _blank(batch.to(device, non_blocking=True), modality)
        images = transform(batch.images) if transform is not None else batch.images
        with _autocast(device, amp):
            logits = model(images, batch.tokens, batch.lengths)
        total_loss += float(F.cross_entropy(logits.float(), batch.labels, reduction="sum"))
        count += batch.labels.numel()
        confusion += _confusion(logits.argmax(1).cpu(), batch.labels.cpu(), n)
    accuracy = float(confusion.diag().sum()) / max(count, 1)
    return EvalReport(total_loss / max(count, 1), accuracy, _macro_f1(confusion), count, confusion.tolist(), classes)


def _autocast(device, amp: str):
    if amp == "none":
        return torch.autocast(device_type=torch.device(device).type, enabled=False)
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


# --------------------------------------------------------------------------------------------- fit

def _loader(dataset, collate, cfg: TrainConfig, shuffle: bool, epoch: int, world: int, rank: int) -> DataLoader:
    generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    sampler = None
    if world > 1:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=cfg.seed)
        sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      collate_fn=collate, generator=generator, num_workers=cfg.num_workers,
                      pin_memory=str(cfg.device).startswith("cuda"))


def _make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    # The fused (single-kernel / single-loop) AdamW exists for CUDA and CPU tensors in float types.
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                             fused=device.type in ("cuda", "cpu"))


def build_model(cfg: TrainConfig, vocab_size: int, num_classes: int) -> MultimodalClassifier:
    model_cfg = ModelConfig(num_classes=num_classes, vocab_size=vocab_size, image_size=cfg.image_size,
                            channels=cfg.channels, padding=cfg.padding, embed_dim=cfg.embed_dim,
                            hidden_size=cfg.hidden_size, fusion_dim=cfg.fusion_dim, dropout=cfg.dropout)
    return MultimodalClassifier(model_cfg, cfg.backend)


def fit(cfg: TrainConfig, log=print) -> Dict:
    """Train, validate every epoch, checkpoint, and evaluate on the test split. Returns a summary dict."""
    rank, world, device = _init_distributed(cfg)
    main = rank == 0
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT
    resume = cfg.resume and ckpt_path.is_file()
    if main:
        out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)

    train_ds, val_ds, test_ds = (load_split(cfg, s) for s in ("train", "val", "test"))
    classes = _classes(train_ds)
    state = load_checkpoint(ckpt_path) if resume else None
    if state is not None:
        vocab = Vocab.from_dict(state["vocab"])
    else:
        vocab = Vocab.build(train_ds.texts, min_freq=cfg.min_freq, max_size=cfg.max_vocab)
    model = build_model(cfg, len(vocab), len(classes)).to(device)
    optimizer = _make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp == "fp16")
    start_epoch = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        start_epoch = state["epoch"] + 1
        if main:
            log(f"resuming from {ckpt_path} at epoch {start_epoch + 1}")
    if main:
        vocab.save(out / "vocab.json")
        _write_json_atomic(out / "config.json", {"train": asdict(cfg), "model": model.config.to_dict()})
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model

    collate = Collator(vocab, max_len=cfg.max_len)
    eval_tf = image_transform(cfg, train=False)
    val_loader = DataLoader(val_ds, batch_size=cfg.batch_size, collate_fn=collate, num_workers=cfg.num_workers)
    history = []
    for epoch in range(start_epoch, cfg.epochs):
        aug_gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch + 1)
        train_tf = image_transform(cfg, train=True, generator=aug_gen)
        loader = _loader(train_ds, collate, cfg, True, epoch, world, rank)
        net.train()
        seen, loss_sum, correct, t0 = 0, 0.0, 0, time.perf_counter()
        steps = len(loader) if cfg.max_steps is None else min(len(loader), cfg.max_steps)
        bar = tqdm(loader, total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                   disable=not (cfg.progress and main) or None, leave=False)
        for step, batch in enumerate(bar):
            if step >= steps:
                break
            batch = _blank(batch.to(device, non_blocking=True), cfg.modality)
            with _autocast(device, cfg.amp):
                logits = net(train_tf(batch.images), batch.tokens, batch.lengths)
                loss = F.cross_entropy(logits.float(), batch.labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            n = batch.labels.numel()
            seen += n
            loss_sum += float(loss.detach()) * n
            correct += int((logits.argmax(1) == batch.labels).sum())
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", samples_s=f"{seen / (time.perf_counter() - t0):.0f}")
        bar.close()
        seconds = time.perf_counter() - t0
        if world > 1:  # every replica's counts, so the logged throughput is the job's
            totals = torch.tensor([seen, loss_sum, correct], dtype=torch.float64)
            dist.all_reduce(totals)
            seen, loss_sum, correct = int(totals[0]), float(totals[1]), int(totals[2])
        if main:
            report = evaluate(model, val_loader, device, classes, cfg.modality, eval_tf, cfg.amp)
            row = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
                   "val_loss": report.loss, "val_accuracy": report.accuracy, "val_macro_f1": report.macro_f1,
                   "samples_per_s": seen / seconds if seconds > 0 else math.nan, "seconds": seconds}
            history.append(row)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            log(f"epoch {epoch + 1}/{cfg.epochs}  loss {row['train_loss']:.4f}  train acc {row['train_accuracy']:.4f}  "
                f"val acc {report.accuracy:.4f}  val macro-F1 {report.macro_f1:.4f}  "
                f"{row['samples_per_s']:.0f} samples/s ({device})")
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "rng": _rng_state(), "epoch": epoch, "backend": cfg.backend, "train_config": asdict(cfg),
                "model_config": model.config.to_dict(), "vocab": vocab.to_dict(), "classes": classes})
        if world > 1:
            dist.barrier()

    summary = {"history": history, "device": str(device), "backend": cfg.backend}
    if main:
        test_loader = DataLoader(test_ds, batch_size=cfg.batch_size, collate_fn=collate, num_workers=cfg.num_workers)
        report = evaluate(model, test_loader, device, classes, cfg.modality, eval_tf, cfg.amp)
        _write_json_atomic(out / "eval.json", report.to_dict())
        summary["test"] = report
    summary["model"] = model
    return summary


# ---------------------------------------------------------------------------------------- predict

def predict(checkpoint, image_path, text: str, topk: int = 3, device="cpu") -> List[Tuple[str, float]]:
    """The ``topk`` (class, probability) pairs for one image file and one caption."""
    model, vocab, state = load_model(checkpoint, device=device)
    cfg = TrainConfig(**{**state["train_config"], "device": str(device), "resume": False})
    image = load_image(image_path, cfg.image_size)
    batch = Collator(vocab, max_len=cfg.max_len)([(image, text, 0)]).to(device)
    with torch.no_grad():
        logits = model(image_transform(cfg, train=False)(batch.images), batch.tokens, batch.lengths)
    probs = logits.float().softmax(1)[0]
    values, indices = probs.topk(min(topk, probs.numel()))
    return [(state["classes"][i], float(v)) for v, i in zip(values.tolist(), indices.tolist())]
