"""Patterns and group OBS against dense brute force (float64, tiny sizes)."""

import itertools

import pytest
import torch

from woodfisher.fisher import DenseInverse, DiagonalFisherInverse, EmpiricalFisherInverse
from woodfisher.fisher.base import InverseCurvature, make_blocks
from woodfisher.fisher.kfac import KFACInverse
from woodfisher.pruning.group_obs import (
    group_independent_update,
    group_saliency,
    nm_best_subsets,
    nm_capped_selection,
    select_groups,
)
from woodfisher.pruning.patterns import (
    aligned_block_sizes,
    block_groups,
    misfit,
    nm_groups,
    parse_pattern,
)


def spd(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    return A @ A.T + 0.5 * torch.eye(d, dtype=torch.float64)


def brute_min(F, w, Q):
    """min ½δᵀFδ s.t. δ_Q = −w_Q, by solving for the free part directly (no inverse of F)."""
    d = F.shape[0]
    Q = torch.as_tensor(Q)
    R = torch.tensor([i for i in range(d) if i not in set(Q.tolist())], dtype=torch.long)
    delta = torch.zeros(d, dtype=F.dtype)
    delta[Q] = -w[Q]
    if R.numel():
        delta[R] = -torch.linalg.solve(F[R][:, R], F[R][:, Q] @ delta[Q])
    return 0.5 * delta @ F @ delta, delta


@pytest.mark.parametrize("text,expected", [
    ("unstructured", "unstructured"), ("2:4", "2:4"), (" 4:8 ", "4:8"),
    ("block:1x4", "block:1x4"), ("BLOCK:4x4", "block:4x4"), ("channels", "channels"),
])
def test_parse_pattern(text, expected):
    assert str(parse_pattern(text)) == expected


@pytest.mark.parametrize("bad,fragment", [
    ("3:2", "1 <= N < M"), ("2:2", "1 <= N < M"), ("0:4", "1 <= N < M"),
    ("block:0x4", "positive sides"), ("block:1x1", "at least 2"), ("rows", "unknown pattern"),
])
def test_parse_pattern_rejects(bad, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_pattern(bad)


def test_groups_by_hand():
    # A (2, 2, 1, 2) conv weight: rows of 4 along in·kh·kw; 2:4 runs are whole rows here.
    assert nm_groups(parse_pattern("2:4"), (2, 2, 1, 2), 10).tolist() == [
        [10, 11, 12, 13], [14, 15, 16, 17]]
    tiles = block_groups(parse_pattern("block:2x1"), (4, 2), 0).tolist()
    assert tiles == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert misfit(parse_pattern("2:3"), (5, 10)) and not misfit(parse_pattern("2:5"), (5, 10))
    assert misfit(parse_pattern("block:4x4"), (6, 8))


@pytest.mark.parametrize("pattern,shape", [("2:4", (3, 8)), ("block:1x4", (5, 8)),
                                           ("block:2x3", (4, 6)), ("channels", (6, 5))])
def test_aligned_blocks_keep_every_group_whole(pattern, shape):
    pat = parse_pattern(pattern)
    sizes = aligned_block_sizes(pat, [shape], 7)
    blocks = make_blocks([shape[0] * shape[1]], sizes)
    starts = torch.tensor([s for s, _ in blocks])
    if pat.kind == "nm":
        groups = nm_groups(pat, shape, 0)
    elif pat.kind == "block":
        groups = block_groups(pat, shape, 0)
    else:
        groups = torch.arange(shape[0] * shape[1]).reshape(shape[0], -1)
    block_of = torch.searchsorted(starts, groups, right=True)
    assert (block_of == block_of[:, :1]).all()


def make_inverses():
    torch.manual_seed(0)
    G = torch.randn(6, 24, dtype=torch.float64)
    A, S = spd(4, 1), spd(3, 2)
    return {
        "ef-sample": EmpiricalFisherInverse(G, block_size=[8, 4], damp=0.1, layout=[16, 8]),
        "ef-dense": EmpiricalFisherInverse(G[:, :], block_size=4, damp=0.1, layout=[16, 8]),
        "diag": DiagonalFisherInverse(G, 0.1, layout=[16, 8]),
        "kfac": KFACInverse({"a": (A, S), "b": (A[:2, :2], S[:2, :2])}, damp=0.1),
        "dense": DenseInverse(spd(24), make_blocks([16, 8], 8)),
    }


@pytest.mark.parametrize("name", list(make_inverses()))
def test_principal_blocks_override_equals_default(name):
    inv = make_inverses()[name]
    idx = torch.tensor([[0, 1, 2, 3], [3, 0, 2, 1], [16, 17, 18, 19]])
    if name == "kfac":
        idx = torch.tensor([[0, 1, 4, 5], [2, 3, 6, 7], [12, 13, 14, 15]])
    assert torch.allclose(inv.principal_blocks(idx), InverseCurvature.principal_blocks(inv, idx))
    dense = inv.mul(torch.eye(inv.d, dtype=inv.dtype))
    assert torch.allclose(inv.principal_blocks(idx)[0], dense[idx[0]][:, idx[0]])


def test_group_crossing_blocks_gets_zeros_between_them():
    for name, inv in make_inverses().items():
        idx = torch.tensor([[6, 7, 8, 9]]) if name != "kfac" else torch.tensor([[10, 11, 12, 13]])
        dense = inv.mul(torch.eye(inv.d, dtype=inv.dtype))
        assert torch.allclose(inv.principal_blocks(idx)[0], dense[idx[0]][:, idx[0]]), name


def test_group_saliency_and_update_match_brute_force():
    F = spd(8, 3)
    w = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    inv = DenseInverse(F)
    for Q in ([1], [0, 5], [2, 3, 7]):
        q = torch.tensor(Q)
        value, delta = brute_min(F, w, Q)
        sal = group_saliency(w[q][None], inv.principal_blocks(q[None]))
        assert torch.allclose(sal, value[None])
        fixed = torch.zeros(8, dtype=torch.bool)
        fixed[q] = True
        assert torch.allclose(inv.constrained_min(fixed, -w), delta)
        # The independent rule with one group is that group's exact step.
        step = group_independent_update(w, q[None], inv.principal_blocks(q[None]), inv)
        assert torch.allclose(step, delta)


def test_woodtaylor_shift_matches_brute_force_with_linear_term():
    F = spd(6, 5)
    g = torch.randn(6, dtype=torch.float64)
    w = torch.randn(6, dtype=torch.float64)
    inv = DenseInverse(F)
    q = torch.tensor([1, 4])
    fixed = torch.zeros(6, dtype=torch.bool)
    fixed[q] = True
    delta = inv.constrained_min(fixed, -w, g)
    value = g @ delta + 0.5 * delta @ F @ delta
    const = -0.5 * g @ inv.mul(g)
    sal = group_saliency(w[q][None], inv.principal_blocks(q[None]), inv.mul(g)[q][None])
    assert torch.allclose(sal + const, value[None])


def test_nm_best_subsets_is_the_brute_force_optimum():
    F = spd(8, 6)
    inv = DenseInverse(F, make_blocks([8], 4))
    w = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    idx = torch.arange(8).reshape(2, 4)
    present = torch.ones(2, 4, dtype=torch.bool)
    present[1, 2] = False  # already pruned: must stay in the removed set
    w[6] = 0.0
    remove, sal = nm_best_subsets(w[idx], inv.principal_blocks(idx), present, 2)
    assert (remove.sum(1) == 2).all() and remove[1, 2]
    for r in range(2):
        Fb = F[4 * r : 4 * r + 4, 4 * r : 4 * r + 4]
        best = min(
            brute_min(Fb, w[idx[r]], list(S))[0]
            for S in itertools.combinations(range(4), 2) if present[r].logical_not()[list(S)].sum()
            == (~present[r]).sum()
        )
        assert torch.isclose(sal[r], best)


def test_capped_selection_never_exceeds_a_run():
    scores = torch.tensor([[0.0, 0.1, 0.2, 9.0], [5.0, 6.0, 7.0, 8.0]])
    present = torch.ones(2, 4, dtype=torch.bool)
    new = nm_capped_selection(scores, present, 2, 3)
    assert new.sum(1).tolist() == [2, 1] and new[0, :2].all() and new[1, 0]
    with pytest.raises(ValueError, match="fit the N:M pattern"):
        nm_capped_selection(scores, present, 2, 5)


def test_select_groups_meets_need_with_least_overshoot():
    scores = torch.tensor([0.1, 0.2, 0.3, 0.4])
    cost = torch.tensor([1.0, 5.0, 1.0, 1.0])
    # Group 1 would overshoot by 4; group 2 (next in order) fits exactly.
    chosen = select_groups(scores, cost, torch.tensor([True, True, True, False]), 2)
    assert chosen.tolist() == [True, False, True, False]
    # Nothing fits the last 0.5: the best-scored remaining group closes the gap.
    chosen = select_groups(scores, cost, torch.ones(4, dtype=torch.bool), 3.5)
    assert chosen.tolist() == [True, True, True, True]
    chosen = select_groups(scores, torch.tensor([1.0, 5.0, 1.0, 3.0]),
                           torch.ones(4, dtype=torch.bool), 2.5)
    assert chosen.tolist() == [True, True, True, False]
    assert not select_groups(scores, cost, torch.ones(4, dtype=torch.bool), 0).any()
