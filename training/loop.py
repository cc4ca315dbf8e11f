"""The DINOv2 training loop on Accelerate, readable top to bottom.

One optimizer step = `grad_accum_steps` micro-batches (accumulated by hand with `no_sync`, so the count survives a
resume exactly). Sinkhorn-Knopp and the softmax centers act per micro-batch, as a smaller batch would.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from .augment import MultiCropAugmentation
from .build import build_pretraining_model
from .checkpoint import load_trainer_state, resolve_resume, save_checkpoint
from .config import save_config, to_dict
from .cpu_memory import keep_freed_memory
from .data import build_dataloader, load_image_dataset, set_loader_epoch
from .masking import BlockMaskGenerator
from .param_groups import apply_schedule, param_groups
from .schedules import Schedules
from .train_config import TrainConfig

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


def _trackers(report_to: str) -> list[str] | None:
    if report_to in ("none", ""):
        return None
    if report_to == "all":
        return ["all"]
    return [name.strip() for name in report_to.split(",") if name.strip()]


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a pretraining run. Returns the step reached, the last logged metrics, the accelerator and
    the unwrapped model; the caller ends the run with `accelerator.end_training()`."""
    output_dir = Path(cfg.output_dir)
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        log_with=_trackers(cfg.train.report_to),
        project_dir=str(output_dir),
        cpu=not torch.cuda.is_available(),
    )
    set_seed(cfg.train.seed)
    if accelerator.device.type == "cpu":
        keep_freed_memory()  # reuse the step's large buffers instead of page-faulting them in again (cpu_memory.py)
    if accelerator.device.type == "cpu" and cfg.data.num_workers > 0 and "OMP_NUM_THREADS" not in os.environ:
        # DataLoader workers need cores too: oversubscribed OpenMP threads spin-wait and were measured 10x slower
        # (3.3 vs 37 img/s for the quickstart on 2 cores). `accelerate launch` sets OMP_NUM_THREADS itself.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // accelerator.num_processes - cfg.data.num_workers))
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    accelerator.init_trackers(cfg.config_name, config=_flat(to_dict(cfg)))

    # ---- model, optimizer
    model = build_pretraining_model(cfg)
    if cfg.model.gradient_checkpointing:
        model.student["backbone"].gradient_checkpointing_enable()
    groups = param_groups(model.student, cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult, cfg.optim.decay_tokens)
    # Fused AdamW (one kernel for all parameters) where parameters are plain tensors; FSDP/DeepSpeed keep the default.
    plain = accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.optim.betas), fused=True if plain else None)
    if cfg.model.compile:
        for tower in (model.student, model.teacher):
            tower["backbone"].compile()
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    # ---- data: multi-crop + masks in the DataLoader workers, sharded per process
    patch = unwrapped.config.backbone_config.patch_size
    dataset = load_image_dataset(
        cfg.data.dataset, cfg.data.split, cfg.data.image_column, cfg.data.streaming,
        rank=accelerator.process_index, world_size=accelerator.num_processes,
    )
    augmentations, mask_generators, probabilities = _crop_pipelines(cfg, patch)
    loader = build_dataloader(
        dataset,
        augmentations,
        cfg.optim.batch_size,
        image_column=cfg.data.image_column,
        mask_generator=mask_generators,
        resolution_probabilities=probabilities,
        mask_ratio_min_max=cfg.masking.ratio_min_max,
        mask_sample_probability=cfg.masking.sample_probability,
        seed=cfg.train.seed,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
        num_workers=cfg.data.num_workers,
    )
    streaming = cfg.data.streaming

    global_batch = cfg.optim.batch_size * accelerator.num_processes * cfg.optim.grad_accum_steps
    schedules = Schedules(cfg, global_batch)
    total_steps = cfg.total_steps

    # ---- resume
    step, epoch, batches_in_epoch = 0, 0, 0
    counters = {"nonfinite_steps": 0, "nonfinite_in_a_row": 0, "skipped_images": 0}
    checkpoint = resolve_resume(cfg.train.resume, output_dir)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        state = load_trainer_state(checkpoint)
        step, epoch, batches_in_epoch = state["step"], state["epoch"], state["batches_in_epoch"]
        counters.update(state["counters"])
        if not streaming:
            loader.sampler.load_state_dict(state["sampler"])
        # Streams: the `datasets` state_dict lives in the DataLoader workers, out of reach of the main process, so
        # the consumed batches of the epoch are read again and dropped below (exact, costs their loading time).
        accelerator.print(f"resumed from {checkpoint} at step {step}")

    def trainer_state() -> dict:
        state = {"step": step, "epoch": epoch, "batches_in_epoch": batches_in_epoch, "counters": counters}
        if not streaming:
            state["sampler"] = loader.sampler.state_dict(batches_in_epoch)
        return state

    def checkpoint_now() -> None:
        save_checkpoint(
            accelerator, output_dir, step, trainer_state(), cfg.train.keep_last,
            extra_files={"config.json": unwrapped.config.to_json_string()},
        )

    eval_sets = load_eval_sets(cfg) if cfg.train.eval_every > 0 else None  # loaded once; nothing when off
    metrics_file = output_dir / "metrics.jsonl"
    progress = tqdm(total=total_steps, initial=step, disable=not accelerator.is_main_process, desc="train")
    accum = cfg.optim.grad_accum_steps
    last_log: dict = {}
    t_last, images_since = time.perf_counter(), 0

    # ---- loop: epochs of data, optimizer steps of `accum` micro-batches
    while step < total_steps:
        set_loader_epoch(loader, epoch)
        micro = 0
        replay = batches_in_epoch if streaming else 0  # map-style: the sampler already starts after them
        batches_in_epoch -= replay
        for batch in loader:
            batches_in_epoch += 1
            if replay:
                replay -= 1
                continue
            n_images = _agree_batch(accelerator, batch)
            counters["skipped_images"] += _sum_across(accelerator, batch["num_skipped"])
            if n_images == 0:  # every image of some process's batch was undecodable: nobody steps
                continue
            values = schedules.at(step)
            apply_schedule(optimizer, values.lr, values.last_layer_lr, values.weight_decay)
            if step < cfg.model.head_warmup_steps:  # backbone frozen while the fresh heads warm up
                _zero_backbone_lr(optimizer)

            centers = (unwrapped.dino_center.clone(), unwrapped.ibot_center.clone())
            sync_now = micro == accum - 1
            context = accelerator.no_sync(model) if not sync_now else contextlib.nullcontext()
            with context:
                out = model(
                    batch["global_crops"].to(accelerator.device, non_blocking=True),
                    None if batch["local_crops"] is None else batch["local_crops"].to(accelerator.device, non_blocking=True),
                    None if batch["masks"] is None else batch["masks"].to(accelerator.device, non_blocking=True),
                    teacher_temp=values.teacher_temp,
                )
                finite = _all_finite(accelerator, out.loss)
                if finite:
                    accelerator.backward(out.loss / accum)
            if not finite:
                # Skip the whole optimizer step on every process; the centers must not learn from NaNs either.
                unwrapped.dino_center.copy_(centers[0])
                unwrapped.ibot_center.copy_(centers[1])
                optimizer.zero_grad(set_to_none=True)
                micro = 0
                counters["nonfinite_steps"] += 1
                counters["nonfinite_in_a_row"] += 1
                logger.warning("non-finite loss at step %d (%d in a row): step skipped", step, counters["nonfinite_in_a_row"])
                if counters["nonfinite_in_a_row"] >= cfg.train.max_nonfinite:
                    checkpoint_now()
                    raise NonFiniteLossError(
                        f"{counters['nonfinite_in_a_row']} non-finite losses in a row at step {step}; checkpoint "
                        f"saved in {output_dir}. Lower optim.base_lr, raise train.max_nonfinite, use "
                        "mixed_precision=bf16 instead of fp16, or check the data."
                    )
                continue
            images_since += n_images
            micro += 1
            if micro < accum:
                continue
            micro = 0

            # ---- optimizer step, EMA teacher
            _clip_gradients(accelerator, unwrapped, cfg.optim.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            unwrapped.update_teacher(values.momentum)
            step += 1
            counters["nonfinite_in_a_row"] = 0
            progress.update(1)

            # ---- logging
            if step % cfg.train.log_every == 0 or step == total_steps:
                now = time.perf_counter()
                images_per_s = _sum_across(accelerator, images_since) / max(now - t_last, 1e-9)
                t_last, images_since = now, 0
                last_log = _log_values(accelerator, out, values, step, images_per_s, counters)
                if cfg.crops.resolutions:  # the resolution drawn for this step's batch
                    last_log["global_size"] = batch["global_crops"].shape[-1]
                if accelerator.is_main_process:
                    with metrics_file.open("a") as f:
                        f.write(json.dumps(last_log) + "\n")
                    progress.set_postfix(loss=f"{last_log['loss']:.3f}", img_s=f"{images_per_s:.1f}")
                    _warn_collapse(last_log, unwrapped.config.num_prototypes)
                accelerator.log(last_log, step=step)

            if eval_sets is not None and step % cfg.train.eval_every == 0:
                knn = knn_top1(unwrapped.teacher_backbone, eval_sets, cfg, accelerator)
                knn["step"] = step
                if accelerator.is_main_process:
                    with metrics_file.open("a") as f:
                        f.write(json.dumps(knn) + "\n")
                    progress.write(f"step {step}: kNN top-1 {knn['knn/top1']:.1f}%")
                accelerator.log(knn, step=step)

            if cfg.train.save_every and step % cfg.train.save_every == 0 and step < total_steps:
                checkpoint_now()
            if step >= total_steps:
                break
        else:  # the data ran out: next epoch
            epoch += 1
            batches_in_epoch = 0
            continue
        break

    progress.close()
    checkpoint_now()
    # No accelerator.end_training() here: it tears down the process group, and the caller still evaluates and
    # exports with it (training.run calls it last).
    return {"step": step, "output_dir": str(output_dir), "last_log": last_log, "accelerator": accelerator, "model": unwrapped}


# ---- evaluation --------------------------------------------------------------------------------------------------


def load_eval_sets(cfg: TrainConfig):
    """(train, test) labelled splits of `data.eval_dataset` for kNN, or None when no eval set is configured."""
    if not cfg.data.eval_dataset:
        return None
    d = cfg.data
    return tuple(load_image_dataset(d.eval_dataset, split, d.image_column) for split in (d.eval_train_split, d.eval_split))


def knn_top1(backbone, eval_sets, cfg: TrainConfig, accelerator=None) -> dict[str, float]:
    """kNN (official protocol, k = 20 headline) of an in-memory backbone on the eval sets, data-parallel."""
    from .evaluation import knn_eval

    return knn_eval(
        backbone, *eval_sets, image_size=cfg.crops.global_size, image_column=cfg.data.image_column,
        label_column=cfg.data.label_column, accelerator=accelerator, num_workers=0,
    )


# ---- small helpers -------------------------------------------------------------------------------------------


def _crop_pipelines(cfg: TrainConfig, patch: int):
    """Augmentation(s), iBOT mask generator(s) and resolution probabilities (None: one fixed resolution)."""
    crops = to_dict(cfg.crops)
    rows = crops.pop("resolutions")
    if not rows:
        rows, probabilities = [(cfg.crops.global_size, cfg.crops.local_size, 1.0)], None
    else:
        probabilities = [p for _, _, p in rows]
    augmentations, generators = [], []
    for global_size, local_size, _ in rows:
        for name, size in (("global", global_size), ("local", local_size)):
            if size % patch:
                raise ValueError(
                    f"{name} crop size {size} is not a multiple of the patch size {patch}: use "
                    f"{size // patch * patch} or {(size // patch + 1) * patch} (crops.{name}_size / crops.resolutions)"
                )
        augmentations.append(MultiCropAugmentation(**{**crops, "global_size": global_size, "local_size": local_size}))
        generators.append(BlockMaskGenerator.for_crop(global_size, patch))
    return augmentations, (generators if cfg.loss.ibot_weight > 0 else None), probabilities


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out


def _sum_across(accelerator: Accelerator, value: int | float) -> float:
    if accelerator.num_processes == 1:
        return value
    t = torch.tensor([float(value)], device=accelerator.device)
    return float(accelerator.reduce(t, reduction="sum").item())


def _agree_batch(accelerator: Accelerator, batch: dict) -> int:
    """Images in this process's batch, or 0 if any process has an empty one (so all skip together)."""
    n = batch["batch_size"]
    if accelerator.num_processes == 1:
        return n
    t = torch.tensor([float(n > 0)], device=accelerator.device)
    all_have = accelerator.reduce(t, reduction="sum").item() == accelerator.num_processes
    return n if all_have else 0


def _all_finite(accelerator: Accelerator, loss: torch.Tensor) -> bool:
    flag = torch.isfinite(loss.detach()).float().reshape(1)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum") / accelerator.num_processes
    return bool(flag.item() == 1.0)


def _zero_backbone_lr(optimizer) -> None:
    for group in optimizer.param_groups:
        if all(name.startswith("backbone.") for name in group.get("names", [])):
            group["lr"] = 0.0


def _clip_gradients(accelerator: Accelerator, model, max_norm: float) -> None:
    """Clip each student submodule (backbone, heads) separately, as the official loop does."""
    if not max_norm:
        return
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return  # DeepSpeed clips inside its step (gradient_clipping in configs/accelerate/deepspeed_zero2.yaml)
    accelerator.unscale_gradients()
    for module in model.student.values():
        torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)


