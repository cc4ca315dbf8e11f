"""Trajectory parity with the official DINOv2 trainer: whole optimizer steps, not just the losses.

Our `train.py` loop (in-process, `training.loop.train`) and the official `SSLMetaArch.forward_backward` driven by
the official training loop's pieces (`dinov2/train/train.py`: `build_schedulers` → `CosineScheduler`s,
`apply_optim_scheduler`, AdamW over `get_params_groups` + `fuse_params_groups`, per-submodule gradient clipping,
`update_teacher`) start from the same weights and see the same batches (our multi-crop pipeline's, in the official
collate layout). Per-step losses and the final student + teacher weights must agree (fp32).

Runs only with `DINOFORGE_OFFICIAL_DINOV2` (a checkout of facebookresearch/dinov2; the official trainer also
needs `omegaconf` and `fvcore` importable) and `-m slow`.

What is patched on the official side, and only because it needs CUDA, xFormers or FSDP:
- `torch.Tensor.cuda` → identity (the batch is moved with `.cuda(non_blocking=True)`);
- `xformers.ops.fmha.BlockDiagonalMask` → a stand-in that concatenates the token lists for one student-head call
  and splits the output back (what the xFormers class does for this use); the official layers' other xFormers
  imports fail and they take their plain-torch paths;
- `DinoVisionTransformer.forward_features_list` → `forward_features` per crop group (the nested-tensor forward
  needs xFormers; attention never mixes crop groups, so the result is the same);
- `reshard_fsdp_model`, `fsdp_synchronize_streams` → no-ops; `get_fsdp_modules(m)` → one pseudo-module holding
  `m.parameters()` (what the FSDP flat params hold), so `update_teacher` runs its own `_foreach_mul_/_foreach_add_`;
- the iBOT loss's `dist.all_reduce` of the masked count → no-op without a process group;
- clipping: `torch.nn.utils.clip_grad_norm_(v.parameters(), clip)` per student submodule instead of the FSDP
  method `v.clip_grad_norm_(clip)` (the same norm over the same parameters);
- the config: `compute_precision.grad_scaler: false` (fp32, no FSDP mixed precision).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import json
import os
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

OFFICIAL_ENV = "DINOFORGE_OFFICIAL_DINOV2"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get(OFFICIAL_ENV), reason=f"set {OFFICIAL_ENV} to an official dinov2 checkout"),
]

STEPS = 12
REL = 1e-5
# The lr (base 0.01 -> 6.25e-4 here) is moderate on purpose: at 5x that, float noise (fused vs foreach AdamW, lerp
# vs mul+add EMA) grows chaotically in the register models and KoLeo, a log of nearest-neighbour distances, was
# measured 1.2e-4 relative apart by step 12 with every weight still within 3e-6.


class _BlockDiagonal:
    """Stand-in for `xformers.ops.fmha.BlockDiagonalMask` as `ssl_meta_arch` uses it: `from_tensor_list` of
    `[1, n_i, d]` tensors → (mask, concatenation); `mask.split(out)` → the per-list pieces of the output."""

    def __init__(self, sizes: list[int]):
        self.sizes = sizes

    @classmethod
    def from_tensor_list(cls, tensors: list[torch.Tensor]):
        return cls([t.shape[1] for t in tensors]), torch.cat(tensors, dim=1)

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(x.split(self.sizes, dim=1))


@pytest.fixture(scope="module")
def official():
    """The official trainer modules, imported with the stand-ins above."""
    root = Path(os.environ[OFFICIAL_ENV])
    os.environ.setdefault("XFORMERS_DISABLED", "1")
    mp = pytest.MonkeyPatch()
    ops = types.ModuleType("xformers.ops")
    ops.__spec__ = importlib.machinery.ModuleSpec("xformers.ops", None)
    ops.fmha = SimpleNamespace(BlockDiagonalMask=_BlockDiagonal)
    xformers = types.ModuleType("xformers")
    xformers.__spec__ = importlib.machinery.ModuleSpec("xformers", None)
    xformers.ops = ops
    mp.setitem(sys.modules, "xformers", xformers)
    mp.setitem(sys.modules, "xformers.ops", ops)
    mp.syspath_prepend(str(root))
    try:
        train = importlib.import_module("dinov2.train.train")
    except ImportError as e:
        pytest.skip(f"the official trainer does not import here ({e}); pip install omegaconf fvcore")
    arch = importlib.import_module("dinov2.train.ssl_meta_arch")
    vit = importlib.import_module("dinov2.models.vision_transformer")
    ibot = importlib.import_module("dinov2.loss.ibot_patch_loss")
    mp.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    mp.setattr(arch, "reshard_fsdp_model", lambda model: None)
    mp.setattr(arch, "get_fsdp_modules", lambda m: [SimpleNamespace(params=list(m.parameters()))])
    mp.setattr(arch.SSLMetaArch, "fsdp_synchronize_streams", lambda self: None)
    mp.setattr(vit.DinoVisionTransformer, "forward_features_list",
               lambda self, xs, ms: [self.forward_features(x, m) for x, m in zip(xs, ms)])
    mp.setattr(ibot, "dist", SimpleNamespace(all_reduce=lambda *a, **k: None, is_initialized=lambda: False))
    yield SimpleNamespace(train=train, arch=arch, omegaconf=importlib.import_module("omegaconf"), root=root)
    mp.undo()


def _our_config(tmp_path: Path, centering: str, separate: bool, registers: int):
    from training.methods import load_train_config

    overrides = {
        "model": {"preset": "vits14", "num_register_tokens": registers, "drop_path_rate": 0.0, "layerscale_init": 0.1},
        "heads": {"num_prototypes": 64, "hidden_dim": 64, "bottleneck_dim": 32, "separate_ibot_head": separate,
                  **({"ibot_num_prototypes": 48} if separate else {})},
        "loss": {"centering": centering},
        # 4x4 patches: every masked image has >= 1 masked patch (with 2x2, a batch can have none, where the official
        # iBOT center turns NaN for good; ours skips that update: a documented deviation, modeling/losses.py)
        "crops": {"global_size": 56, "local_size": 28, "local_number": 2},
        "optim": {"batch_size": 4, "epochs": 2, "iters_per_epoch": 6, "warmup_epochs": 1, "base_lr": 0.01,
                  "freeze_last_layer_epochs": 1},
        "teacher": {"temp_warmup_epochs": 1},
        "data": {"dataset": "sample", "num_workers": 0},
        "train": {"output_dir": str(tmp_path / "ours"), "max_steps": STEPS, "save_every": 0, "log_every": 1,
                  "seed": 0},
    }
    args = [f"{section}.{key}={json.dumps(value)}" for section, values in overrides.items()
            for key, value in values.items()]
    return load_train_config(args)


def _official_config(official, cfg, backbone_config):
    """The official default config with the values of our run (lr already scaled, as `setup` would)."""
    from training.schedules import scaled_lr

    o = official.omegaconf.OmegaConf.load(official.root / "dinov2" / "configs" / "ssl_default_config.yaml")
    h, loss = cfg.heads, cfg.loss
    o.compute_precision.grad_scaler = False
    o.student.update(arch="vit_small", patch_size=14, drop_path_rate=0.0, layerscale=cfg.model.layerscale_init,
                     num_register_tokens=cfg.model.num_register_tokens,
                     interpolate_offset=backbone_config.interpolate_offset,
                     interpolate_antialias=backbone_config.interpolate_antialias)
    o.dino.update(head_n_prototypes=h.num_prototypes, head_hidden_dim=h.hidden_dim, head_bottleneck_dim=h.bottleneck_dim,
                  koleo_loss_weight=loss.koleo_weight, loss_weight=loss.dino_weight)
    o.ibot.update(separate_head=h.separate_ibot_head, head_n_prototypes=h.ibot_num_prototypes or h.num_prototypes,
                  head_hidden_dim=h.hidden_dim, head_bottleneck_dim=h.bottleneck_dim, loss_weight=loss.ibot_weight,
                  mask_ratio_min_max=list(cfg.masking.ratio_min_max),
                  mask_sample_probability=cfg.masking.sample_probability)
    o.train.update(centering="centering" if loss.centering == "softmax" else "sinkhorn_knopp",
                   OFFICIAL_EPOCH_LENGTH=cfg.optim.iters_per_epoch, batch_size_per_gpu=cfg.optim.batch_size)
    o.crops.update(global_crops_size=cfg.crops.global_size, local_crops_size=cfg.crops.local_size,
                   local_crops_number=cfg.crops.local_number)
    t = cfg.teacher
    o.teacher.update(momentum_teacher=t.momentum, final_momentum_teacher=t.momentum_end, teacher_temp=t.temp,
                     warmup_teacher_temp=t.temp_warmup, warmup_teacher_temp_epochs=t.temp_warmup_epochs)
    opt = cfg.optim
    o.optim.update(epochs=opt.epochs, warmup_epochs=opt.warmup_epochs, lr=scaled_lr(opt.base_lr, opt.batch_size),
                   min_lr=opt.min_lr, weight_decay=opt.weight_decay, weight_decay_end=opt.weight_decay_end,
                   clip_grad=opt.clip_grad, freeze_last_layer_epochs=opt.freeze_last_layer_epochs,
                   layerwise_decay=opt.layerwise_decay, patch_embed_lr_mult=opt.patch_embed_lr_mult,
                   adamw_beta1=opt.betas[0], adamw_beta2=opt.betas[1])
    return o


def _to_official(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our `DinoForPretraining` state dict in the official `SSLMetaArch` names (flat blocks, MLP FFN)."""
    from modeling.official import _TOP_LEVEL

    inverse = {v: k for k, v in _TOP_LEVEL.items()}
    out = {}
    for key, value in ours.items():
        tower, module, rest = key.split(".", 2) if key.count(".") >= 2 else (None, None, key)
        if tower not in ("student", "teacher"):
            continue  # loss centers live in the official loss modules (zero at start, like ours)
        if module == "backbone":
            rest = inverse.get(rest, rest)
        out[f"{tower}.{module}.{rest}"] = value
    return out


