"""Parity of DinoVisionModel (loaded with `from_official_state_dict`) with the official DINOv2 backbone.

Needs a checkout of facebookresearch/dinov2: set `DINOFORGE_OFFICIAL_DINOV2` to the directory that contains the
`dinov2` package (e.g. /tmp/dinov2_official). Runs on CPU without xFormers (`XFORMERS_DISABLED=1`: the official
`MemEffAttention` then falls back to its plain scaled-dot-product attention). Every parameter of the official model,
LayerScale gammas included, is randomised so that any mismatch shows.
"""

import os
import sys
import warnings
from functools import partial

import pytest
import torch

from modeling.convert import from_official_state_dict
from modeling.vision_transformer import DinoVisionConfig, DinoVisionModel

OFFICIAL = os.environ.get("DINOFORGE_OFFICIAL_DINOV2")
if not OFFICIAL or not os.path.isdir(os.path.join(OFFICIAL, "dinov2")):
    pytest.skip(
        "set DINOFORGE_OFFICIAL_DINOV2 to a directory containing the official `dinov2` package to run the "
        "official backbone parity tests",
        allow_module_level=True,
    )

os.environ.setdefault("XFORMERS_DISABLED", "1")
sys.path.insert(0, OFFICIAL)
with warnings.catch_warnings():  # the official modules warn at import that xFormers is off
    warnings.simplefilter("ignore", UserWarning)
    from dinov2.layers import attention as official_attention
    from dinov2.layers import block as official_block
    from dinov2.models import vision_transformer as official_vits

TOL = 1e-5
SIZES = [(56, 56), (224, 224), (168, 280)]  # native grid 4×4, then interpolated 16×16 and 12×20


def test_runs_without_xformers():
    assert not official_attention.XFORMERS_AVAILABLE and not official_block.XFORMERS_AVAILABLE


def build_official(ffn: str, registers: int, block_chunks: int, attn_class=None, embed_dim=64, num_heads=2):
    block_fn = partial(official_block.NestedTensorBlock, attn_class=attn_class) if attn_class else official_block.Block
    model = official_vits.DinoVisionTransformer(
        img_size=56,
        patch_size=14,
        embed_dim=embed_dim,
        depth=4,
        num_heads=num_heads,
        mlp_ratio=4,
        init_values=1e-5,
        ffn_layer=ffn,
        block_fn=block_fn,
        block_chunks=block_chunks,
        num_register_tokens=registers,
        interpolate_offset=0.0 if registers else 0.1,
        interpolate_antialias=bool(registers),
    ).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.3 * noise if name.endswith(("gamma", "norm1.weight", "norm2.weight")) else 0.2 * noise)
    return model


def our_config(ffn: str, registers: int, embed_dim=64, num_heads=2) -> DinoVisionConfig:
    return DinoVisionConfig(
        image_size=56,
        patch_size=14,
        hidden_size=embed_dim,
        num_hidden_layers=4,
        num_attention_heads=num_heads,
        ffn="swiglu" if ffn.startswith("swiglu") else "mlp",
        num_register_tokens=registers,
        interpolate_offset=0.0 if registers else 0.1,
        interpolate_antialias=bool(registers),
    )


def compare(official, ours, record_property, tag: str) -> float:
    worst = 0.0
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for h, w in SIZES:
            x = torch.randn(2, 3, h, w, generator=g)
            n = (h // 14) * (w // 14)
            masks = torch.rand(2, n, generator=g) < 0.4
            for m in (None, masks):
                ref = official.forward_features(x, m)
                out = ours(x, masks=m).last_hidden_state
                r = official.num_register_tokens
                diffs = [
                    (out[:, 0] - ref["x_norm_clstoken"]).abs().max().item(),
                    (out[:, 1 + r :] - ref["x_norm_patchtokens"]).abs().max().item(),
                ]
                if r:
                    diffs.append((out[:, 1 : 1 + r] - ref["x_norm_regtokens"]).abs().max().item())
                d = max(diffs)
                label = f"{tag}_{h}x{w}{'_masked' if m is not None else ''}"
                record_property(label, d)
                print(f"official parity {label}: max|Δ| = {d:.3g}")
                worst = max(worst, d)
    return worst


@pytest.mark.parametrize("ffn", ["mlp", "swiglufused"])
@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("block_chunks", [0, 2])
def test_matches_official(ffn, registers, block_chunks, record_property):
    official = build_official(ffn, registers, block_chunks)
    ours = from_official_state_dict(official.state_dict(), our_config(ffn, registers))
    tag = f"{ffn}_reg{registers}_chunks{block_chunks}"
    assert compare(official, ours, record_property, tag) <= TOL


def test_matches_official_memeff_attention_and_inferred_config(record_property):
    # The official size defs use MemEffAttention (plain attention without xFormers); config inferred from weights.
    official = build_official("swiglufused", 4, 2, attn_class=official_attention.MemEffAttention, num_heads=1)
    ours = from_official_state_dict(official.state_dict())  # hidden 64 → 1 head of 64 (official head size)
    assert ours.config.ffn == "swiglu" and ours.config.num_register_tokens == 4
    assert compare(official, ours, record_property, "memeff_inferred") <= TOL


def test_training_checkpoint_layout(record_property):
    # {"teacher": {"backbone.*", "dino_head.*"}} as written by the official do_test (teacher_checkpoint.pth)
    official = build_official("mlp", 0, 2)
    ckpt = {
        "teacher": {
            **{f"backbone.{k}": v for k, v in official.state_dict().items()},
            "dino_head.last_layer.weight": torch.zeros(2),
        }
    }
    ours = from_official_state_dict(ckpt, our_config("mlp", 0))
    assert compare(official, ours, record_property, "teacher_checkpoint") <= TOL


@pytest.mark.parametrize(
    "preset,arch", [("vits14", "vit_small"), ("vitb14", "vit_base"), ("vitl14", "vit_large"), ("vitg14", "vit_giant2")]
)
def test_preset_sizes_match_official(preset, arch):
    cfg = DinoVisionConfig.from_preset(preset)
    ffn = "swiglufused" if cfg.ffn == "swiglu" else "mlp"
    with torch.device("meta"):
        official = official_vits.__dict__[arch](
            patch_size=14, img_size=224, init_values=1e-5, ffn_layer=ffn, block_chunks=0
        )
        ours = DinoVisionModel(cfg)
    theirs = sorted(tuple(p.shape) for p in official.parameters())
    mine = sorted(tuple(p.shape) for p in ours.parameters())
    assert mine == theirs
