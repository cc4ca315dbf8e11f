"""The two-view data pipeline (augmentation, collate, `two_views` loader, exact resume) and the SGD / LARS
optimizers of the two-view methods."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageFilter, ImageOps
from torch import nn
from torchvision import transforms
from torchvision.transforms import functional as TF

from modeling.method import DataPipeline
from training.data.two_views import RandomPILGaussianBlur, TwoViewAugmentation, collate_two_views
from training.optimizers import LARS, build_optimizer, split_one_dimensional
from training.param_groups import apply_schedule, param_groups

OFF = dict(color_jitter_probability=0.0, grayscale_probability=0.0, blur_probability=(0.0, 0.0),
           solarize_probability=(0.0, 0.0), horizontal_flip=False, scale=(1.0, 1.0))


def _image(size: int = 40, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def _normalize(image: Image.Image) -> torch.Tensor:
    return TF.normalize(TF.to_tensor(image), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def test_views_are_a_function_of_seed_and_image():
    aug = TwoViewAugmentation(size=24)
    image = _image()
    state = torch.random.get_rng_state()
    a, b, c = aug(image, seed=1), aug(image, seed=1), aug(image, seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's generator is untouched
    assert a.keys() == {"view1", "view2"} and a["view1"].shape == (3, 24, 24)
    assert torch.equal(a["view1"], b["view1"]) and torch.equal(a["view2"], b["view2"])
    assert not torch.equal(a["view1"], c["view1"]) and not torch.equal(a["view1"], a["view2"])


def test_each_op_is_the_references():
    image = _image()
    # everything off, full-image crop: a resize + ImageNet normalisation
    plain = TwoViewAugmentation(size=24, interpolation="bilinear", **OFF)(image, seed=0)
    resized = TF.resized_crop(image, 0, 0, 40, 40, [24, 24], transforms.InterpolationMode.BILINEAR)
    assert torch.allclose(plain["view1"], _normalize(resized), atol=1e-6)
    # blur: PIL's GaussianBlur(radius=σ), σ drawn in blur_sigma
    blurred = TwoViewAugmentation(size=40, **{**OFF, "blur_probability": (1.0, 0.0)}, blur_sigma=(1.5, 1.5))(image, seed=0)
    assert torch.allclose(blurred["view1"], _normalize(image.filter(ImageFilter.GaussianBlur(radius=1.5))), atol=1e-6)
    assert torch.allclose(blurred["view2"], _normalize(image), atol=1e-6)
    # solarize (the references' ImageOps.solarize, threshold 128) on view 2 only
    solarized = TwoViewAugmentation(size=40, **{**OFF, "solarize_probability": (0.0, 1.0)})(image, seed=0)
    assert torch.allclose(solarized["view2"], _normalize(ImageOps.solarize(image, 128)), atol=1e-6)
    assert torch.allclose(solarized["view1"], _normalize(image), atol=1e-6)


def test_default_recipe_is_byols_asymmetric_pair():
    aug = TwoViewAugmentation()
    blur = [next(t for t in v.transforms if isinstance(t, RandomPILGaussianBlur)) for v in aug.views]
    solarize = [next(t for t in v.transforms if isinstance(t, transforms.RandomSolarize)) for v in aug.views]
    assert [b.p for b in blur] == [1.0, 0.1] and [s.p for s in solarize] == [0.0, 0.2]
    crop = aug.views[0].transforms[0]
    assert crop.scale == (0.08, 1.0) and crop.size == (224, 224)
    jitter = aug.views[0].transforms[2]
    assert jitter.p == 0.8 and jitter.transforms[0].saturation == (0.8, 1.2) and jitter.transforms[0].hue == (-0.1, 0.1)


def test_collate_stacks_views_and_counts_skipped():
    aug = TwoViewAugmentation(size=16)
    samples = [aug(_image(seed=i), seed=i) for i in range(3)]
    batch = collate_two_views([samples[0], None, samples[1], samples[2]])
    assert batch["view1"].shape == (3, 3, 16, 16) and batch["batch_size"] == 3 and batch["num_skipped"] == 1
    assert torch.equal(batch["view2"][1], samples[1]["view2"])


# ---- the `two_views` pipeline ------------------------------------------------------------------------------------


def _cfg(**crops):
    from training.methods.mocov3 import MoCoV3TrainConfig

    cfg = MoCoV3TrainConfig()
    cfg.crops.global_size, cfg.crops.global_scale = 32, (0.2, 1.0)
    for name, value in crops.items():
        setattr(cfg.crops, name, value)
    cfg.optim.batch_size, cfg.data.num_workers = 4, 0
    return cfg


def test_pipeline_batches_and_resume(one_thread):
    from training.data import load_image_dataset
    from training.pipelines import build_pipeline

    dataset = load_image_dataset("sample", "train", "image")
    spec = DataPipeline("two_views", {"patch_size": 8})
    first = iter(build_pipeline(spec, _cfg(), dataset, rank=0, world_size=1))
    batches = [next(first) for _ in range(3)]
    assert batches[0]["view1"].shape == (4, 3, 32, 32) and batches[0]["batch_size"] == 4
    # a loader resumed after two batches continues with the third, crops included
    resumed = build_pipeline(spec, _cfg(), dataset, rank=0, world_size=1)
    resumed.sampler.load_state_dict(build_pipeline(spec, _cfg(), dataset, rank=0, world_size=1).sampler.state_dict(2))
    third = next(iter(resumed))
    assert torch.equal(third["view1"], batches[2]["view1"]) and torch.equal(third["view2"], batches[2]["view2"])
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        build_pipeline(DataPipeline("two_views", {"patch_size": 14}), _cfg(), dataset, rank=0, world_size=1)
    with pytest.raises(ValueError, match="crops.resolutions"):
        build_pipeline(spec, _cfg(resolutions=[(32, 16, 1.0)]), dataset, rank=0, world_size=1)


# ---- optimizers --------------------------------------------------------------------------------------------------


def ref_lars_step(params, grads, state, lr, wd, momentum=0.9, eta=0.001):
    """moco/optimizer.py `LARS.step` (= barlowtwins' LARS with both filters on), for one group."""
    for p, dp in zip(params, grads):
        if p.ndim > 1:
            dp = dp.add(p, alpha=wd)
            param_norm, update_norm = torch.norm(p), torch.norm(dp)
            one = torch.ones_like(param_norm)
            q = torch.where(param_norm > 0.0, torch.where(update_norm > 0, (eta * param_norm / update_norm), one), one)
            dp = dp.mul(q)
        mu = state.setdefault(id(p), torch.zeros_like(p))
        mu.mul_(momentum).add_(dp)
        p.add_(mu, alpha=-lr)


def test_lars_matches_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3, bias=False))
    reference = [p.detach().clone() for p in model.parameters()]
    optimizer = LARS(model.parameters(), lr=0.5, weight_decay=1e-3, momentum=0.9)
    state: dict = {}
    for step in range(3):
        x = torch.randn(8, 5)
        model.zero_grad()
        model(x).pow(2).mean().backward()
        ref_lars_step(reference, [p.grad.clone() for p in model.parameters()], state, 0.5, 1e-3)
        optimizer.step()
        for p, r in zip(model.parameters(), reference):
            assert torch.allclose(p, r, atol=1e-6), step
        with torch.no_grad():  # keep both on the same trajectory from the model's parameters
            for p, r in zip(model.parameters(), reference):
                r.copy_(p)