def _official_batch(batch: dict) -> dict:
    """Our batch in the layout of the official `collate_data_and_cast` (the fields derived from the masks as it
    derives them)."""
    masks = batch["masks"]
    indices = masks.flatten().nonzero().flatten()
    return {
        "collated_global_crops": batch["global_crops"],
        "collated_local_crops": batch["local_crops"],
        "collated_masks": masks,
        "mask_indices_list": indices,
        "n_masked_patches": torch.full((1,), fill_value=indices.shape[0], dtype=torch.long),
        "upperbound": int(indices.shape[0]),
        "masks_weight": (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks],
    }


def _our_batches(cfg, model) -> list[dict]:
    """The batches our loop sees in its first `STEPS` steps (the pipeline is deterministic per seed/epoch/index)."""
    from training.data import load_image_dataset, set_loader_epoch
    from training.pipelines import build_pipeline

    dataset = load_image_dataset(cfg.data.dataset, cfg.data.split, cfg.data.image_column)
    loader = build_pipeline(model.data_pipeline(), cfg, dataset, rank=0, world_size=1)
    set_loader_epoch(loader, 0)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == STEPS:
            return batches
    raise AssertionError("the sample set has fewer batches than steps")


CASES = [
    ("softmax", False, 0), ("softmax", True, 0), ("softmax", False, 4), ("softmax", True, 4),
    ("sinkhorn_knopp", False, 0), ("sinkhorn_knopp", True, 0), ("sinkhorn_knopp", False, 4),
    ("sinkhorn_knopp", True, 4),
]


