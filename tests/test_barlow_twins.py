"""Barlow Twins: the loss against the reference's `BarlowTwins.forward` (1 process, and 2 gloo processes equal to
one process on the concatenated batch), the model, a LARS run through train.py with a stock `ResNetModel` export,
and a collapsed run (λ = 0, no BatchNorm) caught by the method's health signal."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from two_view_helpers import (
    DATA,
    OPTIM,
    RESNET_SECTION,
    TINY_RESNET,
    TINY_VIT,
    TRAIN,
    VIT_SECTION,
    assert_ddp_equals_one_process,
    load_stock,
    metric_rows,
    run_two_processes,
    train,
    views,
)

from modeling import BarlowTwinsConfig, BarlowTwinsForPretraining
from modeling.losses import barlow_twins_cross_correlation, barlow_twins_loss, off_diagonal

TOL = 1e-5


# ---- the reference (barlowtwins main.py), written from its semantics ---------------------------------------------


def ref_off_diagonal(x: torch.Tensor) -> torch.Tensor:
    n, m = x.shape
    assert n == m
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def ref_barlow_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float) -> torch.Tensor:
    """`BarlowTwins.forward` after the projector, one process (`self.bn`: BatchNorm1d without affine, training)."""
    bn = nn.BatchNorm1d(z1.shape[1], affine=False).train()
    c = bn(z1).T @ bn(z2)
    c = c / z1.shape[0]  # c.div_(args.batch_size); the all_reduce is the identity in one process
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = ref_off_diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag


def _loss_and_grads(fn, z1, z2, lambd):
    z1, z2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss = fn(z1, z2, lambd)
    loss.backward()
    return loss.detach(), z1.grad, z2.grad


def _inputs(batch: int = 8, dim: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(batch, dim, generator=g) * 2 + 0.5
    return z1, z1 + 0.5 * torch.randn(batch, dim, generator=g)


@pytest.mark.parametrize("lambd", [0.0051, 0.0, 1.0])
def test_loss_matches_reference(lambd):
    z1, z2 = _inputs()
    for got, ref in zip(_loss_and_grads(barlow_twins_loss, z1, z2, lambd), _loss_and_grads(ref_barlow_loss, z1, z2, lambd)):
        assert (got - ref).abs().max() <= TOL * max(1.0, ref.abs().max().item())


def test_off_diagonal_and_hand_values():
    c = torch.arange(16.0).reshape(4, 4)
    assert torch.equal(off_diagonal(c), ref_off_diagonal(c))
    assert torch.equal(off_diagonal(c), c[~torch.eye(4, dtype=torch.bool)])
    # perfectly correlated, decorrelated dimensions: c = identity, loss 0
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert barlow_twins_loss(z, z).item() == pytest.approx(0.0, abs=1e-4)
    c = barlow_twins_cross_correlation(z, z)
    assert torch.allclose(c, torch.eye(2) / (1 + 1e-5) ** 1, atol=1e-4)
    # no normalisation: c = z1ᵀ z2 / N as it is
    assert torch.allclose(barlow_twins_cross_correlation(z, 2 * z, normalize=False), 2 * z.T @ z / 4)


# ---- 2 gloo processes -------------------------------------------------------------------------------------------


def _two_process(rank: int, world: int, z1: torch.Tensor, z2: torch.Tensor, expected: tuple) -> None:
    rows = slice(rank * 4, rank * 4 + 4)
    loss, g1, g2 = _loss_and_grads(barlow_twins_loss, z1[rows], z2[rows], 0.0051)
    # every process holds the loss of the global batch ...
    assert (loss - expected[0]).abs() <= TOL * expected[0].abs()
    # ... and, as DDP averages gradients over processes, W × its rows' share of the 1-process gradient
    assert (g1 / world - expected[1][rows]).abs().max() <= TOL
    assert (g2 / world - expected[2][rows]).abs().max() <= TOL
    c = barlow_twins_cross_correlation(z1[rows], z2[rows])
    summed = c.clone()
    dist.all_reduce(summed)
    assert torch.allclose(summed / world, c)  # identical on both processes


@pytest.mark.slow  # DDP equivalence: train.py's and text alignment's two-process tests stay fast
def test_two_processes_equal_one_process_on_the_concatenated_batch(tmp_path):
    z1, z2 = _inputs()
    expected = _loss_and_grads(ref_barlow_loss, z1, z2, 0.0051)
    run_two_processes(tmp_path, _two_process, z1, z2, expected)


# ---- the model ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", [TINY_VIT, TINY_RESNET], ids=["vit", "resnet"])
def test_model(backbone, tmp_path):
    torch.manual_seed(0)
    model = BarlowTwinsForPretraining(BarlowTwinsConfig(backbone_config=backbone, projector_dims=[64, 64, 48]))
    dims = [(m.in_features, m.out_features) for m in model.projector if isinstance(m, nn.Linear)]
    assert dims == [(32, 64), (64, 64), (64, 48)]
    assert [type(m).__name__ for m in model.projector] == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear"]
    x1, x2 = views()
    out = model(x1, x2)
    z1, z2 = (model.projector(model.backbone(pixel_values=x).pooler_output.flatten(1)) for x in (x1, x2))
    assert torch.allclose(out.loss, ref_barlow_loss(z1, z2, 0.0051), rtol=1e-5)
    assert model.health({k: float(v.detach()) for k, v in out.items()}) == []
    model.save_pretrained(tmp_path / "m")
    loaded = BarlowTwinsForPretraining.from_pretrained(tmp_path / "m")
    assert loaded.config.projector_dims == [64, 64, 48] and type(loaded.backbone) is type(model.backbone)


def test_health_signals():
    model = BarlowTwinsForPretraining(BarlowTwinsConfig(backbone_config=TINY_VIT, projector_dims=[16]))
    assert "collapse" in model.health({"embedding_std": 0.01, "off_diagonal": 0.1})[0]
    assert "dimensional collapse" in model.health({"embedding_std": 0.5, "off_diagonal": 0.9})[0]
    assert model.health({"embedding_std": 0.5, "off_diagonal": 0.2}) == []


# ---- through train.py ----------------------------------------------------------------------------------------------


CONFIG = {"method": "barlow_twins", "model": RESNET_SECTION, "barlow": {"projector_dims": [64, 64]},
          "crops": {"global_size": 32}, "data": DATA, "train": TRAIN,
          # LARS with the reference's split: biases and BatchNorm at 0.0048 / 0.2 of the weights' lr, no decay
          "optim": {**OPTIM, "optimizer": "lars", "base_lr": 2.0, "bias_norm_lr_mult": 0.024,
                    "weight_decay": 1e-6, "weight_decay_end": 1e-6}}


def test_trains_with_lars_and_exports_stock_resnet(tmp_path):
    out = tmp_path / "run"
    log = train(CONFIG, tmp_path, f"train.output_dir={out}")
    rows = metric_rows(out)
    assert sorted(rows) == list(range(1, 13))
    assert {"loss", "on_diagonal", "off_diagonal", "embedding_std"} <= rows[12].keys()
    assert "collapse" not in log
    code = "print(type(m).__name__, tuple(m(pixel_values=torch.randn(1, 3, 32, 32)).pooler_output.shape))"
    assert load_stock(out / "backbone", code, tmp_path).strip() == "ResNetModel (1, 32, 1, 1)"
    card = (out / "backbone" / "README.md").read_text()
    assert "Barlow Twins" in card and "ResNetModel" in card


@pytest.mark.slow
def test_collapsed_run_is_reported(tmp_path):
    """λ = 0 and no BatchNorm on the embeddings: nothing keeps the dimensions apart; within a few dozen steps
    they become copies of each other, and the loop logs the method's warning."""
    out = tmp_path / "run"
    config = {**CONFIG, "barlow": {"projector_dims": [256, 256, 256], "lambd": 0.0, "normalize_embeddings": False},
              "crops": {"global_size": 48, "global_scale": [0.2, 1.0]},
              "optim": {**OPTIM, "optimizer": "adamw", "base_lr": 3e-2, "batch_size": 32, "epochs": 4,
                        "iters_per_epoch": 9},
              "model": {**RESNET_SECTION, "resnet_embedding_size": 16, "resnet_hidden_sizes": [16, 32, 64, 128]},
              "train": {"save_every": 1000, "log_every": 2}}
    log = train(config, tmp_path, f"train.output_dir={out}")
    assert "dimensional collapse: the embedding's dimensions are nearly copies of each other" in log


@pytest.mark.slow
def test_vit_with_adamw(tmp_path):
    out = tmp_path / "run"
    config = {**CONFIG, "model": VIT_SECTION, "optim": {**OPTIM, "epochs": 1, "base_lr": 5e-3}}
    train(config, tmp_path, f"train.output_dir={out}")
    assert load_stock(out / "backbone", "print(type(m).__name__)", tmp_path).strip() == "Dinov2Model"


@pytest.mark.slow
def test_two_process_training_equals_one_process(tmp_path):
    """ResNet + LARS, 3 steps under accelerate launch with 2 gloo processes (later steps drift apart slowly: LARS
    at this lr amplifies float summation-order differences)."""
    config = {**CONFIG, "optim": {**CONFIG["optim"], "epochs": 1}, "train": {"save_every": 1000, "log_every": 1}}
    assert_ddp_equals_one_process(config, tmp_path, steps=3)
