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


class _Nested(nn.Module):
    """Conv + nested Linear + BatchNorm: an ordinary module, not a Sequential of Linears."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, 3))

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


def _nested_and_data():
    torch.manual_seed(1)
    net = _Nested().double().eval()
    X = torch.randn(20, 1, 5, 5, dtype=torch.float64)
    Y = torch.randint(0, 3, (20,))
    return net, [(X[:10], Y[:10]), (X[10:], Y[10:])], X, Y


def test_any_module_with_masks_matches_dense_inverse_and_takes_parameter_names():
    net, data, X, Y = _nested_and_data()
    mask = torch.ones(3, 18, dtype=torch.float64)
    mask[:, :5] = 0
    tprune.custom_from_mask(net.head[1], "weight", mask)
    op = wf.fisher_inverse(net, data, num_grads=20, block_size=None, damp=1e-2)
    assert op.layout.names == ("conv", "head.1")
    assert op.param_names == ("conv.weight", "head.1.weight_orig")
    # Oracle: per-sample gradients by single backward passes, masked entries dropped.
    rows = []
    for i in range(20):
        net.zero_grad()
        nn.functional.cross_entropy(net(X[i : i + 1]), Y[i : i + 1]).backward()
        rows.append(torch.cat([net.conv.weight.grad.reshape(-1),
                               net.head[1].weight_orig.grad.reshape(-1)]))
    G = torch.stack(rows)
    keep = torch.cat([torch.ones(18, dtype=torch.bool), mask.reshape(-1).bool()])
    Gk = G[:, keep]
    F = 1e-2 * torch.eye(Gk.shape[1], dtype=torch.float64) + Gk.T @ Gk / 20
    v = {"conv.weight": torch.randn(2, 1, 3, 3, dtype=torch.float64),
         "head.1.weight": torch.randn(3, 18, dtype=torch.float64)}
    out = op.mul(v)
    assert set(out) == set(v)  # answered in the caller's names
    flat_v = torch.cat([v["conv.weight"].reshape(-1), v["head.1.weight"].reshape(-1)])
    expect = torch.zeros(72, dtype=torch.float64)
    expect[keep] = torch.linalg.solve(F, flat_v[keep])
    got = torch.cat([out["conv.weight"].reshape(-1), out["head.1.weight"].reshape(-1)])
    torch.testing.assert_close(got, expect)
    assert (out["head.1.weight"][:, :5] == 0).all()
    # F v with the same F, and F⁻¹ F v = v on the kept entries.
    fv = op.fmul(flat_v)
    torch.testing.assert_close(fv[keep], F @ flat_v[keep])
    torch.testing.assert_close(op.mul(fv)[keep], flat_v[keep])


def test_gradient_and_newton_direction_against_autograd():
    net, data, X, Y = _nested_and_data()
    op = wf.fisher_inverse(net, data, num_grads=20, block_size=None, damp=1e-1)
    g = op.gradient(net, data)
    net.zero_grad()
    nn.functional.cross_entropy(net(X), Y).backward()
    torch.testing.assert_close(g["conv"], net.conv.weight.grad)
    torch.testing.assert_close(g["head.1"], net.head[1].weight.grad)
    newton = op.mul(g)
    assert float(sum((a * b).sum() for a, b in zip(g.values(), newton.values(), strict=True))) > 0


def test_operator_refuses_another_model_and_bad_options():
    net, data, *_ = _net_and_data()
    op = wf.fisher_inverse(net, data, num_grads=24, block_size=8, damp=1e-2)
    v = {"0": torch.randn(4, 5, dtype=torch.float64), "2": torch.randn(3, 4, dtype=torch.float64)}
    torch.testing.assert_close(wf.ihvp(net, None, v, inverse=op)["0"], op.mul(v)["0"])
    copy = _net_and_data()[0]
    with pytest.raises(ValueError, match="another model"):
        wf.ihvp(copy, None, v, inverse=op)
    with pytest.raises(ValueError, match="another model"):
        op.gradient(copy, data)
    with pytest.raises(ValueError, match="with inverse= give none"):
        wf.ihvp(net, None, v, inverse=op, num_grads=3)
    with pytest.raises(ValueError, match=r"unknown ihvp options \['num_grad'\]"):
        wf.ihvp(net, data, v, num_grad=3)
    with pytest.raises(ValueError, match="params or layers/skip"):
        wf.fisher_inverse(net, data, params={"0": net[0]}, skip="2")
    with pytest.raises(ValueError, match=r"NaN or Inf \(first in '2', entry 1\)"):
        op.mul({"0": torch.zeros(4, 5), "2": torch.zeros(3, 4).index_fill_(1, torch.tensor([1]),
                                                                           float("inf"))})
    with pytest.raises(ValueError, match="twice"):
        op.mul({"0": torch.zeros(4, 5), "0.weight": torch.zeros(4, 5), "2": torch.zeros(3, 4)})
    with pytest.raises(ValueError, match="same number of vectors"):
        op.mul({"0": torch.zeros(4, 5, 2), "2": torch.zeros(3, 4, 3)})
    with pytest.raises(ValueError, match="dict of parameter-shaped tensors"):
        op.mul([1.0, 2.0])


def test_layers_and_skip_select_like_prune():
    net, data, *_ = _net_and_data()
    op = wf.fisher_inverse(net, data, method="kfac", num_grads=2, skip="0")
    assert op.layout.names == ("2",)
    V = torch.randn(12, 3, dtype=torch.float64)
    torch.testing.assert_close(op.mul(op.fmul(V)), V)
