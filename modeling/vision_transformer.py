"""DINOv2 vision transformer: config and model in one readable file.

Numerically this is the official DINOv2 `DinoVisionTransformer` (pre-norm blocks with LayerScale, MLP or SwiGLU FFN,
CLS + optional register tokens, learned mask token, bicubic position-embedding interpolation with the official
0.1 offset or 0.0 + antialias for the register models). Parameter names follow the official layout where it is
readable (`blocks.N.attn.qkv`, `blocks.N.ls1.gamma`, `blocks.N.mlp.w12`) so converters stay simple.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling

# Official sizes (METHOD.md "Architectures"). `ffn` is the FFN of the official *training* recipe.
PRESETS: dict[str, dict] = {
    "vits14": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, ffn="mlp", drop_path_rate=0.3),
    "vitb14": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn="mlp", drop_path_rate=0.3),
    "vitl14": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn="swiglu", drop_path_rate=0.4),
    "vitg14": dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, ffn="swiglu", drop_path_rate=0.4),
}


class DinoVisionConfig(PretrainedConfig):
    """Configuration of a DINOv2 ViT backbone.

    `image_size` only sets the position-embedding grid (`image_size // patch_size` per side): inputs of any size
    divisible by `patch_size` work, the embeddings are interpolated like the official model.
    """

    model_type = "dinoforge_vit"

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 14,
        num_channels: int = 3,
        hidden_size: int = 384,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 6,
        mlp_ratio: float = 4.0,
        ffn: str = "mlp",
        num_register_tokens: int = 0,
        layerscale_init: float = 1e-5,
        drop_path_rate: float = 0.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        interpolate_offset: float = 0.1,
        interpolate_antialias: bool = False,
        layer_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        if ffn not in ("mlp", "swiglu"):
            raise ValueError(f"ffn must be 'mlp' or 'swiglu', got {ffn!r}")
        if hidden_size % num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads})"
            )
        if image_size % patch_size != 0:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.mlp_ratio = mlp_ratio
        self.ffn = ffn
        self.num_register_tokens = num_register_tokens
        self.layerscale_init = layerscale_init
        self.drop_path_rate = drop_path_rate
        self.qkv_bias = qkv_bias
        self.proj_bias = proj_bias
        self.ffn_bias = ffn_bias
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        super().__init__(**kwargs)

    @classmethod
    def from_preset(
        cls, name: str, image_size: int = 224, num_register_tokens: int = 0, **overrides
    ) -> DinoVisionConfig:
        """Official sizes for "vits14" | "vitb14" | "vitl14" | "vitg14".

        Register models use offset 0.0 + antialiased interpolation, as the official `*_reg` models.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        values = dict(PRESETS[name], image_size=image_size, patch_size=14, num_register_tokens=num_register_tokens)
        if num_register_tokens > 0:
            values.update(interpolate_offset=0.0, interpolate_antialias=True)
        values.update(overrides)
        return cls(**values)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def ffn_hidden_size(self) -> int:
        hidden = int(self.hidden_size * self.mlp_ratio)
        if self.ffn == "swiglu":  # two thirds of the MLP width, rounded up to a multiple of 8 (official)
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample: drop the whole residual branch, rescale the kept ones."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, config: DinoVisionConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.config._attn_implementation == "eager":
            attn = (q * self.scale) @ k.transpose(-2, -1)
            out = attn.softmax(dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, config: DinoVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.ffn_hidden_size, bias=config.ffn_bias)
        self.fc2 = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.ffn_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """SwiGLU with the official fused `w12` projection (first half gate, second half value)."""

    def __init__(self, config: DinoVisionConfig):
        super().__init__()
        self.w12 = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=config.ffn_bias)
        self.w3 = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.ffn_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class Block(GradientCheckpointingLayer):
    def __init__(self, config: DinoVisionConfig):
        super().__init__()
        self.drop_path_rate = config.drop_path_rate  # uniform over depth (official drop_path_uniform)
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = Attention(config)
        self.ls1 = LayerScale(config.hidden_size, config.layerscale_init)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SwiGLUFFN(config) if config.ffn == "swiglu" else Mlp(config)
        self.ls2 = LayerScale(config.hidden_size, config.layerscale_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.ls1(self.attn(self.norm1(x))), self.drop_path_rate, self.training)
        x = x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path_rate, self.training)
        return x


