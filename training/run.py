"""What `train.py` runs: train (or resume), export what the method exports (`backbone/`, `pretraining/`, ...),
then — when an eval set is configured — report the kNN of the trained backbone next to a random-init one and write
it into the backbone's model card, and optionally push to the Hub.

The export comes before the end-of-run evaluation, so an evaluation that fails (logged, not fatal) never costs
the trained model. What could stop the push at the end (no token, offline, a visibility conflict) is checked
before training, by every process alike (so they all stop, or none does).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoint import ResumeError
from .config import ConfigError, atomic_write_text, to_dict
from .data_guard import BadDataError
from .export import HubPushError, check_hub_push, export_run, is_backbone_export, push_to_hub
from .loop import NonFiniteLossError, eval_backbone, knn_top1, load_eval_sets, train
from .methods import get_method
from .model_card import update_model_card
from .train_config import TrainConfig

logger = logging.getLogger(__name__)

# Errors whose message says what went wrong and how to fix it: `train.py` prints them without a traceback.
USER_ERRORS = (ConfigError, HubPushError, BadDataError, ResumeError, NonFiniteLossError)


def run_cli(argv: list[str], quickstart: Path, load: Callable[[list[str], Path | None], TrainConfig]) -> None:
    """The scripts' common tail: `load(argv, config_file)` the config (the quickstart recipe when no `--config` is
    given), then `run` it; config and user errors exit with their message, not a traceback."""
    has_config = any(a == "--config" or a.startswith("--config=") for a in argv)
    try:
        cfg = load(argv, None if has_config else quickstart)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    try:
        run(cfg)
    except USER_ERRORS as e:  # the message names the problem and the fix; a traceback would only bury it
        sys.exit(f"error: {e}")


def run(cfg: TrainConfig) -> dict:
    if cfg.hub.push:  # fail now, not after hours of training
        if not cfg.hub.model_id:
            raise ConfigError("hub.push=true needs hub.model_id=<user-or-org/name>")
        check_hub_push(cfg.hub.model_id, cfg.hub.private, cfg.hub.update_visibility)
    result = train(cfg)
    accelerator, model = result["accelerator"], result["model"]
    summary = {"step": result["step"], "last_log": result["last_log"], "data": result["data"]}
    out = Path(cfg.output_dir)

    paths = {}
    if accelerator.is_main_process:
        run_info = {
            "config": to_dict(cfg),
            "step": result["step"],
            "last_log": result["last_log"],
            "global_batch": cfg.optim.batch_size * accelerator.num_processes * cfg.optim.grad_accum_steps,
            "model_name": cfg.hub.model_id or f"dinoforge-{cfg.config_name}",
            "repo_id": cfg.hub.model_id,
            "method_description": get_method(cfg.method).description,
        }
        paths = export_run(model, out, run_info)
        accelerator.print("exported " + ", ".join(str(p) for p in paths.values()))
    accelerator.wait_for_everyone()

    method = get_method(cfg.method)
    knn = _end_of_run_knn(cfg, model, accelerator) if method.evaluate is None else None
    if knn is not None:
        summary["knn"] = knn
    if method.evaluate is not None:
        evaluation = _method_evaluation(method, cfg, model, accelerator, paths)
        if evaluation is not None:
            summary["evaluation"] = evaluation
    if accelerator.is_main_process:
        if knn is not None:
            results = {"dataset": cfg.data.eval_dataset, "split": cfg.data.eval_split, "knn": knn["trained"],
                       "random_init": knn["random_init"]}
            for name, path in paths.items():
                if is_backbone_export(name):
                    update_model_card(path, results, model_name=cfg.hub.model_id or f"dinoforge-{cfg.config_name}")
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        if cfg.hub.push:
            url = push_to_hub(paths, cfg.hub.model_id, cfg.hub.private, update_visibility=cfg.hub.update_visibility)
            accelerator.print(f"pushed to {url}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _method_evaluation(method, cfg: TrainConfig, model, accelerator, paths: dict) -> dict | None:
    """The method's own end-of-run evaluation; a failure is logged, not fatal (the exports are already saved)."""
    try:
        return method.evaluate(cfg, model, accelerator, paths)
    except Exception:
        logger.exception("the end-of-run evaluation of method %r failed; the exported model is unaffected", cfg.method)
        return None


def _end_of_run_knn(cfg: TrainConfig, model, accelerator) -> dict | None:
    """kNN of the trained backbone and of a random-init one of the same architecture (the baseline to beat), or
    None when no eval set is configured or the evaluation failed (logged: the run's outputs are already saved)."""
    if not cfg.data.eval_dataset:
        return None
    try:
        eval_sets = load_eval_sets(cfg)
        backbone = eval_backbone(model)
        trained = knn_top1(backbone, eval_sets, cfg, accelerator)
        torch.manual_seed(cfg.train.seed)
        random_init = type(backbone)(backbone.config).to(accelerator.device)
        baseline = knn_top1(random_init, eval_sets, cfg, accelerator)
    except Exception:
        logger.exception("the end-of-run kNN evaluation on %s failed; the exported model is unaffected",
                         cfg.data.eval_dataset)
        return None
    accelerator.print(
        f"kNN (k=20) top-1 on {cfg.data.eval_dataset}/{cfg.data.eval_split}: trained backbone "
        f"{trained['knn/top1']:.1f}%  vs  random-init backbone {baseline['knn/top1']:.1f}%  (seed {cfg.train.seed})"
    )
    return {"trained": trained, "random_init": baseline}
