"""MoCo v3: the loss against the reference's `MoCo.contrastive_loss` (1 process and 2 gloo processes), BatchNorm
over the global batch, the model (ViT stability trick, momentum encoder and schedule, health) and a run through
train.py whose export loads as a stock `Dinov2Model`."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
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

from modeling import MoCoV3Config, MoCoV3ForPretraining
from modeling.losses import moco_v3_loss
from modeling.two_view import GlobalBatchNorm, pooled_features, pooled_two_views

TOL = 1e-5


# ---- the reference (moco/builder.py), written from its semantics ----------------------------------------------


def ref_concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    if not dist.is_initialized():
        return tensor
    parts = [torch.ones_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts)


def ref_contrastive_loss(q: torch.Tensor, k: torch.Tensor, T: float) -> torch.Tensor:
    q = F.normalize(q, dim=1)
    k = F.normalize(k, dim=1)
    with torch.no_grad():
        k = ref_concat_all_gather(k)
    logits = torch.einsum("nc,mc->nm", [q, k]) / T
    N = logits.shape[0]
    rank = dist.get_rank() if dist.is_initialized() else 0
    labels = torch.arange(N, dtype=torch.long) + N * rank
    return nn.CrossEntropyLoss()(logits, labels) * (2 * T)


def ref_moco_loss(q1, q2, k1, k2, T):
    return ref_contrastive_loss(q1, k2, T) + ref_contrastive_loss(q2, k1, T)


def _inputs(batch: int = 6, dim: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, dim, generator=g) * 3 for _ in range(4)]


def _loss_and_query_grads(fn, q1, q2, k1, k2, T):
    q1, q2 = q1.clone().requires_grad_(), q2.clone().requires_grad_()
    loss = fn(q1, q2, k1, k2, T)
    loss.backward()
    return loss.detach(), q1.grad, q2.grad


@pytest.mark.parametrize("temperature", [0.2, 1.0])
def test_loss_matches_reference(temperature):
    q1, q2, k1, k2 = _inputs()
    got = _loss_and_query_grads(moco_v3_loss, q1, q2, k1, k2, temperature)
    ref = _loss_and_query_grads(ref_moco_loss, q1, q2, k1, k2, temperature)
    for a, b in zip(got, ref):
        assert (a - b).abs().max() <= TOL
    # keys are targets: no gradient reaches them
    q1, k1 = q1.clone().requires_grad_(), k1.clone().requires_grad_()
    moco_v3_loss(q1, q2, k1, k2, temperature).backward()
    assert k1.grad is None and q1.grad is not None


def test_loss_hand_value():
    # One image per view, its key equal to its query: logit 1/T for the only (positive) key, CE 0.
    q = torch.tensor([[1.0, 0.0]])
    assert moco_v3_loss(q, q, q, q, 0.2).item() == pytest.approx(0.0, abs=1e-6)
    # Two images, orthogonal keys: CE = log(1 + e^{-1/T}) per view, times 2T, two views.
    q = torch.eye(2)
    expected = 2 * (2 * 0.5) * math.log(1 + math.exp(-1 / 0.5))
    assert moco_v3_loss(q, q, q, q, 0.5).item() == pytest.approx(expected, rel=1e-6)


# ---- 2 gloo processes: equal to one process on the concatenated batch -----------------------------------------


def _two_process_loss(rank: int, world: int, inputs: list[torch.Tensor], expected: dict) -> None:
    rows = slice(rank * 3, rank * 3 + 3)
    q1, q2, k1, k2 = (t[rows] for t in inputs)
    loss, g1, g2 = _loss_and_query_grads(moco_v3_loss, q1, q2, k1, k2, 0.2)
    ref_loss, r1, r2 = _loss_and_query_grads(ref_moco_loss, q1, q2, k1, k2, 0.2)
    # the reference's own multi-process semantics, process by process
    assert (loss - ref_loss).abs() <= TOL and (g1 - r1).abs().max() <= TOL and (g2 - r2).abs().max() <= TOL
    # DDP averages losses and gradients over processes: that average is the 1-process result on all rows
    mean = loss.clone()
    dist.all_reduce(mean)
    assert (mean / world - expected["loss"]).abs() <= TOL
    assert (g1 / world - expected["g1"][rows]).abs().max() <= TOL
    assert (g2 / world - expected["g2"][rows]).abs().max() <= TOL


def _two_process_batch_norm(rank: int, world: int, x: torch.Tensor, weights: torch.Tensor, expected: dict) -> None:
    rows = slice(rank * 5, rank * 5 + 5)
    torch.manual_seed(0)
    bn = GlobalBatchNorm.convert(nn.Sequential(nn.BatchNorm1d(4)))[0]
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        bn.bias.copy_(torch.tensor([0.0, 1.0, -1.0, 0.5]))
    xr = x[rows].clone().requires_grad_()
    out = bn(xr)
    (out * weights[rows]).sum().backward()  # the sum over processes is the 1-process objective
    assert (out - expected["out"][rows]).abs().max() <= TOL
    assert (xr.grad - expected["grad"][rows]).abs().max() <= TOL
    weight_grad = bn.weight.grad.clone()
    dist.all_reduce(weight_grad)  # each process has its rows' share (DDP averages them)
    assert (weight_grad - expected["weight_grad"]).abs().max() <= TOL
    assert (bn.running_mean - expected["running_mean"]).abs().max() <= TOL
    assert (bn.running_var - expected["running_var"]).abs().max() <= TOL


@pytest.mark.slow  # multi-process: runs in `pytest -m slow` (CI's second half)
def test_two_processes(tmp_path):
    inputs = _inputs()
    loss, g1, g2 = _loss_and_query_grads(moco_v3_loss, *inputs, 0.2)
    ref_loss = _loss_and_query_grads(ref_moco_loss, *inputs, 0.2)[0]
    assert (loss - ref_loss).abs() <= TOL

    x, weights = torch.randn(10, 4) * 2 + 1, torch.randn(10, 4)
    bn = nn.BatchNorm1d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        bn.bias.copy_(torch.tensor([0.0, 1.0, -1.0, 0.5]))
    xg = x.clone().requires_grad_()
    out = bn(xg)
    (out * weights).sum().backward()
    bn_expected = {"out": out.detach(), "grad": xg.grad, "weight_grad": bn.weight.grad,
                   "running_mean": bn.running_mean, "running_var": bn.running_var}
    run_two_processes(tmp_path, _two_process_loss, inputs, {"loss": loss, "g1": g1, "g2": g2})
    run_two_processes(tmp_path, _two_process_batch_norm, x, weights, bn_expected)


# ---- the model -------------------------------------------------------------------------------------------------


def _model(backbone=TINY_VIT, **kwargs) -> MoCoV3ForPretraining:
    torch.manual_seed(0)
    return MoCoV3ForPretraining(MoCoV3Config(backbone_config=backbone, hidden_dim=64, out_dim=16, **kwargs))


def ref_sincos(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """vits.py `build_2d_sincos_position_embedding`, as written there (meshgrid's default 'ij' indexing)."""
    grid_w = torch.arange(grid, dtype=torch.float32)
    grid_h = torch.arange(grid, dtype=torch.float32)
    grid_w, grid_h = torch.meshgrid(grid_w, grid_h, indexing="ij")
    pos_dim = dim // 4
    omega = torch.arange(pos_dim, dtype=torch.float32) / pos_dim
    omega = 1.0 / (temperature**omega)
    out_w = torch.einsum("m,d->md", [grid_w.flatten(), omega])
    out_h = torch.einsum("m,d->md", [grid_h.flatten(), omega])
    pos_emb = torch.cat([torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)], dim=1)[None, :, :]
    return torch.cat([torch.zeros([1, 1, dim]), pos_emb], dim=1)


