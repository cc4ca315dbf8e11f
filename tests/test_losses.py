"""Tests for modeling.losses and the fused cross-entropy: hand values, invariants, loop references, 2-process gloo."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import modeling.fused_cross_entropy as fused_ce
from modeling.fused_cross_entropy import fused_soft_cross_entropy, reference_soft_cross_entropy
from modeling.losses import (
    centered_softmax,
    dino_crop_losses_from_rows,
    dino_crop_targets,
    dino_loss,
    ibot_loss,
    koleo_loss,
    masked_patch_weights,
    sinkhorn_knopp,
    soft_cross_entropy,
    teacher_targets,
    update_center,
)

ATOL = 1e-5


def dino_crop_losses(
    student_global_logits: torch.Tensor,
    student_local_logits: torch.Tensor | None,
    teacher_probs: torch.Tensor,
    n_global_crops: int = 2,
    student_temp: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dino_global_crops_loss, dino_local_crops_loss)`` from whole crops, the way DinoForPretraining forms them.

    Crop-major inputs: ``student_global_logits`` and ``teacher_probs`` ``[n_global·B, K]`` in the same crop
    order, ``student_local_logits`` ``[n_local·B, K]`` or ``None``. Composes the model's pieces
    (:func:`dino_crop_targets`, one :func:`soft_cross_entropy`, :func:`dino_crop_losses_from_rows`) so that this
    module and the official-parity tests can check them against references of the official pairing.
    """
    if teacher_probs.shape != student_global_logits.shape or teacher_probs.shape[0] % n_global_crops:
        raise ValueError(
            f"teacher_probs {tuple(teacher_probs.shape)} and student_global_logits "
            f"{tuple(student_global_logits.shape)} must both be [{n_global_crops}·B, K]"
        )
    batch = teacher_probs.shape[0] // n_global_crops
    n_local_rows = 0 if student_local_logits is None else student_local_logits.shape[0]
    if batch == 0 or n_local_rows % batch:
        raise ValueError(f"student_local_logits has {n_local_rows} rows, not a multiple of the batch size {batch}")
    n_local_crops = n_local_rows // batch
    rows = student_global_logits if n_local_crops == 0 else torch.cat((student_global_logits, student_local_logits))
    per_row = soft_cross_entropy(rows, dino_crop_targets(teacher_probs, n_global_crops, n_local_crops), student_temp)
    return dino_crop_losses_from_rows(per_row, batch, n_global_crops, n_local_crops)


# ----------------------------------------------------------------------------------------------------------------
# Independent references: explicit loops over Python floats (float64), no vectorised torch ops.
# ----------------------------------------------------------------------------------------------------------------


def ref_sinkhorn(logits: torch.Tensor, temp: float, n_iterations: int) -> torch.Tensor:
    """The paper's algorithm with its constants (mass 1/K per prototype, 1/B per sample), literally."""
    rows = logits.double().tolist()
    n_samples, n_protos = len(rows), len(rows[0])
    q = [[math.exp(rows[b][k] / temp) for b in range(n_samples)] for k in range(n_protos)]  # K x B
    total = sum(sum(r) for r in q)
    q = [[v / total for v in r] for r in q]
    for _ in range(n_iterations):
        for k in range(n_protos):
            s = sum(q[k])
            q[k] = [v / s / n_protos for v in q[k]]
        for b in range(n_samples):
            s = sum(q[k][b] for k in range(n_protos))
            for k in range(n_protos):
                q[k][b] = q[k][b] / s / n_samples
    return torch.tensor([[q[k][b] * n_samples for k in range(n_protos)] for b in range(n_samples)])


def ref_cross_entropy(student_row: list[float], teacher_row: list[float], temp: float) -> float:
    """-Σ_k t_k log softmax(s / temp)_k for one row."""
    scaled = [v / temp for v in student_row]
    top = max(scaled)
    log_norm = top + math.log(sum(math.exp(v - top) for v in scaled))
    return -sum(t * (v - log_norm) for t, v in zip(teacher_row, scaled))


