"""Factorised layers against the dense layer and hand counts; measures against closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from woodfisher.lowrank.layers import (
    compose,
    describe,
    factor_params,
    factorise,
    fisher_scales,
    max_rank,
    shell,
    useful_max_rank,
)
from woodfisher.lowrank.measures import (
    effective_rank,
    energy_rank,
    l1_rank,
    nuclear_norm,
    stable_rank,
)

CONVS = [
    dict(s=4, t=6, k=3, stride=1, padding=1, dilation=1, bias=True),
    dict(s=8, t=5, k=3, stride=2, padding=1, dilation=1, bias=False),
    dict(s=3, t=7, k=3, stride=1, padding=2, dilation=2, bias=True),
    dict(s=6, t=4, k=1, stride=2, padding=0, dilation=1, bias=True),
]


def _conv(c):
    torch.manual_seed(0)
    return nn.Conv2d(c["s"], c["t"], c["k"], stride=c["stride"], padding=c["padding"],
                     dilation=c["dilation"], bias=c["bias"]).double()


@pytest.mark.parametrize("case", CONVS)
@pytest.mark.parametrize("method", ["svd", "tucker2"])
def test_full_rank_reproduces_the_convolution(case, method):
    conv = _conv(case)
    seq = factorise(conv, method, max_rank(conv, method))
    x = torch.randn(2, case["s"], 9, 9, dtype=torch.float64)
    assert torch.allclose(seq(x), conv(x), atol=1e-10)
    assert torch.allclose(compose(seq), conv.weight, atol=1e-10)


def test_full_rank_reproduces_a_linear_layer():
    torch.manual_seed(0)
    lin = nn.Linear(20, 7)
    seq = factorise(lin, "tucker2", max_rank(lin, "tucker2"))  # matrices always use SVD
    x = torch.randn(5, 20)
    assert len(seq) == 2 and torch.allclose(seq(x), lin(x), atol=1e-5)


def test_cp_recovers_a_kernel_of_known_cp_rank():
    torch.manual_seed(0)
    t, s, k, r = 8, 6, 3, 4
    a, b, c = torch.randn(t, r), torch.randn(k * k, r), torch.randn(s, r)
    w = torch.einsum("tr,kr,sr->tks", a, b, c).reshape(t, k, k, s).permute(0, 3, 1, 2)
    conv = nn.Conv2d(s, t, k, padding=1, bias=False)
    conv.weight.data.copy_(w)
    seq = factorise(conv, "cp", r)
    assert seq[1].groups == r  # depthwise middle stage
    assert (compose(seq) - w).norm() / w.norm() < 1e-4
    x = torch.randn(2, s, 7, 7)
    assert torch.allclose(seq(x), conv(x), atol=1e-3)


def test_truncated_svd_is_the_best_rank_r_approximation():
    torch.manual_seed(0)
    lin = nn.Linear(12, 9, bias=False)
    s = torch.linalg.svdvals(lin.weight.detach().double())
    seq = factorise(lin, "svd", 3)
    err = (compose(seq).double() - lin.weight.detach().double()).norm()
    assert math.isclose(float(err), float(s[3:].norm()), rel_tol=1e-5)  # Eckart-Young


def test_fisher_weighting_lowers_the_weighted_error():
    torch.manual_seed(0)
    lin = nn.Linear(30, 20, bias=False).double()
    f = torch.rand(20, 1, dtype=torch.float64) ** 4 * torch.rand(1, 30, dtype=torch.float64) ** 4
    rw, cw = fisher_scales(f, "svd")
    assert torch.allclose(rw[:, None] * cw[None, :], f, rtol=1e-8)  # separable: exact
    plain = compose(factorise(lin, "svd", 4)) - lin.weight
    weighted = compose(factorise(lin, "svd", 4, rw, cw)) - lin.weight
    assert (f * weighted.square()).sum() < 0.9 * (f * plain.square()).sum()


@pytest.mark.parametrize("method", ["svd", "tucker2", "cp"])
def test_param_formula_matches_the_built_layer(method):
    conv = nn.Conv2d(8, 12, 3, padding=1)
    for r in (1, 3, 8, 11):
        built = sum(m.weight.numel() for m in shell(conv, method, r))
        assert factor_params(conv, method, r) == built
    hand = {"svd": 3 * (8 * 9 + 12), "tucker2": 8 * 3 + 3 * 3 * 9 + 3 * 12,
            "cp": 3 * (8 + 9 + 12)}
    assert factor_params(conv, method, 3) == hand[method]
    u = useful_max_rank(conv, method)
    assert factor_params(conv, method, u) < 8 * 12 * 9 <= factor_params(conv, method, u + 1)


def test_describe_reads_the_structure_back():
    conv = nn.Conv2d(8, 12, 3)
    assert describe(shell(conv, "cp", 5))["method"] == "cp"
    assert describe(shell(conv, "tucker2", 10))["ranks"] == [8, 10]
    assert describe(shell(conv, "svd", 4))["rank"] == 4


def test_bad_ranks_and_layers_are_refused():
    conv = nn.Conv2d(4, 6, 3)
    with pytest.raises(ValueError, match=r"rank must be an integer in 1\.\.6"):
        factorise(conv, "tucker2", 7)
    with pytest.raises(ValueError, match="rank must be"):
        factorise(conv, "svd", 0)
    with pytest.raises(ValueError, match="grouped convolution"):
        factorise(nn.Conv2d(4, 4, 3, groups=2), "svd", 1)
    with pytest.raises(ValueError, match="unknown method"):
        factorise(conv, "tt", 2)


def test_measures_match_closed_forms():
    sig = torch.tensor([3.0, 2.0, 1.0, 0.0])
    w = torch.diag(sig)
    p = sig[:3] / 6
    assert math.isclose(effective_rank(w), math.exp(-(p * p.log()).sum()), rel_tol=1e-6)
    assert math.isclose(stable_rank(w), 14 / 9, rel_tol=1e-6)
    assert math.isclose(nuclear_norm(w), 6.0, rel_tol=1e-6)
    assert math.isclose(l1_rank(w), 36 / 14, rel_tol=1e-6)
    assert energy_rank(w, 9 / 14) == 1 and energy_rank(w, 13 / 14) == 2
    assert energy_rank(w, 1.0) == 3
    assert effective_rank(torch.eye(5)) == pytest.approx(5.0)
    d = effective_rank(torch.diag(sig).requires_grad_(), differentiable=True)
    assert d.requires_grad and float(d) == pytest.approx(effective_rank(w), rel=1e-6)
    conv = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    assert effective_rank(conv, mode=1) <= 4 < effective_rank(conv, mode=0) <= 6
