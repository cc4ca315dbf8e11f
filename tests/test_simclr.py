"""SimCLR: NT-Xent against the reference's `add_contrastive_loss` (written from its semantics), and runs through
train.py (tiny ResNet / TextNet / VGG, background swap on) that export their backbones."""

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
    # google-research/simclr runs both views as one batch: BatchNorm statistics over all 2B views
    z1, z2 = model.projector(model.backbone(pixel_values=torch.cat((x1, x2))).pooler_output.flatten(1)).chunk(2)
    assert torch.allclose(out.loss, nt_xent_loss(z1, z2, 0.2), rtol=1e-5)
    p1, p2 = (model.projector(model.backbone(pixel_values=x).pooler_output.flatten(1)) for x in (x1, x2))
    assert not torch.allclose(out.loss, nt_xent_loss(p1, p2, 0.2), rtol=1e-3)  # per-view statistics differ
    assert model.health({"embedding_std": 0.01})[0].startswith("collapse")
    model.save_pretrained(tmp_path / "m")
    loaded = SimCLRForPretraining.from_pretrained(tmp_path / "m")
    assert loaded.config.loss_temperature == 0.2 and loaded.config.out_dim == 16


TEXTNET_SECTION = {"arch": "textnet", "textnet_depths": [1, 1, 2], "textnet_hidden_sizes": [8, 16, 32]}
VGG_SECTION = {"arch": "vgg", "vgg_depths": [1, 1, 2], "vgg_hidden_sizes": [8, 16, 32]}


@pytest.mark.parametrize("section, batched, expected", [
    # ResNet: slow (ResNet export is covered fast by Barlow Twins; this path by the TextNet case)
    pytest.param(RESNET_SECTION, False, "ResNetModel (1, 32, 1, 1)", marks=pytest.mark.slow),
    # with its RepVGG branches: slow (the branch-free case below runs the same path; the unit tests cover both)
    pytest.param(TEXTNET_SECTION, False, "TextNetModel (1, 32, 2, 2)", marks=pytest.mark.slow),
    # branch-free TextNet with the recipe's pipeline: slow (the VGG case below runs that pipeline)
    pytest.param({**TEXTNET_SECTION, "textnet_branches": False, "channels_last": True}, True,
                 "TextNetModel (1, 32, 2, 2)", marks=pytest.mark.slow),
    # configs/small_data.yaml's backbone and pipeline; its export loads with its own code (trust_remote_code)
    ({**VGG_SECTION, "channels_last": True}, True, "VGGModel (1, 32, 1, 1)"),
], ids=["resnet", "textnet", "textnet-no-branches-batched-color", "vgg-batched-color"])
def test_trains_with_background_swap_and_exports_stock_backbone(tmp_path, section, batched, expected):
    out = tmp_path / "run"
    config = {"method": "simclr", "model": section, "simclr": {"hidden_dim": 32, "out_dim": 16},
              "crops": {"global_size": 32},
              "views": {"background_swap": 0.5, "color_jitter": [0.4, 0.4, 0.4, 0.5], "batched_color": batched,
                        "object_centred_crops": batched},
              "data": DATA, "train": {"save_every": 1000, "log_every": 1},
              "optim": {**OPTIM, "base_lr": 1e-3, "epochs": 1}}
    log = train(config, tmp_path, f"train.output_dir={out}")
    assert "background swap: 288 images" in log
    rows = metric_rows(out)
    assert sorted(rows) == list(range(1, 7))
    assert {"loss", "positive_similarity", "embedding_std"} <= rows[6].keys()
    code = "print(type(m).__name__, tuple(m(pixel_values=torch.randn(1, 3, 32, 32)).pooler_output.shape))"
    remote = section["arch"] == "vgg"
    assert load_stock(out / "backbone", code, tmp_path, trust_remote_code=remote).strip() == expected
    if remote:  # exported with the preprocessing of its 32 px views, not 224
        assert '"crop_size": {\n    "height": 32' in (out / "backbone" / "preprocessor_config.json").read_text()
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


def test_textnet_is_a_plain_cnn_at_full_resolution_and_its_features_are_the_global_pool(tmp_path):
    from transformers import AutoModel

    from modeling.two_view import build_backbone, pooled_features
    from training.evaluation.features import forward_features
    from training.export import save_backbone
    from training.methods.two_view import textnet_config

    config = textnet_config([1, 2, 2, 2], [16, 32, 64, 128])
    assert config.stem_stride == 1 and config.conv_layer_strides == [[1], [2, 1], [2, 1], [2, 1]]
    backbone = build_backbone(config).eval()
    x = torch.randn(2, 3, 32, 32)
    out = backbone(pixel_values=x)
    assert out.last_hidden_state.shape == (2, 128, 4, 4)  # 32 px / 2**3: the stem does not downsample
    pooled = pooled_features(backbone, x)
    torch.testing.assert_close(pooled, out.last_hidden_state.mean((2, 3)))
    save_backbone(backbone, tmp_path / "b")
    stock = AutoModel.from_pretrained(tmp_path / "b").eval()
    cls, mean = forward_features(stock, x)  # what kNN / linear probes read: the global pool, not the 2x2 pooler
    torch.testing.assert_close(cls, pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean, pooled, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one entry per stage"):
        textnet_config([1, 2], [16, 32, 64])
    # a 2x2 stride-2 first layer (patch merge) in the later stages: same map sizes
    merged = build_backbone(textnet_config([1, 2, 2, 2], [16, 32, 64, 128], downsample_kernel=2)).eval()
    assert merged.encoder.stages[1].stage[0].main_conv.kernel_size == (2, 2)
    assert merged.encoder.stages[1].stage[1].main_conv.kernel_size == (3, 3)
    assert merged(pixel_values=x).last_hidden_state.shape == (2, 128, 4, 4)


def test_textnet_without_branches_exports_as_the_same_function(tmp_path):
    """`model.textnet_branches: false` trains a plain conv-BN-ReLU stack; its export is a stock TextNetModel whose
    (zero) branches change nothing, in eval mode and in train mode, and the pretraining model round-trips."""
    from transformers import AutoModel

    from modeling.simclr import SimCLRConfig, SimCLRForPretraining
    from modeling.two_view import build_backbone
    from training.export import save_backbone
    from training.methods.two_view import textnet_config

    torch.manual_seed(0)
    with_branches = build_backbone(textnet_config([1, 2, 2], [8, 16, 32]))
    backbone = build_backbone(textnet_config([1, 2, 2], [8, 16, 32], branches=False))
    assert sum(p.numel() for p in backbone.parameters()) < 0.8 * sum(p.numel() for p in with_branches.parameters())
    opt = torch.optim.SGD(backbone.parameters(), lr=0.1)
    for _ in range(3):  # moves weights and BatchNorm statistics away from their init
        backbone(pixel_values=torch.randn(8, 3, 32, 32)).last_hidden_state.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    save_backbone(backbone.eval(), tmp_path / "b")
    assert "rep_branches" not in (tmp_path / "b" / "config.json").read_text()
    stock = AutoModel.from_pretrained(tmp_path / "b").eval()
    assert stock.encoder.stages[1].stage[1].vertical_conv is not None  # stock: every branch is there
    x = torch.randn(4, 3, 32, 32)
    for mode in (False, True):
        backbone.train(mode), stock.train(mode)
        torch.testing.assert_close(stock(pixel_values=x).last_hidden_state,
                                   backbone(pixel_values=x).last_hidden_state, atol=1e-6, rtol=0)
    model = SimCLRForPretraining(SimCLRConfig(backbone_config=textnet_config([1, 2], [8, 16], branches=False),
                                              hidden_dim=16, out_dim=8))
    model.save_pretrained(tmp_path / "m")
    loaded = SimCLRForPretraining.from_pretrained(tmp_path / "m")
    assert loaded.backbone.encoder.stages[1].stage[0].vertical_conv is None
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())


