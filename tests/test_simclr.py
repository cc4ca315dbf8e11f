"""SimCLR: NT-Xent against the reference's `add_contrastive_loss` (written from its semantics), and a run through
train.py (tiny ResNet, background swap on) that exports a stock `ResNetModel`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from two_view_helpers import DATA, OPTIM, RESNET_SECTION, TINY_RESNET, load_stock, metric_rows, train, views

from modeling import SimCLRConfig, SimCLRForPretraining
from modeling.losses import nt_xent_loss

LARGE_NUM = 1e9


def ref_add_contrastive_loss(hidden1: torch.Tensor, hidden2: torch.Tensor, temperature: float) -> torch.Tensor:
    """google-research/simclr `objective.add_contrastive_loss` (hidden_norm=True, one replica): logits of each view
    against the other view (ab) and against its own view with itself masked by -LARGE_NUM (aa), softmax
    cross-entropy with the positive at column i, `loss_a + loss_b` (each a batch mean)."""
    hidden1, hidden2 = F.normalize(hidden1, dim=-1), F.normalize(hidden2, dim=-1)
    b = hidden1.shape[0]
    labels = F.one_hot(torch.arange(b), 2 * b).to(hidden1.dtype)
    masks = F.one_hot(torch.arange(b), b).to(hidden1.dtype)
    logits_aa = hidden1 @ hidden1.T / temperature - masks * LARGE_NUM
    logits_bb = hidden2 @ hidden2.T / temperature - masks * LARGE_NUM
    logits_ab = hidden1 @ hidden2.T / temperature
    logits_ba = hidden2 @ hidden1.T / temperature

    def softmax_ce(logits: torch.Tensor) -> torch.Tensor:
        return -(labels * F.log_softmax(logits, dim=1)).sum(1).mean()

    return softmax_ce(torch.cat([logits_ab, logits_aa], 1)) + softmax_ce(torch.cat([logits_ba, logits_bb], 1))


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_equals_the_reference(temperature):
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(6, 8, generator=g)
    z2 = z1 + 0.5 * torch.randn(6, 8, generator=g)
    a1, a2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    got = 2 * nt_xent_loss(a1, a2, temperature)  # the reference sums its two views' means
    got.backward()
    r1, r2 = z1.double().requires_grad_(), z2.double().requires_grad_()
    ref = ref_add_contrastive_loss(r1, r2, temperature)
    ref.backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(a1.grad.double(), r1.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a2.grad.double(), r2.grad, atol=1e-6, rtol=1e-5)


def test_model_forward_and_reload(tmp_path):
    model = SimCLRForPretraining(SimCLRConfig(backbone_config=TINY_RESNET, hidden_dim=32, out_dim=16,
                                              loss_temperature=0.2))
    x1, x2 = views()
    out = model(x1, x2)
    z1, z2 = (model.projector(model.backbone(pixel_values=x).pooler_output.flatten(1)) for x in (x1, x2))
    assert torch.allclose(out.loss, nt_xent_loss(z1, z2, 0.2), rtol=1e-5)
    assert model.health({"embedding_std": 0.01})[0].startswith("collapse")
    model.save_pretrained(tmp_path / "m")
    loaded = SimCLRForPretraining.from_pretrained(tmp_path / "m")
    assert loaded.config.loss_temperature == 0.2 and loaded.config.out_dim == 16


def test_trains_with_background_swap_and_exports_stock_resnet(tmp_path):
    out = tmp_path / "run"
    config = {"method": "simclr", "model": RESNET_SECTION, "simclr": {"hidden_dim": 32, "out_dim": 16},
              "crops": {"global_size": 32}, "views": {"background_swap": 0.5, "color_jitter": [0.4, 0.4, 0.4, 0.5]},
              "data": DATA, "train": {"save_every": 1000, "log_every": 1},
              "optim": {**OPTIM, "base_lr": 1e-3, "epochs": 1}}
    log = train(config, tmp_path, f"train.output_dir={out}")
    assert "background swap: 288 images" in log
    rows = metric_rows(out)
    assert sorted(rows) == list(range(1, 7))
    assert {"loss", "positive_similarity", "embedding_std"} <= rows[6].keys()
    code = "print(type(m).__name__, tuple(m(pixel_values=torch.randn(1, 3, 32, 32)).pooler_output.shape))"
    assert load_stock(out / "backbone", code, tmp_path).strip() == "ResNetModel (1, 32, 1, 1)"
    assert "SimCLR" in (out / "backbone" / "README.md").read_text()


def test_multicrop_hue_setting_is_refused_by_the_two_view_pipeline(tmp_path):
    """`crops.hue` belongs to the multi-crop pipeline; a two-view method would silently ignore it."""
    import yaml

    from training.config import ConfigError
    from training.methods import load_train_config
    from training.pipelines import _two_views

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"method": "simclr", "model": RESNET_SECTION, "crops": {"global_size": 32}}))
    cfg = load_train_config(["--config", str(path), "crops.hue=0.5"])
    with pytest.raises(ConfigError, match=r"views.color_jitter=\[0.4,0.4,0.2,0.5\]"):
        _two_views({}, cfg, None, rank=0, world_size=1)