def test_groups_for_the_references_optimizers():
    from training.train_config import OptimConfig

    model = nn.Sequential()
    model.add_module("linear", nn.Linear(4, 4))
    model.add_module("norm", nn.BatchNorm1d(4))
    groups = param_groups({"model": model})
    optim = OptimConfig(optimizer="lars", bias_norm_lr_mult=0.024)
    optimizer = build_optimizer(groups, optim, fused=False)
    assert isinstance(optimizer, LARS)
    apply_schedule(optimizer, lr=2.0, last_layer_lr=2.0, weight_decay=1e-6)
    lrs = {name: g["lr"] for g in optimizer.param_groups for name in g["names"]}
    assert lrs["model.linear.weight"] == 2.0  # Barlow Twins: weights at lr, biases and BatchNorm at 0.0048 / 0.2 of it
    assert lrs["model.linear.bias"] == lrs["model.norm.weight"] == pytest.approx(0.048)
    # decay_biases_and_norms: every parameter decays (MoCo v3's AdamW, DenseCL's SGD)
    split = split_one_dimensional(param_groups({"model": model}), 1.0, decay_all=True)
    assert all(g["wd_multiplier"] == 1.0 for g in split)
    sgd = build_optimizer(param_groups({"model": model}), OptimConfig(optimizer="sgd", momentum=0.9), False)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9 and not sgd.defaults["nesterov"]
    with pytest.raises(ValueError, match="not one of"):
        build_optimizer(groups, OptimConfig(optimizer="lamb"), False)


