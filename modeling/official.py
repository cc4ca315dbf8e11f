"""Official facebookresearch/dinov2 checkpoints → `DinoVisionModel`: released `*_pretrain.pth`,
`teacher_checkpoint.pth`, training checkpoints with `teacher.backbone.` / `student.backbone.` / `module.` prefixes,
and `block_chunks` layouts. Re-exported as `modeling.convert.from_official_state_dict`."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping

import torch

from .vision_transformer import DinoVisionConfig, DinoVisionModel
from .weights import build_from_state_dict

logger = logging.getLogger(__name__)


# Where a backbone sits inside official checkpoints, in order of preference (the teacher is the model DINOv2
# evaluates and releases). "" = a bare backbone state dict (hub `*_pretrain.pth`).
_OFFICIAL_PREFIXES = ("teacher.backbone.", "backbone.", "student.backbone.", "")
# Containers around the state dict: {"teacher": ...} (teacher_checkpoint.pth), {"model": ...} (training checkpoints).
_CONTAINER_KEYS = ("teacher", "model", "state_dict", "student")
# Wrapper segments that DDP / torch.compile / FSDP / activation checkpointing insert into parameter names.
_WRAPPER_RE = re.compile(r"(^|\.)(module|_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module)\.")
# `blocks.N.rest` or, with block_chunks, `blocks.C.N.rest` (N is the global index: chunks are padded with Identity).
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(?:(\d+)\.)?(.+)$")
_BLOCK_PARAMS = {
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
    "mlp.w12.weight", "mlp.w12.bias", "mlp.w3.weight", "mlp.w3.bias", "ls2.gamma",
    "mlp.w1.weight", "mlp.w1.bias", "mlp.w2.weight", "mlp.w2.bias",  # unfused SwiGLU (SwiGLUFFNAligned)
}  # fmt: skip
_TOP_LEVEL = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "register_tokens": "embeddings.register_tokens",
    "mask_token": "embeddings.mask_token",
    "patch_embed.proj.weight": "embeddings.patch_embed.weight",
    "patch_embed.proj.bias": "embeddings.patch_embed.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}


def _unwrap_container(state_dict: Mapping) -> Mapping:
    sd = state_dict
    while isinstance(sd, Mapping) and sd and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        for key in _CONTAINER_KEYS:
            if isinstance(sd.get(key), Mapping):
                sd = sd[key]
                break
        else:
            raise ValueError(
                f"no tensors found in the checkpoint; top-level keys are {sorted(map(str, sd))[:20]}, expected a "
                f"state dict or a dict holding one under one of {list(_CONTAINER_KEYS)}"
            )
    return sd


def _select_backbone(state_dict: Mapping, prefix: str | None) -> tuple[dict[str, torch.Tensor], str]:
    sd = {_WRAPPER_RE.sub(r"\1", k): v for k, v in _unwrap_container(state_dict).items() if isinstance(v, torch.Tensor)}
    if prefix is None:
        prefix = next((p for p in _OFFICIAL_PREFIXES if p + "cls_token" in sd), None)
        if prefix is None:
            raise ValueError(
                "no DINOv2 backbone found: expected a 'cls_token' key, bare or under one of "
                f"{[p for p in _OFFICIAL_PREFIXES if p]}; got keys like {sorted(sd)[:12]}"
            )
    selected = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    if not selected:
        raise ValueError(f"no keys start with prefix {prefix!r}; got keys like {sorted(sd)[:12]}")
    ignored = len(sd) - len(selected)
    if ignored:  # heads, the other tower, optimizer-free extras: not part of the backbone
        logger.info("from_official_state_dict: using keys under %r, ignoring %d others", prefix, ignored)
    return selected, prefix


def _map_official(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Official names → ours. Returns (mapped, ours→official name for messages, unknown official keys)."""
    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unknown: list[str] = []
    unfused: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}

    def put(ours: str, official: str, value: torch.Tensor) -> None:
        if ours in mapped:
            raise ValueError(f"official keys {origin[ours]!r} and {official!r} both map to {ours!r}")
        mapped[ours], origin[ours] = value, official

    for key, value in sd.items():
        if key in _TOP_LEVEL:
            put(_TOP_LEVEL[key], key, value)
            continue
        m = _BLOCK_RE.match(key)
        if m and m.group(3) in _BLOCK_PARAMS:
            index = int(m.group(2) if m.group(2) is not None else m.group(1))
            rest = m.group(3)
            if rest.startswith(("mlp.w1.", "mlp.w2.")):
                unfused.setdefault(f"blocks.{index}.{rest[len('mlp.w1.') :]}", {})[rest[4:6]] = (key, value)
            else:
                put(f"blocks.{index}.{rest}", key, value)
        else:
            unknown.append(key)
    for target, parts in unfused.items():  # w1 (gate) and w2 (value) → fused w12 = [gate; value]
        index, suffix = target.rsplit(".", 1)
        if set(parts) != {"w1", "w2"}:
            unknown.extend(key for key, _ in parts.values())
            continue
        put(
            f"{index}.mlp.w12.{suffix}",
            f"{parts['w1'][0]} + {parts['w2'][0]}",
            torch.cat([parts["w1"][1], parts["w2"][1]]),
        )
    return mapped, origin, sorted(unknown)


