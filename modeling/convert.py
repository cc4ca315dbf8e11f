"""Converters between `DinoVisionModel` and the other DINOv2 layouts.

- `to_transformers` / `from_transformers`: stock `transformers.Dinov2Model` (no registers) and
  `Dinov2WithRegistersModel` (registers), loadable with plain `AutoModel.from_pretrained`, no dinoforge import.
- `from_official_state_dict`: checkpoints in the official facebookresearch/dinov2 layout (released `*_pretrain.pth`,
  `teacher_checkpoint.pth`, training checkpoints with `teacher.backbone.` / `student.backbone.` / `module.` prefixes,
  `block_chunks` layouts).
- `from_official_pretraining_state_dict`: official *training* checkpoints with their DINO / iBOT heads → a
  `DinoForPretraining` (the teacher of the paper's distillation recipe).
- `to_timm`: a timm `vit_*_patch14_dinov2` / `vit_*_patch14_reg4_dinov2` model (`dynamic_img_size=True`).
- `export_backbone`: `to_transformers(...).save_pretrained(out_dir)` + the `preprocessor_config.json` of the released
  DINOv2 models, so `pipeline("image-feature-extraction", model=out_dir)` works out of the box.

All converters copy tensors (the result never shares storage with the source), keep the source's device and dtype,
and return the new model in eval mode. Models are built on the meta device and filled with `assign=True`, so
converting a ViT-g costs no random initialisation and no second copy of the weights.

Interpolation (DESIGN.md "Known reference differences"): our model resamples position embeddings exactly like the
official model. Stock `Dinov2Model` resamples with `size=` and no antialias, `Dinov2WithRegistersModel` with `size=`
and antialias, timm with `size=` and antialias. So an export equals the source at every input size only when the
target's scheme is the source's (`transformers_matches_at_all_sizes`); otherwise (e.g. the official offset-0.1 models
without registers) it equals it at the native grid `config.image_size` only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import torch
from torch import nn
from transformers import (
    BitImageProcessor,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
)

from .official import from_official_pretraining_state_dict, from_official_state_dict
from .vision_transformer import DinoVisionConfig, DinoVisionModel
from .weights import bias_or_zeros, build_from_state_dict

logger = logging.getLogger(__name__)

__all__ = [
    "dinov2_image_processor",
    "export_backbone",
    "from_official_pretraining_state_dict",
    "from_official_state_dict",
    "from_transformers",
    "timm_model_name",
    "to_timm",
    "to_transformers",
    "transformers_matches_at_all_sizes",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

def transformers_matches_at_all_sizes(config: DinoVisionConfig) -> bool:
    """Whether the stock transformers class `to_transformers` picks resamples position embeddings like `config`.

    True: the export equals our model at every input size. False: only at the native grid (`config.image_size`);
    this is the case of the official offset-0.1 models without registers (model cards should say so).
    """
    if config.interpolate_offset:
        return False
    # Dinov2WithRegistersModel uses antialias=True, Dinov2Model antialias=False (both with `size=`).
    return bool(config.interpolate_antialias) == (config.num_register_tokens > 0)


# --------------------------------------------------------------------------------------------------------------------
# transformers
# --------------------------------------------------------------------------------------------------------------------


def _to_hf_config(config: DinoVisionConfig) -> Dinov2Config | Dinov2WithRegistersConfig:
    if float(config.mlp_ratio) != int(config.mlp_ratio):
        raise ValueError(
            f"stock Dinov2Config only takes an integer mlp_ratio, this backbone has mlp_ratio={config.mlp_ratio}; "
            "it cannot be exported to transformers (use to_timm or keep the dinoforge format)"
        )
    kwargs = dict(
        image_size=int(config.image_size),
        patch_size=int(config.patch_size),
        num_channels=int(config.num_channels),
        hidden_size=int(config.hidden_size),
        num_hidden_layers=int(config.num_hidden_layers),
        num_attention_heads=int(config.num_attention_heads),
        mlp_ratio=int(config.mlp_ratio),
        hidden_act="gelu",  # exact erf GELU, like nn.GELU in the official Mlp
        layer_norm_eps=float(config.layer_norm_eps),
        qkv_bias=bool(config.qkv_bias),
        layerscale_value=float(config.layerscale_init),
        drop_path_rate=float(config.drop_path_rate),
        use_swiglu_ffn=config.ffn == "swiglu",
        initializer_range=float(config.initializer_range),
    )
    attn = getattr(config, "_attn_implementation", None)
    if attn in ("eager", "sdpa"):
        kwargs["attn_implementation"] = attn
    if config.num_register_tokens:
        return Dinov2WithRegistersConfig(num_register_tokens=int(config.num_register_tokens), **kwargs)
    return Dinov2Config(use_mask_token=True, **kwargs)


def _ours_to_hf(sd: Mapping[str, torch.Tensor], config: DinoVisionConfig) -> dict[str, torch.Tensor]:
    D, F_ = config.hidden_size, config.ffn_hidden_size
    out = {
        "embeddings.cls_token": sd["embeddings.cls_token"],
        "embeddings.mask_token": sd["embeddings.mask_token"],
        "embeddings.position_embeddings": sd["embeddings.position_embeddings"],
        "embeddings.patch_embeddings.projection.weight": sd["embeddings.patch_embed.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["embeddings.patch_embed.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
    }
    if config.num_register_tokens:
        out["embeddings.register_tokens"] = sd["embeddings.register_tokens"]
    for i in range(config.num_hidden_layers):
        s, t = f"blocks.{i}.", f"encoder.layer.{i}."
        ref = sd[s + "norm1.weight"]
        for name in ("norm1", "norm2"):
            out[t + f"{name}.weight"] = sd[s + f"{name}.weight"]
            out[t + f"{name}.bias"] = sd[s + f"{name}.bias"]
        # Fused qkv rows are [q; k; v], each head-major: the same order as three separate projections.
        for proj, w in zip(("q_proj", "k_proj", "v_proj"), sd[s + "attn.qkv.weight"].chunk(3, dim=0)):
            out[t + f"attention.{proj}.weight"] = w
        if config.qkv_bias:
            for proj, b in zip(("q_proj", "k_proj", "v_proj"), sd[s + "attn.qkv.bias"].chunk(3, dim=0)):
                out[t + f"attention.{proj}.bias"] = b
        out[t + "attention.o_proj.weight"] = sd[s + "attn.proj.weight"]
        out[t + "attention.o_proj.bias"] = bias_or_zeros(sd, s + "attn.proj.bias", D, ref)
        out[t + "layer_scale1.lambda1"] = sd[s + "ls1.gamma"]
        out[t + "layer_scale2.lambda1"] = sd[s + "ls2.gamma"]
        if config.ffn == "swiglu":
            gate, up = sd[s + "mlp.w12.weight"].chunk(2, dim=0)  # official: silu(first half) * second half
            out[t + "mlp.gate_proj.weight"], out[t + "mlp.up_proj.weight"] = gate, up
            gate_b, up_b = bias_or_zeros(sd, s + "mlp.w12.bias", 2 * F_, ref).chunk(2, dim=0)
            out[t + "mlp.gate_proj.bias"], out[t + "mlp.up_proj.bias"] = gate_b, up_b
            out[t + "mlp.down_proj.weight"] = sd[s + "mlp.w3.weight"]
            out[t + "mlp.down_proj.bias"] = bias_or_zeros(sd, s + "mlp.w3.bias", D, ref)
        else:
            out[t + "mlp.fc1.weight"] = sd[s + "mlp.fc1.weight"]
            out[t + "mlp.fc1.bias"] = bias_or_zeros(sd, s + "mlp.fc1.bias", F_, ref)
            out[t + "mlp.fc2.weight"] = sd[s + "mlp.fc2.weight"]
            out[t + "mlp.fc2.bias"] = bias_or_zeros(sd, s + "mlp.fc2.bias", D, ref)
    return out


def to_transformers(backbone: DinoVisionModel) -> Dinov2Model | Dinov2WithRegistersModel:
    """Our backbone as a stock transformers model: `Dinov2Model`, or `Dinov2WithRegistersModel` with registers.

    Outputs (`last_hidden_state`, `pooler_output`) equal ours (fp32, ≤1e-4) at the native size `config.image_size`,
    and at every size when `transformers_matches_at_all_sizes(config)` — i.e. register models with offset 0 +
    antialias (the official `*_reg` setting). Offset-0.1 models (the official setting without registers) differ at
    other sizes because stock `Dinov2Model` resamples position embeddings with `size=` and no offset (measured
    max |Δ| ~0.03 on small random models); their model card should say so.

    Mapping: fused `qkv` → `q_proj/k_proj/v_proj`, `proj` → `o_proj`, `ls{1,2}.gamma` → `layer_scale{1,2}.lambda1`,
    SwiGLU `w12` → `gate_proj` (first half) + `up_proj` (second half), `w3` → `down_proj`.
    Biases the stock classes always have (`o_proj`, FFN) are written as zeros when our config turns them off
    (`proj_bias=False` / `ffn_bias=False`): the function is unchanged. A non-integer `mlp_ratio` raises `ValueError`
    (stock `Dinov2Config.mlp_ratio` is an int).
    """
    config = backbone.config
    if not transformers_matches_at_all_sizes(config):
        logger.info(
            "to_transformers: interpolate_offset=%s, interpolate_antialias=%s; the stock %s equals this "
            "backbone only at the native size %d (see modeling.convert docs)",
            config.interpolate_offset,
            config.interpolate_antialias,
            "Dinov2WithRegistersModel" if config.num_register_tokens else "Dinov2Model",
            config.image_size,
        )
    hf_config = _to_hf_config(config)
    model_cls = Dinov2WithRegistersModel if config.num_register_tokens else Dinov2Model
    return build_from_state_dict(lambda: model_cls(hf_config), _ours_to_hf(backbone.state_dict(), config), model_cls.__name__)


def _square(value, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"only square {name} is supported (the position grid is square), got {value}")
        value = value[0]
    return int(value)


def from_transformers(hf_model: Dinov2Model | Dinov2WithRegistersModel) -> DinoVisionModel:
    """Inverse of `to_transformers`: a stock `Dinov2Model` / `Dinov2WithRegistersModel` as our `DinoVisionModel`.

    Also accepts models wrapping one (e.g. `Dinov2ForImageClassification`; the head is dropped). Interpolation
    follows the official model the checkpoint comes from: offset 0.1 without antialias for `Dinov2Model`
    (facebook/dinov2-*), offset 0 with antialias for `Dinov2WithRegistersModel` (facebook/dinov2-with-registers-*).
    So, for offset-0.1 models, the result equals the official model (not the stock class) at non-native sizes.
    Biases come back as present (`proj_bias=ffn_bias=True`), zero where the source had none.
    """
    base = hf_model
    if not isinstance(base, (Dinov2Model, Dinov2WithRegistersModel)):
        base = getattr(hf_model, "base_model", None)  # e.g. Dinov2ForImageClassification
    if not isinstance(base, (Dinov2Model, Dinov2WithRegistersModel)):
        raise TypeError(
            f"from_transformers expects a transformers Dinov2Model or Dinov2WithRegistersModel, got {type(hf_model)}"
        )
    hc = base.config
    registers = isinstance(base, Dinov2WithRegistersModel)
    if hc.hidden_act != "gelu":
        raise ValueError(f"only hidden_act='gelu' is supported (the DINOv2 MLP), got {hc.hidden_act!r}")
    num_registers = int(hc.num_register_tokens) if registers else 0
    config = DinoVisionConfig(
        image_size=_square(hc.image_size, "image_size"),
        patch_size=_square(hc.patch_size, "patch_size"),
        num_channels=hc.num_channels,
        hidden_size=hc.hidden_size,
        num_hidden_layers=hc.num_hidden_layers,
        num_attention_heads=hc.num_attention_heads,
        mlp_ratio=float(hc.mlp_ratio),
        ffn="swiglu" if hc.use_swiglu_ffn else "mlp",
        num_register_tokens=num_registers,
        layerscale_init=float(hc.layerscale_value),
        drop_path_rate=float(hc.drop_path_rate),
        qkv_bias=bool(hc.qkv_bias),
        proj_bias=True,
        ffn_bias=True,
        interpolate_offset=0.0 if registers else 0.1,
        interpolate_antialias=registers,
        layer_norm_eps=float(hc.layer_norm_eps),
        initializer_range=float(hc.initializer_range),
    )
    if getattr(hc, "_attn_implementation", None) in ("eager", "sdpa"):
        config._attn_implementation = hc._attn_implementation

    sd = base.state_dict()
    out = {
        "embeddings.cls_token": sd["embeddings.cls_token"],
        "embeddings.position_embeddings": sd["embeddings.position_embeddings"],
        "embeddings.patch_embed.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "embeddings.patch_embed.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    # use_mask_token=False models have none; it only matters for masked (iBOT) inputs.
    out["embeddings.mask_token"] = sd.get(
        "embeddings.mask_token", sd["embeddings.cls_token"].new_zeros(1, hc.hidden_size)
    )
    if num_registers:
        out["embeddings.register_tokens"] = sd["embeddings.register_tokens"]
    for i in range(hc.num_hidden_layers):
        s, t = f"encoder.layer.{i}.", f"blocks.{i}."
        for name in ("norm1", "norm2"):
            out[t + f"{name}.weight"] = sd[s + f"{name}.weight"]
            out[t + f"{name}.bias"] = sd[s + f"{name}.bias"]
        qkv = ("q_proj", "k_proj", "v_proj")
        out[t + "attn.qkv.weight"] = torch.cat([sd[s + f"attention.{p}.weight"] for p in qkv], dim=0)
        if hc.qkv_bias:
            out[t + "attn.qkv.bias"] = torch.cat([sd[s + f"attention.{p}.bias"] for p in qkv], dim=0)
        out[t + "attn.proj.weight"] = sd[s + "attention.o_proj.weight"]
        out[t + "attn.proj.bias"] = sd[s + "attention.o_proj.bias"]
        out[t + "ls1.gamma"] = sd[s + "layer_scale1.lambda1"]
        out[t + "ls2.gamma"] = sd[s + "layer_scale2.lambda1"]
        if hc.use_swiglu_ffn:
            for suffix in ("weight", "bias"):
                out[t + f"mlp.w12.{suffix}"] = torch.cat(
                    [sd[s + f"mlp.gate_proj.{suffix}"], sd[s + f"mlp.up_proj.{suffix}"]], dim=0
                )
                out[t + f"mlp.w3.{suffix}"] = sd[s + f"mlp.down_proj.{suffix}"]
        else:
            for name in ("fc1", "fc2"):
                for suffix in ("weight", "bias"):
                    out[t + f"mlp.{name}.{suffix}"] = sd[s + f"mlp.{name}.{suffix}"]
    return build_from_state_dict(lambda: DinoVisionModel(config), out, "DinoVisionModel")


# --------------------------------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------------------------------

# (hidden, depth, heads) → timm architecture prefix of the DINOv2 model defs.
_TIMM_ARCHS = {
    (384, 12, 6): "vit_small",
    (768, 12, 12): "vit_base",
    (1024, 24, 16): "vit_large",
    (1536, 40, 24): "vit_giant",
}


def timm_model_name(config: DinoVisionConfig) -> str | None:
    """The timm model def matching `config`'s size (`vit_*_patch14_dinov2` / `*_reg4_dinov2`), or None."""
    arch = _TIMM_ARCHS.get((config.hidden_size, config.num_hidden_layers, config.num_attention_heads))
    if arch is None or config.patch_size != 14 or config.num_register_tokens not in (0, 4):
        return None
    return f"{arch}_patch14_{'reg4_' if config.num_register_tokens else ''}dinov2"