class Embeddings(nn.Module):
    """Patch embedding + CLS (+ registers) + position embeddings, with the mask token for iBOT."""

    def __init__(self, config: DinoVisionConfig):
        super().__init__()
        self.config = config
        self.patch_size = config.patch_size
        self.patch_embed = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, config.num_register_tokens, config.hidden_size))
            if config.num_register_tokens
            else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, config.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.hidden_size))

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """Position embeddings for a `height`×`width` input, resampled exactly as the official model does."""
        pos = self.position_embeddings
        grid = int(math.sqrt(pos.shape[1] - 1))
        h0, w0 = height // self.patch_size, width // self.patch_size
        if h0 == w0 == grid:
            return pos
        dim = pos.shape[-1]
        patch_pos = pos[:, 1:].float().reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
        offset = self.config.interpolate_offset
        if offset:
            # Official kludge (facebookresearch/dino#8): a scale factor slightly above the exact ratio.
            size_kwargs = {"scale_factor": ((h0 + offset) / grid, (w0 + offset) / grid)}
        else:
            size_kwargs = {"size": (h0, w0)}
        patch_pos = F.interpolate(
            patch_pos, mode="bicubic", antialias=self.config.interpolate_antialias, **size_kwargs
        )
        if patch_pos.shape[-2:] != (h0, w0):
            raise RuntimeError(f"position-embedding interpolation gave {tuple(patch_pos.shape[-2:])}, not {(h0, w0)}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h0 * w0, dim)
        return torch.cat((pos[:, :1].float(), patch_pos), dim=1).to(pos.dtype)

    def forward(self, pixel_values: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        B, _, H, W = pixel_values.shape
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(H, W)
        if self.register_tokens is not None:  # registers carry no position embedding (official)
            x = torch.cat((x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]), dim=1)
        return x


class DinoVisionPreTrainedModel(PreTrainedModel):
    config_class = DinoVisionConfig
    config: DinoVisionConfig
    base_model_prefix = "dinoforge_vit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["Embeddings", "Block"]
    _supports_sdpa = True
    _can_compile_fullgraph = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Official init: trunc-normal(0.02) linears with zero bias, pos-embed trunc-normal(0.02), CLS/registers
        # normal(1e-6), mask token zeros; the patch-embed conv keeps PyTorch's default init as in the official code.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in = module.weight.shape[1] * module.weight.shape[2] * module.weight.shape[3]
                bound = 1 / math.sqrt(fan_in)
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, LayerScale):
            init.constant_(module.gamma, module.init_value)
        elif isinstance(module, Embeddings):
            init.trunc_normal_(module.position_embeddings, std=std)
            init.normal_(module.cls_token, std=1e-6)
            if module.register_tokens is not None:
                init.normal_(module.register_tokens, std=1e-6)
            init.zeros_(module.mask_token)


class DinoVisionModel(DinoVisionPreTrainedModel):
    """DINOv2 ViT backbone.

    `forward(pixel_values, masks=None)` → `last_hidden_state` = final-normed `[CLS, registers..., patches...]`,
    `pooler_output` = normed CLS. `masks` (bool `[B, num_patches]`) replaces masked patch embeddings by the
    learned mask token (iBOT).
    """

    def __init__(self, config: DinoVisionConfig):
        super().__init__(config)
        self.embeddings = Embeddings(config)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embed

    def _check_inputs(self, pixel_values: torch.Tensor, masks: torch.Tensor | None) -> None:
        c, p = self.config.num_channels, self.config.patch_size
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be [batch, {c}, height, width], got shape {tuple(pixel_values.shape)}")
        B, C, H, W = pixel_values.shape
        if C != c:
            raise ValueError(f"pixel_values must have {c} channels, got {C} (shape {tuple(pixel_values.shape)})")
        if H % p or W % p:
            raise ValueError(
                f"image height and width must be multiples of the patch size {p}, got {H}x{W}; "
                f"resize or crop to e.g. {max(p, H // p * p)}x{max(p, W // p * p)}"
            )
        if masks is not None:
            expected = (B, (H // p) * (W // p))
            if tuple(masks.shape) != expected:
                raise ValueError(f"masks must have shape [batch, num_patches] = {list(expected)}, got {list(masks.shape)}")
            if masks.dtype != torch.bool:
                raise ValueError(f"masks must be a bool tensor, got {masks.dtype}")

    def forward(
        self,
        pixel_values: torch.Tensor,
        masks: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        self._check_inputs(pixel_values, masks)
        x = self.embeddings(pixel_values.to(self.embeddings.patch_embed.weight.dtype), masks)
        hidden_states = [x] if output_hidden_states else None
        for block in self.blocks:
            x = block(x)
            if hidden_states is not None:
                hidden_states.append(x)
        x = self.norm(x)
        out = BaseModelOutputWithPooling(
            last_hidden_state=x,
            pooler_output=x[:, 0],
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
        )
        return out if return_dict else out.to_tuple()

    @torch.no_grad()
    def resize_position_embeddings(self, image_size: int) -> None:
        """Resample the position-embedding grid once to `image_size` (high-res phase) and record it in the config.

        Uses the model's own interpolation, so outputs at `image_size` are unchanged by the resampling.
        """
        p = self.config.patch_size
        if image_size % p:
            raise ValueError(f"image_size must be a multiple of the patch size {p}, got {image_size}")
        new = self.embeddings.interpolate_pos_encoding(image_size, image_size).detach().clone()
        self.embeddings.position_embeddings = nn.Parameter(new)
        self.config.image_size = image_size
