"""Run under `accelerate launch --multi_gpu --num_processes 2 ...`: train a few steps, then gather a checksum of
the teacher weights and the loss centers from every rank and write them (rank 0) to OUT/ranks.json.

Fault-injection hooks (environment variables, read here only, never by the library):

* `DDP_CHECK_REPORT=DIR`: every rank writes `DIR/rank<r>.json` — `{"error": "<type>: <message>"}` if training
  raised (then exits 1), else `{"step", "resumed_from", "skipped_images"}`; so a test sees what *each* process did;
* `DDP_CHECK_RANK1_OUTPUT_DIR=DIR`: rank 1 trains into DIR instead of the `train.output_dir` rank 0 uses, as a
  process on a machine whose disk is not shared would.
"""

import json
import os
import sys
from pathlib import Path

import torch

from training.loop import train
from training.methods import load_train_config

argv = sys.argv[1:]
rank = int(os.environ.get("RANK", "0"))
if rank == 1 and os.environ.get("DDP_CHECK_RANK1_OUTPUT_DIR"):
    argv.append(f"train.output_dir={os.environ['DDP_CHECK_RANK1_OUTPUT_DIR']}")
report = Path(os.environ["DDP_CHECK_REPORT"]) if os.environ.get("DDP_CHECK_REPORT") else None

cfg = load_train_config(argv)
try:
    result = train(cfg)
except Exception as e:
    if report is None:
        raise
    report.mkdir(parents=True, exist_ok=True)
    (report / f"rank{rank}.json").write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}))
    sys.exit(1)
accelerator, model = result["accelerator"], result["model"]
if report is not None:
    report.mkdir(parents=True, exist_ok=True)
    (report / f"rank{rank}.json").write_text(json.dumps(
        {"step": result["step"], "resumed_from": result["resumed_from"],
         "skipped_images": result["data"]["skipped_images"]}))
teacher = torch.cat([p.detach().float().flatten() for p in model.teacher.parameters()])
stats = torch.stack([teacher.sum(), teacher.abs().sum(), model.dino_center.sum(), model.ibot_center.sum()]).reshape(1, 4)
gathered = accelerator.gather(stats)
if accelerator.is_main_process:
    Path(cfg.output_dir, "ranks.json").write_text(json.dumps(gathered.tolist()))
accelerator.wait_for_everyone()
accelerator.end_training()
