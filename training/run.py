"""What `train.py` runs: train (or resume), report kNN of the trained teacher vs a random-init backbone when an eval
set is configured, export `pretraining/` + `backbone/`, and optionally push both to the Hub."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from modeling import DinoVisionModel

from .config import to_dict
from .export import export_run, push_to_hub
from .loop import knn_top1, load_eval_sets, train
from .train_config import TrainConfig


def run(cfg: TrainConfig) -> dict:
    result = train(cfg)
    accelerator, model = result["accelerator"], result["model"]
    summary = {"step": result["step"], "last_log": result["last_log"]}

    eval_sets = load_eval_sets(cfg)
    if eval_sets is not None:
        trained = knn_top1(model.teacher_backbone, eval_sets, cfg, accelerator)
        torch.manual_seed(cfg.train.seed)
        random_init = DinoVisionModel(model.teacher_backbone.config).to(accelerator.device)
        baseline = knn_top1(random_init, eval_sets, cfg, accelerator)
        summary["knn"] = {"trained_teacher": trained, "random_init": baseline}
        accelerator.print(
            f"kNN (k=20) top-1 on {cfg.data.eval_dataset}/{cfg.data.eval_split}: trained teacher "
            f"{trained['knn/top1']:.1f}%  vs  random-init backbone {baseline['knn/top1']:.1f}%  (seed {cfg.train.seed})"
        )

    if accelerator.is_main_process:
        out = Path(cfg.output_dir)
        run_info = {
            "config": to_dict(cfg),
            "step": result["step"],
            "last_log": result["last_log"],
            "global_batch": cfg.optim.batch_size * accelerator.num_processes * cfg.optim.grad_accum_steps,
            "model_name": cfg.hub.model_id or f"dinoforge-{cfg.config_name}",
            "repo_id": cfg.hub.model_id or str(out / "backbone"),
        }
        paths = export_run(model, out, run_info)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        accelerator.print(f"exported {paths['pretraining']} and {paths['backbone']}")
        if cfg.hub.push:
            if not cfg.hub.model_id:
                raise ValueError("hub.push=true needs hub.model_id=<user-or-org/name>")
            accelerator.print(f"pushed to {push_to_hub(paths, cfg.hub.model_id, cfg.hub.private)}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary
