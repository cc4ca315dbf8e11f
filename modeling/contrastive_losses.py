"""Contrastive and redundancy-reduction objectives: MoCo v3, Barlow Twins, DenseCL (two views, BatchNorm
projectors, momentum keys), SimCLR / SSCD NT-Xent and CLIP-style image-text alignment, as plain functions.

Each reproduces its reference (moco-v3 `contrastive_loss`, barlowtwins `BarlowTwins.forward`, DenseCL
`DenseCLNeck`/head, open_clip `ClipLoss`) to within fp32 rounding, including under ``torch.distributed``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .losses import _all_reduce_

__all__ = [
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

# --------------------------------------------------------------------------------------------------------------
# Objectives of the same family: MoCo v3, Barlow Twins, DenseCL (two views, BatchNorm projectors, momentum keys)
#
# Gradients under several processes: wherever the references combine processes, keys enter as constants (their
# `concat_all_gather` has no gradient) and batch statistics / correlations go through an autograd-aware
# all-reduce. The gradient each process gets is then that of the sum of every process's loss, so DDP's average
# over processes is the gradient of the loss of one process on the concatenated batch (tests/test_mocov3.py,
# tests/test_barlow_twins.py check this with 2 gloo processes).
# --------------------------------------------------------------------------------------------------------------


def moco_v3_loss(
    q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, temperature: float = 0.2
) -> torch.Tensor:
    """MoCo v3 symmetric InfoNCE (official ``MoCo.contrastive_loss``): ``ctr(q1, k2) + ctr(q2, k1)``.

    ``q*`` are this process's predictor outputs ``[B, D]``, ``k*`` the momentum projector outputs ``[B, D]`` of the
    same images (unnormalised; both are L2-normalised here). Each query is scored against the keys of *every*
    process (gathered, no gradient); its positive is the key of the same image. The cross-entropy is multiplied
    by ``2 * temperature``, as the official code does.
    """
    return _moco_contrastive(q1, k2, temperature) + _moco_contrastive(q2, k1, temperature)


def _moco_contrastive(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    if q.ndim != 2 or q.shape != k.shape:
        raise ValueError(f"queries and keys must both be [B, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.detach().float(), dim=1)
    keys, offset = gather_rows(k)
    logits = q @ keys.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + offset  # this process's images among all keys
    return F.cross_entropy(logits, labels) * (2 * temperature)


def barlow_twins_cross_correlation(
    z1: torch.Tensor, z2: torch.Tensor, *, normalize: bool = True, eps: float = 1e-5
) -> torch.Tensor:
    """The Barlow Twins cross-correlation ``[D, D]`` of two views' embeddings over the *global* batch.

    ``z1``, ``z2`` are this process's projector outputs ``[B, D]``. With ``normalize`` (the official ``self.bn``, a
    SyncBatchNorm without affine under DDP) each dimension is standardised with the mean and biased variance of
    the global batch (``eps`` inside the square root); ``c = z1ᵀ z2 / N`` with N the global batch, summed over
    processes. ``normalize=False`` skips the standardisation (only to show the collapse it prevents).
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must both be [B, D], got {tuple(z1.shape)} and {tuple(z2.shape)}")
    z1, z2 = z1.float(), z2.float()
    n = _all_reduce_(torch.tensor(float(z1.shape[0]), device=z1.device))  # global batch (a count: no gradient)
    if normalize:
        z1, z2 = _global_standardize(z1, n, eps), _global_standardize(z2, n, eps)
    return all_reduce_with_grad(z1.T @ z2 / n)


def barlow_twins_loss_from_correlation(c: torch.Tensor, lambd: float = 0.0051) -> torch.Tensor:
    """``Σ_i (1 - c_ii)² + λ Σ_{i≠j} c_ij²`` of a cross-correlation matrix (official ``BarlowTwins.forward``)."""
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    return on_diag + lambd * off_diagonal(c).pow(2).sum()


def barlow_twins_loss(
    z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051, *, normalize: bool = True
) -> torch.Tensor:
    """Barlow Twins (official ``BarlowTwins.forward``): on-diagonal + ``lambd`` · off-diagonal terms of the global
    cross-correlation (:func:`barlow_twins_cross_correlation`) of this process's projector outputs ``[B, D]``."""
    return barlow_twins_loss_from_correlation(barlow_twins_cross_correlation(z1, z2, normalize=normalize), lambd)