# ---- batched colour (views.batched_color) -------------------------------------------------------------------------


def test_batched_color_is_torchvisions_tensor_ops_per_image():
    """Each image of a batch gets exactly torchvision's tensor ops with its own parameters, in its own order."""
    from training.data.batched_color import BatchedColor, draw_color_params

    g = torch.Generator().manual_seed(0)
    images = (torch.rand(24, 3, 20, 20, generator=g) * 255).to(torch.uint8)
    torch.manual_seed(1)
    params = torch.stack([draw_color_params((0.4, 0.4, 0.4, 0.5), 0.8, 0.3, 0.5, (0.1, 2.0), 0.4) for _ in images])
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    out = BatchedColor(mean, std, largest_sigma=2.0)(images, params)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    seen = set()
    for image, p, got in zip(images, params, out):
        x = image.float() / 255
        if p[0] > 0:
            for op_index in p[5:9].long().tolist():
                x = ops[op_index](x, p[1 + op_index].item())
        if p[9] > 0:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if p[10] > 0:
            x = TF.gaussian_blur(x, [13, 13], [p[10].item()] * 2)  # radius ceil(3 * 2.0)
        if p[11] > 0:
            x = TF.solarize(x, 128 / 255)
        torch.testing.assert_close(got, TF.normalize(x, mean, std), atol=2e-5, rtol=0)
        seen.add(tuple((p[[0, 9, 11]] > 0).tolist()) + (bool(p[10] > 0),))
    assert len(seen) >= 8  # the coins took many combinations: every op was exercised on and off
    assert params[:, 5:9].sort(1).values.eq(torch.arange(4.0)).all()  # orders are permutations


def test_batched_color_pipeline_batches_and_resume(one_thread):
    from training.data import load_image_dataset
    from training.pipelines import build_pipeline

    dataset = load_image_dataset("sample", "train", "image")
    spec = DataPipeline("two_views", {"patch_size": None})
    cfg = _cfg()
    cfg.views.batched_color = True
    first = iter(build_pipeline(spec, cfg, dataset, rank=0, world_size=1))
    batches = [next(first) for _ in range(3)]
    assert batches[0]["view1"].shape == (4, 3, 32, 32) and batches[0]["view1"].dtype == torch.float32
    assert set(batches[0]) == {"view1", "view2", "batch_size", "num_skipped", "skipped"}
    resumed = build_pipeline(spec, cfg, dataset, rank=0, world_size=1)
    resumed.sampler.load_state_dict(build_pipeline(spec, cfg, dataset, rank=0, world_size=1).sampler.state_dict(2))
    third = next(iter(resumed))
    assert torch.equal(third["view1"], batches[2]["view1"]) and torch.equal(third["view2"], batches[2]["view2"])
    # with every photometric op off and a full-image crop, a view is the PIL pipeline's resize, normalised
    off = dict(OFF)
    image = _image()
    pil = TwoViewAugmentation(size=24, interpolation="bilinear", **off)(image, seed=3)
    batched = TwoViewAugmentation(size=24, interpolation="bilinear", **off, batched_color=True)
    views = batched.collate([batched(image, seed=3)])
    torch.testing.assert_close(views["view1"][0], pil["view1"], atol=1e-6, rtol=0)


def test_random_resized_crop_box_is_torchvisions_rule():
    from training.data.two_views import random_resized_crop_box

    torch.manual_seed(0)
    boxes = [random_resized_crop_box(60, 40, (0.2, 0.9)) for _ in range(2000)]
    for left, top, w, h in boxes:
        assert 0 <= left <= 60 - w and 0 <= top <= 40 - h
        assert 0.2 * 2400 - 60 <= w * h <= 0.9 * 2400 + 60  # rounding of w and h
        assert 3 / 4 - 0.1 <= w / h <= 4 / 3 + 0.1
    areas = torch.tensor([w * h / 2400 for _, _, w, h in boxes])
    reference = torch.tensor([h * w / 2400 for _, _, h, w in (
        transforms.RandomResizedCrop.get_params(Image.new("RGB", (60, 40)), (0.2, 0.9), (3 / 4, 4 / 3))
        for _ in range(2000))])
    assert abs(areas.mean() - reference.mean()) < 0.02 and abs(areas.std() - reference.std()) < 0.02
    # no try fits a 100 x 10 image at this scale: the largest centred crop of ratio 4/3
    assert random_resized_crop_box(100, 10, (0.9, 1.0)) == (43, 0, 13, 10)


