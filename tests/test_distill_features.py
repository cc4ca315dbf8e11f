"""Feature distillation (`method: distill_features`): reading any backbone's pooled and dense features, the loss,
students of every kind (our ViT, timm, transformers; CNNs included) beside one teacher forward, and an end-to-end
run whose timm CNN student loads with stock `AutoModel` in a clean process."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from modeling import DinoVisionConfig, DinoVisionModel
from modeling.convert import export_backbone, to_transformers
from modeling.feature_distillation import (
    FeatureDistillConfig,
    FeatureDistillForPretraining,
    pooled_and_dense,
    vision_tower,
)
from modeling.losses import feature_distillation_loss

ROOT = Path(__file__).resolve().parents[1]


def tiny_vit(registers: int = 0, seed: int = 0) -> DinoVisionModel:
    torch.manual_seed(seed)
    return DinoVisionModel(DinoVisionConfig(image_size=28, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                            layerscale_init=0.5, num_register_tokens=registers)).eval()


def _vit_backbones():
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPVisionConfig,
        CLIPVisionModel,
        DINOv3ViTConfig,
        DINOv3ViTModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    return {  # name: (model, patch, leading tokens)
        "ours_reg2": (tiny_vit(registers=2), 14, 3),
        "dinov2": (to_transformers(tiny_vit()), 14, 1),
        "dinov3": (DINOv3ViTModel(DINOv3ViTConfig(**small, image_size=32, patch_size=16, num_register_tokens=4)), 16, 5),
        "clip_vision": (CLIPVisionModel(CLIPVisionConfig(**small, image_size=28, patch_size=14)), 14, 1),
        "clip_dual": (vision_tower(CLIPModel(CLIPConfig(vision_config=dict(**small, image_size=28, patch_size=14),
                                                        text_config=dict(**small, vocab_size=50)))), 14, 1),
        "siglip": (SiglipVisionModel(SiglipVisionConfig(**small, image_size=28, patch_size=14)), 14, 0),
    }


@pytest.mark.parametrize("name", ["ours_reg2", "dinov2", "dinov3", "clip_vision", "clip_dual", "siglip"])
def test_pooled_and_dense_of_vits(name, one_thread):
    model, patch, prefix = _vit_backbones()[name]
    model.eval()
    size = 2 * patch
    x = torch.randn(2, 3, 2 * size, size)  # not the native size: 4x2 patches (interpolated position embeddings)
    pooled, dense = pooled_and_dense(model, x)
    with torch.no_grad():
        out = model(pixel_values=x, **({"interpolate_pos_encoding": True} if name.startswith(("clip", "siglip")) else {}))
    hidden = out.last_hidden_state
    assert hidden.shape[1] == prefix + 8
    torch.testing.assert_close(dense.flatten(2).transpose(1, 2), hidden[:, prefix:])
    assert dense.shape == (2, 32, 4, 2)
    torch.testing.assert_close(pooled, out.pooler_output if out.pooler_output is not None else hidden[:, 0])


def _cnn_backbones():
    from transformers import (
        ConvNextConfig,
        ConvNextModel,
        EfficientNetConfig,
        EfficientNetModel,
        ResNetConfig,
        ResNetModel,
        TimmWrapperConfig,
        TimmWrapperModel,
    )

    torch.manual_seed(0)
    return {  # name: (model, channels of the last map)
        "timm_resnet": (TimmWrapperModel(TimmWrapperConfig(architecture="test_resnet")), 96),
        "timm_convnext": (TimmWrapperModel(TimmWrapperConfig(architecture="test_convnext")), 64),
        "timm_efficientnet": (TimmWrapperModel(TimmWrapperConfig(architecture="test_efficientnet")), 256),
        "hf_resnet": (ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                               layer_type="basic")), 16),
        "hf_convnext": (ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)), 16),
        "hf_efficientnet": (EfficientNetModel(EfficientNetConfig(width_coefficient=0.1, depth_coefficient=0.1,
                                                                 hidden_dim=128, image_size=64)), 128),  # hidden_dim = round_filters(1280)
    }


@pytest.mark.parametrize("name", ["timm_resnet", "timm_convnext", "timm_efficientnet", "hf_resnet", "hf_convnext",
                                  "hf_efficientnet"])
def test_pooled_and_dense_of_convnets(name, one_thread):
    model, channels = _cnn_backbones()[name]
    model.eval()
    pooled, dense = pooled_and_dense(model, torch.randn(2, 3, 64, 64))
    assert dense.ndim == 4 and dense.shape[:2] == (2, channels)
    assert pooled.shape == (2, channels)


def test_feature_distillation_loss():
    s, t = torch.randn(3, 5, 8, requires_grad=True), torch.randn(3, 5, 8, requires_grad=True)
    torch.testing.assert_close(feature_distillation_loss(s, t, "mse"), F.mse_loss(s, t))
    torch.testing.assert_close(feature_distillation_loss(s, t, "cosine"), 1 - F.cosine_similarity(s, t, -1).mean())
    feature_distillation_loss(s, t).backward()
    assert s.grad is not None and t.grad is None  # no gradient to the teacher
    assert feature_distillation_loss(t.detach(), t, "cosine").abs() < 1e-6
    with pytest.raises(ValueError, match="differ in shape"):
        feature_distillation_loss(s, t[:, :4])


def _feature_model(teacher, students: dict, **kw) -> FeatureDistillForPretraining:
    from training.methods.distill_features import _widths

    t_pooled, t_dense = _widths(teacher, 28, 14)
    specs = {}
    for name, model in students.items():
        kind = "vit" if isinstance(model, DinoVisionModel) else "timm" if "Timm" in type(model).__name__ else \
            "transformers"
        pooled, dense = _widths(model, 28, getattr(model.config, "patch_size", None))
        specs[name] = {"kind": kind, "config": model.config.to_dict(), "pooled_dim": pooled, "dense_dim": dense,
                       "patch_size": getattr(model.config, "patch_size", None)}
    out = FeatureDistillForPretraining(FeatureDistillConfig(teacher_pooled_dim=t_pooled, teacher_dense_dim=t_dense,
                                                            teacher_patch_size=14, students=specs, **kw))
    out.attach_teacher(teacher)
    return out


def test_students_of_every_kind_from_one_teacher_forward(one_thread):
    from transformers import ConvNextConfig, ConvNextModel, TimmWrapperConfig, TimmWrapperModel

    teacher = to_transformers(tiny_vit(seed=3))
    students = {"vit": tiny_vit(seed=1), "resnet": TimmWrapperModel(TimmWrapperConfig(architecture="test_resnet")),
                "convnext": ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2))}
    model = _feature_model(teacher, students).train()
    calls = []
    handle = model.teacher.register_forward_hook(lambda *args: calls.append(1))
    v1, v2 = torch.randn(3, 3, 28, 28), torch.randn(3, 3, 28, 28)
    out = model(v1, v2)
    handle.remove()
    assert len(calls) == 1  # one teacher forward for three students
    out.loss.backward()
    assert all(p.grad is not None for p in model.students.parameters() if p.requires_grad)
    assert not any(k.startswith("teacher") and k != "teacher_fingerprint" for k in model.state_dict())
    for name in students:  # each student's numbers as alone (same seeded init, its own BatchNorm statistics)
        alone = _feature_model(teacher, {name: students[name]}).train()
        single = alone(v1, v2)
        for key in ("loss", "pooled_loss", "dense_loss"):
            torch.testing.assert_close(out[f"{name}/{key}"], single[key], rtol=1e-6, atol=1e-7)
    assert set(model.exports()) == {"backbone/vit", "backbone/resnet", "backbone/convnext"}


# ---- an end-to-end run -----------------------------------------------------------------------------------------


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_run_distils_into_a_timm_cnn_that_stock_transformers_loads(tmp_path):
    teacher = tmp_path / "teacher"
    export_backbone(tiny_vit(seed=3), teacher)  # a stock Dinov2Model folder
    before = _digest(teacher)
    config = {
        "method": "distill_features",
        "teacher": {"path": str(teacher)},
        "students": [{"name": "cnn", "arch": "timm", "timm_name": "test_resnet"},
                     {"name": "convnext", "arch": "transformers",
                      "hf_config": {"model_type": "convnext", "hidden_sizes": [8, 16], "depths": [1, 1],
                                    "num_stages": 2}}],
        "crops": {"global_size": 28},
        "optim": {"batch_size": 4, "epochs": 1, "iters_per_epoch": 3, "warmup_epochs": 0, "base_lr": 0.01},
        "data": {"dataset": "sample", "num_workers": 0, "eval_dataset": "sample"},
        "train": {"save_every": 0, "log_every": 1, "output_dir": str(tmp_path / "run")},
    }
    (tmp_path / "f.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(ROOT / "distill.py"), "--config", str(tmp_path / "f.yaml")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "kNN (k=20) top-1 on sample/test: backbone/cnn" in res.stdout + res.stderr
    assert _digest(teacher) == before  # the teacher folder is untouched
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"cnn/pooled_loss", "convnext/dense_loss", "pooled_cosine"} <= rows[-1].keys()
    from safetensors.torch import load_file

    assert not any(k.startswith("teacher") and k != "teacher_fingerprint"
                   for k in load_file(tmp_path / "run" / "checkpoint-3" / "model.safetensors"))
    backbone = tmp_path / "run" / "backbone" / "cnn"
    assert json.loads((backbone / "config.json").read_text())["model_type"] == "timm_wrapper"
    card = (backbone / "README.md").read_text()
    assert "feature distillation" in card and "The frozen teacher, evaluated the same way" in card
    code = (
        "import sys, numpy as np, torch\n"
        "from PIL import Image\n"
        "from transformers import AutoImageProcessor, AutoModel, pipeline\n"
        "for folder, cls in ((sys.argv[1], 'TimmWrapperModel'), (sys.argv[2], 'ConvNextModel')):\n"
        "    m = AutoModel.from_pretrained(folder).eval()\n"
        "    assert type(m).__name__ == cls, type(m)\n"
        "    p = AutoImageProcessor.from_pretrained(folder)\n"
        "    x = p(images=[Image.fromarray(np.zeros((40, 50, 3), dtype=np.uint8))], return_tensors='pt')\n"
        "    f = pipeline('image-feature-extraction', model=folder)(Image.fromarray(np.zeros((40, 50, 3), np.uint8)))\n"
        "    print(type(p).__name__, tuple(x['pixel_values'].shape), np.array(f).shape)\n"
        "assert 'modeling' not in sys.modules and 'training' not in sys.modules\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(backbone), str(backbone.parent / "convnext")], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    timm_line, convnext_line = res.stdout.strip().splitlines()
    assert timm_line.startswith("TimmWrapperImageProcessor (1, 3, 28, 28)")  # preprocessing at the trained size
    # DINOv2's evaluation preprocessing at the trained size (what the end-of-run kNN used), added at export
    assert convnext_line.startswith("BitImageProcessor (1, 3, 28, 28)")
