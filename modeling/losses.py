"""DINOv2 losses as plain functions: teacher targets (Sinkhorn-Knopp, centered softmax), centers, DINO, iBOT, KoLeo.

Each function reproduces the official DINOv2 module it is named after (``dinov2/loss/*.py``) to within fp32
rounding, including under ``torch.distributed`` (default process group). State (the centers) is passed in and
returned instead of living in module buffers, so the caller decides where it is stored and checkpointed.

The file follows the official modules: teacher side (``softmax_center_teacher``, ``update_center``,
``sinkhorn_knopp_teacher``), then ``DINOLoss``, ``iBOTPatchLoss`` and ``KoLeoLoss``. How
``dinov2/train/ssl_meta_arch.py`` combines them:

* Teacher sees the 2 global crops only. Its CLS logits ``[2B, K]`` (crop-major) become targets with
  :func:`sinkhorn_knopp` or :func:`centered_softmax` (then :func:`update_center` with the same logits: the
  official code centers with the center *before* this step's update). :func:`teacher_targets` does both.
* DINO: each student global crop against the *other* teacher global crop, local crops against both;
  :func:`dino_crop_targets` and :func:`dino_crop_losses_from_rows` around one :func:`soft_cross_entropy` call.
* iBOT: the teacher logits of the masked patches of the global crops (``x[masks]`` order) go through the same
  target function (their own center); the loss is :func:`ibot_loss`, weight 1 (``* 2 * 1/2`` officially).
* KoLeo: ``sum(koleo_loss(c) for c in student_global_cls_before_head.chunk(2))`` times its weight (0.1); per
  crop, so two crops of one image are never each other's neighbour.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .fused_cross_entropy import fused_soft_cross_entropy, row_blocks

__all__ = [
    "centered_softmax",
    "dino_crop_losses_from_rows",
    "dino_crop_targets",
    "dino_loss",
    "ibot_loss",
    "ibot_loss_from_rows",
    "koleo_loss",
    "masked_patch_weights",
    "sinkhorn_knopp",
    "soft_cross_entropy",
    "teacher_targets",
    "update_center",
]


# --------------------------------------------------------------------------------------------------------------
# Teacher targets and centers (official softmax_center_teacher, update_center, sinkhorn_knopp_teacher)
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def centered_softmax(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """Official ``softmax_center_teacher``: ``softmax((logits - center) / T)`` over the last dim, in fp32.

    ``center`` may be ``[K]``, ``[1, K]`` (official DINO buffer) or ``[1, 1, K]`` (official iBOT buffer); the
    output always has the shape of ``teacher_logits``. Pass the center *before* this step's
    :func:`update_center` (the official module applies the pending update of the previous step first).
    """
    centered = teacher_logits.float() - center.float().reshape(-1)
    return F.softmax(centered / teacher_temp, dim=-1)


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float = 0.9) -> torch.Tensor:
    """EMA of the teacher logits' mean: ``center * m + batch_center * (1 - m)``; returns a new tensor.

    ``batch_center`` is the mean of the rows on each process, summed over processes (all-reduce) and divided
    by the world size, as the official DINO and iBOT centers compute it. For DINO every process holds the same
    number of rows, so this is the global row mean; for iBOT the caller passes the masked-patch logits, whose
    per-process counts differ, so it is the mean of per-process means (not the global row mean).

    Deviation for a degenerate case only: a process with no rows (no masked patch) would make the official
    center NaN on every process forever; here it is left out of the average (divided by the number of
    processes that had rows), and the center is returned unchanged if no process had any.
    """
    n_protos = center.numel()
    logits = teacher_logits.float().reshape(-1, n_protos)
    # One all-reduce carries both the summed means and how many processes contributed.
    stats = logits.new_zeros(n_protos + 1)
    if logits.shape[0] > 0:
        stats[:n_protos] = logits.mean(dim=0)
        stats[n_protos] = 1.0
    _all_reduce_(stats)
    n_contributing = stats[n_protos]
    batch_center = (stats[:n_protos] / n_contributing.clamp(min=1.0)).reshape(center.shape).to(center.dtype)
    updated = center * momentum + batch_center * (1 - momentum)
    # torch.where instead of a Python `if` keeps this free of a device->host sync.
    return torch.where(n_contributing > 0, updated, center)


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: torch.Tensor,
    teacher_temp: float,
    n_iterations: int = 3,
    n_samples: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Sinkhorn-Knopp teacher assignment (official ``sinkhorn_knopp_teacher``), global over all processes.

    ``teacher_logits`` is ``[..., K]`` (leading dims are samples); returns fp32 probabilities of the same shape
    whose rows sum to 1. Each iteration first gives every prototype the same total mass over the samples of
    *all* processes (all-reduce), then renormalises every sample; after the last iteration the rows are exact
    assignments and the global column sums are ≈ ``n_samples / K``.

    ``n_samples`` is the total number of rows over all processes (``B`` in the paper; official iBOT passes the
    all-reduced masked-patch count, DINO uses rows × world size, the default here). It is accepted for parity
    with the official signature only: the official code divides by ``B`` after each column normalisation and
    multiplies by ``B`` at the end, and the next normalisation cancels every such constant (as well as the
    initial division by the total and the ``1/K``), so the result does not depend on it. Callers therefore
    need not all-reduce a count for it.

    Unlike the official code, each prototype's logits are shifted by their global max before ``exp``: the
    official ``exp(logits / T)`` overflows fp32 once ``logits / T`` exceeds ~88 (low teacher temperatures, grown
    weight-norm gains). A per-prototype factor cancels exactly in the first prototype normalisation, so the
    result is otherwise equal.

    The iterations keep the result as ``diag(a) · Q · diag(b)`` with ``Q = exp(...)`` and update only the
    scaling vectors: a column normalisation is ``b = 1 / (aᵀQ)``, a row normalisation ``a = 1 / (Q b)``, two
    matrix-vector products that read ``Q`` once each instead of rewriting it. With 65,536 prototypes this runs on
    every step; the official in-place form traverses the ``[rows, K]`` matrix about 2.5x as often.
    """
    if n_iterations < 1:
        # With 0 iterations the official output is exp(l/T)/Σ·B: not an assignment and B-dependent.
        raise ValueError(f"sinkhorn_knopp needs n_iterations >= 1, got {n_iterations}")
    del n_samples  # cancels exactly, see docstring
    shape = teacher_logits.shape
    # fp32 like the official code: bf16/fp16 exponentials of logits / 0.04 lose the ordering of near-ties.
    logits = teacher_logits.float().reshape(-1, shape[-1])
    n_rows, n_cols = logits.shape
    shift = _global_column_max(logits).div_(-teacher_temp)
    q = torch.empty_like(logits)
    blocks = row_blocks(n_rows, n_cols)  # element-wise passes in cache-sized row blocks
    for r in blocks:  # exp(logits / T - max / T)
        torch.add(shift, logits[r : r + blocks.step], alpha=1.0 / teacher_temp, out=q[r : r + blocks.step]).exp_()
    row_scale = q.new_ones(n_rows)
    for _ in range(n_iterations):
        # Prototypes: each gets mass (global rows) / K, summed over the samples of all processes; the row count
        # rides along in the same all-reduce. (Targets consistent with the rows' total keep a and b bounded.)
        stats = _all_reduce_(torch.cat((row_scale @ q, q.new_full((1,), n_rows))))
        col_sums, total_rows = stats[:n_cols], stats[n_cols]
        col_scale = _safe_reciprocal(col_sums, total_rows / n_cols)
        # Samples: each row becomes a distribution over prototypes (local: a row lives on one process).
        row_scale = _safe_reciprocal(q @ col_scale, 1.0)
    for r in blocks:
        q[r : r + blocks.step].mul_(col_scale).mul_(row_scale[r : r + blocks.step, None])
    return q.reshape(shape)