def test_vit_stability_trick_and_heads(tmp_path):
    model = _model()
    position = model.backbone.embeddings.position_embeddings
    assert torch.allclose(position, ref_sincos(4, 32), atol=1e-6)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert {"backbone.embeddings.position_embeddings", "backbone.embeddings.patch_embed.weight",
            "backbone.embeddings.patch_embed.bias"} <= frozen
    assert all(n in frozen for n, _ in model.named_parameters() if n.startswith("momentum_"))
    # the reference's MoCo_ViT heads: 3-layer projector, 2-layer predictor, both ending in an affine-free BN
    linears = [m for m in model.projector if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features, m.bias) for m in linears] == [(32, 64, None), (64, 64, None), (64, 16, None)]
    assert not model.projector[-1].affine and not model.predictor[-1].affine
    # frozen parameters stay frozen through save / load (transformers re-creates parameters while loading)
    model.save_pretrained(tmp_path / "m")
    loaded = MoCoV3ForPretraining.from_pretrained(tmp_path / "m")
    assert {n for n, p in loaded.named_parameters() if not p.requires_grad} == frozen


def test_resnet_variant():
    model = _model(TINY_RESNET, projector_layers=2, predictor_last_bn=False, loss_temperature=1.0)
    assert all((layer.layer[-1].normalization.weight == 0).all()  # zero_init_residual
               for stage in model.backbone.encoder.stages for layer in stage.layers)
    assert isinstance(model.predictor[-1], nn.Linear)  # MoCo_ResNet: no BN after the predictor
    x1, x2 = views()
    out = model(x1, x2)
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.backbone.embedder.embedder.convolution.weight.grad is not None


