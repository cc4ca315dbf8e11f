"""Parity with the official DINOv2 code (facebookresearch/dinov2), which is not a dependency.

Runs only when ``DINOFORGE_OFFICIAL_DINOV2`` names a directory holding the official ``dinov2`` package (e.g. a
checkout of the repository); otherwise the whole module is skipped. Example::

    DINOFORGE_OFFICIAL_DINOV2=/path/to/dinov2_checkout pytest tests/test_official_parity.py

``import_official(name)`` / the ``official`` fixture are the shared entry point for every parity test here
(losses now; backbone tests can use the same helper).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_losses import dino_crop_losses  # the model's DINO pieces composed over whole crops

from modeling import losses

OFFICIAL_ENV = "DINOFORGE_OFFICIAL_DINOV2"
ATOL = 1e-5

pytestmark = pytest.mark.skipif(
    not os.environ.get(OFFICIAL_ENV),
    reason=f"set {OFFICIAL_ENV} to a directory containing the official `dinov2` package to run parity tests",
)


def import_official(name: str):
    """Import ``name`` (e.g. ``"dinov2.loss"``) from the official checkout named by ``DINOFORGE_OFFICIAL_DINOV2``."""
    root = Path(os.environ.get(OFFICIAL_ENV, ""))
    if not (root / "dinov2" / "__init__.py").is_file():
        pytest.fail(f"{OFFICIAL_ENV}={root} does not contain the official package (expected {root}/dinov2/__init__.py)")
    # The official modules pick xFormers kernels when importable; the references here are the plain torch paths.
    os.environ.setdefault("XFORMERS_DISABLED", "1")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def official():
    """The official ``dinov2.loss`` package."""
    return import_official("dinov2.loss")


def max_delta(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def report(name: str, deltas: dict[str, float]) -> None:
    """Print the measured max |Δ| (visible with ``pytest -s``) and check them."""
    print(f"\n{name}: " + ", ".join(f"{k}={v:.2e}" for k, v in deltas.items()))
    bad = {k: v for k, v in deltas.items() if not v <= ATOL}
    assert not bad, f"{name}: max |Δ| above {ATOL}: {bad}"


def no_dist_all_reduce(official_pkg, monkeypatch) -> None:
    """The official iBOT SK all-reduces the masked count even without a process group; make that a no-op."""
    ibot_module = importlib.import_module(official_pkg.__name__ + ".ibot_patch_loss")
    monkeypatch.setattr(
        ibot_module, "dist", SimpleNamespace(all_reduce=lambda *a, **k: None, is_initialized=lambda: False)
    )


def random_masks(generator: torch.Generator, n_images: int, n_patches: int) -> torch.Tensor:
    """Bool masks like the official collate: about half the images masked, at various ratios."""
    masks = torch.zeros(n_images, n_patches, dtype=torch.bool)
    for i in range(0, n_images, 2):
        ratio = 0.1 + 0.4 * torch.rand((), generator=generator).item()
        masks[i, torch.randperm(n_patches, generator=generator)[: max(1, int(ratio * n_patches))]] = True
    return masks


# ----------------------------------------------------------------------------------------------------------------
# Shared comparisons: run in one process here, and on every rank of a 2-process gloo group below.
# ----------------------------------------------------------------------------------------------------------------


def compare_teacher_side(official_pkg, seed: int, n_masked: int) -> dict[str, float]:
    """SK and centering (DINO + iBOT, several steps, deferred official center updates) on this process's rows."""
    gen = torch.Generator().manual_seed(seed)
    k, n_cls, deltas = 32, 12, {}
    # Head outputs are cosine-like (L2-normalised bottleneck, normalised weights): keep |logits| <= 1 so that
    # the official exp(logits / T) stays finite.
    cls_logits = torch.rand(n_cls, k, generator=gen) * 2 - 1
    patch_logits = torch.rand(n_masked, k, generator=gen) * 2 - 1

    dino_official = official_pkg.DINOLoss(k)
    for temp in (0.04, 0.07):
        ref = dino_official.sinkhorn_knopp_teacher(cls_logits.clone(), temp)
        deltas[f"dino_sk_T{temp}"] = max_delta(ref, losses.sinkhorn_knopp(cls_logits, temp))
    ibot_official = official_pkg.iBOTPatchLoss(k)
    world = dist.get_world_size() if dist.is_initialized() else 1
    count = torch.tensor([n_masked])
    ibot_sk = ibot_official.sinkhorn_knopp_teacher(patch_logits.clone(), 0.07, n_masked_patches_tensor=count)
    total = int(count) if world > 1 else n_masked  # the official call all-reduced `count` in place
    deltas["ibot_sk"] = max_delta(ibot_sk, losses.sinkhorn_knopp(patch_logits, 0.07, n_samples=total))

    # Softmax centering over 3 steps, as ssl_meta_arch: center with the previous center, then queue the update.
    dino_center, ibot_center = torch.zeros(1, k), torch.zeros(1, 1, k)
    for step in range(3):
        x_cls = cls_logits + 0.3 * step
        x_patch = patch_logits - 0.2 * step
        ref = dino_official.softmax_center_teacher(x_cls, teacher_temp=0.07)
        dino_official.update_center(x_cls)
        ours = losses.centered_softmax(x_cls, dino_center, 0.07)
        dino_center = losses.update_center(dino_center, x_cls, momentum=0.9)
        deltas[f"dino_centered_softmax_step{step}"] = max_delta(ref, ours)

        x_patch_official = x_patch.unsqueeze(0)  # the official code adds a leading dim for the iBOT center
        ref = ibot_official.softmax_center_teacher(x_patch_official[:, :n_masked], teacher_temp=0.07).squeeze(0)
        ibot_official.update_center(x_patch_official[:n_masked])
        ours = losses.centered_softmax(x_patch, ibot_center, 0.07)
        ibot_center = losses.update_center(ibot_center, x_patch, momentum=0.9)
        deltas[f"ibot_centered_softmax_step{step}"] = max_delta(ref, ours)
    dino_official.apply_center_update()
    ibot_official.apply_center_update()
    deltas["dino_center"] = max_delta(dino_official.center, dino_center)
    deltas["ibot_center"] = max_delta(ibot_official.center, ibot_center)
    assert ibot_official.center.shape == ibot_center.shape and dino_official.center.shape == dino_center.shape
    return deltas