@torch.no_grad()
def teacher_targets(
    teacher_logits: torch.Tensor,
    teacher_temp: float,
    centering: str,
    center: torch.Tensor,
    momentum: float = 0.9,
    n_iterations: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher probabilities and the next center, as ``ssl_meta_arch.get_teacher_output`` produces them.

    ``centering="softmax"``: :func:`centered_softmax` with the current center, then :func:`update_center` on
    the same logits. ``centering="sinkhorn_knopp"``: :func:`sinkhorn_knopp`; the center is returned
    unchanged (the official SK path never updates it). Use it for the DINO CLS logits ``[2B, K]`` and, with
    the iBOT center, for the masked-patch logits ``[n_masked, K]``.
    """
    if centering == "softmax":
        return centered_softmax(teacher_logits, center, teacher_temp), update_center(center, teacher_logits, momentum)
    if centering == "sinkhorn_knopp":
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations=n_iterations), center
    raise ValueError(f"centering must be 'softmax' or 'sinkhorn_knopp', got {centering!r}")


# --------------------------------------------------------------------------------------------------------------
# Student cross-entropy, shared by DINO and iBOT
# --------------------------------------------------------------------------------------------------------------


def soft_cross_entropy(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor | Sequence[torch.Tensor],
    student_temp: float,
) -> torch.Tensor:
    """Per row ``-Σ_k t · log_softmax(s / τ)`` for ``[rows, K]`` logits (fp32); no gradient to the teacher.

    ``teacher_probs`` is one tensor shaped like the logits, or a sequence of ``[r_i, K]`` tensors whose rows, in
    order, are the targets of the logits' rows (``Σ r_i = rows``): the same as concatenating them, without the
    copy. Targets need not sum to 1 (the cross-entropy is linear in the target). Computed by the fused kernel of
    :mod:`modeling.fused_cross_entropy` (one backward pass only).
    """
    if isinstance(teacher_probs, torch.Tensor):
        if teacher_probs.shape != student_logits.shape:
            raise ValueError(
                f"teacher {tuple(teacher_probs.shape)} and student {tuple(student_logits.shape)} shapes differ"
            )
        teacher_probs = [teacher_probs]
    n_cols = student_logits.shape[-1]
    targets = [t.reshape(-1, n_cols) for t in teacher_probs]
    return fused_soft_cross_entropy(student_logits.reshape(-1, n_cols), targets, student_temp)


# --------------------------------------------------------------------------------------------------------------
# DINO (official DINOLoss.forward, and ssl_meta_arch's crop pairing)
# --------------------------------------------------------------------------------------------------------------


def dino_loss(
    student_logits: Sequence[torch.Tensor] | torch.Tensor,
    teacher_probs: Sequence[torch.Tensor] | torch.Tensor,
    student_temp: float = 0.1,
) -> torch.Tensor:
    """Official ``DINOLoss.forward``: ``Σ_s Σ_t -mean_rows(Σ_k t · log_softmax(s / τ))`` over *every* pair.

    Both arguments are sequences of ``[B, K]`` tensors (or ``[n_crops, B, K]`` tensors). There is no
    normalisation and no pairing logic here; the official caller chooses pairs and divides, see
    :func:`dino_crop_targets`. Computed in fp32.
    """
    students = _crop_list(student_logits, "student_logits")
    teachers = _crop_list(teacher_probs, "teacher_probs")
    for t in teachers:
        if t.shape != students[0].shape:
            raise ValueError(f"teacher {tuple(t.shape)} and student {tuple(students[0].shape)} shapes differ")
    # The cross-entropy is linear in the target: Σ_t CE(s, t) = CE(s, Σ_t t), one pass per student crop.
    teacher_sum = teachers[0].float() if len(teachers) == 1 else torch.stack(teachers).float().sum(0)
    total = None
    for s in students:
        if s.shape != teacher_sum.shape:
            raise ValueError(f"teacher {tuple(teacher_sum.shape)} and student {tuple(s.shape)} shapes differ")
        term = soft_cross_entropy(s, teacher_sum, student_temp).mean()
        total = term if total is None else total + term
    return total


def dino_crop_targets(teacher_probs: torch.Tensor, n_global_crops: int, n_local_crops: int) -> list[torch.Tensor]:
    """Targets, as row segments for :func:`soft_cross_entropy`, of the student CLS rows
    ``[global crops (crop-major)..., local crops (crop-major)...]`` in the official pairing.

    ``teacher_probs`` is ``[n_global·B, K]``, crop-major like the student global rows. Global crop ``i`` is paired
    with every *other* teacher global crop (officially: the teacher chunks concatenated in reverse, one pair over
    ``2B`` rows times ``loss_scales = 2``), local crops with all of them. The cross-entropy is linear in the
    target, so a crop's several pairs are one target: the sum of its partners.
    """
    chunks = teacher_probs.float().chunk(n_global_crops)
    total = torch.stack(chunks).sum(0) if n_global_crops > 1 else chunks[0]
    if n_global_crops == 2:
        global_targets = [chunks[1], chunks[0]]
    else:
        global_targets = [total - chunk for chunk in chunks]
    return global_targets + [total] * n_local_crops


def dino_crop_losses_from_rows(
    per_row: torch.Tensor, batch: int, n_global_crops: int, n_local_crops: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dino_global_crops_loss, dino_local_crops_loss)`` as ``ssl_meta_arch`` forms them, from the per-row
    cross-entropies of the rows of :func:`dino_crop_targets`.

    Every pair's cross-entropy is a row mean over the batch and both terms are divided by the official
    ``n_terms = n_global·(n_global-1) + max(n_global·n_local, 1)``. Without local crops the local term is zero
    (the official code skips it, yet still counts ``max(0, 1) = 1`` local term in ``n_terms``). Multiply both
    by the DINO loss weight.
    """
    n_terms = n_global_crops * (n_global_crops - 1) + max(n_global_crops * n_local_crops, 1)
    n_global_rows = n_global_crops * batch
    global_loss = per_row[:n_global_rows].sum() / (batch * n_terms)
    if n_local_crops == 0:
        return global_loss, global_loss.new_zeros(())
    return global_loss, per_row[n_global_rows:].sum() / (batch * n_terms)


# --------------------------------------------------------------------------------------------------------------
# iBOT (official iBOTPatchLoss.forward_masked)
# --------------------------------------------------------------------------------------------------------------


def ibot_loss(
    student_masked_logits: torch.Tensor,
    teacher_masked_probs: torch.Tensor,
    masks: torch.Tensor,
    student_temp: float = 0.1,
) -> torch.Tensor:
    """Official ``iBOTPatchLoss.forward_masked``: masked-patch cross-entropy, image-balanced.

    ``masks`` is bool ``[B, N]`` (``[B, H, W]`` is flattened); the logits/probabilities are the rows of the
    masked patches only, ``[masks.sum(), K]`` in ``x[masks]`` (row-major) order. Each patch is weighted by
    1 / its image's masked count, and the sum is divided by ``B`` — all images, masked or not — so every
    masked image weighs the same whatever its mask size.

    The official call passes rows padded to an ``upperbound`` and truncates with ``n_masked_patches``, plus
    ``masks_weight`` from the collate; both equal what this function derives from ``masks`` when exactly the
    masked rows are given, which is the only form accepted here. Computed in fp32.
    """
    n_masked = masked_patch_weights(masks).shape[0]
    if student_masked_logits.shape[0] != n_masked or teacher_masked_probs.shape != student_masked_logits.shape:
        raise ValueError(
            f"ibot_loss expects [{n_masked}, K] rows (one per masked patch), got student "
            f"{tuple(student_masked_logits.shape)} and teacher {tuple(teacher_masked_probs.shape)}"
        )
    per_patch = soft_cross_entropy(student_masked_logits, teacher_masked_probs, student_temp)
    return ibot_loss_from_rows(per_patch, masks)


def ibot_loss_from_rows(per_patch: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """:func:`ibot_loss` from the masked patches' cross-entropies (``x[masks]`` order): image-balanced sum / B."""
    return (per_patch * masked_patch_weights(masks)).sum() / masks.shape[0]


def masked_patch_weights(masks: torch.Tensor) -> torch.Tensor:
    """Per masked patch, ``1 / (number of masked patches of its image)``, in ``x[masks]`` order (official collate)."""
    masks = masks.flatten(1).bool()
    per_image = 1.0 / masks.sum(dim=-1).clamp(min=1).float()
    return per_image.unsqueeze(-1).expand_as(masks)[masks]


# --------------------------------------------------------------------------------------------------------------
# KoLeo (official KoLeoLoss)
# --------------------------------------------------------------------------------------------------------------

# The official KoLeoLoss builds ``nn.PairwiseDistance(2, eps=1e-8)`` once; its eps is independent of the
# ``eps`` passed to forward (which only goes to the normalisation and the log).
_KOLEO_PDIST_EPS = 1e-8


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Official ``KoLeoLoss``: ``-mean log(d_nn + eps)`` on L2-normalised ``[B, D]`` features, in fp32.

    ``d_nn`` is the distance to the nearest *other* row (max inner product, self excluded by setting the
    diagonal to -1; first index on ties), measured with ``pairwise_distance(eps=1e-8)`` as the official
    ``nn.PairwiseDistance``. Local to the process (no gather), applied per global crop by the caller.
    """
    with torch.autocast(device_type=features.device.type, enabled=False):
        x = F.normalize(features.float(), p=2, dim=-1, eps=eps)
        # The neighbour search only picks indices, so it needs no autograd graph.
        with torch.no_grad():
            dots = x @ x.t()
            dots.fill_diagonal_(-1)
            nn_index = dots.argmax(dim=1)
        distances = F.pairwise_distance(x, x[nn_index], p=2, eps=_KOLEO_PDIST_EPS)
        return -torch.log(distances + eps).mean()


# --------------------------------------------------------------------------------------------------------------
# Helpers: distributed reductions (no-ops in a single process), argument checks
# --------------------------------------------------------------------------------------------------------------


def _all_reduce_(tensor: torch.Tensor, op: dist.ReduceOp | None = None) -> torch.Tensor:
    """In-place all-reduce (sum unless ``op`` says otherwise) over the default group, synchronous; returns ``tensor``."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op)
    return tensor


def _global_column_max(q: torch.Tensor) -> torch.Tensor:
    """Per-column max over the rows of all processes, ``[1, K]``; a process without rows contributes -inf."""
    if q.shape[0] > 0:
        col_max = q.amax(dim=0, keepdim=True)
    else:  # e.g. no masked patch in this process's iBOT batch
        col_max = q.new_full((1, q.shape[1]), float("-inf"))
    return _all_reduce_(col_max, dist.ReduceOp.MAX)


def _safe_reciprocal(sums: torch.Tensor, numerator: float | torch.Tensor) -> torch.Tensor:
    """``numerator / sums``, and 0 where a sum is 0 (a fully underflowed row or column stays 0, never NaN)."""
    return torch.where(sums > 0, numerator / sums.clamp_min(torch.finfo(sums.dtype).tiny), 0.0)


def _crop_list(crops: Sequence[torch.Tensor] | torch.Tensor, name: str) -> list[torch.Tensor]:
    """A sequence of ``[B, K]`` tensors, or a ``[n_crops, B, K]`` tensor iterated over its first dim."""
    if isinstance(crops, torch.Tensor):
        if crops.ndim != 3:
            # Iterating a 2-D tensor would silently treat every row as a "crop".
            raise ValueError(
                f"{name}: pass a list of [B, K] tensors or one [n_crops, B, K] tensor, got {tuple(crops.shape)}"
            )
        return list(crops.unbind(0))
    crops = list(crops)
    if not crops:
        raise ValueError(f"{name} is empty")
    return crops



# --------------------------------------------------------------------------------------------------------------
# Feature distillation (LightlyTrain-style): regress the student's (projected) features onto a frozen teacher's
# --------------------------------------------------------------------------------------------------------------


def feature_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Distance between student features and the teacher's, averaged over the rows (fp32; no gradient to the teacher).

    ``student`` and ``teacher`` are ``[..., D]`` of one shape (pooled embeddings ``[B, D]`` or dense features
    ``[B, h·w, D]``, the student's already projected to the teacher's width and resized to its grid).
    ``kind="mse"``: mean squared error over every element (LightlyTrain's ``DistillationV2Loss``, raw features);
    ``kind="cosine"``: mean of ``1 - cos`` over the feature vectors (scale-free)."""
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} features differ in shape")
    s, t = student.float(), teacher.detach().float()
    if kind == "mse":
        return F.mse_loss(s, t)
    if kind == "cosine":
        return (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    raise ValueError(f"kind must be 'mse' or 'cosine', got {kind!r}")


__all__ += ["feature_distillation_loss"]



# The contrastive family lives in its own file (one job each); its names stay importable from here.
from .contrastive_losses import (  # noqa: E402
    all_gather_with_grad,
    all_reduce_with_grad,
    barlow_twins_cross_correlation,
    barlow_twins_loss,
    barlow_twins_loss_from_correlation,
    clip_loss,
    copy_detection_infonce_loss,
    densecl_loss,
    gather_rows,
    moco_v3_loss,
    nt_xent_loss,
    off_diagonal,
)

__all__ += [
    "all_gather_with_grad",
    "all_reduce_with_grad",
    "barlow_twins_cross_correlation",
    "barlow_twins_loss",
    "barlow_twins_loss_from_correlation",
    "clip_loss",
    "copy_detection_infonce_loss",
    "densecl_loss",
    "gather_rows",
    "moco_v3_loss",
    "nt_xent_loss",
    "off_diagonal",
]