def _timm_factory(config: DinoVisionConfig):
    """A no-argument constructor of the timm model matching `config` (named DINOv2 def when the size is official)."""
    import timm
    from timm.layers import LayerNorm, Mlp, SwiGLUPacked
    from timm.models.vision_transformer import VisionTransformer

    swiglu = config.ffn == "swiglu"
    timm_hidden = 2 * config.ffn_hidden_size if swiglu else config.ffn_hidden_size
    kwargs = dict(
        img_size=config.image_size,
        patch_size=config.patch_size,
        in_chans=config.num_channels,
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        # timm takes int(dim * mlp_ratio); +0.5 keeps float rounding away from the integer boundary.
        mlp_ratio=(timm_hidden + 0.5) / config.hidden_size,
        mlp_layer=SwiGLUPacked if swiglu else Mlp,
        act_layer=nn.SiLU if swiglu else nn.GELU,
        qkv_bias=bool(config.qkv_bias),
        proj_bias=bool(config.proj_bias or config.ffn_bias),  # timm ties attention-output and FFN biases
        init_values=float(config.layerscale_init) or 1.0,  # 0/None would drop LayerScale; gammas are loaded anyway
        norm_layer=partial(LayerNorm, eps=config.layer_norm_eps),
        class_token=True,
        reg_tokens=config.num_register_tokens,
        no_embed_class=config.num_register_tokens > 0,
        dynamic_img_size=True,
        num_classes=0,
        global_pool="token",
    )
    name = timm_model_name(config)
    if name is not None:
        return partial(timm.create_model, name, pretrained=False, **kwargs)
    return partial(VisionTransformer, **kwargs)


