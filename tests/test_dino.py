"""dino.py against direct computations: the loss, the centre and EMA updates, the schedules, the head."""
import math

import numpy as np
import pytest
import torch

import dino


def direct_loss(s, t, c, ts, tt):
    """The DINO loss written out in float64 numpy, one (teacher view, student view) pair at a time."""
    s, t, c = (np.asarray(a, np.float64) for a in (s, t, c))
    softmax = lambda x: np.exp(x - x.max(-1, keepdims=True)) / np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)  # noqa: E731
    terms = []
    for i in range(t.shape[0]):
        for v in range(s.shape[0]):
            if v != i:
                q = softmax((t[i] - c) / tt)
                log_p = np.log(softmax(s[v] / ts))
                terms.append(np.mean(-(q * log_p).sum(-1)))
    return np.mean(terms)


@pytest.mark.parametrize("V,B,K", [(2, 3, 5), (6, 7, 33), (10, 1, 129)])
def test_loss_equals_the_direct_formula(V, B, K):
    g = torch.Generator().manual_seed(V * B * K)
    s, t, c = 3 * torch.randn(V, B, K, generator=g), 3 * torch.randn(2, B, K, generator=g), torch.randn(K, generator=g)
    got = dino.dino_loss(s.double(), t.double(), c.double(), 0.1, 0.04)
    assert got.item() == pytest.approx(direct_loss(s, t, c, 0.1, 0.04), rel=1e-10)


def test_loss_gradient_reaches_the_student_only_and_a_view_is_not_its_own_target():
    s = torch.randn(4, 3, 8, requires_grad=True)
    t = torch.randn(2, 3, 8, requires_grad=True)
    dino.dino_loss(s, t, torch.zeros(8), 0.1, 0.04).backward()
    assert t.grad is None and s.grad.abs().sum() > 0
    # the student's view 0 agrees perfectly with teacher view 0: if that pair counted, moving s[0] towards
    # t[0] alone could not raise the loss; the direct formula (which skips it) agrees
    s2, t2 = torch.randn(3, 2, 6), torch.randn(2, 2, 6)
    s2[0] = t2[0] * 0.4
    assert dino.dino_loss(s2, t2, torch.zeros(6), 0.1, 0.04).item() == pytest.approx(
        direct_loss(s2, t2, np.zeros(6), 0.1, 0.04), rel=1e-6)


def test_center_and_ema_updates_by_hand():
    center = torch.tensor([1.0, -2.0, 0.5])
    rows = torch.tensor([[1.0, 2.0, 3.0], [3.0, 0.0, -1.0]])
    dino.update_center(center, rows.sum(0), len(rows), momentum=0.9)
    torch.testing.assert_close(center, torch.tensor([0.9 * 1 + 0.1 * 2, 0.9 * -2 + 0.1 * 1, 0.9 * 0.5 + 0.1 * 1]))
    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    dino.ema_update(teacher, student, 0.99)
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, 0.99 * before[k] + 0.01 * student.state_dict()[k])


def test_schedules():
    assert dino.teacher_momentum(0, 100) == pytest.approx(0.996)
    assert dino.teacher_momentum(50, 100) == pytest.approx(0.998)
    assert dino.teacher_momentum(100, 100) == pytest.approx(1.0)
    assert dino.teacher_temperature(0, 10) == pytest.approx(0.04)
    assert dino.teacher_temperature(5, 10) == pytest.approx(0.055)
    assert dino.teacher_temperature(10, 10) == dino.teacher_temperature(1000, 10) == pytest.approx(0.07)
    assert dino.teacher_temperature(0, 0) == pytest.approx(0.07)  # no warm-up


def test_head_gives_cosines_and_entropy_bounds():
    head = dino.DINOHead(16, hidden=32, bottleneck=8, prototypes=50)
    out = head(torch.randn(7, 16))
    assert out.shape == (7, 50) and out.abs().max() <= 1 + 1e-6
    proto = head.prototypes.detach()
    x = torch.nn.functional.normalize(head.mlp(torch.randn(3, 16)), dim=-1)
    torch.testing.assert_close(head.prototypes.new_tensor(x @ torch.nn.functional.normalize(proto, dim=-1).T),
                               x @ (proto / proto.norm(dim=-1, keepdim=True)).T)
    K = 50
    assert dino.teacher_entropy(torch.zeros(4, K), torch.zeros(K), 0.04).item() == pytest.approx(math.log(K))
    peaked = torch.full((4, K), -100.0)
    peaked[:, 3] = 100.0
    assert dino.teacher_entropy(peaked, torch.zeros(K), 0.04).item() == pytest.approx(0.0, abs=1e-6)
