"""Whole training steps of MultimodalClassifier, mmfast next to native, on the same batch and weights, and the
memory each keeps for its backward pass.

Used by ``mmfast bench`` and by benchmarks/bench_train_step.py (pytest-benchmark).
"""
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import Collator, Vocab
from .models import ModelConfig, MultimodalClassifier
from .train import TrainConfig, image_transform, load_split

__all__ = ["StepCase", "make_case", "make_train_step", "saved_tensor_bytes", "op_memory_cases", "op_memory_table",
           "bench_train_step", "format_table", "VARIANTS"]

# Training-step variants: the two backends, and the strongest native options a user would try.
#   native_channels_last: the native model and images in channels_last (faster convolutions on CPU);
#   native_compile:       torch.compile of the native model.
VARIANTS = ("native", "mmfast", "native_channels_last", "native_compile")


@dataclass
class StepCase:
    """One batch on a device and the initial weights, shared by every variant."""

    model_config: ModelConfig
    weights: Dict[str, Tensor]
    images: Tensor
    tokens: Tensor
    lengths: Tensor
    labels: Tensor

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def batch_size(self) -> int:
        return self.images.shape[0]


def make_case(data: str = "builtin", device="cpu", batch_size: int = 64, channels: Sequence[int] = (32,),
              padding: int = 0, image_size: int = 32, hidden_size: int = 64, max_len: int = 32) -> StepCase:
    """A batch drawn once from ``data``'s training split (no augmentation) and seeded initial weights."""
    device = torch.device(device)
    cfg = TrainConfig(data=data, device=str(device), batch_size=batch_size, image_size=image_size,
                      train_size=max(batch_size, 8), val_size=8, test_size=8, max_len=max_len, augment=False)
    dataset = load_split(cfg, "train")
    items = [dataset[i % len(dataset)] for i in range(batch_size)]
    vocab = Vocab.build(text for _, text, _ in items)
    batch = Collator(vocab, max_len=max_len)(items).to(device)
    model_cfg = ModelConfig(num_classes=len(dataset.classes), vocab_size=len(vocab), image_size=image_size,
                            channels=tuple(channels), padding=padding, hidden_size=hidden_size)
    torch.manual_seed(0)
    weights = MultimodalClassifier(model_cfg, "native").state_dict()
    images = image_transform(cfg, train=False)(batch.images)
    return StepCase(model_cfg, weights, images, batch.tokens, batch.lengths, batch.labels)


