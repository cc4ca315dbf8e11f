"""DenseCL: the loss against the reference's `DenseCL.forward_train` + `ContrastiveHead`, the queues (wrap-around,
keys enqueued only for steps that happened, not part of the per-step state copy), shuffle BN over 2 gloo
processes, exact resume after SIGKILL through train.py (queues and pointers restored), and the ResNet export
(stock `ResNetModel` + image processor; probe features)."""

from __future__ import annotations

import math
import signal
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from two_view_helpers import (
    DATA,
    OPTIM,
    RESNET_SECTION,
    TINY_RESNET,
    TINY_VIT,
    TRAIN,
    VIT_SECTION,
    load_stock,
    metric_rows,
    run_two_processes,
    train,
    train_process,
    views,
)

from modeling import DenseCLConfig, DenseCLForPretraining
from modeling.densecl import _enqueue_
from modeling.losses import densecl_loss
from modeling.two_view import features_and_map, shuffled_forward

TOL = 1e-5


# ---- the reference (openselfsup densecl.py + contrastive_head.py), written from its semantics --------------------


def ref_head(pos: torch.Tensor, neg: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = torch.cat((pos, neg), dim=1)
    logits /= temperature
    return nn.CrossEntropyLoss()(logits, torch.zeros((pos.size(0),), dtype=torch.long))


def ref_densecl_losses(q, k, queue, q_grid, k_grid, q_b, k_b, queue2, T):
    q = nn.functional.normalize(q, dim=1)
    q_grid = nn.functional.normalize(q_grid, dim=1)
    q_b = nn.functional.normalize(q_b, dim=1)
    with torch.no_grad():
        k = nn.functional.normalize(k, dim=1)
        k_grid = nn.functional.normalize(k_grid, dim=1)
        k_b = nn.functional.normalize(k_b, dim=1)
    l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", [q, queue.clone().detach()])
    backbone_sim_matrix = torch.matmul(q_b.permute(0, 2, 1), k_b)
    densecl_sim_ind = backbone_sim_matrix.max(dim=2)[1]
    indexed_k_grid = torch.gather(k_grid, 2, densecl_sim_ind.unsqueeze(1).expand(-1, k_grid.size(1), -1))
    densecl_sim_q = (q_grid * indexed_k_grid).sum(1)
    l_pos_dense = densecl_sim_q.view(-1).unsqueeze(-1)
    q_grid = q_grid.permute(0, 2, 1)
    q_grid = q_grid.reshape(-1, q_grid.size(2))
    l_neg_dense = torch.einsum("nc,ck->nk", [q_grid, queue2.clone().detach()])
    return ref_head(l_pos, l_neg, T), ref_head(l_pos_dense, l_neg_dense, T)


def _inputs(seed: int = 0, batch: int = 3, c: int = 8, cb: int = 10, s: int = 6, k: int = 20):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return dict(q=r(batch, c), k=r(batch, c), queue=F.normalize(r(c, k), dim=0), q_grid=r(batch, c, s),
                k_grid=r(batch, c, s), q_backbone=r(batch, cb, s), k_backbone=r(batch, cb, s),
                dense_queue=F.normalize(r(c, k), dim=0))


def test_loss_matches_reference():
    inputs = _inputs()
    got_q, ref_q = inputs["q"].clone().requires_grad_(), inputs["q"].clone().requires_grad_()
    got_grid, ref_grid = inputs["q_grid"].clone().requires_grad_(), inputs["q_grid"].clone().requires_grad_()
    got = densecl_loss(**{**inputs, "q": got_q, "q_grid": got_grid}, temperature=0.2)
    ref = ref_densecl_losses(ref_q, inputs["k"], inputs["queue"], ref_grid, inputs["k_grid"], inputs["q_backbone"],
                             inputs["k_backbone"], inputs["dense_queue"], 0.2)
    for a, b in zip(got, ref):
        assert (a - b).abs() <= TOL
    (got[0] + 2 * got[1]).backward()
    (ref[0] + 2 * ref[1]).backward()
    assert (got_q.grad - ref_q.grad).abs().max() <= TOL
    assert (got_grid.grad - ref_grid.grad).abs().max() <= TOL


def test_dense_positive_is_the_location_with_the_most_similar_backbone_feature():
    # Key backbone features are the query's in reverse order: the argmax pairs location i with S - 1 - i.
    b, c, s = 1, 4, 5
    q_b = torch.eye(s)[None].expand(b, s, s).clone()  # feature of location i = e_i
    k_b = q_b.flip(2)
    q_grid = torch.randn(b, c, s)
    k_grid = torch.randn(b, c, s)
    queue = F.normalize(torch.randn(c, 7), dim=0)
    _, dense = densecl_loss(torch.randn(b, c), torch.randn(b, c), queue, q_grid, k_grid, q_b, k_b, queue, 0.2)
    pos = (F.normalize(q_grid, dim=1) * F.normalize(k_grid, dim=1).flip(2)).sum(1).reshape(-1, 1)
    neg = F.normalize(q_grid, dim=1).transpose(1, 2).reshape(-1, c) @ queue
    assert torch.allclose(dense, ref_head(pos, neg, 0.2), atol=TOL)


# ---- queues ------------------------------------------------------------------------------------------------------


def test_enqueue_wraps_around():
    queue, ptr = torch.zeros(2, 5), torch.zeros(1, dtype=torch.long)
    _enqueue_(queue, ptr, torch.ones(3, 2))
    _enqueue_(queue, ptr, 2 * torch.ones(3, 2))
    assert queue[0].tolist() == [2, 1, 1, 2, 2] and int(ptr) == 1
    _enqueue_(queue, ptr, torch.arange(7.0)[:, None].expand(7, 2))  # more keys than slots: the newest win
    assert queue[0].tolist() == [4, 5, 6, 2, 3] and int(ptr) == 3  # as 7 writes in a row from slot 1


def _model(backbone=TINY_RESNET, **kwargs) -> DenseCLForPretraining:
    torch.manual_seed(0)
    return DenseCLForPretraining(DenseCLConfig(backbone_config=backbone, hidden_dim=32, out_dim=16, queue_size=8,
                                               **kwargs))


def test_keys_enter_the_queues_only_for_steps_that_happened():
    model = _model(TINY_VIT)  # no BatchNorm: a key is a function of its image alone
    queue, dense_queue = model.queue.clone(), model.dense_queue.clone()
    state = {n for n, b in model.named_buffers() if any(b is t for t in model.step_state())}
    assert state == {"queue_ptr", "dense_queue_ptr", "pending_key_batches"}  # not the (large) queues
    x1, x2 = views()
    with torch.no_grad():
        k, _, pooled_grid, _ = model._keys(x2)
    model(x1, x2)
    assert torch.equal(model.queue, queue) and torch.equal(model.dense_queue, dense_queue)  # forward: no change
    # the next micro-batch turns out non-finite: the loop restores the step state and skips the step ...
    before = [t.clone() for t in model.step_state()]
    model(*views(seed=1))
    with torch.no_grad():
        for t, b in zip(model.step_state(), before):
            t.copy_(b)
    model(x1, x2)  # ... and the next one steps
    model.after_optimizer_step(momentum=1.0)  # (momentum 1: the key encoder stays as it was)
    assert int(model.queue_ptr) == 0 and int(model.pending_key_batches) == 0  # 2 × 4 keys filled all 8 slots
    expected = F.normalize(k, dim=1).T
    assert torch.allclose(model.queue, torch.cat((expected, expected), dim=1), atol=1e-6)  # no skipped keys
    assert torch.allclose(model.dense_queue[:, :4], F.normalize(pooled_grid, dim=1).T, atol=1e-6)


@pytest.mark.parametrize("backbone", [TINY_RESNET, TINY_VIT], ids=["resnet", "vit"])
def test_model_matches_reference_composition(backbone):
    model = _model(backbone)
    x1, x2 = views()
    out = model(x1, x2, dense_weight=0.3)
    pooled, fmap = features_and_map(model.backbone, x1)
    q, q_grid, _ = model.neck(pooled, fmap)
    with torch.no_grad():
        k_pooled, k_map = features_and_map(model.key_backbone, x2)
        k, k_grid, _ = model.key_neck(k_pooled, k_map)
    single, dense = ref_densecl_losses(q, k, model.queue, q_grid, k_grid, fmap.flatten(2), k_map.flatten(2),
                                       model.dense_queue, 0.2)
    assert torch.allclose(out.loss, 0.7 * single + 0.3 * dense, atol=TOL)
    assert torch.allclose(out.dense_loss, 0.3 * dense, atol=TOL)
    if backbone is TINY_VIT:  # the dense branch reads the 4×4 grid of patch tokens
        assert fmap.shape == (4, 32, 4, 4)


# ---- shuffle BN over 2 gloo processes ------------------------------------------------------------------------------


def _two_process_shuffle(rank: int, world: int, x: torch.Tensor) -> None:
    mine = x[rank * 3 : rank * 3 + 3]
    torch.manual_seed(rank)  # different generators: the permutation must come from rank 0 only
    linear = nn.Linear(4, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.arange(8.0).reshape(2, 4))
        linear.bias.zero_()
    out, also = shuffled_forward(lambda t: (linear(t), 2 * t), mine)
    assert torch.allclose(out, linear(mine)) and torch.equal(also, 2 * mine)  # each process gets its own rows
    # with a batch statistic, each process's statistic covers the images of its slice of rank 0's permutation
    state = torch.random.get_rng_state()
    perm = torch.randperm(6)  # what shuffled_forward draws next (then broadcasts from rank 0)
    torch.random.set_rng_state(state)
    dist.broadcast(perm, src=0)
    centered = shuffled_forward(lambda t: t - t.mean(0, keepdim=True), mine)
    expected = torch.empty_like(x)
    for part in perm.view(2, 3):
        expected[part] = x[part] - x[part].mean(0, keepdim=True)
    assert torch.allclose(centered, expected[rank * 3 : rank * 3 + 3], atol=1e-6)


@pytest.mark.slow  # multi-process: runs in `pytest -m slow` (CI's second half)
def test_shuffle_bn_two_processes(tmp_path):
    run_two_processes(tmp_path, _two_process_shuffle, torch.randn(6, 4))


# ---- through train.py ----------------------------------------------------------------------------------------------


CONFIG = {"method": "densecl", "model": RESNET_SECTION,
          "densecl": {"hidden_dim": 32, "out_dim": 16, "queue_size": 32, "momentum": 0.99, "momentum_end": 0.99},
          "views": {"color_jitter": [0.4, 0.4, 0.4, 0.1], "blur_probability": [0.5, 0.5],
                    "solarize_probability": [0.0, 0.0], "interpolation": "bilinear"},
          "crops": {"global_size": 32, "global_scale": [0.2, 1.0]}, "data": DATA, "train": TRAIN,
          "optim": {**OPTIM, "optimizer": "sgd", "base_lr": 0.1, "weight_decay": 1e-4, "weight_decay_end": 1e-4,
                    "decay_biases_and_norms": True}}


@pytest.mark.slow
def test_resumes_exactly_after_sigkill_with_its_queues(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train(CONFIG, tmp_path, f"train.output_dir={straight}")

    proc = train_process(CONFIG, tmp_path, f"train.output_dir={killed}")
    deadline = time.time() + 300
    while not (killed / "checkpoint-4" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(metric_rows(killed)) < 12, "the kill came too late to test anything"
    train(CONFIG, tmp_path, f"train.output_dir={killed}")  # resume=auto

    ref, got = metric_rows(straight), metric_rows(killed)
    assert sorted(ref) == sorted(got) == list(range(1, 13))
    for step in range(5, 13):
        for key in ("loss", "global_loss", "dense_loss", "key_std"):
            assert math.isclose(got[step][key], ref[step][key], rel_tol=1e-5, abs_tol=1e-6), (step, key)
    a = load_file(straight / "checkpoint-12" / "model.safetensors")
    b = load_file(killed / "checkpoint-12" / "model.safetensors")
    assert {"queue", "queue_ptr", "dense_queue", "dense_queue_ptr"} <= a.keys()
    assert int(a["queue_ptr"]) == (12 * 8) % 32
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)


@pytest.mark.slow
def test_resnet_export_is_stock_with_an_image_processor(tmp_path):
    from modeling.two_view import save_resnet_backbone
    from training.evaluation.features import forward_features

    out = tmp_path / "run"
    train({**CONFIG, "optim": {**CONFIG["optim"], "epochs": 1}}, tmp_path, f"train.output_dir={out}")
    assert load_stock(out / "backbone", "print(type(m).__name__)", tmp_path).strip() == "ResNetModel"
    assert "DenseCL" in (out / "backbone" / "README.md").read_text()
    # what save_backbone should write for a ResNet: weights + microsoft/resnet-50's image processor
    model = DenseCLForPretraining.from_pretrained(out / "pretraining")
    folder = save_resnet_backbone(model.backbone, tmp_path / "resnet", crop_size=32)
    code = (
        "from PIL import Image\n"
        "from transformers import pipeline\n"
        "feats = pipeline('image-feature-extraction', model=m, image_processor="
        f"__import__('transformers').AutoImageProcessor.from_pretrained({str(folder)!r}))(Image.new('RGB', (40, 50)))\n"
        "import numpy as np; print(np.asarray(feats).shape)\n"
    )
    assert load_stock(folder, code, tmp_path).strip() == "(1, 32, 1, 1)"
    # probe features of a ConvNet: the pooled output, and the mean of the last feature map
    backbone = model.backbone.eval()
    x = torch.randn(2, 3, 32, 32)
    pooled, mean = forward_features(backbone, x)
    fmap = backbone(pixel_values=x).last_hidden_state
    assert torch.allclose(pooled, fmap.mean((2, 3)), atol=1e-6) and torch.allclose(mean, pooled, atol=1e-6)


@pytest.mark.slow
def test_vit_variant_trains(tmp_path):
    out = tmp_path / "run"
    config = {**CONFIG, "model": VIT_SECTION, "optim": {**CONFIG["optim"], "epochs": 1}}
    train(config, tmp_path, f"train.output_dir={out}")
    rows = metric_rows(out)
    assert all(math.isfinite(r["loss"]) for r in rows.values()) and rows[6]["dense_weight"] == 0.5
    assert load_stock(out / "backbone", "print(type(m).__name__)", tmp_path).strip() == "Dinov2Model"