def to_timm(backbone: DinoVisionModel) -> nn.Module:
    """Our backbone as a timm `VisionTransformer` (`dynamic_img_size=True`, `num_classes=0`, token pooling).

    Official sizes use the timm model def (`vit_{small,base,large,giant}_patch14[_reg4]_dinov2`, `pretrained=False`);
    other sizes build `timm.models.vision_transformer.VisionTransformer` with the same kwargs. All structural
    kwargs come from our config: `img_size=config.image_size`, `init_values`, `reg_tokens` with `no_embed_class`
    (timm folds the CLS position embedding into `cls_token`, as its own DINOv2 converter), the FFN as timm's `Mlp`
    (GELU) or `SwiGLUPacked` (fc1 = official w12, gate first; SiLU) whatever the size — so a SwiGLU ViT-L (the
    official training recipe) also converts. timm ties the FFN and attention-output biases; a missing one is
    written as zeros. `forward_features(x)` equals our `last_hidden_state` at the native size; at other sizes timm
    resamples with `size=` + antialias, i.e. exactly like offset-0/antialias (register) models and unlike the
    offset-0.1 models. Drop path is not carried over (inference export).
    """
    config = backbone.config
    D, L = config.hidden_size, config.num_hidden_layers
    R = config.num_register_tokens
    swiglu = config.ffn == "swiglu"
    timm_hidden = 2 * config.ffn_hidden_size if swiglu else config.ffn_hidden_size
    timm_bias = config.proj_bias or config.ffn_bias
    sd = backbone.state_dict()
    pos = sd["embeddings.position_embeddings"]
    out = {
        "cls_token": sd["embeddings.cls_token"] + pos[:, :1] if R else sd["embeddings.cls_token"],
        "pos_embed": pos[:, 1:] if R else pos,
        "patch_embed.proj.weight": sd["embeddings.patch_embed.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embed.bias"],
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
    }
    if R:
        out["reg_token"] = sd["embeddings.register_tokens"]
    fc1, fc2 = ("w12", "w3") if swiglu else ("fc1", "fc2")
    for i in range(L):
        s = f"blocks.{i}."
        ref = sd[s + "norm1.weight"]
        for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.qkv.weight", "attn.proj.weight",
                     "ls1.gamma", "ls2.gamma"):  # fmt: skip
            out[s + name] = sd[s + name]
        if config.qkv_bias:
            out[s + "attn.qkv.bias"] = sd[s + "attn.qkv.bias"]
        out[s + "mlp.fc1.weight"] = sd[s + f"mlp.{fc1}.weight"]
        out[s + "mlp.fc2.weight"] = sd[s + f"mlp.{fc2}.weight"]
        if timm_bias:
            out[s + "attn.proj.bias"] = bias_or_zeros(sd, s + "attn.proj.bias", D, ref)
            out[s + "mlp.fc1.bias"] = bias_or_zeros(sd, s + f"mlp.{fc1}.bias", timm_hidden, ref)
            out[s + "mlp.fc2.bias"] = bias_or_zeros(sd, s + f"mlp.{fc2}.bias", D, ref)

    return build_from_state_dict(_timm_factory(config), out, timm_model_name(config) or "timm VisionTransformer")


# --------------------------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------------------------


def dinov2_image_processor(crop_size: int = 224, resize_size: int = 256) -> BitImageProcessor:
    """The preprocessing of the released DINOv2 models: RGB, resize shortest edge 256 (bicubic), center crop 224,
    rescale to [0, 1], ImageNet mean/std."""
    return BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": resize_size},
        resample=3,  # PIL bicubic
        do_center_crop=True,
        crop_size={"height": crop_size, "width": crop_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )


def export_backbone(
    backbone: DinoVisionModel, out_dir: str | Path, *, crop_size: int = 224, resize_size: int = 256
) -> Path:
    """Write `to_transformers(backbone)` (safetensors) + `preprocessor_config.json` to `out_dir`.

    The folder loads with stock `AutoModel.from_pretrained(out_dir)` and `pipeline("image-feature-extraction",
    model=out_dir)`, without dinoforge or `trust_remote_code`. Returns the folder path.
    """
    if backbone.config.num_channels != 3:
        logger.warning(
            "exporting a %d-channel backbone with the RGB DINOv2 image processor", backbone.config.num_channels
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    to_transformers(backbone).save_pretrained(out)
    dinov2_image_processor(crop_size, resize_size).save_pretrained(out)
    return out
