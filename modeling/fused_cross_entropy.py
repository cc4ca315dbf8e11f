"""Fused soft cross-entropy ``-Σ_k t · log_softmax(s / τ)`` per row, for ``[rows, K]`` logits with large K.

:func:`fused_soft_cross_entropy` is the one entry point (``modeling.losses.soft_cross_entropy`` calls it);
:func:`reference_soft_cross_entropy` is the same quantity with plain autograd, the specification the fused path
is tested against.

Why a kernel: autograd through ``log_softmax`` keeps several ``[rows, K]`` temporaries (log-probabilities, their
product with the target, their gradients); with K = 65,536 prototypes and ~700 rows per step that memory traffic
is a visible part of a step. Here forward computes ``p = softmax(s/τ)`` and ``Σt · logsumexp(s/τ) - <t, s/τ>`` in
row blocks and keeps only ``p``; backward turns ``p`` into the gradient ``(p · Σt - t) / τ`` in place. One
``[rows, K]`` buffer in all, and one ``exp`` per logit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

__all__ = ["fused_soft_cross_entropy", "reference_soft_cross_entropy", "row_blocks"]

# Row blocks of [rows, K] work: ~4 MiB of fp32 per block (16 rows at K = 65,536), so the element-wise passes over
# a block run in cache and memory is traversed once per block; smaller blocks cost more in per-op overhead (measured
# on 2 cores: cross-entropy fwd+bwd over [691, 65,536] 39 ms at 4 MiB, 48 ms at 1 MiB, 57 ms at 0.5 MiB).
_BLOCK_ELEMENTS = 1 << 20


def row_blocks(n_rows: int, n_cols: int) -> range:
    """Start rows of cache-sized blocks of a ``[n_rows, n_cols]`` matrix; ``.step`` is the block height."""
    return range(0, n_rows, max(1, _BLOCK_ELEMENTS // max(n_cols, 1)))


def fused_soft_cross_entropy(logits: torch.Tensor, targets: Sequence[torch.Tensor], temp: float) -> torch.Tensor:
    """Per row ``-Σ_k t · log_softmax(s / τ)`` of ``[rows, K]`` logits, in fp32; the targets get no gradient.

    ``targets`` are ``[r_i, K]`` row segments: ``targets[0]`` pairs with the first ``r_0`` logits rows, and so on
    (``Σ r_i = rows``). Callers can thus pair one logits tensor with targets held in several tensors, or reuse one
    target tensor for several row ranges, without concatenating them. Supports a single backward pass (the saved
    probabilities become the gradient in place).
    """
    targets = [t.detach().float() for t in targets]
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return _SoftCrossEntropy.apply(logits, temp, *targets)


def reference_soft_cross_entropy(logits: torch.Tensor, targets: Sequence[torch.Tensor], temp: float) -> torch.Tensor:
    """:func:`fused_soft_cross_entropy` with plain autograd (same arguments, same result up to fp32 rounding)."""
    target = torch.cat([t.detach().float() for t in targets])
    return -(target * F.log_softmax(logits.float() / temp, dim=-1)).sum(-1)


class _SoftCrossEntropy(torch.autograd.Function):
    """Forward keeps ``softmax(s/τ)`` only; backward rewrites it into the gradient (see the module docstring)."""

    @staticmethod
    def forward(ctx, student_logits: torch.Tensor, temp: float, *targets: torch.Tensor) -> torch.Tensor:
        logits = student_logits.float()
        n_rows, n_cols = logits.shape
        probs = torch.empty_like(logits)
        target_sum = logits.new_empty(n_rows)
        loss = logits.new_empty(n_rows)
        for r, r_end, target in _segment_blocks(targets, n_rows, n_cols):
            x, p = logits[r:r_end], probs[r:r_end]
            shift = x.amax(dim=-1, keepdim=True).div_(temp)
            torch.add(-shift, x, alpha=1.0 / temp, out=p).exp_()  # exp(s / τ - max / τ)
            sum_exp = p.sum(dim=-1, keepdim=True)
            p.div_(sum_exp)
            lse = sum_exp.log_().add_(shift).squeeze(-1)
            dot = (target * x).sum(dim=-1).div_(temp)  # (bmm here was ~10x slower on CPU for few rows)
            target_sum[r:r_end] = target.sum(dim=-1)
            loss[r:r_end] = lse * target_sum[r:r_end] - dot
        ctx.save_for_backward(probs, target_sum, *targets)
        ctx.temp, ctx.input_dtype, ctx.used = temp, student_logits.dtype, False
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.used:  # the saved probabilities became the gradient the first time
            raise RuntimeError("soft_cross_entropy supports one backward pass (no retain_graph=True)")
        ctx.used = True
        probs, target_sum, *targets = ctx.saved_tensors
        n_rows, n_cols = probs.shape
        scale = grad_out.float() / ctx.temp
        for r, r_end, target in _segment_blocks(targets, n_rows, n_cols):
            probs[r:r_end].mul_((target_sum[r:r_end] * scale[r:r_end])[:, None])
            probs[r:r_end].addcmul_(target, scale[r:r_end, None], value=-1.0)
        return (probs.to(ctx.input_dtype), None, *([None] * len(targets)))


def _segment_blocks(
    targets: Sequence[torch.Tensor], n_rows: int, n_cols: int
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(row, row_end, target rows)`` blocks over consecutive target segments covering ``n_rows`` logits rows."""
    if sum(t.shape[0] for t in targets) != n_rows:
        raise ValueError(
            f"targets cover {sum(t.shape[0] for t in targets)} rows, the logits have {n_rows}: give one target row "
            "per logits row"
        )
    offset = 0
    for target in targets:
        blocks = row_blocks(target.shape[0], n_cols)
        for r in blocks:
            r_end = min(r + blocks.step, target.shape[0])
            yield offset + r, offset + r_end, target[r:r_end]
        offset += target.shape[0]
