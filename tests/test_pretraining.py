import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from modeling import DinoForPretraining, DinoPretrainingConfig, DinoVisionConfig
from modeling.losses import koleo_loss, sinkhorn_knopp

B, N_LOCAL = 3, 4


def tiny_config(**kw) -> DinoPretrainingConfig:
    backbone = DinoVisionConfig(
        image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_register_tokens=kw.pop("num_register_tokens", 0),
    )
    defaults = dict(num_prototypes=64, hidden_dim=48, bottleneck_dim=16)
    defaults.update(kw)
    return DinoPretrainingConfig(backbone_config=backbone, **defaults)


def crops(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    global_crops = torch.randn(2 * B, 3, 28, 28, generator=g)
    local_crops = torch.randn(N_LOCAL * B, 3, 14, 14, generator=g)
    masks = torch.zeros(2 * B, 4, dtype=torch.bool)
    masks[0, :2] = True
    masks[4, 1:] = True
    return global_crops, local_crops, masks


@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("centering", ["softmax", "sinkhorn_knopp"])
def test_forward_backward_finite_and_teacher_frozen(separate, centering):
    torch.manual_seed(0)
    cfg = tiny_config(separate_ibot_head=separate, ibot_num_prototypes=32 if separate else None, centering=centering)
    model = DinoForPretraining(cfg).train()
    out = model(*crops(), teacher_temp=0.04)
    terms = [out.dino_global_loss, out.dino_local_loss, out.ibot_loss, out.koleo_loss]
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(t) and t != 0 for t in terms)
    torch.testing.assert_close(out.loss, sum(terms))
    out.loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(not p.requires_grad for p in model.teacher.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.student.parameters())
    assert ("ibot_head" in model.student) == separate


def test_update_teacher_momentum_limits():
    torch.manual_seed(0)
    model = DinoForPretraining(tiny_config())
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    model.update_teacher(1.0)
    assert all(torch.equal(before[k], v) for k, v in model.teacher.state_dict().items())
    model.update_teacher(0.0)
    student = model.student.state_dict()
    assert all(torch.equal(student[k], v) for k, v in model.teacher.state_dict().items())
    assert not all(torch.equal(before[k], v) for k, v in model.teacher.state_dict().items())


def test_update_teacher_is_ema():
    torch.manual_seed(0)
    model = DinoForPretraining(tiny_config())
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    t0 = [p.clone() for p in model.teacher.parameters()]
    model.update_teacher(0.9)
    for t_old, t_new, s in zip(t0, model.teacher.parameters(), model.student.parameters()):
        torch.testing.assert_close(t_new, 0.9 * t_old + 0.1 * s)


def test_loss_composition_matches_official_pairing():
    """Recompute every term from the towers with explicit loops over crop pairs (official ssl_meta_arch)."""
    torch.manual_seed(0)
    cfg = tiny_config(centering="sinkhorn_knopp", koleo_weight=0.1, ibot_weight=1.0)
    model = DinoForPretraining(cfg).eval()  # eval: no drop path, no center update
    g, loc, masks = crops(1)
    temp = 0.05
    out = model(g, loc, masks, teacher_temp=temp)

    with torch.no_grad():
        t_seq = model.teacher["backbone"](g).last_hidden_state
        t_probs = sinkhorn_knopp(model.teacher["dino_head"](t_seq[:, 0]), temp).chunk(2)
        t_patch = sinkhorn_knopp(model.teacher["dino_head"](t_seq[:, 1:][masks]), temp)
        s_seq = model.student["backbone"](g, masks=masks).last_hidden_state
        s_glob = model.student["dino_head"](s_seq[:, 0]).chunk(2)
        s_loc = model.student["dino_head"](model.student["backbone"](loc).pooler_output).chunk(N_LOCAL)

        def ce(s, t):
            return -(t * F.log_softmax(s / 0.1, dim=-1)).sum(-1).mean()

        n_terms = 2 * 1 + 2 * N_LOCAL
        expected_global = (ce(s_glob[0], t_probs[1]) + ce(s_glob[1], t_probs[0])) / n_terms
        expected_local = sum(ce(s, t) for s in s_loc for t in t_probs) / n_terms
        s_patch = F.log_softmax(model.student["dino_head"](s_seq[:, 1:][masks]) / 0.1, dim=-1)
        per_patch = (t_patch * s_patch).sum(-1)
        counts = masks.sum(-1)
        weights = torch.cat([torch.full((int(c),), 1.0 / int(c)) for c in counts if c > 0])
        expected_ibot = -(per_patch * weights).sum() / masks.shape[0]
        expected_koleo = 0.1 * (koleo_loss(s_seq[:B, 0]) + koleo_loss(s_seq[B:, 0]))

    torch.testing.assert_close(out.dino_global_loss, expected_global, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.dino_local_loss, expected_local, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.ibot_loss, expected_ibot, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.koleo_loss, expected_koleo, rtol=1e-5, atol=1e-6)


