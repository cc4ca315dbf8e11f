"""Export a run: every entry of the method's `exports()` — `backbone/` (stock-loadable, with image processor and
model card; `backbone/<name>/` for several), and e.g. `pretraining/` (the whole model, to continue training) —
from a live model or from any checkpoint directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file
from torch import nn

from modeling import DinoVisionModel
from modeling.convert import export_backbone

from .model_card import render_model_card


def is_backbone_export(name: str) -> bool:
    return name == "backbone" or name.startswith("backbone/")


def load_checkpoint_model(checkpoint: str | Path) -> nn.Module:
    """Rebuild a run's model from a `checkpoint-<step>/` directory (model config + safetensors weights).

    The model class comes from the config's `model_type` through `AutoModelForPreTraining`, where every method
    registers its pretraining class (import `modeling` first)."""
    from transformers import AutoConfig, AutoModelForPreTraining

    import modeling  # noqa: F401  (registers the dinoforge classes with the Auto classes)

    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint} has no config.json: pass a checkpoint-<step> directory of a run")
    weights = checkpoint / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(
            f"{checkpoint} has no model.safetensors (a sharded FSDP checkpoint? merge it first with "
            f"`accelerate merge-weights {checkpoint}/pytorch_model_fsdp_0 {checkpoint}`)"
        )
    config = AutoConfig.from_pretrained(checkpoint)
    try:
        model = AutoModelForPreTraining.from_config(config)
    except ValueError as e:
        raise ValueError(
            f"{checkpoint}: model type {config.model_type!r} is not registered with AutoModelForPreTraining; export "
            "it from a process that registers its method"
        ) from e
    missing, unexpected = model.load_state_dict(load_file(weights), strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {checkpoint} does not match its config: missing {missing}, unexpected {unexpected}")
    return model.eval()


def save_backbone(backbone: nn.Module, folder: Path) -> Path:
    """A stock-loadable backbone folder: our ViT becomes a stock transformers DINOv2 (+ the released models' image
    processor); any other `PreTrainedModel` is saved as it is."""
    if isinstance(backbone, DinoVisionModel):
        return export_backbone(backbone, folder)
    backbone.save_pretrained(folder)
    return folder


def export_run(model: nn.Module, out_dir: str | Path, run: dict[str, Any] | None = None,
               results: dict | None = None) -> dict[str, Path]:
    """Write every entry of `model.exports()` under `out_dir`; backbones get a README.md model card.

    `results` (optional) go into the cards' model-index and Evaluation section: a probe results.json dict or the
    run's k-NN summary (shapes: `training.model_card`).
    """
    out = Path(out_dir)
    paths: dict[str, Path] = {}
    for name, module in model.exports().items():
        folder = out / name
        if is_backbone_export(name):
            paths[name] = save_backbone(module, folder)
            (folder / "README.md").write_text(render_model_card(model, module, run or {}, results))
        else:
            module.save_pretrained(folder)
            paths[name] = folder
    return paths


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """`python train.py export CHECKPOINT OUT`: export from any checkpoint directory."""
    checkpoint = Path(checkpoint)
    model = load_checkpoint_model(checkpoint)
    run: dict[str, Any] = {}
    config_yaml = checkpoint.parent / "config.yaml"
    if config_yaml.is_file():
        run["config"] = yaml.safe_load(config_yaml.read_text())
    state_file = checkpoint / "trainer_state.json"
    if state_file.is_file():
        run["step"] = json.loads(state_file.read_text()).get("step")
    return export_run(model, out_dir, run)


def build_hub_folder(paths: dict[str, Path], dest: str | Path) -> Path:
    """The exact repository `push_to_hub` uploads: `backbone/` at the root (so `AutoModel.from_pretrained(repo_id)`
    works), every other export in its subfolder (e.g. `from_pretrained(repo_id, subfolder="pretraining")`)."""
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    root = "backbone" if "backbone" in paths else None
    if root is None:
        dest.mkdir(parents=True)
    else:
        shutil.copytree(paths[root], dest)
    for name, path in paths.items():
        if name == root:
            continue
        shutil.copytree(path, dest / name)
        # transformers looks for `trust_remote_code` modules at the repo root even when loading a subfolder, so the
        # code files go there too (the root config has no auto_map: stock loading is unaffected).
        for code in Path(path).glob("*.py"):
            shutil.copy2(code, dest / code.name)
    return dest


def push_to_hub(paths: dict[str, Path], repo_id: str, private: bool = False, staging_dir: str | Path | None = None) -> str:
    """Create the repo if needed and upload `build_hub_folder(paths)` in one commit."""
    from huggingface_hub import HfApi

    staging = Path(staging_dir) if staging_dir else Path(next(iter(paths.values()))).parent / "hub"
    folder = build_hub_folder(paths, staging)
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=f"dinoforge: {', '.join(sorted(paths))}")
    return f"https://huggingface.co/{repo_id}"
