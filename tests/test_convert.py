"""modeling.convert: transformers / official / timm converters and the stock-transformers export folder.

Tiny random models (hidden 32, 2 layers) with every parameter randomised (LayerScale gammas included), so that any
mapping mistake shows up as a large difference. CPU fp32, eval mode.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import randomized

from modeling.convert import (
    export_backbone,
    from_official_state_dict,
    from_transformers,
    timm_model_name,
    to_timm,
    to_transformers,
    transformers_matches_at_all_sizes,
)
from modeling.vision_transformer import DinoVisionConfig, DinoVisionModel

TOL = 1e-4
OFFICIAL_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.mask_token": "mask_token",
    "embeddings.patch_embed.weight": "patch_embed.proj.weight",
    "embeddings.patch_embed.bias": "patch_embed.proj.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}


def tiny_config(ffn="mlp", registers=0, image_size=56, **kw) -> DinoVisionConfig:
    if registers:  # the official register models: offset 0 + antialias
        kw = dict(dict(interpolate_offset=0.0, interpolate_antialias=True), **kw)
    return DinoVisionConfig(
        image_size=image_size,
        patch_size=14,
        hidden_size=kw.pop("hidden_size", 32),
        num_hidden_layers=kw.pop("num_hidden_layers", 2),
        num_attention_heads=kw.pop("num_attention_heads", 2),
        ffn=ffn,
        num_register_tokens=registers,
        **kw,
    )




def official_state_dict(model: DinoVisionModel, block_chunks: int = 0, prefix: str = "") -> dict:
    """Our weights in the official DINOv2 layout (written independently of modeling.convert)."""
    depth = model.config.num_hidden_layers
    chunk = depth // block_chunks if block_chunks else 0
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            # official BlockChunk padding keeps the global index: blocks.<chunk>.<global index>.<param>
            key = f"blocks.{int(index) // chunk}.{index}.{rest}" if block_chunks else key
        else:
            key = OFFICIAL_TOP[key]
        out[prefix + key] = value.clone()
    return out


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def images(h: int, w: int, n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


VARIANTS = [("mlp", 0), ("swiglu", 0), ("mlp", 4), ("swiglu", 4)]


# ---------------------------------------------------------------- transformers


@pytest.mark.parametrize("ffn,registers", VARIANTS)
def test_to_transformers_equal(ffn, registers, record_property):
    model = randomized(tiny_config(ffn, registers, image_size=112))
    hf = to_transformers(model)
    assert type(hf).__name__ == ("Dinov2WithRegistersModel" if registers else "Dinov2Model")
    assert hf.config.use_swiglu_ffn == (ffn == "swiglu")
    sizes = [(112, 112), (224, 224), (168, 280)]
    with torch.no_grad():
        for h, w in sizes:
            x = images(h, w)
            ours, theirs = model(x), hf(pixel_values=x)
            d = max_diff(ours.last_hidden_state, theirs.last_hidden_state)
            record_property(f"transformers_{ffn}_reg{registers}_{h}x{w}", d)
            print(f"to_transformers {ffn} reg{registers} {h}x{w}: max|Δ| = {d:.3g}")
            if (h, w) == (112, 112) or registers:  # WithRegisters interpolates like the official reg models
                assert d <= TOL
                assert max_diff(ours.pooler_output, theirs.pooler_output) <= TOL
            else:  # offset 0.1: stock Dinov2Model interpolates with size=, only the native size matches
                assert not transformers_matches_at_all_sizes(model.config)
        # masked inputs (iBOT mask token) map to bool_masked_pos
        x = images(112, 112)
        masks = torch.rand(2, 64, generator=torch.Generator().manual_seed(3)) < 0.5
        d = max_diff(
            model(x, masks=masks).last_hidden_state, hf(pixel_values=x, bool_masked_pos=masks).last_hidden_state
        )
        assert d <= TOL


def test_to_transformers_is_a_copy():
    model = randomized(tiny_config("swiglu"))
    hf = to_transformers(model)
    ours = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in ours for p in hf.parameters())
    assert all(p.is_contiguous() for p in hf.parameters())
    assert not hf.training


@pytest.mark.parametrize("ffn,registers", VARIANTS)
def test_from_transformers_round_trip(ffn, registers):
    model = randomized(tiny_config(ffn, registers))
    back = from_transformers(to_transformers(model))
    assert isinstance(back, DinoVisionModel)
    for field in ("image_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio", "ffn",
                  "num_register_tokens", "interpolate_offset", "interpolate_antialias", "qkv_bias"):  # fmt: skip
        assert getattr(back.config, field) == getattr(model.config, field), field
    theirs, ours = back.state_dict(), model.state_dict()
    assert theirs.keys() == ours.keys()
    for k in ours:
        assert torch.equal(theirs[k], ours[k]), k
    with torch.no_grad():
        x = images(98, 70)  # interpolated: both follow the official interpolation
        assert max_diff(back(x).last_hidden_state, model(x).last_hidden_state) == 0.0


def test_from_transformers_sets_official_interpolation():
    plain = from_transformers(to_transformers(randomized(tiny_config())))
    assert (plain.config.interpolate_offset, plain.config.interpolate_antialias) == (0.1, False)
    reg = from_transformers(to_transformers(randomized(tiny_config(registers=4))))
    assert (reg.config.interpolate_offset, reg.config.interpolate_antialias) == (0.0, True)
    with pytest.raises(TypeError, match="Dinov2Model"):
        from_transformers(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("ffn", ["mlp", "swiglu"])
def test_transformers_without_biases_uses_zero_bias(ffn):
    cfg = tiny_config(ffn, qkv_bias=False, proj_bias=False, ffn_bias=False)
    model = randomized(cfg)
    hf = to_transformers(model)
    assert hf.config.qkv_bias is False
    assert torch.count_nonzero(hf.encoder.layer[0].attention.o_proj.bias) == 0
    back = from_transformers(hf)
    assert back.config.proj_bias and back.config.ffn_bias  # the stock classes always have these biases
    with torch.no_grad():
        x = images(56, 56)
        assert max_diff(hf(pixel_values=x).last_hidden_state, model(x).last_hidden_state) <= TOL
        assert max_diff(back(x).last_hidden_state, model(x).last_hidden_state) <= TOL


def test_to_transformers_rejects_fractional_mlp_ratio():
    with pytest.raises(ValueError, match="mlp_ratio"):
        to_transformers(DinoVisionModel(tiny_config(mlp_ratio=2.5)))


# ---------------------------------------------------------------- official state dicts


@pytest.mark.parametrize("ffn,registers", VARIANTS)
@pytest.mark.parametrize("block_chunks", [0, 2])
def test_from_official_state_dict_round_trip(ffn, registers, block_chunks):
    model = randomized(tiny_config(ffn, registers, num_hidden_layers=4))
    sd = official_state_dict(model, block_chunks)
    if block_chunks:
        assert "blocks.1.2.attn.qkv.weight" in sd  # chunk 1 holds global blocks 2 and 3
    loaded = from_official_state_dict(sd, model.config)
    theirs, ours = loaded.state_dict(), model.state_dict()
    assert theirs.keys() == ours.keys()
    for k in ours:
        assert torch.equal(theirs[k], ours[k]), k
    with torch.no_grad():
        x = images(70, 42)
        assert torch.equal(loaded(x).last_hidden_state, model(x).last_hidden_state)


@pytest.mark.parametrize(
    "wrap,prefix_arg",
    [
        (lambda sd: {"teacher.backbone." + k: v for k, v in sd.items()}, None),
        (lambda sd: {"teacher": {"backbone." + k: v for k, v in sd.items()}}, None),  # teacher_checkpoint.pth
        (lambda sd: {"module.backbone." + k: v for k, v in sd.items()}, None),
        (lambda sd: {"model": {"student.backbone." + k: v for k, v in sd.items()}}, None),
        (lambda sd: {"student.backbone." + k: v for k, v in sd.items()}, "student.backbone."),
    ],
    ids=["teacher.backbone", "teacher-container", "module.backbone", "model-container-student", "explicit-prefix"],
)
def test_from_official_state_dict_prefixes(wrap, prefix_arg):
    model = randomized(tiny_config(registers=4))
    other = randomized(tiny_config(registers=4), seed=5)
    sd = wrap(official_state_dict(model, block_chunks=2))
    # a training checkpoint also holds heads (and possibly the other tower): ignored
    flat = sd.get("teacher", sd.get("model", sd))
    flat["dino_head.mlp.0.weight"] = torch.zeros(3, 3)
    if prefix_arg:
        flat.update({"teacher.backbone." + k: v for k, v in official_state_dict(other).items()})
    loaded = from_official_state_dict(sd, model.config, prefix=prefix_arg)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


@pytest.mark.parametrize("ffn,registers", [("mlp", 0), ("swiglu", 4)])
def test_from_official_state_dict_infers_config(ffn, registers):
    cfg = tiny_config(ffn, registers, hidden_size=64, num_attention_heads=1, qkv_bias=False, image_size=42)
    model = randomized(cfg)
    loaded = from_official_state_dict(official_state_dict(model, block_chunks=2), config=None)
    for field in ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "ffn",
                  "num_register_tokens", "qkv_bias", "proj_bias", "ffn_bias", "interpolate_offset",
                  "interpolate_antialias"):  # fmt: skip
        assert getattr(loaded.config, field) == getattr(cfg, field), field
    with torch.no_grad():
        x = images(56, 84)
        assert torch.equal(loaded(x).last_hidden_state, model(x).last_hidden_state)


def test_from_official_state_dict_without_layerscale():
    # official init_values=None: blocks have no ls1/ls2 at all, i.e. gamma = 1
    model = randomized(tiny_config())
    with torch.no_grad():
        for block in model.blocks:
            block.ls1.gamma.fill_(1.0)
            block.ls2.gamma.fill_(1.0)
    sd = {k: v for k, v in official_state_dict(model).items() if not k.endswith("gamma")}
    loaded = from_official_state_dict(sd, model.config)
    with torch.no_grad():
        x = images(56, 56)
        assert torch.equal(loaded(x).last_hidden_state, model(x).last_hidden_state)


def test_from_official_state_dict_errors():
    model = randomized(tiny_config())
    sd = official_state_dict(model)
    with pytest.raises(ValueError, match="blocks.0.attn.extra.weight"):
        from_official_state_dict({**sd, "blocks.0.attn.extra.weight": torch.zeros(1)}, model.config)
    with pytest.raises(ValueError, match=r"blocks\.1\.norm2\.bias"):
        from_official_state_dict({k: v for k, v in sd.items() if k != "blocks.1.norm2.bias"}, model.config)
    with pytest.raises(ValueError, match=r"mlp\.fc1\.weight.*use ffn='mlp'"):  # wrong ffn in the config
        from_official_state_dict(sd, tiny_config("swiglu"))
    with pytest.raises(ValueError, match="pos_embed.*use image_size=56"):  # pos_embed grid mismatch
        from_official_state_dict(sd, tiny_config(image_size=112))
    with pytest.raises(ValueError, match="cls_token"):
        from_official_state_dict({"foo.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="num_attention_heads"):  # hidden 32: head count not inferable
        from_official_state_dict(sd)


# ---------------------------------------------------------------- timm


@pytest.mark.parametrize("ffn,registers", VARIANTS)
def test_to_timm_equal(ffn, registers, record_property):
    model = randomized(tiny_config(ffn, registers))
    tm = to_timm(model)
    assert tm.dynamic_img_size
    with torch.no_grad():
        for h, w in [(56, 56), (168, 280)]:
            x = images(h, w)
            d = max_diff(tm.forward_features(x), model(x).last_hidden_state)
            record_property(f"timm_{ffn}_reg{registers}_{h}x{w}", d)
            print(f"to_timm {ffn} reg{registers} {h}x{w}: max|Δ| = {d:.3g}")
            if (h, w) == (56, 56) or registers:  # timm resamples with size= + antialias, like the reg models
                assert d <= TOL
        assert max_diff(tm(images(56, 56)), model(images(56, 56)).pooler_output) <= TOL


def test_to_timm_named_models():
    names = {
        ("vits14", 0): "vit_small_patch14_dinov2",
        ("vitb14", 4): "vit_base_patch14_reg4_dinov2",
        ("vitl14", 0): "vit_large_patch14_dinov2",
        ("vitg14", 4): "vit_giant_patch14_reg4_dinov2",
    }
    for (preset, registers), name in names.items():
        assert timm_model_name(DinoVisionConfig.from_preset(preset, num_register_tokens=registers)) == name
    assert timm_model_name(tiny_config()) is None
    # Our kwargs rebuild timm's own released DINOv2 defs (ViT-L/14 released with an MLP, ViT-g/14 with SwiGLUPacked)
    import timm

    from modeling.convert import _timm_factory

    for preset, ffn, name in [
        ("vitl14", "mlp", "vit_large_patch14_dinov2"),
        ("vitg14", "swiglu", "vit_giant_patch14_dinov2"),
    ]:
        cfg = DinoVisionConfig.from_preset(preset, image_size=518, ffn=ffn)
        ours = _timm_factory(cfg)(device="meta")
        ref = timm.create_model(name, pretrained=False, num_classes=0, device="meta")
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
        assert type(ours.blocks[0].mlp) is type(ref.blocks[0].mlp)
    # one real official size through the named timm def (ViT-S/14, small input to stay fast)
    torch.manual_seed(0)
    model = DinoVisionModel(DinoVisionConfig.from_preset("vits14", image_size=56, num_register_tokens=4)).eval()
    tm = to_timm(model)
    assert tm.pretrained_cfg["architecture"] == "vit_small_patch14_reg4_dinov2"
    with torch.no_grad():
        x = images(56, 56, n=1)
        assert max_diff(tm.forward_features(x), model(x).last_hidden_state) <= TOL


# ---------------------------------------------------------------- export folder


def test_export_backbone_loads_with_stock_transformers(tmp_path):
    model = randomized(tiny_config("swiglu", registers=4))
    out = export_backbone(model, tmp_path / "backbone")
    proc = json.loads((out / "preprocessor_config.json").read_text())
    assert proc["image_processor_type"].startswith("BitImageProcessor")
    assert proc["size"] == {"shortest_edge": 256} and proc["crop_size"] == {"height": 224, "width": 224}
    assert (out / "model.safetensors").exists()
    x = images(56, 56)
    torch.save(x, tmp_path / "x.pt")
    # A fresh interpreter without dinoforge: stock AutoModel and the feature-extraction pipeline.
    script = textwrap.dedent(
        f"""
        import sys, torch
        from PIL import Image
        from transformers import AutoModel, pipeline
        model = AutoModel.from_pretrained({str(out)!r}).eval()
        with torch.no_grad():
            y = model(pixel_values=torch.load({str(tmp_path / "x.pt")!r}, weights_only=True)).last_hidden_state
        torch.save(y, {str(tmp_path / "y.pt")!r})
        feats = pipeline("image-feature-extraction", model={str(out)!r})(Image.new("RGB", (300, 260), (120, 30, 200)))
        assert "modeling" not in sys.modules, "dinoforge was imported"
        print(type(model).__name__, len(feats[0]), len(feats[0][0]))
        """
    )
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    name, tokens, dim = res.stdout.split()[-3:]
    assert name == "Dinov2WithRegistersModel"
    assert (int(tokens), int(dim)) == (1 + 4 + 16 * 16, 32)  # 224 crop → 16×16 patches
    with torch.no_grad():
        assert max_diff(torch.load(tmp_path / "y.pt", weights_only=True), model(x).last_hidden_state) <= TOL
