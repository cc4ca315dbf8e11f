"""Run under `accelerate launch --multi_gpu --num_processes 2 ...`: train a few steps, then gather a checksum of
the teacher weights and the loss centers from every rank and write them (rank 0) to OUT/ranks.json."""

import json
import sys
from pathlib import Path

import torch

from training.loop import train
from training.methods import load_train_config

cfg = load_train_config(sys.argv[1:])
result = train(cfg)
accelerator, model = result["accelerator"], result["model"]
teacher = torch.cat([p.detach().float().flatten() for p in model.teacher.parameters()])
stats = torch.stack([teacher.sum(), teacher.abs().sum(), model.dino_center.sum(), model.ibot_center.sum()]).reshape(1, 4)
gathered = accelerator.gather(stats)
if accelerator.is_main_process:
    Path(cfg.output_dir, "ranks.json").write_text(json.dumps(gathered.tolist()))
accelerator.wait_for_everyone()
accelerator.end_training()