def test_forward_equals_the_reference_composition():
    model = _model()
    x1, x2 = views()
    out = model(x1, x2)
    # one ViT pass over both views equals two (no BatchNorm in the backbone)
    a1, a2 = pooled_two_views(model.backbone, x1, x2)
    assert torch.allclose(a1, pooled_features(model.backbone, x1), atol=1e-5)
    q1, q2 = model.predictor(model.projector(a1)), model.predictor(model.projector(a2))
    with torch.no_grad():
        k1 = model.momentum_projector(pooled_features(model.momentum_backbone, x1))
        k2 = model.momentum_projector(pooled_features(model.momentum_backbone, x2))
    assert torch.allclose(out.loss, ref_moco_loss(q1, q2, k1, k2, 0.2), atol=TOL)


def test_momentum_update_and_schedule():
    model = _model()
    with torch.no_grad():
        for p in model.backbone.parameters():
            if p.requires_grad:
                p.add_(1.0)
    before = [p.clone() for p in model.momentum_backbone.parameters()]
    model.after_optimizer_step(momentum=1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.momentum_backbone.parameters()))
    model.after_optimizer_step(momentum=0.75)
    for m, online, old in zip(model.momentum_backbone.parameters(), model.backbone.parameters(), before):
        assert torch.allclose(m, 0.75 * old + 0.25 * online)

    from training.methods.mocov3 import MoCoV3TrainConfig, mocov3_schedules

    cfg = MoCoV3TrainConfig()
    cfg.optim.epochs, cfg.optim.iters_per_epoch = 10, 7
    momentum = mocov3_schedules(cfg)["momentum"]
    for step in (0, 13, 69):  # main_moco.py adjust_moco_momentum(epoch + i / iters_per_epoch) of iteration step+1
        epoch = (step + 1) / 7
        reference = 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / 10)) * (1.0 - 0.99)
        assert momentum(step) == pytest.approx(reference, abs=1e-12)


def test_health_reports_collapsed_keys():
    model = _model()
    x1, x2 = views()
    assert model.health({k: float(v.detach()) for k, v in model(x1, x2).items()}) == []
    same = x1[:1].expand(4, -1, -1, -1)  # one image four times: the keys' BatchNorm maps them all to 0
    warnings = model.health({k: float(v.detach()) for k, v in model(same, same).items()})
    assert warnings and "collapse" in warnings[0]


# ---- through train.py --------------------------------------------------------------------------------------------


CONFIG = {"method": "mocov3", "model": VIT_SECTION, "moco": {"hidden_dim": 64, "out_dim": 16},
          "crops": {"global_size": 32}, "optim": {**OPTIM, "base_lr": 0.02}, "data": DATA, "train": TRAIN}


def test_trains_logs_and_exports_stock_dinov2(tmp_path):
    out = tmp_path / "run"
    train(CONFIG, tmp_path, f"train.output_dir={out}")
    rows = metric_rows(out)
    assert sorted(rows) == list(range(1, 13))
    assert {"loss", "positive_similarity", "key_std", "momentum", "lr"} <= rows[12].keys()
    assert rows[12]["momentum"] == pytest.approx(1.0) and rows[1]["momentum"] < 1.0
    printed = load_stock(out / "backbone", "print(type(m).__name__, m.config.patch_size)", tmp_path)
    assert printed.split() == ["Dinov2Model", "8"]
    card = (out / "backbone" / "README.md").read_text()
    assert "MoCo v3" in card and "mocov3" in card


@pytest.mark.slow
def test_resnet_recipe_shape_trains_with_lars(tmp_path):
    config = {**CONFIG, "model": RESNET_SECTION, "crops": {"global_size": 32},
              "moco": {"hidden_dim": 64, "out_dim": 16, "projector_layers": 2, "predictor_last_bn": False,
                       "temperature": 1.0},
              "optim": {**OPTIM, "epochs": 1, "optimizer": "lars", "base_lr": 1.0}}
    out = tmp_path / "run"
    train(config, tmp_path, f"train.output_dir={out}")
    assert load_stock(out / "backbone", "print(type(m).__name__)", tmp_path).strip() == "ResNetModel"


@pytest.mark.slow
def test_two_process_training_equals_one_process(tmp_path):
    """ResNet (every BatchNorm over the global batch), 6 steps under accelerate launch with 2 gloo processes."""
    config = {**CONFIG, "model": RESNET_SECTION,
              "moco": {"hidden_dim": 64, "out_dim": 16, "projector_layers": 2, "predictor_last_bn": False},
              "optim": {**OPTIM, "epochs": 1, "optimizer": "lars", "base_lr": 1.0},
              "train": {"save_every": 1000, "log_every": 1}}
    assert_ddp_equals_one_process(config, tmp_path, steps=6)