def _log_values(accelerator, out, values, step: int, images_per_s: float, counters: dict) -> dict:
    names = ["loss", "dino_global_loss", "dino_local_loss", "ibot_loss", "koleo_loss", "teacher_entropy"]
    stacked = torch.stack([getattr(out, n).detach().float().reshape(()) for n in names])
    stacked = accelerator.reduce(stacked, reduction="mean") if accelerator.num_processes > 1 else stacked
    log = {"step": step}
    log.update({n: float(v) for n, v in zip(names, stacked.tolist())})
    log.update(
        teacher_prototypes_used=int(out.teacher_prototypes_used),
        lr=values.lr,
        weight_decay=values.weight_decay,
        momentum=values.momentum,
        teacher_temp=values.teacher_temp,
        images_per_s=images_per_s,
        nonfinite_steps=counters["nonfinite_steps"],
        skipped_images=counters["skipped_images"],
    )
    return log


def _warn_collapse(log: dict, num_prototypes: int) -> None:
    uniform = math.log(num_prototypes)
    if log["teacher_prototypes_used"] <= 1:
        logger.warning("teacher collapse: every image of the batch maps to one prototype (step %d)", log["step"])
    elif log["teacher_entropy"] > 0.98 * uniform:
        logger.warning(
            "teacher collapse: targets are near-uniform (entropy %.2f of max %.2f) at step %d",
            log["teacher_entropy"], uniform, log["step"],
        )
