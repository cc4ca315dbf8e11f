"""Export a run: every entry of the method's `exports()` — `backbone/` (stock-loadable, with image processor and
model card; `backbone/<name>/` for several), and e.g. `pretraining/` (the whole model, to continue training) —
from a live model or from any checkpoint directory."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file
from torch import nn

from modeling import DinoVisionModel
from modeling.convert import export_backbone

from .model_card import render_model_card

logger = logging.getLogger(__name__)


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
    state = load_file(weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied weights (one tensor under several names, e.g. Grounding DINO's shared box heads) are saved once by
    # safetensors: a "missing" name whose tensor is shared with a loaded one is loaded.
    current = model.state_dict()
    loaded = {current[k].data_ptr() for k in state if k in current}
    missing = [k for k in missing if current[k].data_ptr() not in loaded]
    if missing or unexpected:
        raise ValueError(f"checkpoint {checkpoint} does not match its config: missing {missing}, unexpected {unexpected}")
    return model.eval()


def save_backbone(backbone: nn.Module, folder: Path, image_size: int | None = None) -> Path:
    """A stock-loadable backbone folder: our ViT becomes a stock transformers DINOv2 (+ the released models' image
    processor); any other `PreTrainedModel` is saved as it is, with an image processor whose crop is `image_size`
    (the run's view size, default 224), so the pipeline feeds it images at the scale it was trained and evaluated
    on (a CNN trained on 32 px views sees 32 px images, not 224)."""
    from transformers import ResNetModel, TextNetModel

    from modeling.two_view import save_resnet_backbone, stock_textnet

    if isinstance(backbone, DinoVisionModel):
        return export_backbone(backbone, folder)
    if isinstance(backbone, ResNetModel):  # + the image processor of microsoft/resnet-50, at `image_size`
        return save_resnet_backbone(backbone, folder, crop_size=image_size or 224)
    if isinstance(backbone, TextNetModel):
        backbone = stock_textnet(backbone)  # a branch-free one gets its (zero) branches back
    backbone.save_pretrained(folder)
    _ensure_image_processor(Path(folder), image_size or 224)
    return folder


def _ensure_image_processor(folder: Path, image_size: int = 224) -> None:
    """A backbone folder that `AutoImageProcessor` cannot load a processor from (e.g. a ConvNeXt or EfficientNet
    student built from a config) gets the DINOv2 evaluation one at `image_size` (resize 256/224 of it, center
    crop; what the end-of-run kNN uses), so `pipeline("image-feature-extraction")` works. Folders that carry their
    own (a timm wrapper's `pretrained_cfg` in config.json) are left as they are."""
    from transformers import AutoImageProcessor

    from training.evaluation.preprocess import default_image_processor

    try:
        AutoImageProcessor.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError, TypeError):
        default_image_processor(image_size).save_pretrained(folder)


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
            paths[name] = save_backbone(module, folder, _view_size(run))
            (folder / "README.md").write_text(render_model_card(model, module, run or {}, results))
            # Files a method keeps beside a backbone (e.g. copy detection's descriptor head).
            extras = getattr(model, "export_extras", None)
            if extras is not None:
                extras(name, folder)
        else:
            module.save_pretrained(folder)
            paths[name] = folder
    return paths


def _view_size(run: dict[str, Any] | None) -> int | None:
    """The run's training view size (`crops.global_size` of its resolved config), if the run says."""
    size = (((run or {}).get("config") or {}).get("crops") or {}).get("global_size")
    return int(size) if size else None


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


class HubPushError(RuntimeError):
    """`hub.push` cannot (or must not) upload: no usable token, the Hub unreachable, or a visibility conflict."""


_LOGIN_HELP = (
    "log in with `hf auth login` (`huggingface-cli login` with older huggingface_hub) or set HF_TOKEN to a token "
    "with write access (https://huggingface.co/settings/tokens), or set hub.push=false"
)


def check_hub_push(repo_id: str, private: bool, update_visibility: bool = False) -> None:
    """Fail before training, not after it, when the end-of-run push could not happen: no token, offline, a token
    the Hub rejects, or a private run aimed at an existing public repo (see `push_to_hub`)."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    token = get_token()
    if not token:
        raise HubPushError(f"hub.push=true but no Hugging Face token was found: {_LOGIN_HELP}.")
    api = HfApi(token=token)
    try:
        user = api.whoami()
        _visibility_change(api, repo_id, private, update_visibility)
    except OfflineModeIsEnabled:
        raise HubPushError(
            f"hub.push=true but the Hub is switched off (HF_HUB_OFFLINE=1): unset HF_HUB_OFFLINE to push "
            f"{repo_id}, or set hub.push=false and upload later with `hf upload`."
        ) from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise HubPushError(f"hub.push=true but the Hub rejects the token ({status}): {_LOGIN_HELP}.") from None
        raise HubPushError(f"hub.push=true but checking {repo_id} on the Hub failed: {e}") from None
    except HubPushError:
        raise
    except Exception as e:  # connection errors come from the HTTP client, whatever it is
        raise HubPushError(
            f"hub.push=true but the Hub could not be reached to check the token ({type(e).__name__}: {e}); check "
            "the network (HF_ENDPOINT), or set hub.push=false"
        ) from None
    logger.info("hub.push: will push to %s as %s", repo_id, user.get("name", "?"))


def _visibility_change(api, repo_id: str, private: bool, update_visibility: bool) -> bool | None:
    """The visibility to set on an existing repo before uploading (True: private, False: public), None to leave it.

    A private run is never uploaded into a public repo unless `update_visibility` makes the repo private first; a
    public run pushed into a private repo leaves it private (nothing leaks) unless `update_visibility` is set."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        is_private = bool(api.repo_info(repo_id).private)
    except RepositoryNotFoundError:
        return None  # created with the asked visibility
    if is_private == private:
        return None
    if update_visibility:
        return private
    if private:
        raise HubPushError(
            f"hub.private=true but the Hub repo {repo_id} exists and is public: refusing to push a private run into "
            "it. Choose another hub.model_id, make the repo private on the Hub, or set hub.update_visibility=true "
            "to make it private before the upload."
        )
    logger.warning("hub.private=false but %s exists and is private: it stays private (hub.update_visibility=true "
                   "makes it public)", repo_id)
    return None


def push_to_hub(paths: dict[str, Path], repo_id: str, private: bool = False, staging_dir: str | Path | None = None,
                update_visibility: bool = False) -> str:
    """Create the repo if needed and upload `build_hub_folder(paths)` in one commit.

    An existing repo keeps its visibility unless `update_visibility`; a private run into an existing public repo
    is refused (`HubPushError`) before anything is uploaded."""
    from huggingface_hub import HfApi

    api = HfApi()
    change = _visibility_change(api, repo_id, private, update_visibility)
    staging = Path(staging_dir) if staging_dir else Path(next(iter(paths.values()))).parent / "hub"
    folder = build_hub_folder(paths, staging)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if change is not None:
        api.update_repo_settings(repo_id, private=change)
        logger.info("made %s %s", repo_id, "private" if change else "public")
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=f"dinoforge: {', '.join(sorted(paths))}")
    return f"https://huggingface.co/{repo_id}"