def test_batched_views_paste_the_crop_on_the_swapped_background():
    """Left half foreground, a flat red bank: with a full-image crop the view shows the image on the left and red
    on the right; the swap's draws and mask are those of the per-image swap."""
    import numpy as np

    from training.data.background_swap import BackgroundSwap
    from training.data.loader import content_key

    image = _image(32)
    mask = np.zeros((64, 64), bool)
    mask[:, :32] = True
    red = np.zeros((1, 64, 64, 3), np.uint8)
    red[..., 0] = 255
    swap = BackgroundSwap(red, {content_key(image): np.packbits(mask)}, probability=1.0)
    off = dict(OFF)
    aug = TwoViewAugmentation(size=32, interpolation="bilinear", **off, background_swap=swap, batched_color=True,
                              mean=(0, 0, 0), std=(1, 1, 1))
    view = aug.collate([aug(image, seed=0)])["view2"][0]
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(view[:, :, :15], pixels[:, :, :15], atol=1e-6, rtol=0)
    torch.testing.assert_close(view[:, :, 17:], torch.tensor([1.0, 0, 0])[:, None, None].expand(3, 32, 15))


def test_object_centred_crops_centre_on_the_foreground_box():
    import numpy as np

    from training.data.background_swap import BackgroundSwap
    from training.data.loader import content_key
    from training.data.two_views import centre_in_region

    assert centre_in_region(10, 10, (20, 20, 40, 40), (0.5, 0.5), 64, 64) == (25, 25)  # centre of the box
    assert centre_in_region(10, 10, (0, 0, 4, 4), (0.0, 0.0), 64, 64) == (0, 0)  # pushed back inside the image
    assert centre_in_region(10, 10, (60, 60, 64, 64), (1.0, 1.0), 64, 64) == (54, 54)
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[0:20, 12:32] = 200  # grey around the foreground box, black elsewhere
    image = Image.fromarray(pixels)
    mask = np.zeros((64, 64), bool)
    mask[8:24, 40:56] = True  # foreground box (20, 4, 28, 12) in the image's pixels
    swap = BackgroundSwap(np.zeros((1, 64, 64, 3), np.uint8), {content_key(image): np.packbits(mask)}, 0.0)
    options = dict(size=8, scale=(0.05, 0.05), interpolation="bilinear", mean=(0, 0, 0), std=(1, 1, 1),
                   **{k: v for k, v in OFF.items() if k != "scale"}, background_swap=swap, batched_color=True)
    aug = TwoViewAugmentation(**options, object_centred_crops=True)
    assert aug._foreground_box(image) == (20.0, 4.0, 28.0, 12.0)
    with pytest.raises(ValueError, match="object_centred_crops needs"):
        TwoViewAugmentation(size=8, batched_color=True, object_centred_crops=True)
    # 7x7 crops centred in the box stay in the grey; crops placed anywhere often reach the black
    for centred, expected in ((True, True), (False, False)):
        aug = TwoViewAugmentation(**options, object_centred_crops=centred)
        views = aug.collate([aug(image, seed=seed) for seed in range(20)])
        all_grey = torch.cat([views["view1"], views["view2"]]).sub(200 / 255).abs().max() < 1e-5
        assert bool(all_grey) is expected


def test_batched_views_take_odd_images():
    """A 3x5 image, a 400x10 strip, a flat image (no foreground: crops placed as usual) and a photo in one batch."""
    from training.data.background_swap import BackgroundSwap

    images = [_image(40).resize((3, 5)), _image(40).resize((400, 10)), Image.new("RGB", (64, 64), (128, 128, 128)),
              _image(48)]
    swap = BackgroundSwap.from_images(images, 1.0)
    aug = TwoViewAugmentation(16, (0.3, 1.0), batched_color=True, background_swap=swap, object_centred_crops=True)
    batch = aug.collate([aug(image, seed=i) for i, image in enumerate(images)])
    assert batch["view1"].shape == (4, 3, 16, 16) and batch["view2"].isfinite().all() and batch["batch_size"] == 4