@pytest.mark.parametrize("centering,separate,registers", CASES)
def test_training_steps_match_the_official_trainer(official, tmp_path, centering, separate, registers):
    from accelerate.utils import set_seed
    from safetensors.torch import load_file

    from training.loop import train
    from training.methods.dinov2 import build_pretraining_model

    cfg = _our_config(tmp_path, centering, separate, registers)
    set_seed(cfg.train.seed)  # as `train` does before building the model: the same initial weights
    model = build_pretraining_model(cfg)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    batches = _our_batches(cfg, model)

    # ---- ours: the real loop
    result = train(cfg)
    result["accelerator"].end_training()
    ours = {}
    for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        ours[row["step"]] = row
    final = load_file(Path(cfg.output_dir) / f"checkpoint-{STEPS}" / "model.safetensors")

    # ---- official: SSLMetaArch + the official loop's pieces
    torch.manual_seed(0)
    o_cfg = _official_config(official, cfg, model.config.backbone_config)
    meta = official.arch.SSLMetaArch(o_cfg)
    missing, unexpected = meta.load_state_dict(_to_official(initial), strict=False)
    assert not unexpected and all(".loss" in k or "center" in k for k in missing), (missing, unexpected)
    meta.train()
    optimizer = official.train.build_optimizer(o_cfg, meta.get_params_groups())
    lr_s, wd_s, mom_s, temp_s, last_s = official.train.build_schedulers(o_cfg)
    theirs = {}
    for iteration, batch in enumerate(batches):
        official.train.apply_optim_scheduler(optimizer, lr_s[iteration], wd_s[iteration], last_s[iteration])
        optimizer.zero_grad(set_to_none=True)
        loss_dict = meta.forward_backward(_official_batch(batch), teacher_temp=temp_s[iteration])
        for v in meta.student.values():
            torch.nn.utils.clip_grad_norm_(v.parameters(), o_cfg.optim.clip_grad)
        optimizer.step()
        meta.update_teacher(mom_s[iteration])
        # Official display values: KoLeo and iBOT are shown halved (see ssl_meta_arch); ours are as they enter the loss.
        d = {k: float(v) for k, v in loss_dict.items()}
        theirs[iteration + 1] = {
            "dino_local_loss": d.get("dino_local_crops_loss", 0.0), "dino_global_loss": d["dino_global_crops_loss"],
            "koleo_loss": 2 * d.get("koleo_loss", 0.0), "ibot_loss": 2 * d.get("ibot_loss", 0.0),
        }
        theirs[iteration + 1]["loss"] = sum(theirs[iteration + 1].values())

    worst = {}
    for step in range(1, STEPS + 1):
        for key, value in theirs[step].items():
            rel = abs(ours[step][key] - value) / max(abs(value), 1e-8)
            worst[key] = max(worst.get(key, 0.0), rel)
            assert rel <= REL, (step, key, ours[step][key], value)
    theirs_final = _to_official(final)
    official_state = meta.state_dict()
    diffs = {k: (official_state[k] - v).abs() for k, v in theirs_final.items()}
    # The key bias of attention gets an exactly-zero gradient (softmax ignores a constant added to all of a query's
    # logits), so Adam normalises float noise and both sides move it by noise-driven amounts: it cannot affect any
    # output. It is compared through the outputs below instead of value by value.
    key_bias = 0.0
    for k, d in diffs.items():
        if k.endswith("attn.qkv.bias"):
            key_bias = max(key_bias, d.reshape(3, -1)[1].max().item())
            diffs[k] = d.reshape(3, -1)[[0, 2]]
    worst_weight = max(d.max().item() for d in diffs.values())
    moved = max((official_state[k] - v).abs().max().item() for k, v in _to_official(initial).items())
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.load_state_dict(final, strict=False)
        ours_out = model.student["backbone"].eval()(x).last_hidden_state
        theirs_out = meta.student.backbone.eval().forward_features(x)
        theirs_out = torch.cat([theirs_out["x_norm_clstoken"][:, None], theirs_out["x_norm_regtokens"],
                                theirs_out["x_norm_patchtokens"]], dim=1)
    # (diagnostic only: weights ~1e-6 apart move outputs ~100x that through the wide patch embedding)
    worst_output = ((ours_out - theirs_out).abs().max() / theirs_out.abs().max()).item()
    print(f"\n{centering} separate={separate} registers={registers}: worst rel diff per loss term "
          f"{ {k: float(f'{v:.1e}') for k, v in worst.items()} }, "
          f"worst weight |diff| {worst_weight:.2e} (weights moved up to {moved:.2e}; attention key bias, "
          f"zero-gradient, {key_bias:.1e}), student outputs rel diff {worst_output:.2e}")
    assert moved > 1e-3, "the weights did not move: nothing was compared"
    assert worst_weight <= 1e-5
