"""Draft alignment losses against a direct per-position formula."""

from __future__ import annotations

import math

import pytest
import torch

from decoding.speculative import relaxed_alignment_loss, strict_alignment_loss


def direct_strict(q, p, k, tau, rho, allowed, weights):
    total, norm = 0.0, 0.0
    for pos in range(q.shape[0]):
        tokens = [t for t in range(q.shape[1]) if allowed is None or allowed[pos, t]]
        top = sorted(tokens, key=lambda t: -float(q[pos, t]))[:k]
        zq = sum(math.exp(float(q[pos, t]) / tau) for t in top)
        zp = sum(math.exp(float(p[pos, t]) / tau) for t in top)
        qk = {t: math.exp(float(q[pos, t]) / tau) / zq for t in top}
        pk = {t: math.exp(float(p[pos, t]) / tau) / zp for t in top}
        rkl = sum(qk[t] * math.log(qk[t] / pk[t]) for t in top)
        entropy = -sum(qk[t] * math.log(qk[t]) for t in top)
        z_full = sum(math.exp(float(p[pos, t])) for t in tokens)
        p_kth = math.exp(float(p[pos, top[-1]])) / z_full
        total += float(weights[pos]) * (rkl + rho * entropy * p_kth)
        norm += float(weights[pos])
    return total / norm


def direct_tvd(q, p, tau, allowed, weights):
    total, norm = 0.0, 0.0
    for pos in range(q.shape[0]):
        tokens = [t for t in range(q.shape[1]) if allowed is None or allowed[pos, t]]
        zq = sum(math.exp(float(q[pos, t]) / tau) for t in tokens)
        zp = sum(math.exp(float(p[pos, t]) / tau) for t in tokens)
        tvd = 0.5 * sum(abs(math.exp(float(q[pos, t]) / tau) / zq - math.exp(float(p[pos, t]) / tau) / zp)
                        for t in tokens)
        total += float(weights[pos]) * tvd
        norm += float(weights[pos])
    return total / norm


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("with_mask", [False, True])
def test_losses_equal_the_direct_formula(seed, with_mask):
    g = torch.Generator().manual_seed(seed)
    P, V, k = 7, 12, 4
    q = torch.randn(P, V, generator=g, dtype=torch.float64) * 2
    p = torch.randn(P, V, generator=g, dtype=torch.float64) * 2
    allowed = torch.rand(P, V, generator=g) < 0.6 if with_mask else None
    if allowed is not None:
        allowed[:, :k] = True  # at least k allowed tokens per position
    weights = (torch.rand(P, generator=g) < 0.8).double()
    weights[0] = 1.0
    tau, rho = 0.7, 0.5
    got = strict_alignment_loss(q, p, k=k, temperature=tau, density_weight=rho, allowed=allowed, weights=weights)
    assert float(got) == pytest.approx(direct_strict(q, p, k, tau, rho, allowed, weights), rel=1e-5, abs=1e-6)
    got = relaxed_alignment_loss(q, p, temperature=tau, allowed=allowed, weights=weights)
    assert float(got) == pytest.approx(direct_tvd(q, p, tau, allowed, weights), rel=1e-5, abs=1e-6)


def test_losses_are_differentiable_in_the_draft_only_and_vanish_when_aligned():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 10, generator=g, requires_grad=True)
    p = torch.randn(2, 3, 10, generator=g, requires_grad=True)
    for loss in (strict_alignment_loss(q, p, k=3), relaxed_alignment_loss(q, p)):
        q.grad = p.grad = None
        loss.backward()
        assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
        assert p.grad is None  # the target is a teacher
    same = q.detach()
    assert float(strict_alignment_loss(same, same, k=3, density_weight=0.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(relaxed_alignment_loss(same, same)) == pytest.approx(0.0, abs=1e-6)


def test_training_the_draft_with_a_loss_reduces_it():
    g = torch.Generator().manual_seed(1)
    p = torch.randn(16, 20, generator=g) * 3
    q = torch.zeros(16, 20, requires_grad=True)
    opt = torch.optim.Adam([q], lr=0.1)
    for fn in (lambda: strict_alignment_loss(q, p, k=5), lambda: relaxed_alignment_loss(q, p)):
        first = float(fn().detach())
        for _ in range(100):
            opt.zero_grad()
            loss = fn()
            loss.backward()
            opt.step()
        assert float(fn().detach()) < 0.5 * first


@pytest.mark.parametrize("call, match", [
    (lambda q, p: strict_alignment_loss(q, p[:, :5], k=2), "target_logits"),
    (lambda q, p: strict_alignment_loss(q, p, k=0), "k"),
    (lambda q, p: strict_alignment_loss(q, p, k=99), "k: 99"),
    (lambda q, p: relaxed_alignment_loss(q, p, temperature=0.0), "temperature"),
    (lambda q, p: relaxed_alignment_loss(q, p, allowed=torch.ones(3, 6)), "allowed"),
    (lambda q, p: relaxed_alignment_loss(q, p, weights=torch.zeros(3)), "weights"),
    (lambda q, p: relaxed_alignment_loss(q, p, weights=torch.ones(4)), "weights"),
])
def test_bad_arguments_name_the_argument(call, match):
    q, p = torch.randn(3, 6), torch.randn(3, 6)
    with pytest.raises((ValueError, TypeError), match=match):
        call(q, p)