def test_softmax_centers_update_only_in_training():
    torch.manual_seed(0)
    model = DinoForPretraining(tiny_config(centering="softmax")).eval()
    model(*crops(), teacher_temp=0.04)
    assert torch.count_nonzero(model.dino_center) == 0
    model.train()
    model(*crops(), teacher_temp=0.04)
    assert torch.count_nonzero(model.dino_center) > 0 and torch.count_nonzero(model.ibot_center) > 0


def test_losses_can_be_switched_off():
    torch.manual_seed(0)
    model = DinoForPretraining(tiny_config(ibot_weight=0.0, koleo_weight=0.0))
    g, loc, _ = crops()
    out = model(g, loc, None, teacher_temp=0.04)
    assert out.ibot_loss == 0 and out.koleo_loss == 0 and out.dino_global_loss > 0
    with pytest.raises(ValueError, match="masks"):
        DinoForPretraining(tiny_config())(g, loc, None, teacher_temp=0.04)


def test_bad_crop_layouts():
    model = DinoForPretraining(tiny_config())
    g, loc, masks = crops()
    with pytest.raises(ValueError, match=r"2\*batch"):
        model(g[:5], loc, masks[:5])
    with pytest.raises(ValueError, match="n_local"):
        model(g, loc[:5], masks)
    with pytest.raises(ValueError, match="num_patches"):
        model(g, loc, masks[:, :3])


def test_registers_and_no_local_crops():
    torch.manual_seed(0)
    model = DinoForPretraining(tiny_config(num_register_tokens=4))
    g, _, masks = crops()
    out = model(g, None, masks, teacher_temp=0.04)
    assert torch.isfinite(out.loss) and out.dino_local_loss == 0


def test_save_load_round_trip_with_heads_and_centers(tmp_path):
    from transformers import AutoModel, AutoModelForPreTraining

    torch.manual_seed(0)
    model = DinoForPretraining(tiny_config(separate_ibot_head=True, ibot_num_prototypes=32, centering="softmax"))
    model.train()
    model(*crops(), teacher_temp=0.04)  # moves the centers away from zero
    model.update_teacher(0.5)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    for auto in (AutoModelForPreTraining, AutoModel):
        loaded = auto.from_pretrained(tmp_path)
        assert type(loaded) is DinoForPretraining
        ref = model.state_dict()
        got = loaded.state_dict()
        assert ref.keys() == got.keys()
        assert all(torch.equal(ref[k], got[k]) for k in ref), "weights, heads or centers changed"
        assert torch.count_nonzero(got["dino_center"]) > 0


def test_saved_folder_loads_with_trust_remote_code_without_dinoforge(tmp_path):
    torch.manual_seed(0)
    model = DinoForPretraining(tiny_config())
    model.save_pretrained(tmp_path / "pt")
    code = (
        "import sys, torch\n"
        f"sys.path = [p for p in sys.path if p not in ('', '.', {str(tmp_path.parent)!r})]\n"
        "from transformers import AutoModelForPreTraining\n"
        f"m = AutoModelForPreTraining.from_pretrained({str(tmp_path / 'pt')!r}, trust_remote_code=True)\n"
        "assert 'modeling' not in sys.modules, 'dinoforge was imported'\n"
        "print(type(m).__name__, sum(p.numel() for p in m.parameters()))\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    n_params = sum(p.numel() for p in model.parameters())
    assert res.stdout.split() == ["DinoForPretraining", str(n_params)]


def test_collapse_warning_waits_for_its_patience_and_names_the_keys():
    torch.manual_seed(0)
    model = DinoForPretraining(tiny_config(collapse_patience=20))
    uniform = math.log(model.config.num_prototypes)
    near_uniform = {"teacher_entropy": 0.99 * uniform, "teacher_prototypes_used": 30}
    assert model.health({"step": 10, **near_uniform}) == []  # starts the count
    assert model.health({"step": 20, **near_uniform}) == []
    warning = model.health({"step": 30, **near_uniform})
    assert len(warning) == 1 and "near-uniform for 20 steps" in warning[0]
    for key in ("heads.num_prototypes", "teacher.temp", "loss.centering=sinkhorn_knopp"):
        assert key in warning[0]
    healthy = {"teacher_entropy": 0.5 * uniform, "teacher_prototypes_used": 30}
    assert model.health({"step": 40, **healthy}) == []  # recovered: the count starts again
    assert model.health({"step": 50, **near_uniform}) == []
    one = {"teacher_entropy": 0.0, "teacher_prototypes_used": 1}
    model.health({"step": 60, **one})
    assert "one prototype for 20 steps" in model.health({"step": 80, **one})[0]
    assert "teacher.momentum" in model.health({"step": 80, **one})[0]


def test_near_uniform_threshold_is_configurable():
    uniform = math.log(tiny_config().num_prototypes)
    at_090 = {"teacher_entropy": 0.90 * uniform, "teacher_prototypes_used": 30}
    default = DinoForPretraining(tiny_config(collapse_patience=0))
    assert default.health({"step": 5, **at_090}) == []  # 0.98 by default: full-size warm-ups are high-entropy
    small = DinoForPretraining(tiny_config(collapse_patience=0, collapse_entropy_fraction=0.88))
    warning = small.health({"step": 5, **at_090})
    assert len(warning) == 1 and "near-uniform" in warning[0]
