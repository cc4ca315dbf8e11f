"""Copy detection (`method: copy_detection`, SSCD recipe): the InfoNCE loss against a plain cross-entropy reference
(1 process and 2 gloo processes), the copy edits (deterministic per seed / epoch / index, right sizes for every
edit), a train.py run whose export loads with stock `AutoModel` and embeds through curation as descriptors, and
threshold calibration on planted copies."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from two_view_helpers import OPTIM, RESNET_SECTION, TINY_RESNET, TINY_VIT, load_stock, run_two_processes, train

from curation.calibrate import calibrate, pick_threshold
from modeling import CopyDetectionConfig, CopyDetectionForPretraining
from modeling.copy_detection import CopyDescriptorHead, gem, load_copy_descriptor
from modeling.losses import copy_detection_infonce_loss
from training.augment import derive_seed
from training.data.copy_edits import EDIT_KINDS, CopyEditAugmentation, CopyEditMixer, CopyEditsConfig

TOL = 1e-6


# ---- the loss -------------------------------------------------------------------------------------------------


def ref_infonce(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent written the plain way: all 2B views, self-similarity masked, the other view is the target."""
    z = F.normalize(torch.cat((z1, z2)).double(), dim=1)
    b = z1.shape[0]
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * b, dtype=torch.bool), float("-inf"))
    targets = torch.cat((torch.arange(b, 2 * b), torch.arange(b)))
    return F.cross_entropy(logits, targets)


