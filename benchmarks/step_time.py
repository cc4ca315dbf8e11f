"""Time one full DINOv2 pretraining step against the bare backbone work it contains.

    python benchmarks/step_time.py [--batch 8] [--steps 3] [--device cpu|cuda]

Full step: ViT-S/14 with the default heads (shared DINO/iBOT head, 65,536 prototypes), 2×224 + 8×98 crops,
student fwd+bwd, teacher fwd, heads, Sinkhorn-Knopp, losses, AdamW step, EMA update — driven through the method
protocol as `training/loop.py` drives it (parameter groups of `trainable_parts()`, per-part clipping, the step
state saved for a skipped step, `after_optimizer_step`).
Bare work: the same crops through timm's `vit_small_patch14_dinov2` (`dynamic_img_size=True`): fwd+bwd for the
student plus a no-grad fwd of the teacher on the global crops, nothing else. Prints the median of the timed steps
(after one warm-up) and `ratio: X` = full / bare (target ≤ 1.15). On CPU both run with malloc keeping freed memory,
as `train.py` does (training/cpu_memory.py; `DINOFORGE_MALLOC_TUNING=0` measures without).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling import DinoForPretraining, DinoPretrainingConfig, DinoVisionConfig  # noqa: E402
from training.cpu_memory import keep_freed_memory  # noqa: E402
from training.param_groups import apply_schedule, param_groups  # noqa: E402


def make_batch(batch: int, n_local: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    global_crops = torch.randn(2 * batch, 3, 224, 224, generator=g).to(device)
    local_crops = torch.randn(n_local * batch, 3, 98, 98, generator=g).to(device)
    n_patches = 16 * 16
    masks = torch.zeros(2 * batch, n_patches, dtype=torch.bool)
    # half the images masked with ratios spread over [0.1, 0.5], like the official collate
    for i, r in enumerate(torch.linspace(0.1, 0.5, batch)):
        masks[2 * i, torch.randperm(n_patches, generator=g)[: int(r * n_patches)]] = True
    return global_crops, local_crops, masks.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, steps: int, device: torch.device) -> float:
    step()  # warm-up
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def full_step_fn(batch, device: torch.device):
    global_crops, local_crops, masks = batch
    backbone = DinoVisionConfig.from_preset("vits14", drop_path_rate=0.0)
    model = DinoForPretraining(DinoPretrainingConfig(backbone_config=backbone, centering="sinkhorn_knopp"))
    model.to(device).train()
    optimizer = torch.optim.AdamW(param_groups(model.trainable_parts(), 0.9, 0.2), lr=0.0, fused=True)
    apply_schedule(optimizer, 1e-4, 1e-4, 0.04)

    def step():
        optimizer.zero_grad(set_to_none=True)
        [t.clone() for t in model.step_state()]  # the loop keeps them to restore a skipped step
        out = model(global_crops=global_crops, local_crops=local_crops, masks=masks, teacher_temp=0.07)
        out.loss.backward()
        for part in model.trainable_parts().values():
            torch.nn.utils.clip_grad_norm_(part.parameters(), 3.0)
        optimizer.step()
        model.after_optimizer_step(momentum=0.992, teacher_temp=0.07)

    return step


def bare_step_fn(batch, device: torch.device):
    import timm

    global_crops, local_crops, _ = batch
    student = timm.create_model("vit_small_patch14_dinov2", pretrained=False, dynamic_img_size=True, img_size=224)
    teacher = timm.create_model("vit_small_patch14_dinov2", pretrained=False, dynamic_img_size=True, img_size=224)
    student.to(device).train()
    teacher.to(device).eval().requires_grad_(False)

    def step():
        student.zero_grad(set_to_none=True)
        with torch.no_grad():
            teacher.forward_features(global_crops)
        loss = student.forward_features(global_crops).float().mean() + student.forward_features(local_crops).float().mean()
        loss.backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--local", type=int, default=8, help="local crops per image")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    # As train.py does on CPU (both measurements run under it): malloc keeps freed memory instead of unmapping it.
    malloc_tuned = device.type == "cpu" and keep_freed_memory()
    torch.manual_seed(0)
    batch = make_batch(args.batch, args.local, device)
    bare = time_steps(bare_step_fn(batch, device), args.steps, device)
    full = time_steps(full_step_fn(batch, device), args.steps, device)
    print(
        f"device: {device}, threads: {torch.get_num_threads()}, batch {args.batch}, 2x224 + {args.local}x98 crops, "
        f"malloc keeps freed memory: {malloc_tuned}"
    )
    print(f"{'work':<40}{'median s/step':>15}")
    print(f"{'bare backbone (timm fwd+bwd, teacher fwd)':<40}{bare:>15.3f}")
    print(f"{'full dinoforge pretraining step':<40}{full:>15.3f}")
    print(f"ratio: {full / bare:.3f}")


if __name__ == "__main__":
    main()
