"""`VGGModel` (modeling/vgg.py): the max-pooling CNN of the small-data recipe. It computes what a plain PyTorch
stack of the same layers computes, exports as a folder that loads with `trust_remote_code` without dinoforge, and
plugs into the two-view methods like the transformers ConvNets."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from two_view_helpers import load_stock

from modeling import SimCLRConfig, SimCLRForPretraining, VGGConfig, VGGModel


def reference_stack(widths: list[int], depths: list[int]) -> nn.Sequential:
    """The same network written as a bare PyTorch stack: conv3x3 (no bias) - BN - ReLU, max-pool 2 between stages,
    global average pool."""
    layers: list[nn.Module] = []
    channels = 3
    for i, (width, depth) in enumerate(zip(widths, depths)):
        if i:
            layers.append(nn.MaxPool2d(2))
        for _ in range(depth):
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
    return nn.Sequential(*layers)


@pytest.mark.parametrize("train_mode", [False, True])
def test_equals_a_plain_pytorch_stack(train_mode):
    torch.manual_seed(0)
    config = VGGConfig(hidden_sizes=[8, 16, 24], depths=[2, 1, 2])
    model = VGGModel(config).train(train_mode)
    ref = reference_stack([8, 16, 24], [2, 1, 2]).train(train_mode)
    ours = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    theirs = [m for m in ref.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    assert [type(m) for m in ours] == [type(m) for m in theirs]
    for a, b in zip(ours, theirs):
        b.load_state_dict(a.state_dict())
    for m in ours:  # non-trivial BatchNorm statistics and affine terms for eval mode
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 1.5)
    for a, b in zip(ours, theirs):
        b.load_state_dict(a.state_dict())
    x = torch.randn(3, 3, 20, 20)
    out = model(pixel_values=x, output_hidden_states=True)
    feature_map = ref(x)
    assert out.last_hidden_state.shape == (3, 24, 5, 5)  # 20 px / 2**2: two pools, no stem downsampling
    torch.testing.assert_close(out.last_hidden_state, feature_map, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.pooler_output, feature_map.mean((2, 3), keepdim=True), atol=1e-6, rtol=1e-6)
    assert [h.shape[1:] for h in out.hidden_states] == [(8, 20, 20), (16, 10, 10), (24, 5, 5)]
    assert model(pixel_values=x, return_dict=False)[0].shape == (3, 24, 5, 5)


def test_default_init_is_pytorchs():
    """Conv weights kaiming-uniform(a=sqrt 5) as `nn.Conv2d` draws them (bound 1/sqrt(fan_in)), BatchNorm 1 / 0."""
    model = VGGModel(VGGConfig(hidden_sizes=[16, 32], depths=[1, 1]))
    conv = model.stages[1].layers[0].convolution
    bound = 1 / (16 * 9) ** 0.5
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound
    assert conv.weight.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.1)
    bn = model.stages[1].layers[0].normalization
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_export_loads_without_dinoforge_and_evaluates_as_its_global_pool(tmp_path):
    from training.evaluation.features import forward_features
    from training.export import save_backbone

    torch.manual_seed(0)
    model = VGGModel(VGGConfig()).eval()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)  # the same draw as in the clean process below
    expected = model(pixel_values=x).pooler_output.flatten(1)
    save_backbone(model, tmp_path / "b", image_size=32)
    assert (tmp_path / "b" / "vgg.py").is_file()  # the code travels with the weights (auto_map)
    # the preprocessing the run's kNN used, at the 32 px it was trained on: resize 256/224 of it, center crop
    processor = json.loads((tmp_path / "b" / "preprocessor_config.json").read_text())
    assert processor["size"] == {"shortest_edge": 37} and processor["crop_size"] == {"height": 32, "width": 32}
    code = ("torch.manual_seed(0); x = torch.randn(2, 3, 32, 32)\n"
            "print(type(m).__name__, ' '.join(f'{v:.6f}' for v in m(pixel_values=x).pooler_output.flatten(1)[:, :4].flatten().tolist()))")
    code += ("\nfrom PIL import Image\nfrom transformers import pipeline\n"
             f"p = pipeline('image-feature-extraction', model={str(tmp_path / 'b')!r}, trust_remote_code=True)\n"
             "print(len(p(Image.new('RGB', (40, 30), (200, 10, 10)))[0]))")
    name, *values, pipeline_rows = load_stock(tmp_path / "b", code, tmp_path, trust_remote_code=True).split()
    assert name == "VGGModel" and int(pipeline_rows) == 128  # the feature map's channels
    torch.testing.assert_close(torch.tensor([float(v) for v in values]), expected[:, :4].flatten(), atol=1e-5, rtol=0)
    cls, mean = forward_features(model, x)  # what kNN and the probes read
    torch.testing.assert_close(cls, expected)
    torch.testing.assert_close(mean, expected)


def test_pretraining_round_trip_and_init_from_a_vgg_folder(tmp_path):
    from training.methods.two_view import BackboneModelConfig, _backbone_weights, backbone_config

    section = BackboneModelConfig(arch="vgg", vgg_depths=[1, 2], vgg_hidden_sizes=[8, 16])
    config = backbone_config(section, 32)
    assert isinstance(config, VGGConfig) and config.depths == [1, 2] and config.hidden_sizes == [8, 16]
    model = SimCLRForPretraining(SimCLRConfig(backbone_config=config, hidden_dim=32, out_dim=16))
    model.save_pretrained(tmp_path / "m")
    loaded = SimCLRForPretraining.from_pretrained(tmp_path / "m")
    assert isinstance(loaded.backbone, VGGModel)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    model.backbone.save_pretrained(tmp_path / "b")
    state = _backbone_weights(str(tmp_path / "b"), section)
    assert state.keys() == model.backbone.state_dict().keys()
    with pytest.raises(ValueError, match="one entry per stage"):
        backbone_config(BackboneModelConfig(arch="vgg", vgg_depths=[1, 2], vgg_hidden_sizes=[8]), 32)
    with pytest.raises(ValueError, match="one entry per stage"):
        VGGConfig(hidden_sizes=[8, 16], depths=[1])


def test_model_card_says_how_to_load_it():
    from training.methods.two_view import textnet_config
    from training.model_card import render_model_card

    run = {"config": {"method": "simclr"}, "step": 3}
    for backbone, remote in ((VGGModel(VGGConfig(hidden_sizes=[8], depths=[1])), True),
                             (SimCLRForPretraining(SimCLRConfig(backbone_config=textnet_config([1], [8]))).backbone, False)):
        model = SimCLRForPretraining(SimCLRConfig(backbone_config=backbone.config, hidden_dim=16, out_dim=8))
        card = render_model_card(model, backbone, run)
        assert card.count('"path/to/backbone", trust_remote_code=True)') == (2 if remote else 0), card[:1500]
        assert ("no `trust_remote_code`" in card) != remote
