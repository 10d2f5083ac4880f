"""The model-level inverse Fisher against a dense inverse of the exact empirical Fisher."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as tprune

import woodfisher as wf


def _net_and_data():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X = torch.randn(24, 5, dtype=torch.float64)
    Y = torch.randint(0, 3, (24,))
    return net, [(X[:12], Y[:12]), (X[12:], Y[12:])], X, Y


def _per_sample_grads(net, X, Y):
    rows = []
    for i in range(X.shape[0]):
        net.zero_grad()
        nn.functional.cross_entropy(net(X[i : i + 1]), Y[i : i + 1]).backward()
        rows.append(torch.cat([net[0].weight.grad.reshape(-1), net[2].weight.grad.reshape(-1)]))
    return torch.stack(rows)


def test_mul_matches_dense_inverse_of_the_empirical_fisher():
    net, data, X, Y = _net_and_data()
    op = wf.fisher_inverse(net, data, num_grads=24, block_size=None, damp=1e-2)
    G = _per_sample_grads(net, X, Y)
    d = G.shape[1]
    F = 1e-2 * torch.eye(d, dtype=torch.float64) + G.T @ G / 24
    dense = torch.linalg.inv(F)  # block_size=None: one full block, across layers
    v = torch.randn(d, dtype=torch.float64)
    assert torch.allclose(op.mul(v), dense @ v, rtol=1e-8, atol=1e-8)
    as_dict = op.mul(op.layout.split(v))
    assert torch.allclose(op.layout.flatten(as_dict), dense @ v, rtol=1e-8, atol=1e-8)
    V = torch.randn(d, 3, dtype=torch.float64)
    several = op.mul({n: t.movedim(0, -1) for n, t in op.layout.split(V.T).items()})
    assert several["0"].shape == (4, 5, 3)
    assert torch.allclose(several["2"][..., 1].reshape(-1), (dense @ V)[20:, 1], atol=1e-8)
    assert torch.allclose(op.layout.flatten(op.diag()), dense.diag(), atol=1e-8)
    # relative damp: damp = 1e-2 × mean diag of GᵀG/m
    rel = wf.fisher_inverse(net, data, num_grads=24, block_size=None)
    assert rel.damp == pytest.approx(1e-2 * float((G * G).sum(0).mean() / 24))


def test_masked_weights_are_left_out():
    net, data, X, Y = _net_and_data()
    mask = torch.ones(4, 5, dtype=torch.float64)
    mask[0] = 0
    tprune.custom_from_mask(net[0], "weight", mask)
    op = wf.fisher_inverse(net, data, method="diag-fisher", num_grads=24, damp=1e-3)
    out = op.mul({"0": torch.ones(4, 5), "2": torch.ones(3, 4)})
    assert (out["0"][0] == 0).all() and (out["0"][1:] != 0).all()
    assert (op.diag()["0"][0] == 0).all()


def test_ihvp_one_call_equals_operator_and_bad_vectors_fail():
    net, data, *_ = _net_and_data()
    v = {"0": torch.randn(4, 5, dtype=torch.float64), "2": torch.randn(3, 4, dtype=torch.float64)}
    one = wf.ihvp(net, data, v, num_grads=24, block_size=8, damp=1e-2)
    op = wf.fisher_inverse(net, data, num_grads=24, block_size=8, damp=1e-2)
    assert torch.allclose(one["2"], op.mul(v)["2"])
    with pytest.raises(ValueError, match="shape"):
        op.mul({"0": torch.randn(5, 4), "2": torch.randn(3, 4)})
    with pytest.raises(ValueError, match="missing"):
        op.mul({"0": torch.randn(4, 5)})
    with pytest.raises(ValueError, match="NaN"):
        op.mul(torch.full((32,), float("nan")))
    with pytest.raises(ValueError, match="unknown curvature"):
        wf.fisher_inverse(net, data, method="hessian")
