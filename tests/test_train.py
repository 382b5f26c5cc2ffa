"""The pipeline end to end on the CPU: training reaches its accuracy, ablations stay below their ceilings,
checkpoints are atomic, resume continues exactly, DDP keeps replicas identical, and the CLI works."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from mmfast import train as train_mod
from mmfast.cli import main as cli
from mmfast.train import TrainConfig, fit, load_checkpoint, save_checkpoint


def _cfg(tmp_path, **kw):
    base = dict(out=str(tmp_path / "run"), epochs=1, train_size=128, val_size=32, test_size=32, batch_size=32,
                progress=False, hidden_size=16, embed_dim=16, fusion_dim=32, channels=(8,))
    base.update(kw)
    return TrainConfig(**base)


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def ablation_runs(tmp_path_factory):
    """The built-in task trained with both modalities and with each alone (same budget, same seed).
    BuiltinShapes' documented ceilings: image only 50 %, text only 25 %, both 100 %."""
    tmp = tmp_path_factory.mktemp("ablation")
    results = {}
    for modality in ("both", "image", "text"):
        cfg = TrainConfig(out=str(tmp / modality), epochs=4, train_size=2000, val_size=400, test_size=400,
                          modality=modality, augment=False, progress=False)
        results[modality] = fit(cfg, log=_quiet)["test"]
    return results


def test_fused_model_learns_the_builtin_task(ablation_runs):
    both = ablation_runs["both"]
    assert both.accuracy >= 0.85, both
    assert both.macro_f1 >= 0.85, both
    assert sum(map(sum, both.confusion)) == both.samples == 400


def test_fused_model_beats_single_modality_ablations(ablation_runs):
    both, image, text = (ablation_runs[m].accuracy for m in ("both", "image", "text"))
    assert image <= 0.5 + 0.08 and text <= 0.25 + 0.08  # the ceilings, plus sampling noise on 400 samples
    assert both >= image + 0.25 and both >= text + 0.5


def test_run_writes_its_files_and_is_reproducible(tmp_path):
    cfg = _cfg(tmp_path, epochs=2)
    first = fit(cfg, log=_quiet)
    out = tmp_path / "run"
    assert {p.name for p in out.iterdir()} >= {"checkpoint.pt", "vocab.json", "config.json", "metrics.jsonl",
                                              "eval.json"}
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in lines] == [1, 2]
    assert all(row["samples_per_s"] > 0 for row in lines)
    report = json.loads((out / "eval.json").read_text())
    assert len(report["confusion"]) == 8 and report["samples"] == 32
    second = fit(_cfg(tmp_path, epochs=2, out=str(tmp_path / "again")), log=_quiet)
    for a, b in zip(first["model"].state_dict().values(), second["model"].state_dict().values()):
        assert torch.equal(a, b)


def test_resume_continues_exactly(tmp_path):
    straight = fit(_cfg(tmp_path, epochs=3, out=str(tmp_path / "straight")), log=_quiet)
    fit(_cfg(tmp_path, epochs=1, out=str(tmp_path / "split")), log=_quiet)
    resumed = fit(_cfg(tmp_path, epochs=3, out=str(tmp_path / "split"), resume=True), log=_quiet)
    assert load_checkpoint(tmp_path / "split" / "checkpoint.pt")["epoch"] == 2
    for name, a in straight["model"].state_dict().items():
        assert torch.equal(a, resumed["model"].state_dict()[name]), name
    rows = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2, 3]


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"epoch": 1})
    real_save = torch.save

    def crash_midway(obj, f):
        f.write(b"partial bytes")
        raise KeyboardInterrupt("simulated crash while saving")

    monkeypatch.setattr(train_mod.torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.setattr(train_mod.torch, "save", real_save)
    assert torch.load(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind


def test_bad_checkpoints_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_checkpoint(tmp_path / "nothing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pt"):
        load_checkpoint(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": 1}, foreign)
    with pytest.raises(ValueError, match="foreign.pt: not an mmfast checkpoint"):
        load_checkpoint(foreign)


def test_config_errors():
    with pytest.raises(ValueError, match="backend"):
        TrainConfig(backend="cudnn")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        TrainConfig(amp="bf16", device="cpu")
    with pytest.raises(ValueError, match="modality"):
        TrainConfig(modality="audio")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    cfg = TrainConfig(out=out, epochs=1, train_size=128, val_size=32, test_size=32, batch_size=16, progress=False,
                      hidden_size=16, embed_dim=16, fusion_dim=32, channels=(8,), max_steps=3)
    summary = fit(cfg, log=_quiet)
    torch.save(summary["model"].state_dict(), os.path.join(result_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_ddp_two_cpu_processes_keep_replicas_identical(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "run"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name
    start = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"]
    assert all(torch.equal(start[k], r0[k]) for k in r0)  # rank 0 checkpointed the trained replica
    train_mod.seed_everything(0)  # the weights fit started from: training moved them
    init = train_mod.build_model(TrainConfig(hidden_size=16, embed_dim=16, fusion_dim=32, channels=(8,)),
                                 len(start["embedding.weight"]), 8).state_dict()
    assert not torch.equal(init["classifier.weight"], r0["classifier.weight"])


def test_cli_train_evaluate_predict_bench(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--train-size", "64", "--max-steps", "2", "--epochs", "1", "--batch-size", "16", "--out", str(out)]
    assert cli(["train", *args]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "samples/s" in printed
    ckpt = str(out / "checkpoint.pt")
    assert cli(["evaluate", "--checkpoint", ckpt, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0.0 <= report["accuracy"] <= 1.0 and report["samples"] == 500
    assert cli(["evaluate", "--checkpoint", ckpt, "--backend", "native"]) == 0
    assert "confusion matrix" in capsys.readouterr().out
    image = tmp_path / "shape.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    assert cli(["predict", str(image), "A wooden thing, on the table!", "--checkpoint", ckpt, "--topk", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("%" in line for line in lines)
    assert cli(["bench", "--steps", "2", "--warmup", "1", "--batch-size", "8", "--memory",
                "--variants", "native,mmfast,native_channels_last"]) == 0
    table = capsys.readouterr().out
    assert "native_channels_last" in table and "mmfast" in table and "cpu" in table
    assert "memory each op keeps for backward" in table and "| lstm T32 E128 H64 |" in table


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    assert cli(["predict", str(tmp_path / "missing.png"), "text", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "none.pt" in capsys.readouterr().err
    assert cli(["train", "--data", "imagenet", "--out", str(tmp_path / "x")]) == 2
    assert "unknown dataset spec" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli(["bench", "--variants", "native,fast"])
    assert exit_info.value.code == 2 and "expected comma-separated variants" in capsys.readouterr().err
