"""K-FAC, the diagonal Fisher and the exact oracles against independent computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from woodfisher.fisher import (
    DiagonalFisherInverse,
    InverseCurvature,
    KFACInverse,
    exact_empirical_fisher,
    exact_hessian,
    kfac_inverse,
)
from woodfisher.fisher.kfac import kfac_factors
from woodfisher.gradients import sample_gradients

F64 = torch.float64


def test_kfac_linear_factors_by_hand():
    torch.manual_seed(0)
    net = nn.Linear(5, 4, bias=True).double()
    X, Y = torch.randn(12, 5, dtype=F64), torch.randint(0, 4, (12,))
    batches = [(X[:5], Y[:5]), (X[5:], Y[5:])]
    factors, _ = kfac_factors(net, batches, num_batches=2)
    A, S = factors[""]
    # Per-sample cross-entropy gradient w.r.t. the logits: softmax − one-hot.
    with torch.no_grad():
        delta = torch.softmax(net(X), 1) - nn.functional.one_hot(Y, 4).to(F64)
    torch.testing.assert_close(A, X.T @ X / 12, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(S, delta.T @ delta / 12, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("pi_damping", [True, False])
def test_kfac_equals_explicit_kronecker_inverse(pi_damping):
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2, bias=False)).double()
    X, Y = torch.randn(20, 4, dtype=F64), torch.randint(0, 2, (20,))
    lam = 1e-2
    inv = kfac_inverse(net, [(X, Y)], num_batches=1, damp=lam, pi_damping=pi_damping)
    blocks = []
    for name in inv.names:
        A, S = inv.A[name], inv.S[name]
        pi = math.sqrt((A.trace() / A.shape[0]) / (S.trace() / S.shape[0])) if pi_damping else 1
        Ad = A + pi * math.sqrt(lam) * torch.eye(A.shape[0], dtype=F64)
        Sd = S + math.sqrt(lam) / pi * torch.eye(S.shape[0], dtype=F64)
        blocks.append(torch.linalg.inv(torch.kron(Sd, Ad)))
    dense = torch.block_diag(*blocks)
    torch.testing.assert_close(inv.diag(), dense.diagonal(), rtol=1e-10, atol=0)
    V = torch.randn(inv.d, 3, dtype=F64)
    torch.testing.assert_close(inv.mul(V), dense @ V, rtol=1e-10, atol=1e-12)
    idx = torch.tensor([0, 5, 13, inv.d - 1])
    torch.testing.assert_close(inv.columns(idx), dense[:, idx], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(inv.columns(idx), InverseCurvature.columns(inv, idx))
    torch.testing.assert_close(inv.diag(), InverseCurvature.diag(inv))
    fixed = torch.zeros(inv.d, dtype=torch.bool)
    fixed[[1, 2, 16]] = True
    w = torch.randn(inv.d, dtype=F64)
    got = inv.constrained_min(fixed, -w)
    Finv = dense
    expect = torch.zeros(inv.d, dtype=F64)
    for s, e in inv.blocks:
        q = torch.zeros(inv.d, dtype=torch.bool)
        q[s:e] = fixed[s:e]
        if q.any():
            expect -= Finv[:, q] @ torch.linalg.solve(Finv[q][:, q], w[q])
    torch.testing.assert_close(got, expect, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Linear(6, 3, bias=False)),
    lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten()),  # 3×3 kernel on a 3×3 image
], ids=["linear", "conv"])
def test_kfac_single_sample_single_location_is_rank_one_fisher(make):
    """With one sample and one location, S ⊗ A = g gᵀ exactly (checks the Kronecker order)."""
    torch.manual_seed(2)
    net = make().double()
    shape = (6,) if isinstance(net[0], nn.Linear) else (2, 3, 3)
    X, Y = torch.randn(1, *shape, dtype=F64), torch.randint(0, 3, (1,))
    factors, _ = kfac_factors(net, [(X, Y)], num_batches=1)
    (A, S), = factors.values()
    g = sample_gradients(net, (X, Y), num_grads=1)[0]
    torch.testing.assert_close(torch.kron(S, A), torch.outer(g, g), rtol=1e-10, atol=1e-14)


def test_kfac_conv_locations_average():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(1, 2, 2, bias=False), nn.Flatten()).double()
    X, Y = torch.randn(4, 1, 3, 3, dtype=F64), torch.randint(0, 8, (4,))
    factors, _ = kfac_factors(net, [(X, Y)], num_batches=1)
    A, _ = factors["0"]
    patches = torch.stack([X[:, 0, i:i + 2, j:j + 2].reshape(4, 4) for i in (0, 1) for j in (0, 1)])
    expect = torch.einsum("lni,lnj->ij", patches, patches) / (4 * 4)
    torch.testing.assert_close(A, expect, rtol=1e-12, atol=1e-14)


def test_kfac_big_layer_joint_raises():
    A, S = torch.eye(100, dtype=F64), torch.eye(50, dtype=F64)
    inv = KFACInverse({"big": (A, S)}, damp=1e-2)
    fixed = torch.zeros(inv.d, dtype=torch.bool)
    fixed[0] = True
    with pytest.raises(NotImplementedError, match="independent"):
        inv.constrained_min(fixed, torch.zeros(inv.d, dtype=F64))


def test_kfac_bad_damp_and_batches():
    with pytest.raises(ValueError, match="damp"):
        KFACInverse({"a": (torch.eye(2), torch.eye(2))}, damp=0)
    with pytest.raises(ValueError, match="num_batches"):
        kfac_inverse(nn.Linear(2, 2), [(torch.randn(2, 2), torch.tensor([0, 1]))], num_batches=0)


def test_diagonal_equals_dense():
    gen = torch.Generator().manual_seed(4)
    G = torch.randn(7, 30, generator=gen, dtype=F64)
    inv = DiagonalFisherInverse(G, 0.1, layout=[20, 10])
    dense = torch.linalg.inv(torch.diag(0.1 + (G**2).mean(0)))
    torch.testing.assert_close(inv.diag(), dense.diagonal(), rtol=1e-12, atol=0)
    V = torch.randn(30, 2, generator=gen, dtype=F64)
    torch.testing.assert_close(inv.mul(V), dense @ V, rtol=1e-12, atol=0)
    idx = torch.tensor([0, 19, 20, 29])
    torch.testing.assert_close(inv.columns(idx), dense[:, idx])
    assert inv.blocks == ((0, 20), (20, 30))
    torch.testing.assert_close(inv.block(1), dense[20:, 20:])
    fixed = torch.rand(30, generator=gen) < 0.5
    vals, lin = torch.randn(30, generator=gen, dtype=F64), torch.randn(30, generator=gen, dtype=F64)
    torch.testing.assert_close(
        inv.constrained_min(fixed, vals, lin),
        InverseCurvature.constrained_min(inv, fixed, vals, lin),
    )


def test_diagonal_bad_input():
    with pytest.raises(ValueError, match="damp"):
        DiagonalFisherInverse(torch.randn(3, 4), damp=-1)
    with pytest.raises(ValueError, match="sum to"):
        DiagonalFisherInverse(torch.randn(3, 4), damp=1, layout=[3])


def test_exact_hessian_logistic_regression():
    """Softmax regression: H = (1/N) Σ (diag(p) − p pᵀ) ⊗ x xᵀ."""
    torch.manual_seed(5)
    net = nn.Linear(3, 4, bias=False).double()
    X, Y = torch.randn(9, 3, dtype=F64), torch.randint(0, 4, (9,))
    H = exact_hessian(net, (X, Y))
    with torch.no_grad():
        P = torch.softmax(net(X), 1)
    expect = sum(
        torch.kron(torch.diag(p) - torch.outer(p, p), torch.outer(x, x))
        for p, x in zip(P, X, strict=True)
    ) / 9
    torch.testing.assert_close(H, expect, rtol=1e-10, atol=1e-13)


def test_exact_hessian_finite_differences():
    torch.manual_seed(6)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, Y = torch.randn(10, 3, dtype=F64), torch.randint(0, 2, (10,))
    H = exact_hessian(net, [(X[:4], Y[:4]), (X[4:], Y[4:])])
    w = [net[0].weight, net[2].weight]
    def grad_at():
        loss = nn.functional.cross_entropy(net(X), Y)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, w)])
    eps, cols = 1e-5, []
    flat = torch.cat([p.detach().reshape(-1) for p in w])
    for j in range(flat.numel()):
        grads = []
        for sign in (1, -1):
            f = flat.clone()
            f[j] += sign * eps
            with torch.no_grad():
                w[0].copy_(f[:12].reshape(4, 3))
                w[1].copy_(f[12:].reshape(2, 4))
            grads.append(grad_at())
        cols.append((grads[0] - grads[1]) / (2 * eps))
    fd = torch.stack(cols, 1)
    torch.testing.assert_close(H, fd, rtol=1e-6, atol=1e-8)


def test_exact_empirical_fisher():
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    X, Y = torch.randn(6, 3, dtype=F64), torch.randint(0, 2, (6,))
    F = exact_empirical_fisher(net, (X, Y))
    w = [net[0].weight, net[2].weight]
    expect = torch.zeros(20, 20, dtype=F64)
    for i in range(6):
        loss = nn.functional.cross_entropy(net(X[i:i + 1]), Y[i:i + 1])
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, w)])
        expect += torch.outer(g, g) / 6
    torch.testing.assert_close(F, expect, rtol=1e-10, atol=1e-14)