def ref_dino(students: list[torch.Tensor], teachers: list[torch.Tensor], temp: float) -> float:
    total = 0.0
    for s in students:
        for t in teachers:
            s_rows, t_rows = s.double().tolist(), t.double().tolist()
            total += sum(ref_cross_entropy(a, b, temp) for a, b in zip(s_rows, t_rows)) / len(s_rows)
    return total


def ref_ibot(student: torch.Tensor, teacher: torch.Tensor, masks: torch.Tensor, temp: float) -> float:
    s_rows, t_rows, mask_rows = student.double().tolist(), teacher.double().tolist(), masks.tolist()
    total, row = 0.0, 0
    for image_mask in mask_rows:
        n_masked = sum(image_mask)
        image_loss = 0.0
        for is_masked in image_mask:
            if is_masked:
                image_loss += ref_cross_entropy(s_rows[row], t_rows[row], temp)
                row += 1
        total += image_loss / max(n_masked, 1)
    return total / len(mask_rows)


def ref_koleo(features: torch.Tensor, eps: float = 1e-8) -> float:
    points = []
    for f in features.double().tolist():
        norm = max(math.sqrt(sum(v * v for v in f)), eps)
        points.append([v / norm for v in f])
    total = 0.0
    for i, p in enumerate(points):
        nearest = min(math.dist(p, q) for j, q in enumerate(points) if j != i)
        total += -math.log(nearest + eps)
    return total / len(points)


def close(a, b, atol: float = ATOL) -> bool:
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=atol)


# ----------------------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp
# ----------------------------------------------------------------------------------------------------------------


def test_sinkhorn_matches_loop_reference():
    torch.manual_seed(0)
    for n_iterations in (1, 3, 5):
        logits = torch.rand(7, 5) * 2 - 1
        got = sinkhorn_knopp(logits, 0.1, n_iterations=n_iterations)
        assert close(got, ref_sinkhorn(logits, 0.1, n_iterations))


def test_sinkhorn_row_blocks_do_not_change_the_result(monkeypatch):
    logits = torch.randn(29, 40)
    whole = sinkhorn_knopp(logits, 0.07)
    monkeypatch.setattr(fused_ce, "_BLOCK_ELEMENTS", 3 * 40)  # 3-row blocks, the last one short
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.07), whole, rtol=0, atol=0)


def test_sinkhorn_marginals():
    torch.manual_seed(1)
    n_samples, n_protos = 12, 4
    logits = torch.rand(n_samples, n_protos) * 2 - 1
    q = sinkhorn_knopp(logits, 0.1)
    assert q.dtype == torch.float32 and q.shape == logits.shape
    # The last step normalises samples: rows are exact assignments ...
    assert close(q.sum(-1), torch.ones(n_samples))
    # ... the total mass is B, and the prototype marginals only approach B/K: after 3 iterations they are
    # closer to uniform than the plain softmax's, yet not uniform; more iterations converge to B/K.
    uniform = torch.full((n_protos,), n_samples / n_protos)
    assert close(q.sum(), n_samples)

    def imbalance(p):
        return (p.sum(0) - uniform).abs().max()

    assert 1e-2 < imbalance(q) < imbalance(torch.softmax(logits / 0.1, -1))
    assert imbalance(sinkhorn_knopp(logits, 0.1, n_iterations=10)) < imbalance(q)
    assert imbalance(sinkhorn_knopp(logits, 0.1, n_iterations=200)) < 1e-4


def test_sinkhorn_limits():
    # Uniform logits -> uniform assignment.
    assert close(sinkhorn_knopp(torch.zeros(6, 3), 0.05), torch.full((6, 3), 1 / 3))
    # Very low temperature, each sample preferring a different prototype -> one-hot (a permutation).
    logits = torch.eye(4)[[2, 0, 3, 1]] * 0.5
    q = sinkhorn_knopp(logits, 1e-3)
    assert close(q, torch.eye(4)[[2, 0, 3, 1]], atol=1e-6)
    # logits / T = 500 overflows exp() in fp32; the log-domain version stays finite.
    assert torch.isfinite(sinkhorn_knopp(torch.rand(5, 3), 1e-3)).all()


