"""OBS saliencies and updates against brute-force KKT solutions of the quadratic model."""

import itertools

import pytest
import torch

from woodfisher.fisher import DenseInverse, make_blocks
from woodfisher.pruning import (
    independent_update,
    joint_update,
    obs_saliency,
    quadratic_model,
    woodtaylor_saliency,
)

D = 7


def spd(d, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    return A @ A.T + 0.3 * torch.eye(d, dtype=torch.float64)


def kkt(F, fixed, values, g=None):
    """Minimise gᵀδ + ½δᵀFδ subject to δ[fixed] = values[fixed] by one linear solve."""
    d = F.shape[0]
    idx = fixed.nonzero().reshape(-1)
    E = torch.eye(d, dtype=F.dtype)[:, idx]
    K = torch.zeros(d + len(idx), d + len(idx), dtype=F.dtype)
    K[:d, :d], K[:d, d:], K[d:, :d] = F, E, E.T
    rhs = torch.cat([-(g if g is not None else torch.zeros(d, dtype=F.dtype)), values[idx]])
    return torch.linalg.solve(K, rhs)[:d]


def model_value(F, delta, g=None):
    v = 0.5 * delta @ F @ delta
    return v + (g @ delta if g is not None else 0)


@pytest.fixture(params=[0, 1, 2])
def case(request):
    s = request.param
    F = spd(D, s)
    w = torch.randn(D, generator=torch.Generator().manual_seed(100 + s), dtype=torch.float64)
    g = torch.randn(D, generator=torch.Generator().manual_seed(200 + s), dtype=torch.float64)
    return F, w, g


def onehot(q, d=D):
    m = torch.zeros(d, dtype=torch.bool)
    m[q] = True
    return m


def test_single_weight_update_and_saliency(case):
    F, w, _ = case
    inv = DenseInverse(F)
    Finv = torch.linalg.inv(F)
    sal = obs_saliency(w, inv.diag())
    for q in range(D):
        delta = independent_update(w, onehot(q), inv)
        closed = -(w[q] / Finv[q, q]) * Finv[:, q]
        torch.testing.assert_close(delta, closed)
        assert torch.isclose(delta[q], -w[q])
        torch.testing.assert_close(sal[q], model_value(F, delta))
        torch.testing.assert_close(delta, kkt(F, onehot(q), -w))


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_joint_matches_kkt_for_every_subset(case, k):
    F, w, _ = case
    inv = DenseInverse(F)
    for Q in itertools.combinations(range(D), k):
        fixed = onehot(list(Q))
        delta = joint_update(w, fixed, inv)
        torch.testing.assert_close(delta, kkt(F, fixed, -w))
        assert torch.equal(delta[fixed], -w[fixed])
        # No feasible perturbation does better.
        pert = torch.randn(D, dtype=torch.float64) * (~fixed)
        assert model_value(F, delta) <= model_value(F, delta + 1e-3 * pert) + 1e-12


def test_joint_with_one_weight_is_independent(case):
    F, w, g = case
    inv = DenseInverse(F)
    for q in range(D):
        torch.testing.assert_close(
            joint_update(w, onehot(q), inv), independent_update(w, onehot(q), inv)
        )
        torch.testing.assert_close(
            joint_update(w, onehot(q), inv, g), independent_update(w, onehot(q), inv, g)
        )


def test_full_block_equals_one_block_and_blocks_are_independent(case):
    F, w, _ = case
    fixed = onehot([0, 3, 5])
    full = joint_update(w, fixed, DenseInverse(F))
    same = joint_update(w, fixed, DenseInverse(F, make_blocks([D], D)))
    torch.testing.assert_close(full, same)
    blocks = make_blocks([4, 3], 2)
    Fb = torch.zeros_like(F)
    for a, b in blocks:
        Fb[a:b, a:b] = F[a:b, a:b]
    torch.testing.assert_close(joint_update(w, fixed, DenseInverse(F, blocks)), kkt(Fb, fixed, -w))


def test_joint_keeps_pruned_at_zero(case):
    F, w, _ = case
    w = w.clone()
    pruned = onehot([1, 2])
    w[pruned] = 0
    delta = joint_update(w, onehot([4]), DenseInverse(F), pruned=pruned)
    assert torch.equal(delta[pruned], torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(delta, kkt(F, onehot([1, 2, 4]), -w))


def test_woodtaylor_saliency_is_model_minimum(case):
    F, w, g = case
    inv = DenseInverse(F)
    sal = woodtaylor_saliency(w, inv.diag(), inv.mul(g), g)
    for q in range(D):
        delta = kkt(F, onehot(q), -w, g)
        torch.testing.assert_close(sal[q], model_value(F, delta, g))
        torch.testing.assert_close(independent_update(w, onehot(q), inv, g), delta)


@pytest.mark.parametrize("k", [2, 4])
def test_woodtaylor_joint_matches_kkt(case, k):
    F, w, g = case
    inv = DenseInverse(F)
    for Q in itertools.combinations(range(D), k):
        fixed = onehot(list(Q))
        delta = joint_update(w, fixed, inv, g)
        torch.testing.assert_close(delta, kkt(F, fixed, -w, g))


def test_quadratic_model_value(case):
    F, w, g = case
    assert quadratic_model(w, lambda v: F @ v, g) == pytest.approx(float(model_value(F, w, g)))
