"""Exact-k selection: global, layerwise, overrides, already-pruned weights counted."""

import pytest
import torch

from woodfisher.params import Layout
from woodfisher.pruning import interpolate as schedule
from woodfisher.pruning import select, select_by_sparsity

LAYOUT = Layout(("a", "b"), (torch.Size([4, 5]), torch.Size([10])))


@pytest.mark.parametrize("k", [0, 1, 7, 30])
def test_select_exact_k_lowest(k):
    scores = torch.randn(30, generator=torch.Generator().manual_seed(k))
    out = select(scores, k)
    assert int(out.sum()) == k
    if 0 < k < 30:
        assert scores[out].max() <= scores[~out].min()


def test_select_ties_by_index_and_eligible():
    scores = torch.ones(6)
    assert select(scores, 3).tolist() == [True, True, True, False, False, False]
    eligible = torch.tensor([False, True, False, True, True, True])
    assert select(scores, 2, eligible).tolist() == [False, True, False, True, False, False]


def test_select_rejects_bad_k_and_nan():
    with pytest.raises(ValueError, match="k=4"):
        select(torch.zeros(3), 4)
    with pytest.raises(ValueError, match="NaN"):
        select(torch.tensor([0.0, float("nan")]), 1)


def test_global_is_one_threshold():
    scores = torch.cat([torch.arange(20.0), torch.arange(10.0) + 0.5])
    present = torch.ones(30, dtype=torch.bool)
    out = select_by_sparsity(scores, present, LAYOUT, 0.5)
    assert int(out.sum()) == 15
    assert scores[out].max() < scores[~out].min()


def test_layerwise_same_sparsity_per_layer():
    scores = torch.cat([torch.arange(20.0), -torch.arange(10.0)])
    out = select_by_sparsity(scores, torch.ones(30, dtype=torch.bool), LAYOUT, 0.5, "layerwise")
    assert int(out[:20].sum()) == 10 and int(out[20:].sum()) == 5


def test_overrides_own_target_rest_global():
    scores = torch.cat([torch.arange(20.0), -torch.arange(10.0)])
    out = select_by_sparsity(
        scores, torch.ones(30, dtype=torch.bool), LAYOUT, 0.25, layer_sparsity={"b": 0.8}
    )
    assert int(out[20:].sum()) == 8
    assert int(out[:20].sum()) == 5  # round(0.25 * 20): the rest ranked alone


def test_already_pruned_count_as_pruned():
    present = torch.ones(30, dtype=torch.bool)
    present[:6] = False
    scores = torch.randn(30, generator=torch.Generator().manual_seed(0))
    out = select_by_sparsity(scores, present, LAYOUT, 0.5)
    assert not (out & ~present).any()
    assert int(out.sum()) + 6 == 15
    with pytest.raises(ValueError, match="below the current"):
        select_by_sparsity(scores, present, LAYOUT, 0.1)


def test_bad_scope_layer_and_sparsity():
    s, p = torch.zeros(30), torch.ones(30, dtype=torch.bool)
    with pytest.raises(ValueError, match="unknown scope 'row'"):
        select_by_sparsity(s, p, LAYOUT, 0.5, "row")
    with pytest.raises(ValueError, match="unknown layer 'c'"):
        select_by_sparsity(s, p, LAYOUT, 0.5, layer_sparsity={"c": 0.5})
    with pytest.raises(ValueError, match="1.0"):
        select_by_sparsity(s, p, LAYOUT, 1.0)


def test_schedule_ends_at_target_and_increases():
    for kind in ("cubic", "linear"):
        steps = schedule(0.2, 0.9, 4, kind)
        assert steps[-1] == 0.9 and len(steps) == 4
        assert all(a <= b for a, b in zip([0.2, *steps], steps, strict=False))
    assert schedule(0.0, 0.5, 1) == [0.5]
