"""Whole training steps of MultimodalClassifier, mmfast next to native, on the same batch and weights."""
import time
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from .data import Collator, Vocab
from .models import ModelConfig, MultimodalClassifier
from .train import TrainConfig, image_transform, load_split

__all__ = ["bench_train_step", "format_table"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train_step(data: str = "builtin", device="cpu", batch_size: int = 64, steps: int = 20, warmup: int = 3,
                     channels: Sequence[int] = (32,), padding: int = 0, image_size: int = 32, hidden_size: int = 64,
                     max_len: int = 32, backends: Sequence[str] = ("native", "mmfast")) -> List[Dict]:
    """Median time of one training step (forward, cross-entropy, backward, fused AdamW step) per backend.

    Both backends get the same batch (drawn once from ``data``'s training split) and the same initial
    weights; the first backend is the baseline of the speedup column.
    """
    device = torch.device(device)
    cfg = TrainConfig(data=data, device=str(device), batch_size=batch_size, image_size=image_size,
                      train_size=max(batch_size, 8), val_size=8, test_size=8, max_len=max_len, augment=False)
    dataset = load_split(cfg, "train")
    items = [dataset[i % len(dataset)] for i in range(batch_size)]
    vocab = Vocab.build(text for _, text, _ in items)
    batch = Collator(vocab, max_len=max_len)(items).to(device)
    images = image_transform(cfg, train=False)(batch.images)
    model_cfg = ModelConfig(num_classes=len(dataset.classes), vocab_size=len(vocab), image_size=image_size,
                            channels=tuple(channels), padding=padding, hidden_size=hidden_size)
    torch.manual_seed(0)
    weights = MultimodalClassifier(model_cfg, "native").state_dict()
    rows = []
    for backend in backends:
        model = MultimodalClassifier(model_cfg, backend).to(device)
        model.load_state_dict(weights)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type in ("cpu", "cuda"))

        def step():
            loss = F.cross_entropy(model(images, batch.tokens, batch.lengths), batch.labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(warmup):
            step()
        _sync(device)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - t0)
        median = sorted(times)[len(times) // 2]
        rows.append({"backend": backend, "ms_per_step": median * 1e3, "samples_per_s": batch_size / median,
                     "device": str(device), "batch_size": batch_size})
    base = rows[0]["ms_per_step"]
    for row in rows:
        row["speedup"] = base / row["ms_per_step"]
    return rows


def format_table(rows: List[Dict]) -> str:
    device = rows[0]["device"]
    if device == "cpu":
        device = f"cpu ({torch.get_num_threads()} threads)"
    elif device.startswith("cuda"):
        device = torch.cuda.get_device_name(torch.device(device))
    lines = [f"training step, batch {rows[0]['batch_size']}, {device}, torch {torch.__version__}",
             f"{'backend':<8} {'ms/step':>9} {'samples/s':>10} {'speedup':>8}"]
    for r in rows:
        lines.append(f"{r['backend']:<8} {r['ms_per_step']:>9.2f} {r['samples_per_s']:>10.0f} {r['speedup']:>7.2f}x")
    return "\n".join(lines)