def off_diagonal(x: torch.Tensor) -> torch.Tensor:
    """The off-diagonal elements of a square matrix, flattened (row-major, a view-based gather, no mask)."""
    n, m = x.shape
    if n != m:
        raise ValueError(f"off_diagonal needs a square matrix, got {tuple(x.shape)}")
    # Dropping the first element and reading rows of n + 1 puts every diagonal element in the last column.
    return x.flatten()[1:].view(n - 1, n + 1)[:, :-1].flatten()


def densecl_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor,
    q_grid: torch.Tensor,
    k_grid: torch.Tensor,
    q_backbone: torch.Tensor,
    k_backbone: torch.Tensor,
    dense_queue: torch.Tensor,
    temperature: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DenseCL (official ``DenseCL.forward_train`` + ``ContrastiveHead``): ``(global_loss, dense_loss)``, unweighted.

    * ``q``, ``k`` ``[B, C]``: global query / key projections; ``queue`` ``[C, K]`` normalised past keys.
      Global InfoNCE: the positive is the key of the same image, the negatives the queue.
    * ``q_grid``, ``k_grid`` ``[B, C, S]``: dense projections at S locations; ``q_backbone``, ``k_backbone``
      ``[B, C', S]``: the backbone features at the same locations. Each query location is matched to the key
      location whose *backbone* feature is most cosine-similar (argmax); its dense projection is the positive,
      ``dense_queue`` ``[C, K]`` the negatives; every location of every image is one row of the cross-entropy.

    Everything except the queues is L2-normalised along the channel dimension here, as the official code does
    before the loss. Keys, queues and backbone features carry no gradient (the official keys come from the
    momentum encoder under ``no_grad``; the correspondence is an argmax).
    """
    if q.ndim != 2 or q.shape != k.shape or queue.ndim != 2 or queue.shape[0] != q.shape[1]:
        raise ValueError(f"q, k must be [B, C] and queue [C, K]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(queue.shape)}")
    if q_grid.ndim != 3 or q_grid.shape != k_grid.shape or dense_queue.shape[0] != q_grid.shape[1]:
        raise ValueError(f"q_grid, k_grid must be [B, C, S] and dense_queue [C, K]; got {tuple(q_grid.shape)}, "
                         f"{tuple(k_grid.shape)}, {tuple(dense_queue.shape)}")
    if q_backbone.shape[::2] != q_grid.shape[::2] or q_backbone.shape != k_backbone.shape:
        raise ValueError(f"q_backbone, k_backbone must be [B, C', S] like the grids {tuple(q_grid.shape)}; got "
                         f"{tuple(q_backbone.shape)}, {tuple(k_backbone.shape)}")
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.detach().float(), dim=1)
    q_grid = F.normalize(q_grid.float(), dim=1)
    k_grid = F.normalize(k_grid.detach().float(), dim=1)
    q_b = F.normalize(q_backbone.detach().float(), dim=1)
    k_b = F.normalize(k_backbone.detach().float(), dim=1)

    global_loss = _contrastive_head((q * k).sum(1, keepdim=True), q @ queue.detach().float(), temperature)

    # For each query location, the key location with the most similar backbone feature.
    match = torch.bmm(q_b.transpose(1, 2), k_b).max(dim=2).indices  # [B, S]
    matched_k = torch.gather(k_grid, 2, match.unsqueeze(1).expand(-1, k_grid.shape[1], -1))  # [B, C, S]
    dense_pos = (q_grid * matched_k).sum(1).reshape(-1, 1)  # [B·S, 1], image-major
    dense_neg = q_grid.transpose(1, 2).reshape(-1, q_grid.shape[1]) @ dense_queue.detach().float()
    return global_loss, _contrastive_head(dense_pos, dense_neg, temperature)


def _contrastive_head(pos: torch.Tensor, neg: torch.Tensor, temperature: float) -> torch.Tensor:
    """Official ``ContrastiveHead``: cross-entropy of ``[pos, neg] / T`` with the positive in column 0."""
    logits = torch.cat((pos, neg), dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def gather_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(rows of every process concatenated in rank order, index of this process's first row), without gradient
    (the official ``concat_all_gather``). Processes may hold different numbers of rows (e.g. a batch that lost an
    undecodable image); the official code assumes equal ones."""
    return all_gather_with_grad(tensor.detach())  # the same gather; a detached input has no backward


def all_reduce_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes that autograd sees through (its backward sums the gradients of every process); the
    identity in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    return _AllReduceSum.apply(tensor)


class _AllReduceSum(torch.autograd.Function):
    """y = Σ_processes x; the gradient of x is Σ_processes dL/dy: that of the sum of every process's loss."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _global_standardize(z: torch.Tensor, n: torch.Tensor, eps: float) -> torch.Tensor:
    """Batch normalisation without affine over the rows of all processes (mean, then biased variance)."""
    mean = all_reduce_with_grad(z.sum(0)) / n
    centered = z - mean
    var = all_reduce_with_grad(centered.pow(2).sum(0)) / n
    return centered / torch.sqrt(var + eps)




# --------------------------------------------------------------------------------------------------------------
# Image-text alignment (CLIP / LiT / dino.txt): the contrastive loss over the global batch
#
# Features of every process are gathered *with* gradients (open_clip's `gather_with_grad=True`, `local_loss=False`):
# each process computes the loss of the whole global batch, and the gather's backward sums every process's
# gradient for its own rows. Each process's gradient is then W × that of the global loss, and DDP's average over W
# processes gives exactly the gradient of one process on the concatenated batch (tests/test_text_alignment.py).
# --------------------------------------------------------------------------------------------------------------


def all_gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(rows of every process concatenated in rank order, index of this process's first row), differentiable: the
    gradient of this process's rows is the sum over processes of the gradients of their copies. Processes may
    hold different numbers of rows. The identity (offset 0) in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = torch.zeros(world, dtype=torch.long, device=tensor.device)
    sizes[rank] = tensor.shape[0]
    dist.all_reduce(sizes)
    counts = sizes.tolist()
    return _AllGatherRows.apply(tensor, counts, rank), sum(counts[:rank])


class _AllGatherRows(torch.autograd.Function):
    """y = concat of every process's rows (padded to the largest count for the collective); dL/dx = the slice of
    Σ_processes dL/dy that belongs to this process's rows."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, counts: list[int], rank: int) -> torch.Tensor:
        ctx.counts, ctx.rank = counts, rank
        padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:n] for p, n in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start : start + ctx.counts[ctx.rank]], None, None


def clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric contrastive loss over the global batch (open_clip ``ClipLoss(gather_with_grad=True)``).

    ``image_embeds``, ``text_embeds`` ``[B, D]``: this process's L2-normalised embeddings, row i of both from the
    same pair; ``logit_scale``: the multiplier (``exp`` of the learnt log-scale), a scalar tensor. Every image is
    scored against the texts of *all* processes and vice versa (gathered with gradients); the positives are the
    diagonal of the global similarity matrix; the loss is the mean of the image→text and text→image
    cross-entropies over the global batch — the same value on every process.
    """
    if image_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
        raise ValueError(f"image_embeds and text_embeds must both be [B, D], got {tuple(image_embeds.shape)} and "
                         f"{tuple(text_embeds.shape)}")
    all_images, _ = all_gather_with_grad(image_embeds)
    all_texts, _ = all_gather_with_grad(text_embeds)
    logits_per_image = logit_scale * all_images @ all_texts.T
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels)) / 2


# --------------------------------------------------------------------------------------------------------------
# SimCLR's NT-Xent, also SSCD's (copy detection, Pizzi et al. 2022) InfoNCE: both views of the global batch
# --------------------------------------------------------------------------------------------------------------


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent (google-research/simclr `add_contrastive_loss`; SSCD's InfoNCE): each of the 2B
    descriptors of this process is scored against every other descriptor of the global batch (both views of every
    process, gathered *with* gradient, itself excluded); its positive is the other view of the same image. ``z1``,
    ``z2`` ``[B, D]`` (L2-normalised here). Each process averages over its own 2B rows, so DDP's gradient average
    is the gradient of the global mean."""
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"the two views' descriptors must both be [B, D], got {tuple(z1.shape)} and {tuple(z2.shape)}")
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    all1, offset = all_gather_with_grad(z1)
    all2, _ = all_gather_with_grad(z2)
    n, b = all1.shape[0], z1.shape[0]
    logits = torch.cat((z1, z2)) @ torch.cat((all1, all2)).T / temperature
    rows = torch.arange(b, device=z1.device) + offset
    own = torch.cat((rows, rows + n))  # column of each local row itself ...
    positive = torch.cat((rows + n, rows))  # ... and of its other view
    logits[torch.arange(2 * b, device=z1.device), own] = float("-inf")
    # The reference sums its two views' means (loss_a + loss_b): 2x this value, the same minimiser.
    return F.cross_entropy(logits, positive)


def copy_detection_infonce_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """SSCD's InfoNCE: :func:`nt_xent_loss` at SSCD's temperature."""
    return nt_xent_loss(z1, z2, temperature)