def _infer_config(sd: Mapping[str, torch.Tensor]) -> DinoVisionConfig:
    needed = ["embeddings.cls_token", "embeddings.position_embeddings", "embeddings.patch_embed.weight"]
    missing = [k for k in needed if k not in sd]
    if missing:
        raise ValueError(f"cannot infer the config, the state dict lacks {missing}; pass config=")
    hidden = sd["embeddings.cls_token"].shape[-1]
    patch_w = sd["embeddings.patch_embed.weight"]
    patch = patch_w.shape[-1]
    n_pos = sd["embeddings.position_embeddings"].shape[1] - 1
    grid = math.isqrt(n_pos)
    if grid * grid != n_pos:
        raise ValueError(f"pos_embed has {n_pos} patch positions, not a square grid; pass config=")
    depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    if depth == 0:
        raise ValueError("no transformer blocks found in the state dict; pass config=")
    if hidden % 64:
        # Head count is not stored in the weights; every official DINOv2 size uses 64-dim heads.
        raise ValueError(
            f"cannot infer num_attention_heads for hidden size {hidden} (not a multiple of 64); pass config="
        )
    swiglu = "blocks.0.mlp.w12.weight" in sd
    ffn_hidden = sd["blocks.0.mlp.w3.weight"].shape[1] if swiglu else sd["blocks.0.mlp.fc1.weight"].shape[0]
    mlp_ratio = 4.0 if swiglu else ffn_hidden / hidden
    has_ls = "blocks.0.ls1.gamma" in sd
    registers = sd["embeddings.register_tokens"].shape[1] if "embeddings.register_tokens" in sd else 0
    config = DinoVisionConfig(
        image_size=grid * patch,
        patch_size=patch,
        num_channels=patch_w.shape[1],
        hidden_size=hidden,
        num_hidden_layers=depth,
        num_attention_heads=hidden // 64,
        mlp_ratio=mlp_ratio,
        ffn="swiglu" if swiglu else "mlp",
        num_register_tokens=registers,
        layerscale_init=1e-5 if has_ls else 1.0,  # no LayerScale in the checkpoint ≡ gamma = 1
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        proj_bias="blocks.0.attn.proj.bias" in sd,
        ffn_bias=("blocks.0.mlp.w12.bias" if swiglu else "blocks.0.mlp.fc1.bias") in sd,
        # The official register models resample with offset 0 + antialias, the others with the 0.1 offset.
        interpolate_offset=0.0 if registers else 0.1,
        interpolate_antialias=bool(registers),
    )
    if config.ffn_hidden_size != ffn_hidden:
        raise ValueError(f"cannot infer mlp_ratio for an FFN width of {ffn_hidden} (hidden {hidden}); pass config=")
    return config