def make_train_step(case: StepCase, variant: str,
                    capturable: bool = False) -> Tuple[Callable[[], Tensor], torch.nn.Module]:
    """(step, model): ``step()`` runs forward, cross-entropy, backward and a fused AdamW step, returning the loss.

    ``capturable``: an optimizer that a CUDA graph can capture (torch.optim's ``capturable``). With it the whole
    "mmfast" step on CUDA is capturable: its ops take the lengths on the device, where make_case puts them, while
    the native model's packing needs them on the host."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown training-step variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    backend = "mmfast" if variant == "mmfast" else "native"
    model = MultimodalClassifier(case.model_config, backend).to(case.device)
    model.load_state_dict(case.weights)
    images = case.images
    if variant == "native_channels_last":
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    forward = torch.compile(model, dynamic=False) if variant == "native_compile" else model
    fused = case.device.type in ("cpu", "cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused, capturable=capturable)

    def step() -> Tensor:
        loss = F.cross_entropy(forward(images, case.tokens, case.lengths), case.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step, model


def saved_tensor_bytes(fn: Callable[[], object], exclude: Iterable[Tensor] = ()) -> int:
    """Bytes of the distinct storages that autograd saves for backward while ``fn()`` runs its forward pass,
    leaving out the storages of ``exclude`` (inputs and parameters, which the caller holds anyway).

    Counted through saved-tensor hooks, so it covers native autograd nodes and mmfast's C++ autograd Functions
    alike; what backward will keep alive, not the peak of the forward.
    """
    held = {t.untyped_storage().data_ptr() for t in exclude}
    saved: Dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in held:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values())


def op_memory_cases(device="cpu") -> Dict[str, Tuple[Callable[[], object], Callable[[], object], List[Tensor]]]:
    """Each op at the seed's shapes (batch 64): name -> (mmfast forward, native forward, inputs and parameters).

    The native side is the composition a user writes: conv2d + relu + max_pool2d; pack_padded_sequence + LSTM
    (lengths uniform in [0, T], T itself present: padding-heavy, the case least favourable to mmfast, whose
    workspace is padded); cat + dropout + linear + relu.
    """
    from . import ops, reference
    from .testing import make_concat_linear_inputs, make_conv2d_relu_maxpool2d_inputs, make_lstm_inputs

    torch.manual_seed(0)
    x, w, b, pad = make_conv2d_relu_maxpool2d_inputs(device, torch.float32, n=64, c=3, h=32, w=32, o=32, k=3,
                                                     padding=0, requires_grad=True)
    x.requires_grad_(False)
    x2, w2, b2, pad2 = make_conv2d_relu_maxpool2d_inputs(device, torch.float32, n=64, c=32, h=16, w=16, o=64, k=3,
                                                         padding=1, requires_grad=True)
    seq, lengths, _, _, *lstm_w = make_lstm_inputs(device, torch.float32, b=64, t=32, i=128, h=64, state=False,
                                                   requires_grad=True)
    feats, fw, fb = make_concat_linear_inputs(device, torch.float32, n=64, widths=(7200, 64), o=128,
                                              requires_grad=True)
    return {
        "conv2d_relu_maxpool2d 3->32 32x32": (lambda: ops.conv2d_relu_maxpool2d(x, w, b, pad),
                                              lambda: reference.conv2d_relu_maxpool2d(x, w, b, pad), [x, w, b]),
        "conv2d_relu_maxpool2d 32->64 16x16": (lambda: ops.conv2d_relu_maxpool2d(x2, w2, b2, pad2),
                                               lambda: reference.conv2d_relu_maxpool2d(x2, w2, b2, pad2),
                                               [x2, w2, b2]),
        "lstm T32 E128 H64": (lambda: ops.lstm(seq, lengths, None, None, *lstm_w),
                              lambda: reference.lstm(seq, lengths, None, None, *lstm_w), [seq, *lstm_w]),
        "concat_linear [7200, 64] -> 128": (
            lambda: ops.concat_linear(feats, fw, fb, 0.5, training=True, relu=True),
            lambda: reference.concat_linear(feats, fw, fb, 0.5, training=True, relu=True), [*feats, fw, fb]),
    }


def op_memory_table(device="cpu") -> str:
    """Markdown: the bytes each op's forward keeps for backward (inputs and parameters left out), vs native."""
    lines = ["| op, batch 64 | native | mmfast | mmfast / native |", "| --- | ---: | ---: | ---: |"]
    for name, (fused, native, leaves) in op_memory_cases(device).items():
        kept_native = saved_tensor_bytes(native, exclude=leaves)
        kept_fused = saved_tensor_bytes(fused, exclude=leaves)
        lines.append(f"| {name} | {kept_native / 2**20:.2f} MiB | {kept_fused / 2**20:.2f} MiB | "
                     f"{kept_fused / kept_native:.2f} |")
    return "\n".join(lines)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train_step(data: str = "builtin", device="cpu", batch_size: int = 64, steps: int = 20, warmup: int = 3,
                     channels: Sequence[int] = (32,), padding: int = 0, image_size: int = 32, hidden_size: int = 64,
                     max_len: int = 32, variants: Sequence[str] = ("native", "mmfast")) -> List[Dict]:
    """Median time of one training step per variant, and the activation memory its forward keeps for backward.

    Every variant gets the same batch and the same initial weights; the first is the baseline of the speedup
    column.
    """
    case = make_case(data, device, batch_size, channels, padding, image_size, hidden_size, max_len)
    rows = []
    for variant in variants:
        step, model = make_train_step(case, variant)
        for _ in range(warmup):
            step()
        _sync(case.device)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            _sync(case.device)
            times.append(time.perf_counter() - t0)
        median = sorted(times)[len(times) // 2]
        # Measured on the eager model (torch.compile'd graphs save what inductor chooses, not visible here).
        saved = saved_tensor_bytes(lambda: F.cross_entropy(model(case.images, case.tokens, case.lengths),
                                                           case.labels),
                                   exclude=[case.images, *model.parameters()])
        rows.append({"variant": variant, "ms_per_step": median * 1e3, "samples_per_s": case.batch_size / median,
                     "saved_mb": saved / 2**20, "device": str(case.device), "batch_size": case.batch_size})
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
             f"{'variant':<21} {'ms/step':>9} {'samples/s':>10} {'speedup':>8} {'saved for bwd (eager)':>22}"]
    for r in rows:
        lines.append(f"{r['variant']:<21} {r['ms_per_step']:>9.2f} {r['samples_per_s']:>10.0f} "
                     f"{r['speedup']:>7.2f}x {r['saved_mb']:>19.1f} MB")
    return "\n".join(lines)
