"""The paper's distillation recipe (`method: distill_dino`): numerics against DINOv3's formulas, the frozen teacher
kept out of checkpoints, official training checkpoints with heads, bad teachers, and the multi-student model.

Runs through `distill.py` (resume, 2 processes, multi-student) are in tests/test_distill_runs.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_convert import official_state_dict  # our weights in the official layout

from modeling import DinoForPretraining, DinoPretrainingConfig, DinoVisionConfig
from modeling.convert import export_backbone, from_official_pretraining_state_dict
from modeling.distillation import DistillDinoConfig, DistillDinoForPretraining, load_dino_teacher
from training.config import ConfigError


def teacher_config(separate: bool = True, registers: int = 0, patch: int = 14) -> DinoPretrainingConfig:
    # 64 wide with one 64-dim head, like every official size: official checkpoints of it infer back exactly
    backbone = DinoVisionConfig(image_size=2 * patch, patch_size=patch, hidden_size=64, num_hidden_layers=2,
                                num_attention_heads=1, layerscale_init=0.5, num_register_tokens=registers)
    return DinoPretrainingConfig(backbone_config=backbone, num_prototypes=48, hidden_dim=32, bottleneck_dim=16,
                                 separate_ibot_head=separate, ibot_num_prototypes=40 if separate else None,
                                 centering="sinkhorn_knopp")


def tiny_teacher(seed: int = 0, **kw) -> DinoForPretraining:
    torch.manual_seed(seed)
    model = DinoForPretraining(teacher_config(**kw))
    with torch.no_grad():  # a teacher with some structure: sharper, non-uniform prototype logits
        for p in model.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for tower in (model.teacher, model.student):
            for head in ("dino_head", "ibot_head"):
                if head in tower:
                    tower[head].last_layer.weight_g.fill_(3.0)  # logits / T below exp()'s fp32 range in the reference
    return model.eval()


def student_vit(hidden: int = 32, patch: int = 14, registers: int = 0) -> dict:
    return DinoVisionConfig(image_size=2 * patch, patch_size=patch, hidden_size=hidden, num_hidden_layers=2,
                            num_attention_heads=2, layerscale_init=0.5, num_register_tokens=registers).to_dict()


def distill_model(teacher: DinoForPretraining, students: dict | None = None, **kw) -> DistillDinoForPretraining:
    model = DistillDinoForPretraining(DistillDinoConfig(
        teacher_config=teacher.config, student_configs=students or {"s": student_vit()}, **kw))
    model.attach_teacher(teacher)
    return model


def crops(batch: int = 3, n_local: int = 2, size: int = 28, local: int = 14, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(2 * batch, (size // 14) ** 2, generator=g) < 0.5
    masks[0] = False  # an image without masked patches, as half the batch has in the recipe
    return (torch.randn(2 * batch, 3, size, size, generator=g), torch.randn(n_local * batch, 3, local, local, generator=g),
            masks)


# ---- DINOv3's formulas, transcribed (dinov3/train/ssl_meta_arch.py, dinov3/loss/*.py) -------------------------


def dinov3_sinkhorn(logits: torch.Tensor, temp: float, n_samples: int | None = None, iterations: int = 3):
    q = torch.exp(logits.float() / temp).t()
    b = q.shape[1] if n_samples is None else n_samples
    k = q.shape[0]
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


def dinov3_dino_loss(student_logits, teacher_probs, ignore_diagonal=False, temp=0.1):
    s_crops, b, _ = student_logits.shape
    t_crops = teacher_probs.shape[0]
    log_p = F.log_softmax(student_logits.float() / temp, dim=-1)
    if not ignore_diagonal:
        return -torch.einsum("sbk,tbk->", log_p, teacher_probs) / (b * s_crops * t_crops)
    loss = -torch.einsum("sbk,tbk->st", log_p, teacher_probs)
    loss = torch.diagonal_scatter(loss, loss.new_zeros(min(s_crops, t_crops)))
    return loss.sum() / (b * s_crops * t_crops - b * min(s_crops, t_crops))


def dinov3_koleo(x, eps=1e-8):
    x = F.normalize(x.float(), eps=eps, p=2, dim=-1)
    dots = x @ x.t()
    dots.view(-1)[:: x.shape[0] + 1].fill_(-1)
    idx = dots.max(dim=1).indices
    return -torch.log(F.pairwise_distance(x, x[idx], 2, eps=1e-8) + eps).mean()


def dinov3_reference(teacher: DinoForPretraining, student: dict, g, loc, masks, teacher_temp, weights=(1.0, 1.0, 0.1)):
    """`MultiDistillationMetaArch` for one student: teacher heads + SK, student on unmasked crops, iBOT at `masks`."""
    t = teacher.teacher
    n_local, b = loc.shape[0] // (g.shape[0] // 2), g.shape[0] // 2
    with torch.no_grad():
        out = t["backbone"](g).last_hidden_state
        reg = teacher.config.backbone_config.num_register_tokens
        index = masks.flatten().nonzero().squeeze(1)
        ibot_head = t["ibot_head"] if "ibot_head" in t else t["dino_head"]
        t_ibot = dinov3_sinkhorn(ibot_head(out[:, 1 + reg :].flatten(0, 1)[index]), teacher_temp, int(masks.sum()))
        t_dino = dinov3_sinkhorn(t["dino_head"](out[:, 0]), teacher_temp).unflatten(0, (2, b))
    s_reg = student["backbone"].config.num_register_tokens
    s_out = student["backbone"](g).last_hidden_state
    s_cls, s_patch = s_out[:, 0], s_out[:, 1 + s_reg :]
    l_cls = student["backbone"](loc).pooler_output
    s_ibot_head = student["ibot_head"] if "ibot_head" in student else student["dino_head"]
    s_ibot = s_ibot_head(s_patch.flatten(0, 1)[index])
    logits = student["dino_head"](torch.cat((s_cls, l_cls)))
    g_logits, l_logits = logits[: 2 * b].unflatten(0, (2, b)), logits[2 * b :].unflatten(0, (n_local, b))
    global_terms, local_terms = 2, 2 * n_local
    dino_w, ibot_w, koleo_w = weights
    local = dinov3_dino_loss(l_logits, t_dino) * local_terms / (global_terms + local_terms)
    global_ = dinov3_dino_loss(g_logits, t_dino, ignore_diagonal=True) * global_terms / (global_terms + local_terms)
    koleo = koleo_w * 2 * sum(dinov3_koleo(x) for x in s_cls.unflatten(0, (2, b))) / 2
    weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    ibot = -(torch.sum(t_ibot * F.log_softmax(s_ibot.float() / 0.1, dim=-1), dim=-1) * weight).sum() / masks.shape[0]
    return {"dino_global_loss": dino_w * global_, "dino_local_loss": dino_w * local, "koleo_loss": koleo,
            "ibot_loss": ibot_w * ibot}


@pytest.mark.parametrize("separate,registers", [(True, 0), (False, 4)])
def test_losses_equal_dinov3_multidistillation(separate, registers, one_thread):
    teacher = tiny_teacher(separate=separate, registers=registers)
    model = distill_model(teacher, {"s": student_vit(registers=1)})
    g, loc, masks = crops()
    out = model(g, loc, masks, teacher_temp=0.06)
    ref = dinov3_reference(teacher, model.students["s"], g, loc, masks, 0.06)
    for key, value in ref.items():
        torch.testing.assert_close(out[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert math.isclose(out.loss.item(), sum(v.item() for v in ref.values()), rel_tol=1e-5)
    out.loss.backward()  # every trainable student parameter gets a gradient (DDP needs that)
    assert all(p.grad is not None for p in model.students.parameters() if p.requires_grad)


def test_paper_variant_applies_ibot_to_every_patch(one_thread):
    teacher = tiny_teacher()
    model = distill_model(teacher, ibot_patches="all")
    assert model.data_pipeline().options["masks"] is False  # the pipeline draws no masks
    g, loc, _ = crops()
    out = model(g, loc, None, teacher_temp=0.06)
    everything = torch.ones(g.shape[0], 4, dtype=torch.bool)
    ref = dinov3_reference(teacher, model.students["s"], g, loc, everything, 0.06)
    torch.testing.assert_close(out.ibot_loss, ref["ibot_loss"], rtol=1e-5, atol=1e-6)


def test_teacher_outside_checkpoints_frozen_and_moved(tmp_path, one_thread):
    teacher = tiny_teacher()
    teacher.save_pretrained(tmp_path / "teacher")
    model = distill_model(teacher, teacher_path=str(tmp_path / "teacher"))
    names = list(model.state_dict())
    assert not any(n.startswith(("teacher.", "_teacher")) for n in names) and "teacher_fingerprint" in names
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for part in (model.students, model.ema) for p in part.parameters())
    model.train()
    assert not model.teacher.training and not any(p.requires_grad for p in model.teacher.parameters())
    model.to(torch.float64)  # .to / dtype casts reach the teacher, which is not a submodule
    assert next(model.teacher.parameters()).dtype == torch.float64
    model.to(torch.float32)

    model.save_pretrained(tmp_path / "distill")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "distill" / "model.safetensors")
    assert saved.keys() == set(names)
    from transformers import AutoModelForPreTraining

    reloaded = AutoModelForPreTraining.from_pretrained(tmp_path / "distill")  # no teacher yet: loaded when used
    assert isinstance(reloaded, DistillDinoForPretraining) and reloaded.teacher is None
    assert not reloaded.students["s"]["backbone"].embeddings.mask_token.requires_grad
    g, loc, masks = crops()
    torch.testing.assert_close(reloaded.eval()(g, loc, masks).loss, model.eval()(g, loc, masks).loss)
    assert reloaded.teacher is not None


def test_a_different_teacher_is_refused_on_resume(tmp_path, one_thread):
    tiny_teacher(seed=0).save_pretrained(tmp_path / "teacher")
    model = distill_model(tiny_teacher(seed=0), teacher_path=str(tmp_path / "teacher"))
    state = model.state_dict()
    tiny_teacher(seed=1).save_pretrained(tmp_path / "teacher")  # the folder now holds another model
    resumed = DistillDinoForPretraining(model.config)
    resumed.load_teacher()
    resumed.load_state_dict(state)  # the checkpoint's fingerprint is the original teacher's
    with pytest.raises(ValueError, match="not the teacher this run started with"):
        resumed(*crops())


def test_teacher_forward_once_per_batch_and_students_independent(one_thread):
    teacher = tiny_teacher()
    students = {"a": student_vit(32), "b": student_vit(48, patch=7), "c": student_vit(32, registers=2)}
    model = distill_model(teacher, students)
    calls = []
    handle = model.teacher["backbone"].register_forward_hook(lambda *args: calls.append(1))
    g, loc, masks = crops()
    out = model(g, loc, masks, teacher_temp=0.06)
    handle.remove()
    assert len(calls) == 1  # one teacher forward for three students
    for name in students:
        alone = distill_model(teacher, {name: students[name]})
        assert all(torch.equal(a, b) for a, b in zip(alone.state_dict().values(), (
            model.state_dict()[k] for k in alone.state_dict())))  # the same initialisation alone or together
        single = alone(g, loc, masks, teacher_temp=0.06)
        for key in ("loss", "dino_global_loss", "dino_local_loss", "ibot_loss", "koleo_loss"):
            torch.testing.assert_close(out[f"{name}/{key}"], single[key], rtol=1e-6, atol=1e-7)
    assert set(model.exports()) == {"backbone/a", "backbone/b", "backbone/c"}
    assert {"a/backbone", "b/dino_head", "c/ibot_head"} <= set(model.trainable_parts())


def test_student_with_another_patch_size_sees_the_teachers_grid(one_thread):
    teacher = tiny_teacher()  # patch 14
    model = distill_model(teacher, {"p7": student_vit(patch=7)})
    g, loc, masks = crops()
    assert model._student_crops("p7", g).shape[-2:] == (14, 14)  # 2x2 patches of 7 px, as the teacher's grid
    assert model._student_crops("p7", loc).shape[-2:] == (7, 7)
    out = model(g, loc, masks)
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match=r"crops of 30x30 px do not tile into the teacher's 14-px patches"):
        model._student_crops("p7", torch.zeros(2, 3, 30, 30))


def test_ema_update_and_export():
    teacher = tiny_teacher()
    model = distill_model(teacher)
    with torch.no_grad():
        for p in model.students["s"]["backbone"].parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.ema["s"].parameters()]
    model.after_optimizer_step(momentum=0.75)
    for b, e, s in zip(before, model.ema["s"].parameters(), model.students["s"]["backbone"].parameters()):
        torch.testing.assert_close(e, 0.75 * b + 0.25 * s)
    model.after_optimizer_step(momentum=0.5, **{"ema_momentum/s": 1.0})  # a student's own momentum wins
    for e, b2 in zip(model.ema["s"].parameters(), [0.75 * b + 0.25 * s for b, s in zip(
            before, model.students["s"]["backbone"].parameters())]):
        torch.testing.assert_close(e, b2)
    assert model.exports() == {"backbone": model.ema["s"]}


# ---- teachers: official training checkpoints, and the ones that cannot be used ------------------------------


def _official_training_checkpoint(model: DinoForPretraining, parametrized: bool = False) -> dict:
    sd = {}
    for tower in ("student", "teacher"):
        sd.update(official_state_dict(getattr(model, tower)["backbone"], prefix=f"{tower}.backbone."))
        for head in ("dino_head", "ibot_head"):
            if head not in getattr(model, tower):
                continue
            for k, v in getattr(model, tower)[head].state_dict().items():
                if parametrized and k.startswith("last_layer."):  # torch.nn.utils.parametrizations.weight_norm
                    k = {"last_layer.weight_g": "last_layer.parametrizations.weight.original0",
                         "last_layer.weight_v": "last_layer.parametrizations.weight.original1"}[k]
                sd[f"module.{tower}.{head}.{k}"] = v
    sd["dino_loss.center"] = torch.randn(1, model.config.num_prototypes)
    sd["ibot_patch_loss.center"] = torch.randn(1, 1, model.config.ibot_num_prototypes)
    return {"model": sd, "iteration": 7}


@pytest.mark.parametrize("parametrized", [False, True])
def test_official_training_checkpoint_with_heads(tmp_path, parametrized):
    model = tiny_teacher()
    ckpt = _official_training_checkpoint(model, parametrized)
    loaded = from_official_pretraining_state_dict(ckpt, model.config.backbone_config)
    ours = model.state_dict()
    for k, v in loaded.state_dict().items():
        if k == "dino_center":
            assert torch.equal(v, ckpt["model"]["dino_loss.center"])
        elif k == "ibot_center":
            assert torch.equal(v, ckpt["model"]["ibot_patch_loss.center"].reshape(1, -1))
        else:
            assert torch.equal(v, ours[k]), k
    assert loaded.config.separate_ibot_head and loaded.config.ibot_num_prototypes == 40
    assert (loaded.config.hidden_dim, loaded.config.bottleneck_dim, loaded.config.head_nlayers) == (32, 16, 3)
    # teacher_checkpoint.pth ({"teacher": tower}) fills both towers; a plain last layer (DINOv3 head) is the same map
    flat = {k.removeprefix("module."): v for k, v in ckpt["model"].items()}
    tower = {k.removeprefix("teacher."): v for k, v in flat.items() if k.startswith("teacher.")}
    tower = {k.replace("last_layer.weight_v", "last_layer.weight"): (
        model.teacher["dino_head"].last_layer.weight if k == "dino_head.last_layer.weight_v" else
        model.teacher["ibot_head"].last_layer.weight if k == "ibot_head.last_layer.weight_v" else v)
        for k, v in tower.items() if "weight_g" not in k}
    only = from_official_pretraining_state_dict({"teacher": tower}, model.config.backbone_config)
    x = torch.randn(2, 16)
    for head in ("dino_head", "ibot_head"):
        torch.testing.assert_close(only.student[head].last_layer(x), model.teacher[head].last_layer(x))
    # as a distillation teacher, straight from the file (sizes inferred from the tensors)
    torch.save(ckpt, tmp_path / "model_0000007.rank_0.pth")
    teacher = load_dino_teacher(tmp_path / "model_0000007.rank_0.pth")
    assert not hasattr(teacher, "student") or "student" not in teacher._modules  # only the teacher tower is kept
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(teacher.teacher["backbone"](x).last_hidden_state,
                               model.teacher["backbone"](x).last_hidden_state)


def test_teachers_without_heads_point_to_feature_distillation(tmp_path):
    backbone = tiny_teacher().teacher_backbone
    with pytest.raises(ValueError, match="no DINO head.*distill_features"):
        from_official_pretraining_state_dict({"model": official_state_dict(backbone, prefix="teacher.backbone.")})
    export_backbone(backbone, tmp_path / "backbone")
    with pytest.raises(ValueError, match="'dinov2' model without DINO/iBOT heads.*distill_features"):
        load_dino_teacher(tmp_path / "backbone")
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    DINOv3ViTModel(DINOv3ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                   image_size=32)).save_pretrained(tmp_path / "dinov3")
    with pytest.raises(ValueError, match="RoPE position embeddings and patch 16"):
        load_dino_teacher(tmp_path / "dinov3")
    with pytest.raises(ValueError, match="DINOv3 checkpoint.*RoPE.*distill_features"):
        from_official_pretraining_state_dict({"teacher": {"backbone.rope_embed.periods": torch.ones(4),
                                                          "dino_head.mlp.0.weight": torch.ones(2, 2)}})
    # through the method builder, the message reaches distill.py as a config error (no traceback)
    from training.methods import load_train_config
    from training.methods.distill import build_distill_dino

    cfg = load_train_config(["method=distill_dino", f"teacher.path={tmp_path / 'backbone'}"])
    with pytest.raises(ConfigError, match="feature distillation"):
        build_distill_dino(cfg)
    with pytest.raises(ConfigError, match="teacher.path is required"):
        build_distill_dino(load_train_config(["method=distill_dino"]))


def test_builder_students_schedules_and_centers(tmp_path):
    from training.methods import load_train_config
    from training.methods.distill import build_distill_dino, distill_schedules

    teacher = tiny_teacher()
    teacher.dino_center.fill_(0.5)
    teacher.ibot_center.fill_(-0.25)
    teacher.save_pretrained(tmp_path / "t")
    tiny = "hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2"
    students = (f"students=[{{name: a, {tiny}}}, {{name: b, {tiny}, patch_size: 7, base_lr: 0.002, "
                "head_warmup_steps: 3, ema_momentum: 0.9}]")
    args = ["method=distill_dino", f"teacher.path={tmp_path / 't'}", "crops.global_size=28", "crops.local_size=14",
            "optim.base_lr=0.004", students]
    cfg = load_train_config([*args, "loss.centering=softmax"])
    model = build_distill_dino(cfg)
    # softmax centering starts from the teacher's own centers
    assert torch.equal(model.dino_center, teacher.dino_center) and torch.equal(model.ibot_center, teacher.ibot_center)
    a, b = model.students["a"]["backbone"].config, model.students["b"]["backbone"].config
    assert (a.patch_size, a.image_size, b.patch_size, b.image_size) == (14, 28, 7, 14)  # b: the teacher's 2x2 grid
    assert a.drop_path_rate == 0.0  # no stochastic depth by default
    s = distill_schedules(cfg)
    assert s["lr_scale/b/dino_head"](0) == 0.5 and "lr_scale/a/backbone" not in s  # b's lr = 0.002 / 0.004
    assert (s["lr_scale/b/backbone"](2), s["lr_scale/b/backbone"](3)) == (0.0, 0.5)  # head warm-up, then its lr
    assert math.isclose(s["ema_momentum/b"](0), 0.9) and math.isclose(s["momentum"](0), 0.994)
    assert not torch.equal(build_distill_dino(load_train_config(args)).dino_center, teacher.dino_center)  # SK: unused
    with pytest.raises(ConfigError, match="student names must be unique"):
        load_train_config(["method=distill_dino", "students=[{name: a}, {name: a}]"])
    with pytest.raises(ConfigError, match="crops.global_size=30 is not a multiple of the teacher's patch size 14"):
        build_distill_dino(load_train_config([*args, "crops.global_size=30"]))
