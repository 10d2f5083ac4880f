"""Block-wise inverse empirical Fisher (fast path and Woodbury reference) against dense inverses."""

from __future__ import annotations

import pytest
import torch

from woodfisher.fisher import (
    DenseInverse,
    EmpiricalFisherInverse,
    InverseCurvature,
    make_blocks,
    plan_memory,
)
from woodfisher.params import Layout

CASES = [
    {"name": "m<B", "m": 5, "sizes": [48], "block": 16, "damp": 1e-2},
    {"name": "m=B", "m": 16, "sizes": [48], "block": 16, "damp": 1e-2},
    {"name": "m>B", "m": 30, "sizes": [48], "block": 16, "damp": 1e-2},
    {"name": "nondividing", "m": 7, "sizes": [50], "block": 12, "damp": 1e-2},
    {"name": "layers", "m": 9, "sizes": [37, 23], "block": 10, "damp": 1e-1},
    {"name": "layers_mixed", "m": 8, "sizes": [37, 23], "block": 16, "damp": 1e-2},
    {"name": "full", "m": 11, "sizes": [20, 19], "block": None, "damp": 1e-3},
    {"name": "full_m>d", "m": 60, "sizes": [30], "block": None, "damp": 1e-3},
]


def dense_oracle(G: torch.Tensor, damp: float, blocks) -> DenseInverse:
    """``linalg.inv`` of the block-diagonal damped empirical Fisher."""
    m, d = G.shape
    F = damp * torch.eye(d, dtype=G.dtype) + G.T @ G / m
    return DenseInverse(F, blocks)