def compare_student_side(official_pkg, seed: int) -> dict[str, float]:
    """Loss values and gradients: DINO (incl. ssl_meta_arch's pairing), iBOT (forward, forward_masked), KoLeo."""
    gen = torch.Generator().manual_seed(seed)
    batch, k, n_local, n_patches, deltas = 4, 24, 3, 9, {}
    dino_official, ibot_official, koleo_official = (
        official_pkg.DINOLoss(k),
        official_pkg.iBOTPatchLoss(k),
        official_pkg.KoLeoLoss(),
    )

    def leaf(*shape):
        return torch.randn(*shape, generator=gen).requires_grad_()

    def probs(*shape):
        return torch.softmax(torch.randn(*shape, generator=gen) / 0.07, dim=-1)

    # DINOLoss.forward on plain lists, values and student gradients.
    students, teachers = [leaf(batch, k) for _ in range(3)], [probs(batch, k) for _ in range(2)]
    ref = dino_official(students, teachers)
    ref_grads = torch.autograd.grad(ref, students)
    ours = losses.dino_loss(students, teachers, 0.1)
    our_grads = torch.autograd.grad(ours, students)
    deltas["dino_forward"] = max_delta(ref, ours)
    deltas["dino_forward_grad"] = max(max_delta(a, b) for a, b in zip(ref_grads, our_grads))

    # ssl_meta_arch pairing: teacher chunks swapped, global pair x2, everything / (n_global_terms + n_local_terms).
    for n_loc in (n_local, 0):
        s_global, s_local, teacher = leaf(2 * batch, k), leaf(n_loc * batch, k), probs(2 * batch, k)
        t_chunks = teacher.view(2, batch, k)
        t_swapped = torch.cat((t_chunks[1], t_chunks[0])).view(2, batch, k)
        n_terms = 2 + max(2 * n_loc, 1)
        ref_global = dino_official([s_global], [t_swapped.flatten(0, 1)]) * 2 / n_terms
        ref_local = dino_official(s_local.chunk(n_loc), t_swapped) / n_terms if n_loc else torch.zeros(())
        our_global, our_local = dino_crop_losses(s_global, s_local, teacher, student_temp=0.1)
        deltas[f"dino_global_nlocal{n_loc}"] = max_delta(ref_global, our_global)
        deltas[f"dino_local_nlocal{n_loc}"] = max_delta(ref_local, our_local)

    # iBOT: forward (dense tokens) and forward_masked (default weights; collate weights + padded buffer).
    masks = random_masks(gen, 2 * batch, n_patches)
    n_masked = int(masks.sum())
    s_dense, t_dense = leaf(2 * batch, n_patches, k), probs(2 * batch, n_patches, k)
    s_masked, t_masked = s_dense[masks], t_dense[masks]
    ours = losses.ibot_loss(s_masked, t_masked, masks, 0.1)
    ref_dense = ibot_official(s_dense, t_dense, masks)
    ref_masked = ibot_official.forward_masked(s_masked, t_masked, student_masks_flat=masks)
    collate_weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    upperbound = n_masked + 5
    s_buffer = torch.cat([s_masked, s_masked.new_zeros(upperbound - n_masked, k)])[:n_masked]
    ref_padded = ibot_official.forward_masked(
        s_buffer, t_masked, student_masks_flat=masks, n_masked_patches=n_masked, masks_weight=collate_weight
    )
    deltas["ibot_forward"] = max_delta(ref_dense, ours)
    deltas["ibot_forward_masked"] = max_delta(ref_masked, ours)
    deltas["ibot_forward_masked_collate"] = max_delta(ref_padded, ours)
    deltas["ibot_grad"] = max_delta(
        torch.autograd.grad(ref_masked, s_dense, retain_graph=True)[0], torch.autograd.grad(ours, s_dense)[0]
    )
    deltas["ibot_masks_weight"] = max_delta(collate_weight, losses.masked_patch_weights(masks))

    # KoLeo on each global crop's CLS features, values and gradients.
    for n_rows in (2, 8, 33):
        feats = leaf(n_rows, 16)
        ref, ours = koleo_official(feats), losses.koleo_loss(feats)
        deltas[f"koleo_n{n_rows}"] = max_delta(ref, ours)
        deltas[f"koleo_grad_n{n_rows}"] = max_delta(
            torch.autograd.grad(ref, feats)[0], torch.autograd.grad(ours, feats)[0]
        )
    return deltas


# ----------------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::FutureWarning")  # official KoLeo uses torch.cuda.amp.autocast
def test_losses_match_official_single_process(official, monkeypatch):
    no_dist_all_reduce(official, monkeypatch)
    report("single-process teacher side", compare_teacher_side(official, seed=0, n_masked=11))
    report("single-process student side", compare_student_side(official, seed=1))


def _parity_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import warnings

    warnings.simplefilter("ignore", FutureWarning)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        official_pkg = import_official("dinov2.loss")
        # Different rows on each rank, and (as for iBOT) different masked counts.
        deltas = compare_teacher_side(official_pkg, seed=10 + rank, n_masked=(11, 6)[rank])
        deltas.update(compare_student_side(official_pkg, seed=20 + rank))
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(deltas))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_losses_match_official_two_process_gloo(official, tmp_path):
    mp.spawn(_parity_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        report(f"2-process gloo, rank {rank}", json.loads((tmp_path / f"rank{rank}.json").read_text()))