def test_sinkhorn_invariances_and_shapes():
    torch.manual_seed(2)
    logits = torch.rand(8, 6) * 2 - 1
    q = sinkhorn_knopp(logits, 0.07)
    # A per-prototype offset is absorbed by the first prototype normalisation; n_samples cancels out.
    assert close(sinkhorn_knopp(logits + torch.randn(1, 6), 0.07), q)
    assert close(sinkhorn_knopp(logits, 0.07, n_samples=123), q)
    # bf16 input is computed in fp32; leading dims are flattened and restored.
    assert sinkhorn_knopp(logits.bfloat16(), 0.07).dtype == torch.float32
    assert close(sinkhorn_knopp(logits.reshape(2, 4, 6), 0.07).reshape(8, 6), q)
    with pytest.raises(ValueError, match="n_iterations"):
        sinkhorn_knopp(logits, 0.07, n_iterations=0)


# ----------------------------------------------------------------------------------------------------------------
# Centering
# ----------------------------------------------------------------------------------------------------------------


def test_centered_softmax_hand_values():
    logits = torch.tensor([[1.0, 2.0], [3.0, 3.0]])
    center = torch.tensor([1.0, 0.0])
    e2 = math.exp(2.0)
    # (logits - center) / 1 = [[0, 2], [2, 3]]
    expected = torch.tensor([[1 / (1 + e2), e2 / (1 + e2)], [1 / (1 + math.e), math.e / (1 + math.e)]])
    assert close(centered_softmax(logits, center, 1.0), expected)
    # Temperature 0.5 doubles the centered logits: [0, 4] -> softmax.
    e4 = math.exp(4.0)
    assert close(centered_softmax(logits[:1], center, 0.5), torch.tensor([[1 / (1 + e4), e4 / (1 + e4)]]))
    # The official DINO ([1, K]) and iBOT ([1, 1, K]) center shapes give the logits' shape back.
    for shape in ((1, 2), (1, 1, 2)):
        assert centered_softmax(logits, center.reshape(shape), 1.0).shape == logits.shape


def test_update_center_hand_values():
    center = torch.zeros(1, 1, 2)
    logits = torch.tensor([[1.0, 3.0], [3.0, 5.0]])  # row mean [2, 4]
    new = update_center(center, logits, momentum=0.9)
    assert new.shape == center.shape
    assert close(new.reshape(-1), [0.2, 0.4])
    new2 = update_center(new, logits, momentum=0.5)
    assert close(new2.reshape(-1), [0.1 + 1.0, 0.2 + 2.0])
    assert center.abs().sum() == 0  # input untouched
    # No rows at all: the center is kept (the official code would produce NaN).
    assert close(update_center(new, logits[:0]), new)


def test_teacher_targets_dispatch():
    torch.manual_seed(3)
    logits, center = torch.randn(6, 5), torch.randn(1, 5)
    probs, new_center = teacher_targets(logits, 0.07, "softmax", center, momentum=0.8)
    assert close(probs, centered_softmax(logits, center, 0.07))
    assert close(new_center, update_center(center, logits, 0.8))
    probs, same_center = teacher_targets(logits, 0.07, "sinkhorn_knopp", center)
    assert close(probs, sinkhorn_knopp(logits, 0.07)) and same_center is center
    with pytest.raises(ValueError, match="centering"):
        teacher_targets(logits, 0.07, "centering", center)


# ----------------------------------------------------------------------------------------------------------------
# Soft cross-entropy: the fused kernel against the plain autograd reference
# ----------------------------------------------------------------------------------------------------------------


