"""The training loop on Accelerate, readable top to bottom; it serves every method and names none.

What it asks of the model is the method protocol (`modeling/method.py`, docs/adding_a_method.md): its data
pipeline, trainable parts, per-step schedule values, post-step hook, step state, exports and health signals.
One optimizer step = `grad_accum_steps` micro-batches (accumulated by hand with `no_sync`, so the count survives a
resume exactly); state a model updates in its forward (e.g. loss centers) changes per micro-batch, as with a
smaller batch.

Every process takes part in the same collectives at the same batch: one all-reduce agrees on each batch's image
counts (`data_guard.agree_on_batch`), so processes step, skip, end an epoch and stop on broken data together.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import time
from pathlib import Path
from typing import NoReturn

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from .checkpoint import (
    agree_on_resume,
    check_shared_output_dir,
    load_trainer_state,
    save_checkpoint,
    truncate_metrics,
)
from .config import save_config, to_dict, validate
from .cpu_memory import keep_freed_memory
from .data import load_image_dataset, set_loader_epoch
from .data_guard import BadDataError, DataGuard, agree_on_batch, format_reasons, gather_reasons
from .methods import get_method
from .optimizers import build_optimizer
from .param_groups import apply_schedule, param_groups
from .pipelines import BOOKKEEPING_KEYS, build_pipeline
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
    """Run (or resume) a pretraining run. Returns the step reached, the last logged metrics, the accelerator, the
    unwrapped model, `resumed_from` (the checkpoint's step, or None) and `data` (images seen and skipped); the
    caller ends the run with `accelerator.end_training()`. Raises `BadDataError` on data too broken to train on
    and `NonFiniteLossError` on a run of non-finite losses (both after a checkpoint, once a step was made)."""
    validate(cfg)  # configs built in Python skip load_config's checks
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
    if accelerator.device.type == "cpu":
        threads = cpu_threads(cfg, accelerator.num_processes)
        if threads is not None:
            torch.set_num_threads(threads)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Several processes: all resume from the checkpoint the main process picks, in one shared output_dir, or
    # all stop here with the reason (before anything is built).
    checkpoint = agree_on_resume(accelerator, cfg.train.resume, output_dir)
    check_shared_output_dir(accelerator, output_dir)
    accelerator.init_trackers(cfg.config_name, config=_flat(to_dict(cfg)))

    # ---- model, optimizer
    method = get_method(cfg.method)
    model = method.build_model(cfg).train()  # (from_pretrained, e.g. init_from, returns eval mode)
    groups = param_groups(model.trainable_parts(), cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult,
                          cfg.optim.decay_tokens)
    plain = accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)
    optimizer = build_optimizer(groups, cfg.optim, fused=plain)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    # ---- data: the method's pipeline (augmentation + collate in the DataLoader workers), sharded per process
    dataset = load_image_dataset(
        cfg.data.dataset, cfg.data.split, cfg.data.image_column, cfg.data.streaming,
        rank=accelerator.process_index, world_size=accelerator.num_processes,
    )
    loader = build_pipeline(
        unwrapped.data_pipeline(), cfg, dataset, rank=accelerator.process_index, world_size=accelerator.num_processes
    )
    streaming = cfg.data.streaming

    global_batch = cfg.optim.batch_size * accelerator.num_processes * cfg.optim.grad_accum_steps
    schedules = Schedules(cfg.optim, global_batch)
    method_schedules = method.schedules(cfg)
    total_steps = cfg.total_steps

    # ---- resume
    step, epoch, batches_in_epoch = 0, 0, 0
    counters = {"nonfinite_steps": 0, "nonfinite_in_a_row": 0, "skipped_images": 0}
    guard = DataGuard(cfg.data.dataset, cfg.data.max_skipped_fraction, cfg.data.skip_window,
                      cfg.optim.batch_size * accelerator.num_processes)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        state = load_trainer_state(checkpoint)
        step, epoch, batches_in_epoch = state["step"], state["epoch"], state["batches_in_epoch"]
        counters.update(state["counters"])
        guard.load_state_dict(state.get("data_guard", {}))
        if not streaming:
            loader.sampler.load_state_dict(state["sampler"])
        # Streams: the `datasets` state_dict lives in the DataLoader workers, out of reach of the main process, so
        # each process reads the consumed batches of the epoch from its own shard again and drops them below
        # (exact, costs their loading time; every process consumed the same number, as they move in lockstep).
        accelerator.print(f"resumed from {checkpoint} at step {step}")
    start_step = step
    if accelerator.is_main_process:  # the rows of later steps are logged again: each step appears once
        truncate_metrics(output_dir / "metrics.jsonl", step)

    def trainer_state() -> dict:
        state = {"step": step, "epoch": epoch, "batches_in_epoch": batches_in_epoch, "counters": counters,
                 "data_guard": guard.state_dict()}
        if not streaming:
            state["sampler"] = loader.sampler.state_dict(batches_in_epoch)
        return state

    def checkpoint_now() -> Path:
        return save_checkpoint(
            accelerator, output_dir, step, trainer_state(), cfg.train.keep_last,
            extra_files={"config.json": unwrapped.config.to_json_string()},
        )

    def stop_for_bad_data(problem: str) -> NoReturn:
        reasons = gather_reasons(accelerator, guard.reasons)  # every process reached this verdict at this batch
        saved = checkpoint_now() if step > 0 else None
        raise BadDataError(guard.message(problem, reasons, str(saved) if saved else None))

    eval_sets = load_eval_sets(cfg) if cfg.train.eval_every > 0 else None  # loaded once; nothing when off
    metrics_file = output_dir / "metrics.jsonl"
    progress = tqdm(total=total_steps, initial=step, disable=not accelerator.is_main_process, desc="train")
    accum = cfg.optim.grad_accum_steps
    last_log: dict = {}
    t_last, images_since = time.perf_counter(), 0

    # ---- loop: epochs of data, optimizer steps of `accum` micro-batches
    while step < total_steps:
        set_loader_epoch(loader, epoch)
        guard.start_epoch(from_start=batches_in_epoch == 0)
        micro = 0
        replay = batches_in_epoch if streaming else 0  # map-style: the sampler already starts after them
        batches_in_epoch -= replay
        for batch in itertools.chain(loader, [None]):  # None: this process's data ran out
            if replay and batch is not None:
                batches_in_epoch += 1
                replay -= 1
                continue
            counts = agree_on_batch(accelerator, batch)
            if counts.exhausted:  # some process ran out: all end the epoch here together
                break
            batches_in_epoch += 1
            counters["skipped_images"] += counts.skipped
            problem = guard.observe(counts, batch.get("skipped"))
            if problem:
                stop_for_bad_data(problem)
            if not counts.usable:  # every image of some process's batch was undecodable: nobody steps
                continue
            values = schedules.at(step)
            method_values = {name: schedule(step) for name, schedule in method_schedules.items()}
            model_kwargs = {k: v for k, v in method_values.items() if not k.startswith("lr_scale/")}
            lr_scales = {k.removeprefix("lr_scale/"): v for k, v in method_values.items() if k.startswith("lr_scale/")}
            apply_schedule(optimizer, values.lr, values.last_layer_lr, values.weight_decay, lr_scales)

            state_before = [t.clone() for t in unwrapped.step_state()]
            inputs = {k: _to_device(v, accelerator.device) for k, v in batch.items() if k not in BOOKKEEPING_KEYS}
            sync_now = micro == accum - 1
            context = accelerator.no_sync(model) if not sync_now else contextlib.nullcontext()
            with context:
                out = model(**inputs, **model_kwargs)
                finite = _all_finite(accelerator, out.loss)
                if finite:
                    accelerator.backward(out.loss / accum)
            if not finite:
                # Skip the whole optimizer step on every process; the model's state must not learn from NaNs either.
                with torch.no_grad():
                    for tensor, before in zip(unwrapped.step_state(), state_before):
                        tensor.copy_(before)
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
            images_since += counts.local_images
            micro += 1
            if micro < accum:
                continue
            micro = 0

            # ---- optimizer step, then the method's post-step hook (EMA / momentum updates)
            _clip_gradients(accelerator, unwrapped.trainable_parts(), cfg.optim.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            unwrapped.after_optimizer_step(**model_kwargs)
            step += 1
            counters["nonfinite_in_a_row"] = 0
            progress.update(1)

            # ---- logging
            if step % cfg.train.log_every == 0 or step == total_steps:
                now = time.perf_counter()
                images_per_s = _sum_across(accelerator, images_since) / max(now - t_last, 1e-9)
                t_last, images_since = now, 0
                last_log = {"step": step, **_output_scalars(accelerator, out)}
                last_log.update(lr=values.lr, weight_decay=values.weight_decay, **method_values)
                last_log.update(batch.get("log") or {})
                last_log.update(images_per_s=images_per_s, nonfinite_steps=counters["nonfinite_steps"],
                                skipped_images=counters["skipped_images"])
                if accelerator.is_main_process:
                    with metrics_file.open("a") as f:
                        f.write(json.dumps(last_log) + "\n")
                    progress.set_postfix(loss=f"{last_log['loss']:.3f}", img_s=f"{images_per_s:.1f}")
                    for warning in unwrapped.health(last_log):
                        logger.warning("%s (step %d)", warning, step)
                accelerator.log(last_log, step=step)

            if eval_sets is not None and step % cfg.train.eval_every == 0:
                knn = knn_top1(eval_backbone(unwrapped), eval_sets, cfg, accelerator)
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
        if step >= total_steps:
            break
        problem = guard.end_epoch()  # the data ran out: judge the epoch, then the next one
        if problem:
            stop_for_bad_data(problem)
        epoch += 1
        batches_in_epoch = 0

    progress.close()
    checkpoint_now()
    data = guard.summary(gather_reasons(accelerator, guard.reasons))
    if data["skipped_images"]:
        logger.warning("%d of %d images of data.dataset=%r could not be decoded and were skipped; first: %s",
                       data["skipped_images"], data["images_seen"], cfg.data.dataset,
                       format_reasons(data["first_skipped"]))
    # No accelerator.end_training() here: it tears down the process group, and the caller still evaluates and
    # exports with it (training.run calls it last).
    return {"step": step, "output_dir": str(output_dir), "last_log": last_log, "accelerator": accelerator,
            "model": unwrapped, "resumed_from": start_step if checkpoint is not None else None, "data": data}


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


def eval_backbone(model) -> torch.nn.Module:
    """The backbone a method exports (and evaluation scores): its `backbone` export, else the first `backbone/*`."""
    exports = model.exports()
    if "backbone" in exports:
        return exports["backbone"]
    return next(module for name, module in exports.items() if name.startswith("backbone/"))


def cpu_threads(cfg: TrainConfig, num_processes: int, environ: dict[str, str] | None = None) -> int | None:
    """Torch threads for each CPU process, or None to leave them: OMP_NUM_THREADS (`accelerate launch` sets it)
    wins; then `train.cpu_threads`; else, with data workers, the process's share of the cores minus its workers —
    oversubscribed OpenMP threads spin-wait, measured 10x slower (3.3 vs 37 img/s for the quickstart, 2 cores)."""
    environ = os.environ if environ is None else environ
    if "OMP_NUM_THREADS" in environ:
        return None
    if cfg.train.cpu_threads:
        return cfg.train.cpu_threads
    if cfg.data.num_workers > 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, cores // num_processes - cfg.data.num_workers)
    return None


def _to_device(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    return value


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


def _all_finite(accelerator: Accelerator, loss: torch.Tensor) -> bool:
    flag = torch.isfinite(loss.detach()).float().reshape(1)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum") / accelerator.num_processes
    return bool(flag.item() == 1.0)


def _clip_gradients(accelerator: Accelerator, parts: dict[str, torch.nn.Module], max_norm: float) -> None:
    """Clip each trainable part (e.g. backbone, heads) separately, as the official DINOv2 loop does."""
    if not max_norm:
        return
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return  # DeepSpeed clips inside its step (gradient_clipping in configs/accelerate/deepspeed_zero2.yaml)
    accelerator.unscale_gradients()
    for module in parts.values():
        torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)


def _output_scalars(accelerator: Accelerator, out) -> dict[str, float | int]:
    """Every scalar field of the model's output, averaged over processes (integer fields stay integers)."""
    names, values, integer = [], [], []
    for name, value in out.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            names.append(name)
            integer.append(not value.is_floating_point())
            values.append(value.detach().float().reshape(()))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            names.append(name)
            integer.append(isinstance(value, int))
            values.append(torch.tensor(float(value)))
    if not names:
        return {}
    stacked = torch.stack([v.to(accelerator.device) for v in values])
    stacked = accelerator.reduce(stacked, reduction="mean") if accelerator.num_processes > 1 else stacked
    return {n: (round(v) if i else v) for n, v, i in zip(names, stacked.tolist(), integer)}
