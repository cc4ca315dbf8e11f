"""Export a run: `pretraining/` (DinoForPretraining with heads and centers) and `backbone/` (stock transformers
DINOv2 of the EMA teacher + image processor + model card), from a live model or any checkpoint directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from string import Template
from typing import Any

import yaml
from safetensors.torch import load_file

from modeling import DinoForPretraining, DinoPretrainingConfig
from modeling.convert import export_backbone, transformers_matches_at_all_sizes

CARD_TEMPLATE = Path(__file__).resolve().parents[1] / "model_cards" / "model_card.md"


def load_checkpoint_model(checkpoint: str | Path) -> DinoForPretraining:
    """Rebuild `DinoForPretraining` from a `checkpoint-<step>/` directory (model config + safetensors weights)."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint} has no config.json: pass a checkpoint-<step> directory of a run")
    weights = checkpoint / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(
            f"{checkpoint} has no model.safetensors (a sharded FSDP checkpoint? merge it first with "
            f"`accelerate merge-weights {checkpoint}/pytorch_model_fsdp_0 {checkpoint}`)"
        )
    model = DinoForPretraining(DinoPretrainingConfig.from_pretrained(checkpoint))
    missing, unexpected = model.load_state_dict(load_file(weights), strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {checkpoint} does not match its config: missing {missing}, unexpected {unexpected}")
    return model


def render_model_card(model: DinoForPretraining, run: dict[str, Any], results: dict | None = None) -> str:
    """Fill `model_cards/model_card.md`; `run` carries the resolved config (dict) and summary values."""
    bc = model.config.backbone_config
    cfg = run.get("config", {})
    crops, loss, data = cfg.get("crops", {}), cfg.get("loss", {}), cfg.get("data", {})
    dataset = data.get("dataset", "unknown")
    metadata_index = ""
    evaluation = "No evaluation was run for this export (`python probe.py --model <this folder> --dataset ...`)."
    if results:
        from training.evaluation import model_index

        metadata_index = yaml.safe_dump({"model-index": model_index(results, run.get("model_name", "model"))}, sort_keys=False)
        evaluation = "```json\n" + json.dumps(results, indent=2) + "\n```"
    is_hub_dataset = "/" in dataset and not Path(dataset).exists()
    note = (
        ""
        if transformers_matches_at_all_sizes(bc)
        else "Note: this model interpolates position embeddings with the official DINOv2 0.1 offset; stock "
        "`transformers` `Dinov2Model` interpolates without it, so at resolutions other than the native grid its "
        "outputs differ slightly from the original model's (max |Δ| ≈ 0.03 measured on a small random model)."
    )
    values = dict(
        model_name=run.get("model_name", "dinoforge ViT"),
        repo_id=run.get("repo_id", "path/to/this/folder"),
        datasets_yaml=yaml.safe_dump({"datasets": [dataset]}) if is_hub_dataset else "",
        model_index_yaml=metadata_index,
        hf_class="Dinov2WithRegistersModel" if bc.num_register_tokens else "Dinov2Model",
        hidden_size=bc.hidden_size,
        num_hidden_layers=bc.num_hidden_layers,
        num_attention_heads=bc.num_attention_heads,
        patch_size=bc.patch_size,
        ffn=bc.ffn,
        num_register_tokens=bc.num_register_tokens,
        image_size=bc.image_size,
        grid=bc.image_size // bc.patch_size,
        interpolation_note=note,
        config_name=cfg.get("config_name", "custom"),
        dataset=dataset,
        steps=run.get("step", "?"),
        global_batch=run.get("global_batch", "?"),
        global_size=crops.get("global_size", "?"),
        local_number=crops.get("local_number", "?"),
        local_size=crops.get("local_size", "?"),
        dino_weight=loss.get("dino_weight", model.config.dino_weight),
        ibot_weight=loss.get("ibot_weight", model.config.ibot_weight),
        koleo_weight=loss.get("koleo_weight", model.config.koleo_weight),
        centering=model.config.centering,
        seed=cfg.get("train", {}).get("seed", "?"),
        last_metrics=json.dumps(run.get("last_log", {})) or "none",
        evaluation=evaluation,
    )
    return Template(CARD_TEMPLATE.read_text()).substitute(values)


def export_run(
    model: DinoForPretraining, out_dir: str | Path, run: dict[str, Any] | None = None, results: dict | None = None
) -> dict[str, Path]:
    """Write `out_dir/pretraining/` and `out_dir/backbone/` (with README.md model card)."""
    out = Path(out_dir)
    pretraining = out / "pretraining"
    model.save_pretrained(pretraining)
    backbone = export_backbone(model.teacher_backbone, out / "backbone")
    (backbone / "README.md").write_text(render_model_card(model, run or {}, results))
    return {"pretraining": pretraining, "backbone": backbone}


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
    works), `pretraining/` in a subfolder (`from_pretrained(repo_id, subfolder="pretraining")`)."""
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(paths["backbone"], dest)
    shutil.copytree(paths["pretraining"], dest / "pretraining")
    # transformers looks for `trust_remote_code` modules at the repo root even when loading a subfolder, so the
    # pretraining model's code files go there too (the root config has no auto_map: stock loading is unaffected).
    for code in Path(paths["pretraining"]).glob("*.py"):
        shutil.copy2(code, dest / code.name)
    return dest


def push_to_hub(paths: dict[str, Path], repo_id: str, private: bool = False, staging_dir: str | Path | None = None) -> str:
    """Create the repo if needed and upload `build_hub_folder(paths)` in one commit."""
    from huggingface_hub import HfApi

    staging = Path(staging_dir) if staging_dir else Path(paths["backbone"]).parent / "hub"
    folder = build_hub_folder(paths, staging)
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="dinoforge: backbone + pretraining/")
    return f"https://huggingface.co/{repo_id}"