def _pair(batch: int = 6, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(batch, dim, generator=g)
    return z1, z1 + 0.5 * torch.randn(batch, dim, generator=g)


@pytest.mark.parametrize("temperature", [0.05, 0.5])
def test_loss_matches_reference(temperature):
    z1, z2 = _pair()
    a1, a2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    got = copy_detection_infonce_loss(a1, a2, temperature)
    got.backward()
    r1, r2 = z1.double().requires_grad_(), z2.double().requires_grad_()
    ref = ref_infonce(r1, r2, temperature)
    ref.backward()
    assert abs(got.item() - ref.item()) < TOL * max(1.0, ref.item())
    torch.testing.assert_close(a1.grad.double(), r1.grad, atol=TOL, rtol=1e-5)
    torch.testing.assert_close(a2.grad.double(), r2.grad, atol=TOL, rtol=1e-5)


def _ddp_loss(rank: int, world_size: int, z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> None:
    b = z1.shape[0] // world_size
    mine1 = z1[rank * b : (rank + 1) * b].clone().requires_grad_()
    mine2 = z2[rank * b : (rank + 1) * b].clone().requires_grad_()
    loss = copy_detection_infonce_loss(mine1, mine2, temperature)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    # DDP averages gradients over processes: the mean of the per-process gradients is the global loss's gradient
    grads = torch.cat((mine1.grad, mine2.grad))
    all_grads = [torch.empty_like(grads) for _ in range(world_size)]
    dist.all_gather(all_grads, grads)
    r1, r2 = z1.double().requires_grad_(), z2.double().requires_grad_()
    ref = ref_infonce(r1, r2, temperature)
    ref.backward()
    assert abs(total.item() / world_size - ref.item()) < 1e-5
    got1 = torch.cat([g[:b] for g in all_grads]) / world_size
    got2 = torch.cat([g[b:] for g in all_grads]) / world_size
    torch.testing.assert_close(got1.double(), r1.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got2.double(), r2.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.slow  # spawning two gloo processes: ~10-30 s here
def test_loss_two_processes_equals_one(tmp_path):
    z1, z2 = _pair(batch=8)
    run_two_processes(tmp_path, _ddp_loss, z1, z2, 0.1)


def test_gem_and_descriptor_head(tmp_path):
    x = torch.rand(2, 4, 3, 3) + 0.1
    torch.testing.assert_close(gem(x, 1.0), x.mean(dim=(2, 3)))
    assert torch.all(gem(x, 50.0) <= x.amax(dim=(2, 3)) + 1e-5)
    head = CopyDescriptorHead(4, 5, "gem")
    head.save(tmp_path)
    loaded = load_copy_descriptor(tmp_path)
    out = type("Out", (), {"last_hidden_state": x})()
    torch.testing.assert_close(loaded(out), head(out))
    assert load_copy_descriptor(tmp_path / "nothing") is None


@pytest.mark.parametrize("backbone", [TINY_RESNET, TINY_VIT], ids=["resnet", "vit"])
def test_model_forward(backbone):
    torch.manual_seed(0)
    model = CopyDetectionForPretraining(CopyDetectionConfig(backbone_config=backbone, descriptor_dim=16,
                                                            koleo_weight=0.5))
    assert model.config.pooling == ("gem" if backbone is TINY_RESNET else "cls")
    v1 = torch.randn(4, 3, 32, 32)
    out = model(view1=v1, view2=v1 + 0.01 * torch.randn_like(v1))
    assert torch.isclose(out.loss, out.infonce_loss + 0.5 * out.koleo_loss)
    assert out.positive_similarity > 0.9
    out.loss.backward()
    assert model.descriptor.projection.weight.grad is not None
    assert model.describe(v1).shape == (4, 16)


# ---- the copy edits -------------------------------------------------------------------------------------------


def _photo(w: int = 120, h: int = 90, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("style", ["train", "heldout"])
def test_each_edit_gives_the_right_size(style):
    augmentation = CopyEditAugmentation(48, style=style)
    image = _photo()
    for kind in EDIT_KINDS:
        out = augmentation.edit_image(image, seed=3, kinds=[kind], size=48)
        assert out.size == (48, 48) and out.mode == "RGB", kind
        free = augmentation.edit_image(image, seed=3, kinds=[kind])
        assert free.mode == "RGB" and min(free.size) > 0, kind
    views = augmentation(image, seed=1)
    assert views["view1"].shape == views["view2"].shape == (3, 48, 48)


def test_applied_names_the_edits_made_without_changing_them():
    augmentation = CopyEditAugmentation(48, style="heldout")
    image = _photo(seed=2)
    applied: list[str] = []
    out = augmentation.edit_image(image, seed=11, kinds=["crop", "text", "jpeg"], applied=applied)
    assert applied == ["crop", "text", "jpeg"]
    assert np.array_equal(np.asarray(out), np.asarray(augmentation.edit_image(image, seed=11, kinds=["crop", "text", "jpeg"])))
    chained: list[str] = []
    augmentation.edit_image(image, seed=5, applied=chained)
    assert chained[0] == "crop" and set(chained) <= set(EDIT_KINDS) and len(set(chained)) == len(chained)


def test_edits_are_deterministic_per_seed_epoch_index():
    augmentation = CopyEditAugmentation(40, CopyEditsConfig(text_probability=1.0, logo_probability=1.0))
    image = _photo(seed=1)
    seed = derive_seed(0, 1, 7)
    a, b = augmentation(image, seed=seed), augmentation(image, seed=seed)
    torch.testing.assert_close(a["view1"], b["view1"], rtol=0, atol=0)
    torch.testing.assert_close(a["view2"], b["view2"], rtol=0, atol=0)
    assert not torch.equal(a["view1"], a["view2"])  # two independent chains
    other_epoch, other_index = augmentation(image, seed=derive_seed(0, 2, 7)), augmentation(image, seed=derive_seed(0, 1, 8))
    assert not torch.equal(a["view1"], other_epoch["view1"])
    assert not torch.equal(a["view1"], other_index["view1"])
    random.seed(123)
    torch.manual_seed(123)  # global generators do not matter
    torch.testing.assert_close(augmentation(image, seed=seed)["view2"], a["view2"], rtol=0, atol=0)


def test_mixer_pastes_deterministically():
    samples = [{"view1": torch.full((3, 16, 16), float(i)), "view2": torch.full((3, 16, 16), float(i)),
                "sample_seed": 100 + i} for i in range(4)]
    mixed = CopyEditMixer(1.0)(samples)
    again = CopyEditMixer(1.0)(samples)
    torch.testing.assert_close(mixed["view2"], again["view2"], rtol=0, atol=0)
    assert torch.equal(mixed["view1"], torch.stack([s["view1"] for s in samples]))  # view 1 untouched
    for i in range(4):
        values = set(mixed["view2"][i].round(decimals=4).unique().tolist())
        assert float(i) in values and len(values) == 2  # the image itself plus one pasted other image
    untouched = CopyEditMixer(0.0)(samples)
    assert torch.equal(untouched["view2"], torch.stack([s["view2"] for s in samples]))


# ---- train.py → export → stock load → curation embedder → calibration --------------------------------------


def test_train_export_embed_and_calibrate(tmp_path):
    config = {
        "method": "copy_detection",
        "model": RESNET_SECTION,
        "copy_detection": {"descriptor_dim": 24, "koleo_weight": 1.0},
        "crops": {"global_size": 32},
        "optim": {**OPTIM, "epochs": 1, "iters_per_epoch": 3},
        "data": {"dataset": "sample", "num_workers": 0, "eval_dataset": None},
        "train": {"save_every": 100, "log_every": 1, "output_dir": str(tmp_path / "run")},
    }
    train(config, tmp_path)
    folder = tmp_path / "run" / "backbone"
    spec = json.loads((folder / "copy_descriptor.json").read_text())
    assert spec["dim"] == 24 and spec["pooling"] == "gem"
    # stock transformers, no dinoforge: a ResNetModel with the exported image processor
    out = load_stock(folder, "from transformers import AutoImageProcessor\n"
                             "p = AutoImageProcessor.from_pretrained(" + repr(str(folder)) + ")\n"
                             "print(type(m).__name__, p.size['height'], p.size['width'])", tmp_path)
    assert out.split() == ["ResNetModel", "32", "32"]

    from curation.embed import Embedder, resolve_model

    embedder = Embedder(resolve_model(str(folder), "dedup.copy_detection.model"))
    images = [_photo(64 + 8 * i, 64, seed=i) for i in range(6)]
    vectors = embedder(images)
    assert vectors.shape == (6, 24) == (6, embedder.dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    result = calibrate(str(folder), "planted", target_precision=0.9, images=images, seed=0, mix_probability=0.0)
    assert result.num_positive_pairs == 6 and result.num_negative_pairs == 6 * 5 + 15
    assert -1.0 <= result.threshold <= 1.0
    assert result.override().startswith("dedup.copy_detection.threshold=")
    # the same picker on scores that separate: the threshold lies between the groups
    threshold, precision, recall, reached = pick_threshold(np.array([0.9, 0.8, 0.7]), np.array([0.75, 0.1]), 0.99)
    assert reached and 0.75 < threshold < 0.8 and precision == 1.0 and recall == pytest.approx(2 / 3)


def test_pick_threshold_edge_cases():
    t, p, r, reached = pick_threshold(np.array([0.5]), np.array([0.9]), 0.99)
    assert not reached and r == 0.0 and t == pytest.approx(0.9)
    t, p, r, reached = pick_threshold(np.array([0.9, 0.8]), np.array([0.1, 0.2]), 0.99)
    assert reached and 0.2 < t < 0.8 and r == 1.0
    t, p, r, reached = pick_threshold(np.array([0.9, 0.6, 0.5]), np.array([0.7] + [0.0] * 10), 0.6)
    assert reached and r == 1.0 and p == pytest.approx(0.75)  # the lowest threshold reaching the target