def from_official_state_dict(
    state_dict: Mapping, config: DinoVisionConfig | None = None, *, prefix: str | None = None
) -> DinoVisionModel:
    """Our backbone from a state dict in the official facebookresearch/dinov2 layout.

    Accepts bare backbone state dicts (hub `dinov2_vit*14[_reg4]_pretrain.pth`), `block_chunks` layouts
    (`blocks.C.N.*`, N the global block index), registers, and training checkpoints: containers
    `{"teacher": ...}` / `{"model": ...}` are unwrapped, `module.` / `_orig_mod.` / FSDP wrapper segments stripped,
    and the backbone is taken from `teacher.backbone.`, else `backbone.`, else `student.backbone.`, else the bare
    keys (pass `prefix=` to choose, e.g. `prefix="student.backbone."`); keys outside that prefix (heads, the other
    tower) are ignored. The result equals the official model at every input size (fp32).

    `config=None` infers sizes, biases, FFN type and registers from the tensors; the head count is taken as
    hidden_size // 64 (all official sizes), and interpolation as the official models: offset 0 + antialias with
    registers, offset 0.1 without. Pass a config for anything else (and to set `image_size` consistently with
    `pos_embed`). Missing or unknown keys raise `ValueError` listing them, except two documented cases: a checkpoint
    without LayerScale (official `init_values=None`) loads with gamma = 1, and a missing `mask_token` (only used
    for masked iBOT inputs) loads as zeros.
    """
    selected, prefix = _select_backbone(state_dict, prefix)
    mapped, origin, unknown = _map_official(selected)
    if config is None:
        config = _infer_config(mapped)
    with torch.device("meta"):
        expected = DinoVisionModel(config).state_dict()

    missing = set(expected) - set(mapped)
    ls_keys = {k for k in expected if k.endswith((".ls1.gamma", ".ls2.gamma"))}
    if ls_keys and ls_keys <= missing:  # official init_values=None: no LayerScale, i.e. identity
        ref = next(iter(mapped.values()))
        for k in ls_keys:
            mapped[k] = ref.new_ones(config.hidden_size)
        missing -= ls_keys
    if "embeddings.mask_token" in missing:
        mapped["embeddings.mask_token"] = next(iter(mapped.values())).new_zeros(1, config.hidden_size)
        missing.discard("embeddings.mask_token")
        logger.warning("from_official_state_dict: no mask_token in the checkpoint, using zeros")

    unexpected = sorted([origin[k] for k in set(mapped) - set(expected)] + unknown)
    bad_shapes = [
        f"{origin.get(k, k)}: expected {tuple(expected[k].shape)}, got {tuple(v.shape)}"
        for k, v in mapped.items()
        if k in expected and tuple(expected[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or bad_shapes:
        hints = []
        pos = mapped.get("embeddings.position_embeddings")
        if pos is not None and tuple(pos.shape) != tuple(expected["embeddings.position_embeddings"].shape):
            grid = math.isqrt(pos.shape[1] - 1)  # released models: 37×37 grid, image_size=518
            hints.append(f"pos_embed holds a {grid}x{grid} grid: use image_size={grid * config.patch_size}")
        found_ffn = "swiglu" if any(".mlp.w12." in k for k in mapped) else "mlp"
        if found_ffn != config.ffn:  # e.g. the released ViT-L/14 is MLP while the ViT-L training recipe is SwiGLU
            hints.append(f"the checkpoint has a {found_ffn!r} FFN: use ffn={found_ffn!r}")
        raise ValueError(
            f"official state dict (prefix {prefix!r}) does not match the config "
            f"(hidden_size={config.hidden_size}, num_hidden_layers={config.num_hidden_layers}, ffn={config.ffn!r}, "
            f"num_register_tokens={config.num_register_tokens}, image_size={config.image_size}, "
            f"qkv/proj/ffn bias={config.qkv_bias}/{config.proj_bias}/{config.ffn_bias}): "
            f"missing keys (our names) {sorted(missing)}, unexpected keys {unexpected}, shape mismatches {bad_shapes}. "
            + "".join(f"Hint: {h}. " for h in hints)
            + "Fix the config or pass config=None to infer it."
        )
    return build_from_state_dict(lambda: DinoVisionModel(config), {k: mapped[k] for k in expected}, "DinoVisionModel")


# --------------------------------------------------------------------------------------------------------------------
# Training checkpoints with heads (the teacher of the paper's distillation recipe)
# --------------------------------------------------------------------------------------------------------------------

# DINOv3 backbones: RoPE (`rope_embed.periods`) and "storage" register tokens; patch 16.
_DINOV3_MARKERS = ("rope_embed", "storage_tokens", "local_cls_norm")


def _check_not_dinov3(sd: Mapping[str, torch.Tensor]) -> None:
    hits = sorted(k for k in sd if any(m in k for m in _DINOV3_MARKERS))
    if hits:
        raise ValueError(
            f"this is a DINOv3 checkpoint (keys like {hits[:3]}): DINOv3 backbones use rotary position embeddings "
            "(RoPE) and patch 16, which dinoforge's ViT does not implement, so its heads cannot serve as a "
            "`distill_dino` teacher. Distil it with `method: distill_features` instead (teacher.path = the "
            "transformers DINOv3 model, e.g. facebook/dinov3-vitl16-pretrain-lvd1689m, which AutoModel loads)."
        )


def _official_head(sd: Mapping[str, torch.Tensor], prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """An official `DINOHead` under `prefix` → (our `DinoHead` state dict, its sizes).

    Official layouts: `mlp.{0,2,4}` linears (GELU between; `mlp.weight` when nlayers = 1), last layer weight-normed
    as `last_layer.weight_g` / `weight_v` (torch.nn.utils.weight_norm), `last_layer.parametrizations.weight.original0`
    / `original1` (the parametrization API), or a plain `last_layer.weight` (DINOv3's head: g = the row norms,
    which is the same linear map)."""
    keys = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    if any(".running_mean" in k for k in keys):
        raise ValueError(f"{prefix}: heads with BatchNorm (official use_bn=True) are not supported")
    out: dict[str, torch.Tensor] = {}
    if "mlp.weight" in keys:  # nlayers = 1: a bare Linear instead of a Sequential
        out["mlp.0.weight"], out["mlp.0.bias"] = keys["mlp.weight"], keys["mlp.bias"]
    else:
        out.update({k: v for k, v in keys.items() if k.startswith("mlp.")})
    if "last_layer.weight_v" in keys:
        g, v = keys["last_layer.weight_g"], keys["last_layer.weight_v"]
    elif "last_layer.parametrizations.weight.original1" in keys:
        g = keys["last_layer.parametrizations.weight.original0"]
        v = keys["last_layer.parametrizations.weight.original1"]
    elif "last_layer.weight" in keys:
        v = keys["last_layer.weight"]
        g = v.norm(dim=1, keepdim=True)
    else:
        raise ValueError(f"{prefix}: no last layer found; keys are {sorted(keys)[:12]}")
    out["last_layer.weight_g"], out["last_layer.weight_v"] = g.reshape(-1, 1), v
    linears = sorted(int(k.split(".")[1]) for k in out if k.startswith("mlp.") and k.endswith(".weight"))
    if linears != list(range(0, 2 * len(linears), 2)):
        raise ValueError(f"{prefix}: unexpected MLP layout (linear layers at mlp.{linears})")
    sizes = dict(num_prototypes=v.shape[0], bottleneck_dim=v.shape[1], nlayers=len(linears),
                 hidden_dim=out["mlp.0.weight"].shape[0] if len(linears) > 1 else 2048)
    return out, sizes


def from_official_pretraining_state_dict(
    state_dict: Mapping, backbone_config: DinoVisionConfig | None = None, *, centering: str = "sinkhorn_knopp",
):
    """A `DinoForPretraining` (backbones + DINO/iBOT heads + centers) from an official DINOv2 *training* checkpoint.

    Accepts the trainer's checkpoints (`{"model": {"student.backbone.…", "student.dino_head.…", "teacher.…",
    "dino_loss.center", "ibot_patch_loss.center"}}`, FSDP / DDP wrapper segments stripped) and `teacher_checkpoint.pth`
    (`{"teacher": {"backbone.…", "dino_head.…", "ibot_head.…"}}`, the teacher alone: it fills both towers). Head
    sizes, the prototype counts and whether the iBOT head is separate are read from the tensors; the backbone's as
    in `from_official_state_dict` (or `backbone_config`). `centering` is recorded in the config (the checkpoint does
    not say; the L/g recipes use Sinkhorn-Knopp).

    Raises `ValueError` naming the fix for a backbone-only checkpoint (no `dino_head`: nothing to distil the paper
    way, use feature distillation) and for DINOv3 checkpoints (RoPE backbones, not implemented here)."""
    from .pretraining import DinoForPretraining, DinoPretrainingConfig

    sd = {_WRAPPER_RE.sub(r"\1", k): v for k, v in _unwrap_container(state_dict).items() if isinstance(v, torch.Tensor)}
    _check_not_dinov3(sd)
    if any(k.startswith("teacher.") for k in sd):
        towers = {"teacher": "teacher.", "student": "student." if any(k.startswith("student.") for k in sd) else "teacher."}
    else:
        towers = {"teacher": "", "student": ""}
    t = towers["teacher"]
    if not any(k.startswith(t + "dino_head.") for k in sd):
        raise ValueError(
            "the checkpoint has no DINO head (no '" + t + "dino_head.*' keys): it holds a backbone only, so it cannot "
            "be a teacher of the paper's distillation recipe (method: distill_dino), which matches the teacher's "
            "prototype outputs. Use feature distillation (method: distill_features), which needs only a backbone."
        )
    backbones = {name: from_official_state_dict(sd, backbone_config, prefix=p + "backbone.") for name, p in towers.items()}
    dino, dino_sizes = _official_head(sd, t + "dino_head.")
    separate = any(k.startswith(t + "ibot_head.") for k in sd)
    ibot, ibot_sizes = _official_head(sd, t + "ibot_head.") if separate else ({}, dino_sizes)
    config = DinoPretrainingConfig(
        backbone_config=backbones["teacher"].config, num_prototypes=dino_sizes["num_prototypes"],
        hidden_dim=dino_sizes["hidden_dim"], bottleneck_dim=dino_sizes["bottleneck_dim"],
        head_nlayers=dino_sizes["nlayers"], separate_ibot_head=separate,
        ibot_num_prototypes=ibot_sizes["num_prototypes"], ibot_hidden_dim=ibot_sizes["hidden_dim"],
        ibot_bottleneck_dim=ibot_sizes["bottleneck_dim"], centering=centering,
    )
    if separate and ibot_sizes["nlayers"] != dino_sizes["nlayers"]:
        raise ValueError(f"DINO and iBOT heads have {dino_sizes['nlayers']} and {ibot_sizes['nlayers']} layers; "
                         "dinoforge's pretraining config has one head_nlayers")
    state: dict[str, torch.Tensor] = {}
    for name, prefix in towers.items():
        state.update({f"{name}.backbone.{k}": v for k, v in backbones[name].state_dict().items()})
        heads = {"dino_head": _official_head(sd, prefix + "dino_head.")[0]}
        if separate:
            heads["ibot_head"] = _official_head(sd, prefix + "ibot_head.")[0]
        for head, values in heads.items():
            state.update({f"{name}.{head}.{k}": v for k, v in values.items()})
    k_dino, k_ibot = config.num_prototypes, config.ibot_num_prototypes
    centers = {"dino_center": sd.get("dino_loss.center"), "ibot_center": sd.get("ibot_patch_loss.center")}
    state["dino_center"] = torch.zeros(1, k_dino) if centers["dino_center"] is None else centers["dino_center"].reshape(1, k_dino)
    state["ibot_center"] = torch.zeros(1, k_ibot) if centers["ibot_center"] is None else centers["ibot_center"].reshape(1, k_ibot)
    model = build_from_state_dict(lambda: DinoForPretraining(config), state, "DinoForPretraining")
    model.teacher.requires_grad_(False)
    return model
