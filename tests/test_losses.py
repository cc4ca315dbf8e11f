"""Tests for modeling.losses: hand-checkable values, invariants, loop references, and a 2-process gloo group."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from modeling.losses import (
    centered_softmax,
    dino_crop_losses,
    dino_loss,
    ibot_loss,
    koleo_loss,
    masked_patch_weights,
    sinkhorn_knopp,
    teacher_targets,
    update_center,
)

ATOL = 1e-5


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
    import modeling.losses as losses

    logits = torch.randn(29, 40)
    whole = sinkhorn_knopp(logits, 0.07)
    monkeypatch.setattr(losses, "_BLOCK_ELEMENTS", 3 * 40)  # 3-row blocks, the last one short
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
# DINO
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_elements", [1 << 18, 7 * 50])  # one block; blocks of 7 rows across segments
def test_soft_cross_entropy_segments_match_autograd(monkeypatch, block_elements):
    import modeling.losses as losses

    monkeypatch.setattr(losses, "_BLOCK_ELEMENTS", block_elements)
    torch.manual_seed(0)
    logits = (torch.randn(37, 50) * 3).requires_grad_()
    targets = [torch.softmax(torch.randn(n, 50), -1) * w for n, w in ((5, 1.0), (12, 2.0), (20, 1.0))]
    weights = torch.rand(37)
    got = losses.soft_cross_entropy(logits, targets, 0.1)
    (got * weights).sum().backward()
    grad, logits.grad = logits.grad, None

    ref = -(torch.cat(targets) * torch.log_softmax(logits / 0.1, -1)).sum(-1)
    (ref * weights).sum().backward()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, logits.grad, rtol=1e-5, atol=1e-6)
    # one target tensor = the same; a wrong row count names the problem
    torch.testing.assert_close(losses.soft_cross_entropy(logits, torch.cat(targets), 0.1), got)
    with pytest.raises(ValueError, match="targets cover 17 rows, the logits have 37"):
        losses.soft_cross_entropy(logits, targets[:2], 0.1)


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