def test_projector_output_batchnorm_is_optional():
    on = SimCLRForPretraining(SimCLRConfig(backbone_config=TINY_RESNET, hidden_dim=16, out_dim=8))
    off = SimCLRForPretraining(SimCLRConfig(backbone_config=TINY_RESNET, hidden_dim=16, out_dim=8,
                                            projector_last_bn=False))
    assert isinstance(on.projector[-1], torch.nn.BatchNorm1d) and isinstance(off.projector[-1], torch.nn.Linear)
    assert off(*views()).loss.isfinite()


def test_cpu_threads_rule():
    from training.loop import cpu_threads
    from training.methods.simclr import SimCLRTrainConfig

    cfg = SimCLRTrainConfig()
    cfg.data.num_workers = 0
    assert cpu_threads(cfg, 1, {}) is None  # no workers: torch's own default
    cfg.data.num_workers = 1
    assert cpu_threads(cfg, 1, {}) >= 1
    cfg.train.cpu_threads = 3
    assert cpu_threads(cfg, 1, {}) == 3  # the config's choice
    assert cpu_threads(cfg, 1, {"OMP_NUM_THREADS": "1"}) is None  # the environment (accelerate launch) wins


@pytest.mark.slow
def test_batched_views_and_channels_last_resume_exactly(tmp_path):
    """The small-data recipe's pipeline and backbone (batched colour, object-centred crops, a channels-last VGG):
    a run stopped at step 3 and resumed ends with the losses and weights of the run that never stopped."""
    from safetensors.torch import load_file

    config = {"method": "simclr", "model": {**VGG_SECTION, "channels_last": True},
              "simclr": {"hidden_dim": 32, "out_dim": 16}, "crops": {"global_size": 32},
              "views": {"background_swap": 0.5, "batched_color": True, "object_centred_crops": True},
              "data": DATA, "train": {"save_every": 1000, "log_every": 1},
              "optim": {**OPTIM, "base_lr": 1e-3, "epochs": 1}}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(config, tmp_path, f"train.output_dir={straight}")
    train(config, tmp_path, f"train.output_dir={resumed}", "train.max_steps=3", "train.save_every=3")
    train(config, tmp_path, f"train.output_dir={resumed}")  # resume=auto
    ref, got = metric_rows(straight), metric_rows(resumed)
    assert [got[s]["loss"] for s in range(4, 7)] == [ref[s]["loss"] for s in range(4, 7)]
    a, b = (load_file(d / "backbone" / "model.safetensors") for d in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_init_from_a_textnet_keeps_or_refuses_its_branches(tmp_path):
    """`model.init_from` a stock TextNet into a branch-free one: zero branches (our export) are dropped, live ones
    are refused with the setting that keeps them."""
    from modeling.two_view import build_backbone
    from training.config import ConfigError
    from training.export import save_backbone
    from training.methods.two_view import BackboneModelConfig, _backbone_weights, textnet_config

    save_backbone(build_backbone(textnet_config([1, 2], [8, 16], branches=False)), tmp_path / "plain")
    save_backbone(build_backbone(textnet_config([1, 2], [8, 16])), tmp_path / "branches")
    model = BackboneModelConfig(arch="textnet", textnet_depths=[1, 2], textnet_hidden_sizes=[8, 16],
                                textnet_branches=False)
    target = build_backbone(textnet_config([1, 2], [8, 16], branches=False))
    target.load_state_dict(_backbone_weights(str(tmp_path / "plain"), model))  # strict: exactly its keys
    with pytest.raises(ConfigError, match="textnet_branches: true"):
        _backbone_weights(str(tmp_path / "branches"), model)
