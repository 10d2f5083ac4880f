"""IHVPs and Fisher-vector products of every estimate against dense matrices built independently."""

from __future__ import annotations

import math

import pytest
import torch

from woodfisher.fisher import (
    DenseInverse,
    DiagonalFisherInverse,
    EmpiricalFisherInverse,
    KFACInverse,
    make_blocks,
    products,
)

CASES = [
    {"m": 6, "sizes": [48, 20], "block": 8},  # sample space, several runs
    {"m": 30, "sizes": [48, 20], "block": 8},  # dense blocks (m > B)
    {"m": 5, "sizes": [37, 23], "block": 10},  # partial blocks: groups of several sizes
    {"m": 9, "sizes": [30], "block": None},  # one full block
]


def _dense_ef(G, damp, blocks):
    m, d = G.shape
    F = torch.zeros(d, d, dtype=G.dtype)
    for s, e in blocks:
        F[s:e, s:e] = G[:, s:e].T @ G[:, s:e] / m + damp * torch.eye(e - s, dtype=G.dtype)
    return F


@pytest.fixture(params=[1 << 20, 64, 512], ids=["default-chunks", "tiny-chunks", "block-chunks"])
def chunk(request, monkeypatch):
    # Tiny chunks force one block per run and one row per product; chunks of about one block
    # (m = 6, B = 8 in float64: 384 bytes of W; m = 30: 512 bytes of F⁻¹) take the one-vector
    # mat-vec paths: all must agree.
    monkeypatch.setattr(products, "CHUNK_BYTES", request.param)
    return request.param


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"m{c['m']}-B{c['block']}")
@pytest.mark.parametrize("algorithm", ["auto", "woodbury"])
def test_empirical_fisher_mul_and_fmul(case, algorithm, chunk):
    gen = torch.Generator().manual_seed(case["m"])
    G = torch.randn(case["m"], sum(case["sizes"]), generator=gen, dtype=torch.float64)
    inv = EmpiricalFisherInverse(G, case["block"], 0.05, layout=case["sizes"], algorithm=algorithm)
    F = _dense_ef(G, 0.05, make_blocks(case["sizes"], case["block"]))
    Finv = torch.linalg.inv(F)
    for shape in [(G.shape[1],), (G.shape[1], 1), (G.shape[1], 5)]:
        v = torch.randn(*shape, generator=gen, dtype=torch.float64)
        assert inv.mul(v).shape == v.shape
        torch.testing.assert_close(inv.mul(v), (Finv @ v.reshape(F.shape[0], -1)).reshape(shape))
        torch.testing.assert_close(inv.fmul(v), (F @ v.reshape(F.shape[0], -1)).reshape(shape))
    # F⁻¹ F v = v: the two products are inverse to each other.
    v = torch.randn(G.shape[1], generator=gen, dtype=torch.float64)
    torch.testing.assert_close(inv.mul(inv.fmul(v)), v)


def test_mul_accepts_non_contiguous_and_float32_vectors():
    G = torch.randn(7, 40, dtype=torch.float64)
    inv = EmpiricalFisherInverse(G, 10, 0.1)
    V = torch.randn(3, 40, dtype=torch.float64).T  # (40, 3), transposed view
    ref = torch.linalg.inv(_dense_ef(G, 0.1, inv.blocks)) @ V
    torch.testing.assert_close(inv.mul(V), ref)
    assert inv.mul(V.float()).dtype == torch.float64


def test_diagonal_fmul_is_the_inverse_of_mul():
    G = torch.randn(4, 9, dtype=torch.float64)
    inv = DiagonalFisherInverse(G, 0.1)
    v = torch.randn(9, 2, dtype=torch.float64)
    torch.testing.assert_close(inv.fmul(v), (0.1 + (G * G).mean(0))[:, None] * v)
    torch.testing.assert_close(inv.mul(inv.fmul(v)), v)


def test_kfac_products_match_dense_kronecker():
    gen = torch.Generator().manual_seed(0)

    def spd(n):
        X = torch.randn(n, n + 2, generator=gen, dtype=torch.float64)
        return X @ X.T / n

    factors = {"a": (spd(3), spd(4)), "b": (spd(5), spd(2))}
    inv = KFACInverse(factors, damp=0.01)
    root = math.sqrt(0.01)
    dense = []
    for name, (A, S) in factors.items():
        pi = inv.pi[name]
        dense.append(torch.kron(S + root / pi * torch.eye(len(S), dtype=S.dtype),
                                A + pi * root * torch.eye(len(A), dtype=A.dtype)))
    F = torch.block_diag(*dense)
    V = torch.randn(F.shape[0], 4, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(inv.fmul(V), F @ V)
    torch.testing.assert_close(inv.mul(V), torch.linalg.solve(F, V))
    torch.testing.assert_close(inv.mul(V[:, 0]), torch.linalg.solve(F, V[:, 0]))


def test_dense_inverse_fmul_and_bad_shapes():
    F = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    inv = DenseInverse(F)
    v = torch.tensor([1.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(inv.fmul(v), F @ v)
    with pytest.raises(ValueError, match=r"expected v of shape \(2,\)"):
        inv.fmul(torch.ones(3))
    with pytest.raises(ValueError, match=r"expected v of shape \(2,\)"):
        inv.mul(torch.ones(2, 2, 2))
