import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from mmfast.models import ModelConfig, MultimodalClassifier


def _batch(cfg: ModelConfig, b=6, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    lengths = torch.randint(0, t + 1, (b,), generator=g)
    lengths[0] = t
    tokens = torch.randint(1, cfg.vocab_size, (b, t), generator=g)
    tokens[torch.arange(t)[None, :] >= lengths[:, None]] = 0
    labels = torch.randint(0, cfg.num_classes, (b,), generator=g)
    return images, tokens, lengths, labels


@pytest.mark.parametrize("channels,padding,text_proj", [((32,), 0, None), ((8, 16, 32), 1, 16), ((4, 8), 0, None)])
def test_backends_share_state_dict_and_give_same_loss_and_grads(channels, padding, text_proj):
    cfg = ModelConfig(num_classes=5, vocab_size=50, image_size=20, channels=channels, padding=padding,
                      embed_dim=12, hidden_size=10, text_proj=text_proj, fusion_dim=16, dropout=0.5)
    torch.manual_seed(0)
    fused = MultimodalClassifier(cfg, "mmfast").double()
    native = MultimodalClassifier(cfg, "native").double()
    assert list(fused.state_dict()) == list(native.state_dict())
    native.load_state_dict(fused.state_dict())
    images, tokens, lengths, labels = _batch(cfg)
    images = images.double()
    for model in (fused, native):
        model.eval()  # dropout masks differ between backends by design; eval compares the math
    loss_f = F.cross_entropy(fused(images, tokens, lengths), labels)
    loss_n = F.cross_entropy(native(images, tokens, lengths), labels)
    assert_close(loss_f, loss_n, rtol=1e-10, atol=1e-10)
    assert_close(torch.autograd.grad(loss_f, list(fused.parameters())),
                 torch.autograd.grad(loss_n, list(native.parameters())), rtol=1e-9, atol=1e-10)


def test_cpu_autocast_runs_the_ops_in_float32_and_matches_the_float32_loss():
    # Under CPU autocast the text projection is bfloat16 while the CNN features are float32; the ops' autocast
    # kernels cast both to float32 (the CPU kernels' precision), as a native float32 op would run.
    cfg = ModelConfig(num_classes=5, vocab_size=50, image_size=20, channels=(8, 16), padding=1, embed_dim=12,
                      hidden_size=10, text_proj=16, fusion_dim=16)
    torch.manual_seed(0)
    model = MultimodalClassifier(cfg, "mmfast").eval()
    images, tokens, lengths, labels = _batch(cfg)
    loss_fp32 = F.cross_entropy(model(images, tokens, lengths), labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(images, tokens, lengths)
        loss = F.cross_entropy(logits.float(), labels)
    assert logits.dtype == torch.bfloat16
    loss.backward()
    assert_close(loss, loss_fp32, rtol=0.02, atol=0.02)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_training_mode_dropout_is_reproducible():
    cfg = ModelConfig(num_classes=3, vocab_size=20, image_size=16, embed_dim=8, hidden_size=8, fusion_dim=8)
    model = MultimodalClassifier(cfg).train()
    images, tokens, lengths, _ = _batch(cfg)
    torch.manual_seed(1)
    first = model(images, tokens, lengths)
    torch.manual_seed(1)
    assert torch.equal(model(images, tokens, lengths), first)


def test_config_errors():
    with pytest.raises(ValueError, match="backend must be one of"):
        MultimodalClassifier(ModelConfig(num_classes=3, vocab_size=20), "cudnn")
    with pytest.raises(ValueError, match="shrink"):
        ModelConfig(num_classes=3, vocab_size=20, image_size=16, channels=(8, 8, 8, 8)).image_feature_shape()
    with pytest.raises(ValueError, match="num_classes >= 2"):
        ModelConfig(num_classes=1, vocab_size=20)
    assert ModelConfig.from_dict(ModelConfig(num_classes=3, vocab_size=9).to_dict()).vocab_size == 9