def _cross_entropy_case(name: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(logits, target segments)`` for :func:`test_fused_soft_cross_entropy_matches_reference`."""
    g = torch.Generator().manual_seed(0)

    def probs(n: int, k: int) -> torch.Tensor:
        return torch.softmax(torch.randn(n, k, generator=g) * 2, -1)

    if name == "one_row":
        return torch.randn(1, 7, generator=g), [probs(1, 7)]
    if name == "segments":  # unnormalised segments, like DINO's sums of partner crops
        return torch.randn(37, 50, generator=g) * 3, [probs(5, 50), probs(12, 50) * 2, probs(20, 50)]
    if name == "zero_targets":  # all-zero target rows (and an empty segment) contribute 0 and no gradient
        t = probs(23, 64)
        t[[0, 7, 8, 22]] = 0
        return torch.randn(23, 64, generator=g) * 3, [t[:9], t[9:9], t[9:]]
    if name == "extreme":
        # |s/τ| up to 1e5: exp overflows fp32 without the max shift; rows of equal, huge negative, masked-out logits
        x = torch.randn(16, 40, generator=g) * 100
        x[1], x[3] = 0.0, -1e4
        x[2, 3] = 1e4
        x[4, ::2] = -1e4
        t = probs(16, 40)
        t[2] = F.one_hot(torch.tensor(3), 40).float()  # peaked on the max: loss ≈ 0 from two terms of ~1e5
        t[5] = F.one_hot(x[5].argmax(), 40).float()
        t[6] = 0
        return x, [t[:7], t[7:]]
    raise ValueError(name)


@pytest.mark.parametrize("block_rows", [None, 3])  # one block per segment; 3-row blocks, short last blocks
@pytest.mark.parametrize("case", ["one_row", "segments", "zero_targets", "extreme"])
def test_fused_soft_cross_entropy_matches_reference(monkeypatch, case, block_rows):
    logits, targets = _cross_entropy_case(case)
    n_rows, n_cols = logits.shape
    if block_rows is not None:
        monkeypatch.setattr(fused_ce, "_BLOCK_ELEMENTS", block_rows * n_cols)
        assert n_rows <= block_rows or len(fused_ce.row_blocks(n_rows, n_cols)) > 1
    tau = 0.1
    grad_out = torch.rand(n_rows, generator=torch.Generator().manual_seed(1))  # per-row upstream weights

    def value_and_grad(fn):
        x = logits.clone().requires_grad_()
        loss = fn(x, targets, tau)
        loss.backward(grad_out)
        return loss.detach(), x.grad

    got, got_grad = value_and_grad(fused_soft_cross_entropy)
    ref, ref_grad = value_and_grad(reference_soft_cross_entropy)
    assert got.dtype == torch.float32 and got.shape == (n_rows,)
    # Both forms round terms as large as max|s/τ|·Σt (the fused one subtracts two of them): allow a few fp32
    # ulps of that per row, which is 1e-6 absolute for ordinary logits.
    target = torch.cat(targets)
    magnitude = logits.abs().amax(-1) / tau * target.sum(-1)
    tol = 1e-5 * ref.abs() + 8 * torch.finfo(torch.float32).eps * magnitude + 1e-6
    assert ((got - ref).abs() <= tol).all(), (got - ref).abs().max()
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-5, atol=1e-5)  # gradients are O(1/τ) = O(10)
    zero_rows = target.sum(-1) == 0
    assert (got[zero_rows] == 0).all() and (got_grad[zero_rows] == 0).all()


def test_soft_cross_entropy_argument_forms():
    torch.manual_seed(0)
    logits = (torch.randn(2, 6, 5) * 3).requires_grad_()
    targets = torch.softmax(torch.randn(2, 6, 5), -1)
    # One target tensor (any leading dims) = the same rows as segments.
    whole = soft_cross_entropy(logits, targets, 0.1)
    torch.testing.assert_close(whole, soft_cross_entropy(logits, list(targets.reshape(12, 5).split([4, 8])), 0.1))
    torch.testing.assert_close(whole, reference_soft_cross_entropy(logits.reshape(12, 5), [targets.reshape(12, 5)], 0.1))
    with pytest.raises(ValueError, match="targets cover 4 rows, the logits have 12"):
        soft_cross_entropy(logits, [targets[0, :4]], 0.1)
    with pytest.raises(ValueError, match="shapes differ"):
        soft_cross_entropy(logits, targets[:1], 0.1)
    # bf16 logits: fp32 loss, bf16 gradient; the kernel's buffer becomes the gradient, so one backward only.
    x = logits.detach().bfloat16().requires_grad_()
    loss = soft_cross_entropy(x, targets, 0.1)
    assert loss.dtype == torch.float32
    loss.sum().backward(retain_graph=True)
    assert x.grad.dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="one backward pass"):
        loss.sum().backward()
    # No rows at all (DINO or iBOT off in the model).
    assert soft_cross_entropy(logits[:0].reshape(0, 5), [], 0.1).shape == (0,)


# ----------------------------------------------------------------------------------------------------------------
# DINO
# ----------------------------------------------------------------------------------------------------------------


def test_dino_loss_hand_value():
    tau = 0.1
    student = torch.tensor([[0.0, math.log(3.0) * tau]])  # softmax(s / tau) = [1/4, 3/4]
    teacher = torch.tensor([[0.5, 0.5]])
    expected = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert close(dino_loss([student], [teacher], tau), expected)
    # Every (student, teacher) pair is summed, without normalisation.
    assert close(dino_loss([student, student], [teacher, teacher, teacher], tau), 6 * expected)


def test_dino_loss_matches_loop_reference_and_accepts_stacked_crops():
    torch.manual_seed(4)
    students = [torch.randn(3, 5) for _ in range(4)]
    teachers = [torch.softmax(torch.randn(3, 5), -1) for _ in range(2)]
    got = dino_loss(students, teachers, 0.1)
    assert close(got, ref_dino(students, teachers, 0.1))
    assert close(dino_loss(torch.stack(students), torch.stack(teachers), 0.1), got)
    with pytest.raises(ValueError, match="n_crops"):
        dino_loss(students[0], teachers)  # a 2-D tensor would iterate over rows
    with pytest.raises(ValueError, match="differ"):
        dino_loss(students, [teachers[0][:2]])


@pytest.mark.parametrize("n_local", [0, 3])
def test_dino_crop_losses_pairing(n_local):
    torch.manual_seed(5)
    batch, k, tau = 4, 6, 0.1
    s_global, s_local = torch.randn(2 * batch, k), torch.randn(n_local * batch, k)
    teacher = torch.softmax(torch.randn(2 * batch, k), -1)
    got_global, got_local = dino_crop_losses(s_global, s_local, teacher, student_temp=tau)
    s0, s1, t0, t1 = s_global[:batch], s_global[batch:], teacher[:batch], teacher[batch:]
    n_terms = 2 + max(2 * n_local, 1)
    # Each student global crop against the *other* teacher crop only.
    assert close(got_global, (ref_dino([s0], [t1], tau) + ref_dino([s1], [t0], tau)) / n_terms)
    local_chunks = list(s_local.split(batch))
    assert close(got_local, ref_dino(local_chunks, [t0, t1], tau) / n_terms if n_local else 0.0)
    if n_local:
        assert close(
            dino_crop_losses(s_global, None, teacher)[0], (ref_dino([s0], [t1], tau) + ref_dino([s1], [t0], tau)) / 3
        )
        with pytest.raises(ValueError, match="multiple of the batch"):
            dino_crop_losses(s_global, s_local[:-1], teacher)


# ----------------------------------------------------------------------------------------------------------------
# iBOT
# ----------------------------------------------------------------------------------------------------------------


def test_ibot_mask_weighting_hand_value():
    # Image 0: 1 masked patch, image 1: 4, image 2: none (still counts as an image).
    masks = torch.zeros(3, 6, dtype=torch.bool)
    masks[0, 2] = True
    masks[1, [0, 1, 3, 5]] = True
    assert close(masked_patch_weights(masks), [1.0, 0.25, 0.25, 0.25, 0.25])
    tau = 0.1
    # One-hot teachers make each patch's cross-entropy -log softmax(s/tau)[target]; pick values by hand:
    # student rows are [0, c] so the patch CE with target 1 is log(1 + exp(-c/tau)).
    cs = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4])
    student = torch.stack([torch.zeros(5), cs], dim=-1)
    teacher = torch.tensor([[0.0, 1.0]]).expand(5, 2)
    ce = [math.log(1 + math.exp(-c / tau)) for c in cs.tolist()]
    expected = (1.0 * ce[0] + 0.25 * sum(ce[1:])) / 3
    assert close(ibot_loss(student, teacher, masks, tau), expected)


def test_ibot_matches_loop_reference():
    torch.manual_seed(6)
    masks = torch.rand(4, 3, 3) < 0.4  # [B, H, W] is flattened
    masks[0] = False
    n = int(masks.sum())
    student, teacher = torch.randn(n, 7), torch.softmax(torch.randn(n, 7), -1)
    got = ibot_loss(student, teacher, masks, 0.1)
    assert close(got, ref_ibot(student, teacher, masks.flatten(1), 0.1))
    with pytest.raises(ValueError, match="masked patch"):
        ibot_loss(student[:-1], teacher[:-1], masks)


def test_ibot_gradient_reaches_student_only_masked_rows():
    masks = torch.tensor([[True, False], [False, False]])
    student = torch.randn(1, 3, requires_grad=True)
    ibot_loss(student, torch.softmax(torch.randn(1, 3), -1), masks).backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()


# ----------------------------------------------------------------------------------------------------------------
# KoLeo
# ----------------------------------------------------------------------------------------------------------------


def test_koleo_known_neighbours():
    # Points on the unit circle; chord length between angles a, b is 2 sin(|a - b| / 2).
    angles = torch.tensor([0.0, 0.1, 1.0, 2.5])
    points = torch.stack([angles.cos(), angles.sin()], dim=-1)
    nearest_gap = [0.1, 0.1, 0.9, 1.5]  # 0<->0.1, 0.1<->0, 1.0<->0.1, 2.5<->1.0
    expected = -sum(math.log(2 * math.sin(g / 2) + 1e-8) for g in nearest_gap) / 4
    assert close(koleo_loss(points), expected)
    # Features are L2-normalised first: the scale does not matter.
    assert close(koleo_loss(points * 7.0), expected)


def test_koleo_matches_loop_reference_with_gradient():
    torch.manual_seed(7)
    features = torch.randn(9, 5, requires_grad=True)
    loss = koleo_loss(features)
    assert close(loss.detach(), ref_koleo(features.detach()))
    loss.backward()
    assert torch.isfinite(features.grad).all()
    assert koleo_loss(features.detach().bfloat16()).dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------------
# 2-process gloo group: every rank holds different rows
# ----------------------------------------------------------------------------------------------------------------


def _dist_worker(rank: int, world_size: int, init_file: str, cases: list[dict]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        for case in cases:
            rows = case["rows"][rank]
            if case["kind"] == "sinkhorn":
                got = sinkhorn_knopp(rows, case["temp"], n_samples=case["n_samples"])
                assert torch.allclose(got, case["expected"][rank], atol=ATOL), case["name"]
                assert torch.allclose(got.sum(-1), torch.ones(len(rows)), atol=ATOL), case["name"]
            else:
                got = update_center(case["center"], rows, case["momentum"])
                assert torch.allclose(got, case["expected"], atol=ATOL), case["name"]
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # multi-process: runs in `pytest -m slow` (CI's second half)
def test_two_process_gloo(tmp_path):
    torch.manual_seed(8)
    k = 6
    cases = []
    # DINO-like (equal rows), iBOT-like (different rows, explicit total), and a rank without rows.
    for name, counts in (("equal", (4, 4)), ("unequal", (5, 3)), ("empty_rank", (5, 0))):
        rows = torch.rand(sum(counts), k) * 2 - 1
        per_rank = list(rows.split(counts))
        # Single-process SK over the concatenated rows, sliced per rank.
        expected = list(sinkhorn_knopp(rows, 0.05).split(counts))
        cases.append(
            dict(kind="sinkhorn", name=name, rows=per_rank, temp=0.05, n_samples=sum(counts), expected=expected)
        )
        # Center: mean of the per-rank means (ranks with no rows left out), then EMA.
        center = torch.randn(1, k)
        means = [r.mean(0, keepdim=True) for r in per_rank if len(r)]
        batch_center = sum(means) / len(means)
        cases.append(
            dict(
                kind="center",
                name=name,
                rows=per_rank,
                center=center,
                momentum=0.9,
                expected=center * 0.9 + batch_center * 0.1,
            )
        )
    # The per-rank mean average is not the global row mean when counts differ (the iBOT case).
    unequal = cases[3]["rows"]
    assert not torch.allclose(torch.cat(unequal).mean(0), (unequal[0].mean(0) + unequal[1].mean(0)) / 2)
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), cases), nprocs=2, join=True)
