"""The ``mmfast`` command: train, evaluate, predict, bench."""
import argparse
import json
import sys
from dataclasses import fields
from typing import List, Optional


__all__ = ["main"]


def _channels(text: str):
    try:
        return tuple(int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 32,64,128, got {text!r}")


def _variants(text: str):
    from .bench import VARIANTS

    names = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [v for v in names if v not in VARIANTS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected comma-separated variants from {', '.join(VARIANTS)}, got {text!r}")
    return names


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="builtin", help="builtin | cifar10:DIR | manifest:FILE (default: builtin)")
    p.add_argument("--backend", default="mmfast", choices=["mmfast", "native"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--batch-size", type=int, default=64)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmfast", description="Train and run multimodal (image + text) "
                                     "classifiers on mmfast's fused ops.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train on a dataset, then evaluate on its test split")
    _common(t)
    t.add_argument("--epochs", type=int, default=5)
    t.add_argument("--out", default="runs/latest", help="folder for checkpoint, metrics and reports")
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--channels", type=_channels, default=(32,), help="conv blocks, e.g. 32 or 32,64,128")
    t.add_argument("--padding", type=int, default=0)
    t.add_argument("--image-size", type=int, default=32)
    t.add_argument("--max-len", type=int, default=32)
    t.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="autocast on CUDA")
    t.add_argument("--modality", default="both", choices=["both", "image", "text"],
                   help="train an ablation that sees only one modality")
    t.add_argument("--no-augment", dest="augment", action="store_false")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--train-size", type=int, default=4000, help="built-in data: training samples")
    t.add_argument("--max-steps", type=int, default=None, help="cap on steps per epoch")
    t.add_argument("--num-workers", type=int, default=0)

    e = sub.add_parser("evaluate", help="evaluate a checkpoint on a dataset split")
    _common(e)
    e.add_argument("--checkpoint", default="runs/latest/checkpoint.pt")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("predict", help="top classes for one image file and one caption")
    p.add_argument("image", help="image file (any format Pillow reads)")
    p.add_argument("text", help="the caption")
    p.add_argument("--checkpoint", default="runs/latest/checkpoint.pt")
    p.add_argument("--device", default="cpu")
    p.add_argument("--topk", type=int, default=3)

    b = sub.add_parser("bench", help="training step time of both backends on the same batch and weights")
    b.add_argument("--data", default="builtin", help="builtin | cifar10:DIR | manifest:FILE (default: builtin)")
    b.add_argument("--device", default="cpu")
    b.add_argument("--batch-size", type=int, default=64)
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--channels", type=_channels, default=(32,))
    b.add_argument("--padding", type=int, default=0)
    b.add_argument("--image-size", type=int, default=32)
    b.add_argument("--hidden-size", type=int, default=64)
    b.add_argument("--max-len", type=int, default=32)
    b.add_argument("--memory", action="store_true",
                   help="also print the memory each op keeps for backward, mmfast vs native, at the seed's shapes")
    b.add_argument("--variants", type=_variants, default=("native", "mmfast"),
                   help="comma-separated, the first is the baseline: native, mmfast, native_channels_last, "
                        "native_compile (compiles first: adds a minute or more on CPU) (default: native,mmfast)")
    return parser


def _train_config(args, **extra):
    from .train import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(extra)
    return TrainConfig(**values)


def _cmd_train(args) -> int:
    from .train import fit

    cfg = _train_config(args)
    print(f"mmfast {__import__('mmfast').__version__}: training on {cfg.data} with backend={cfg.backend} "
          f"on {cfg.device} for {cfg.epochs} epochs -> {cfg.out}")
    summary = fit(cfg)
    if "test" in summary:
        print("test split:", summary["test"].format(), sep="\n")
        if summary["history"]:
            print(f"throughput: {summary['history'][-1]['samples_per_s']:.0f} training samples/s "
                  f"({summary['device']}, backend={cfg.backend})")
    return 0


def _cmd_evaluate(args) -> int:
    from torch.utils.data import DataLoader

    from .data import Collator
    from .train import TrainConfig, evaluate, image_transform, load_model, load_split

    model, vocab, state = load_model(args.checkpoint, backend=args.backend, device=args.device)
    cfg = TrainConfig(**{**state["train_config"], "data": args.data, "device": args.device, "resume": False,
                         "backend": args.backend, "amp": "none"})
    dataset = load_split(cfg, args.split)
    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=Collator(vocab, max_len=cfg.max_len))
    report = evaluate(model, loader, args.device, state["classes"], cfg.modality, image_transform(cfg, False))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 0


def _cmd_predict(args) -> int:
    from .train import predict

    for name, prob in predict(args.checkpoint, args.image, args.text, args.topk, args.device):
        print(f"{prob:7.2%}  {name}")
    return 0


def _cmd_bench(args) -> int:
    from .bench import bench_train_step, format_table

    rows = bench_train_step(data=args.data, device=args.device, batch_size=args.batch_size, steps=args.steps,
                            warmup=args.warmup, channels=args.channels, padding=args.padding,
                            image_size=args.image_size, hidden_size=args.hidden_size, max_len=args.max_len,
                            variants=args.variants)
    print(format_table(rows))
    if args.memory:
        from .bench import op_memory_table

        print(f"\nmemory each op keeps for backward (inputs and parameters left out), {args.device}:")
        print(op_memory_table(args.device))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"train": _cmd_train, "evaluate": _cmd_evaluate, "predict": _cmd_predict, "bench": _cmd_bench}
    try:
        return handlers[args.command](args)
    except (FileNotFoundError, ValueError) as e:  # user errors: one clear line, no traceback
        print(f"mmfast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