def compare(op: InverseCurvature, ref: InverseCurvature, rtol: float, gen: torch.Generator):
    """Every query of ``op`` equals that of ``ref``, relative to the size of the reference."""

    def close(a, b):
        err = (a - b).abs().max() / b.abs().max()
        assert err <= rtol, f"relative error {err:.2e} > {rtol:.0e}"

    d = op.d
    close(op.diag(), ref.diag())
    v = torch.randn(d, generator=gen, dtype=torch.float64).to(op.dtype)
    close(op.mul(v), ref.mul(v))
    V = torch.randn(d, 3, generator=gen, dtype=torch.float64).to(op.dtype)
    close(op.mul(V), ref.mul(V))
    idx = torch.randperm(d, generator=gen)[: max(3, d // 4)]
    close(op.columns(idx), ref.columns(idx))
    for b in range(len(op.blocks)):
        close(op.block(b), ref.block(b))


@pytest.fixture(params=CASES, ids=lambda c: c["name"])
def case(request):
    c = dict(request.param)
    gen = torch.Generator().manual_seed(CASES.index(request.param))
    c["G"] = torch.randn(c["m"], sum(c["sizes"]), generator=gen, dtype=torch.float64)
    c["gen"] = gen
    return c


@pytest.mark.parametrize("algorithm", ["auto", "woodbury"])
def test_matches_dense_inverse_float64(case, algorithm):
    inv = EmpiricalFisherInverse(
        case["G"], case["block"], case["damp"], layout=case["sizes"], algorithm=algorithm
    )
    assert inv.blocks == make_blocks(case["sizes"], case["block"])
    ref = dense_oracle(case["G"], case["damp"], inv.blocks)
    compare(inv, ref, 1e-10, case["gen"])


def test_matches_dense_inverse_float32(case):
    inv = EmpiricalFisherInverse(
        case["G"].float(), case["block"], case["damp"], layout=case["sizes"]
    )
    assert inv.diag().dtype == torch.float32
    ref = dense_oracle(case["G"], case["damp"], inv.blocks)
    compare(inv, ref, 1e-4, case["gen"])


def test_dtype_argument(case):
    inv = EmpiricalFisherInverse(case["G"].float(), case["block"], case["damp"],
                                 layout=case["sizes"], dtype=torch.float64)
    ref = dense_oracle(case["G"].float().double(), case["damp"], inv.blocks)
    compare(inv, ref, 1e-10, case["gen"])


def test_overrides_equal_generic_defaults(case):
    inv = EmpiricalFisherInverse(case["G"], case["block"], case["damp"], layout=case["sizes"])
    torch.testing.assert_close(inv.diag(), InverseCurvature.diag(inv), rtol=1e-12, atol=0)
    idx = torch.tensor([0, inv.d - 1, inv.d // 2])
    torch.testing.assert_close(inv.columns(idx), InverseCurvature.columns(inv, idx))
    for b in range(len(inv.blocks)):
        torch.testing.assert_close(inv.block(b), InverseCurvature.block(inv, b))


@pytest.mark.parametrize("frac", [0.0, 0.3, 0.98, 1.0])
@pytest.mark.parametrize("with_linear", [False, True])
def test_constrained_min(case, frac, with_linear):
    G, gen, d = case["G"], case["gen"], sum(case["sizes"])
    inv = EmpiricalFisherInverse(G, case["block"], case["damp"], layout=case["sizes"])
    fixed = torch.rand(d, generator=gen) < frac
    values = torch.randn(d, generator=gen, dtype=torch.float64)
    linear = torch.randn(d, generator=gen, dtype=torch.float64) if with_linear else None
    got = inv.constrained_min(fixed, values, linear)
    assert torch.equal(got[fixed], values[fixed])
    generic = InverseCurvature.constrained_min(inv, fixed, values, linear)
    torch.testing.assert_close(got, generic, rtol=1e-10, atol=1e-10 * generic.abs().max())
    # Brute force: minimise over the free entries of the block-diagonal F by a dense solve.
    F = dense_oracle(G, case["damp"], inv.blocks).F
    free = ~fixed
    g = linear if linear is not None else torch.zeros(d, dtype=torch.float64)
    brute = values.clone()
    if free.any():
        rhs = g[free] + F[free][:, fixed] @ values[fixed]
        brute[free] = -torch.linalg.solve(F[free][:, free], rhs)
    torch.testing.assert_close(got, brute, rtol=1e-10, atol=1e-10 * brute.abs().max())


def test_constrained_min_is_joint_obs():
    gen = torch.Generator().manual_seed(5)
    G = torch.randn(6, 40, generator=gen, dtype=torch.float64)
    w = torch.randn(40, generator=gen, dtype=torch.float64)
    inv = EmpiricalFisherInverse(G, 20, 1e-2)
    Q = torch.zeros(40, dtype=torch.bool)
    Q[[3, 7, 25]] = True
    Finv = dense_oracle(G, 1e-2, inv.blocks).inverse
    # Joint OBS, per block: δ = -F⁻¹[:, Q] (F⁻¹[Q, Q])⁻¹ w_Q.
    expect = torch.zeros(40, dtype=torch.float64)
    for s, e in inv.blocks:
        q = torch.zeros(40, dtype=torch.bool)
        q[s:e] = Q[s:e]
        expect += -Finv[:, q] @ torch.linalg.solve(Finv[q][:, q], w[q])
    torch.testing.assert_close(inv.constrained_min(Q, -w), expect, rtol=1e-10, atol=1e-12)


def test_woodbury_equals_fast_with_small_damp():
    gen = torch.Generator().manual_seed(7)
    G = torch.randn(20, 64, generator=gen, dtype=torch.float64) * 1e-2
    fast = EmpiricalFisherInverse(G, 32, 1e-5)
    ref = EmpiricalFisherInverse(G, 32, 1e-5, algorithm="woodbury")
    torch.testing.assert_close(fast.diag(), ref.diag(), rtol=1e-9, atol=0)


def test_layout_object_and_attributes():
    layout = Layout(("a", "b"), (torch.Size([4, 5]), torch.Size([3, 2])))
    G = torch.randn(3, 26, dtype=torch.float64)
    inv = EmpiricalFisherInverse(G, 8, 0.5, layout=layout)
    assert inv.blocks == ((0, 8), (8, 16), (16, 20), (20, 26))
    assert inv.damp == 0.5 and inv.num_grads == 3 and torch.equal(inv.grads, G)
    assert "sample space" in str(inv.plan)


def test_plan_memory_counts():
    item = 4
    plan = plan_memory(1000, 10, 100, dtype=torch.float32)
    assert plan.parts["gradients"] == 10 * 1000 * item
    assert plan.parts["inverse factors"] == 10 * 1000 * item  # W: (m, B) per block
    dense = plan_memory(1000, 200, 100, dtype=torch.float64)
    assert dense.parts["inverse factors"] == 10 * 100 * 100 * 8
    assert "dense Cholesky" in str(dense)
    wood = plan_memory(1000, 10, 100, algorithm="woodbury")
    assert wood.parts["inverse blocks"] == 10 * 100 * 100 * item
    assert str(plan).startswith("fast path, sample space (m <= B): ")


def test_max_memory_names_block_size_that_fits():
    G = torch.randn(50, 400)
    with pytest.raises(ValueError, match=r"block_size=\d+ fits") as err:
        EmpiricalFisherInverse(G, None, 1e-3, max_memory=200_000)
    fit = int(str(err.value).split("block_size=")[-1].split(" fits")[0])
    EmpiricalFisherInverse(G, fit, 1e-3, max_memory=200_000)  # the suggestion works


BAD = [
    ({"damp": 0.0}, "damp"),
    ({"damp": -1.0}, "damp"),
    ({"damp": float("nan")}, "damp"),
    ({"damp": float("inf")}, "damp"),
    ({"block_size": 0}, "block_size"),
    ({"block_size": -3}, "block_size"),
    ({"layout": [5, 6]}, "sum to 11"),
    ({"algorithm": "magic"}, "magic"),
]


@pytest.mark.parametrize(("kwargs", "match"), BAD)
def test_bad_arguments(kwargs, match):
    G = torch.randn(4, 10, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        EmpiricalFisherInverse(G, **{"block_size": 5, **kwargs})


@pytest.mark.parametrize(
    ("grads", "match"),
    [
        (torch.randn(10), "2-D"),
        (torch.randn(2, 3, 4), "2-D"),
        (torch.zeros(0, 10), "no rows"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "NaN or Inf"),
        (torch.tensor([[1.0, 2.0], [float("inf"), 1.0]]), r"row 1"),
    ],
)
def test_bad_grads(grads, match):
    with pytest.raises(ValueError, match=match):
        EmpiricalFisherInverse(grads, None, 1e-3)


def test_bad_vector_length():
    inv = EmpiricalFisherInverse(torch.randn(3, 10, dtype=torch.float64), 4, 1e-2)
    with pytest.raises(ValueError, match=r"\(10,\)"):
        inv.mul(torch.randn(9, dtype=torch.float64))
    with pytest.raises(ValueError, match="fixed"):
        inv.constrained_min(torch.zeros(9, dtype=torch.bool), torch.zeros(10))


def test_all_cases_distinct():
    keys = [(c["m"], tuple(c["sizes"]), c["block"]) for c in CASES]
    assert len(set(keys)) == len(keys)
    assert any(c["block"] is None for c in CASES)
    assert any(len(c["sizes"]) > 1 for c in CASES)


@pytest.mark.parametrize("m", [4, 20])  # sample space (m <= B) and dense blocks (m > B)
def test_damp_that_underflows_against_tiny_gradients_gives_a_clear_error(m):
    # What a broken model hands the pruner: gradients of 1e-29, whose squares and a relative
    # damp of 100 · mean(g²) underflow to 0 in float32.
    G = torch.randn(m, 10) * 1e-29
    with pytest.raises(ValueError, match="not positive definite in torch.float32"):
        EmpiricalFisherInverse(G, 5, 1e-56)
    EmpiricalFisherInverse(G.double(), 5, 1e-56)  # representable in float64
