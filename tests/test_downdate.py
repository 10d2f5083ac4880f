"""The downdate path: dense block inverses from streamed Grams, Schur downdates, joint OBS.

Oracles: dense ``torch.linalg.inv`` of the (block-masked) Fisher, ``DenseInverse`` and its
generic ``constrained_min`` (exact OBS per block), and a brute-force multi-step loop that
rebuilds the restricted inverse from scratch at every step.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fake_curvature import loop_gradients
from woodfisher.data import synthetic
from woodfisher.fisher import DenseInverse
from woodfisher.fisher.base import InverseCurvature, make_blocks
from woodfisher.fisher.dense import GramAccumulator, make_units, unit_ranges
from woodfisher.fisher.spd import spd_inverse, tri_inverse
from woodfisher.models import build_model
from woodfisher.params import Layout, flat_masks, flat_weights, select_modules
from woodfisher.pruning import prune
from woodfisher.pruning.downdate import downdate_applies, refresh_steps
from woodfisher.pruning.obs import obs_saliency
from woodfisher.pruning.select import select_by_sparsity
from woodfisher.streaming import chunk_rows, gradient_chunks

CASES = [
    dict(m=30, sizes=[37, 20], block=8, seed=0),  # m > B, uneven tails
    dict(m=6, sizes=[25], block=10, seed=1),  # m < B: Grams rank-deficient, damp carries it
    dict(m=12, sizes=[9, 9, 4], block=None, seed=2),  # one full block across layers
]


def _dense(G: torch.Tensor, damp: float, blocks) -> torch.Tensor:
    m, d = G.shape
    F = damp * torch.eye(d, dtype=G.dtype) + G.T @ G / m
    masked = torch.zeros_like(F)
    for s, e in blocks:
        masked[s:e, s:e] = F[s:e, s:e]
    return masked


def _build(case, chunks=(0.4, 0.7)):
    g = torch.Generator().manual_seed(case["seed"])
    d = sum(case["sizes"])
    G = torch.randn(case["m"], d, generator=g, dtype=torch.float64) * torch.linspace(
        0.1, 3, d, dtype=torch.float64
    )
    units = make_units(case["sizes"], case["block"], max_elements=200)
    acc = GramAccumulator(units)
    cuts = [0, *(int(c * case["m"]) for c in chunks), case["m"]]
    for a, b in zip(cuts, cuts[1:], strict=False):
        acc.add(G[a:b])
    inv = acc.finish(case["m"], 0.3)
    return G, inv, make_blocks(case["sizes"], case["block"])


@pytest.fixture(params=CASES, ids=lambda c: f"m{c['m']}-B{c['block']}")
def case(request):
    return request.param


def test_units_cover_the_blocks_in_order(case):
    units = make_units(case["sizes"], case["block"], max_elements=200)
    flat = [(u.start + i * u.size, u.start + (i + 1) * u.size) for u in units
            for i in range(u.count)]
    assert tuple(flat) == make_blocks(case["sizes"], case["block"])
    for parts in (1, 2, 3, 7):
        ranges = unit_ranges(units, parts)
        assert ranges[0][0] == 0 and ranges[-1][1] == len(units)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))


def test_streamed_inverse_equals_dense_inverse(case):
    G, inv, blocks = _build(case)
    assert inv.blocks == blocks
    dense = torch.linalg.inv(_dense(G, 0.3, blocks))
    torch.testing.assert_close(inv.diag(), dense.diagonal(), rtol=1e-10, atol=1e-12)
    V = torch.randn(G.shape[1], 3, dtype=torch.float64)
    torch.testing.assert_close(inv.mul(V), dense @ V, rtol=1e-10, atol=1e-12)
    idx = torch.tensor([0, G.shape[1] - 1, 3, 3])
    torch.testing.assert_close(inv.columns(idx), dense[:, idx], rtol=1e-10, atol=1e-12)
    # Overrides equal the generic defaults of the interface.
    torch.testing.assert_close(inv.columns(idx), InverseCurvature.columns(inv, idx))
    last = len(blocks) - 1
    torch.testing.assert_close(inv.block(last), InverseCurvature.block(inv, last))


def test_one_elimination_is_the_exact_joint_obs_step_and_the_restricted_inverse(case):
    G, inv, blocks = _build(case)
    d = G.shape[1]
    g = torch.Generator().manual_seed(7)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    remove = torch.rand(d, generator=g) < 0.3
    F = _dense(G, 0.3, blocks)
    want = DenseInverse(F, blocks).constrained_min(remove, -w)
    delta, value = inv.eliminate(remove, w, "joint")
    torch.testing.assert_close(delta, want, rtol=1e-9, atol=1e-11)
    assert value == pytest.approx(float(0.5 * want @ F @ want), rel=1e-9)
    # F restricted to the rest, removed weights decoupled with 1/damp: its inverse is H now.
    keep = (~remove).double()
    F_rest = F * keep[:, None] * keep[None, :] + torch.diag(0.3 * (1 - keep))
    torch.testing.assert_close(inv.block(0), torch.linalg.inv(F_rest)[: blocks[0][1],
                                                                          : blocks[0][1]],
                               rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(inv.diag(), torch.linalg.inv(_blockmask(F_rest, blocks))
                               .diagonal(), rtol=1e-9, atol=1e-11)


def _blockmask(F, blocks):
    out = torch.zeros_like(F)
    for s, e in blocks:
        out[s:e, s:e] = F[s:e, s:e]
    return out


def test_independent_rule_is_the_sum_of_single_weight_steps(case):
    G, inv, blocks = _build(case)
    d = G.shape[1]
    w = torch.randn(d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    remove = torch.zeros(d, dtype=torch.bool)
    remove[::4] = True
    dense = DenseInverse(_dense(G, 0.3, blocks), blocks)
    from woodfisher.pruning.obs import independent_update

    want = independent_update(w, remove, dense)
    delta, _ = inv.eliminate(remove, w, "independent")
    torch.testing.assert_close(delta, want, rtol=1e-9, atol=1e-11)


def test_eliminate_rejects_bad_input(case):
    _, inv, _ = _build(case)
    with pytest.raises(ValueError, match="rule"):
        inv.eliminate(torch.zeros(inv.d, dtype=torch.bool), torch.zeros(inv.d), "greedy")
    with pytest.raises(ValueError, match="shape"):
        inv.eliminate(torch.zeros(3, dtype=torch.bool), torch.zeros(3))


def test_spd_inverse_and_triangular_inverse_match_linalg():
    g = torch.Generator().manual_seed(0)
    for n in (1, 5, 128, 129, 300):
        A = torch.randn(2, n + 3, n, generator=g, dtype=torch.float64)
        A = A.mT @ A / n + 0.01 * torch.eye(n, dtype=torch.float64)
        torch.testing.assert_close(spd_inverse(A), torch.linalg.inv(A), rtol=1e-8, atol=1e-10)
        L = torch.linalg.cholesky(A)
        torch.testing.assert_close(tri_inverse(L), torch.linalg.inv(L), rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="not positive definite"):
        spd_inverse(-torch.eye(3).expand(2, 3, 3))


def _tiny(seed=0, dtype=torch.float64):
    # 16 inputs: d = 1500, so that the brute-force oracle inverts 1500² dense matrices.
    ds = synthetic(n=256, input_shape=(1, 4, 4), num_classes=3, seed=seed)
    torch.manual_seed(seed)
    model = build_model("mlpnet-small", (1, 4, 4), 3).to(dtype)
    x, y = ds.tensors
    data = [(x[i : i + 32].to(dtype), y[i : i + 32]) for i in range(0, 256, 32)]
    return model, data


def test_several_steps_equal_a_brute_force_greedy_obs_on_one_fisher():
    model, data = _tiny()
    m, block, target, steps = 80, 40, 0.8, 3
    pruned = copy.deepcopy(model)
    res = prune(pruned, data, target, num_grads=m, block_size=block, recompute=steps,
                recompute_by="downdate", refresh=0.0)
    assert res.path == "downdate" and len(res.steps) == steps

    # The oracle: one F from a loop of single backward passes; every step rebuilds the inverse
    # of F restricted to the remaining weights from scratch and takes the exact joint step.
    from woodfisher.pruning.schedule import interpolate

    modules = select_modules(model)
    layout = Layout.of(modules)
    G = loop_gradients(model, data, modules, m)
    damp = 1e-2 * float(G.pow(2).sum(0).mean() / m)
    blocks = make_blocks(layout.sizes, block)
    F = _dense(G, damp, blocks)
    w = flat_weights(modules).double()
    present = flat_masks(modules)
    for t in interpolate(0.0, target, steps, "geometric"):
        keep = present.double()
        F_rest = F * keep[:, None] * keep[None, :] + torch.diag(damp * (1 - keep))
        H = torch.linalg.inv(F_rest)
        remove = select_by_sparsity(obs_saliency(w, H.diagonal()), present, layout, t)
        delta = DenseInverse(F_rest, blocks).constrained_min(remove | ~present, -w)
        present &= ~remove
        w = torch.where(present, w + delta, torch.zeros_like(w))
    assert torch.equal(flat_masks(select_modules(pruned)), present)
    torch.testing.assert_close(flat_weights(select_modules(pruned)), w, rtol=1e-8, atol=1e-10)


def test_one_step_downdate_equals_one_step_resample():
    model, data = _tiny(seed=1)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ra = prune(a, data, 0.6, num_grads=64, block_size=50, recompute=1, recompute_by="downdate")
    rb = prune(b, data, 0.6, num_grads=64, block_size=50, recompute=1, recompute_by="resample")
    assert (ra.path, rb.path) == ("downdate", "resample")
    assert ra.damp == pytest.approx(rb.damp, rel=1e-12)
    assert ra.predicted_increase == pytest.approx(rb.predicted_increase, rel=1e-9)
    ma, mb = select_modules(a), select_modules(b)
    assert torch.equal(flat_masks(ma), flat_masks(mb))
    torch.testing.assert_close(flat_weights(ma), flat_weights(mb), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_downdate_meets_exact_sparsities_and_overrides(scope):
    model, data = _tiny(seed=2, dtype=torch.float32)
    res = prune(model, data, 0.9, num_grads=100, block_size=64, scope=scope,
                layer_sparsity={"fc3": 0.5}, recompute_by="downdate", update="independent")
    layers = {lr.name: lr.sparsity for lr in res.layers}
    assert layers["fc3"] == pytest.approx(0.5, abs=1 / 60)
    if scope == "layerwise":
        assert layers["fc1"] == pytest.approx(0.9, abs=1e-3)
    assert res.path == "downdate" and res.update == "independent"


def test_auto_chooses_downdate_only_where_it_applies():
    assert downdate_applies("woodfisher", False, 1000, 500, 10**6, "auto")
    assert downdate_applies("woodfisher", False, 500, 1000, 10**6, "auto")
    assert not downdate_applies("woodfisher", False, 100, 1000, 10**6, "auto")
    assert not downdate_applies("woodfisher", True, 1000, 500, 10**6, "auto")  # woodtaylor
    assert not downdate_applies("kfac", False, 1000, 500, 10**6, "auto")
    assert not downdate_applies("woodfisher", False, 1000, 500, 10**6, "resample")
    with pytest.raises(ValueError, match="recompute_by='downdate' needs"):
        downdate_applies("woodfisher", True, 1000, 500, 10**6, "downdate")
    with pytest.raises(ValueError, match="unknown recompute_by"):
        downdate_applies("woodfisher", False, 1000, 500, 10**6, "sometimes")


def test_structured_patterns_and_flop_targets_refuse_downdate_and_auto_resamples():
    model, data = _tiny(seed=4, dtype=torch.float32)
    for kw in ({"pattern": "2:4", "sparsity": None}, {"target": "flops", "sparsity": 0.5}):
        with pytest.raises(ValueError, match="recompute_by='resample'"):
            prune(copy.deepcopy(model), data, num_grads=64, block_size=64,
                  recompute_by="downdate", **kw)
    res = prune(copy.deepcopy(model), data, None, pattern="2:4", num_grads=64, block_size=64,
                recompute_by="auto")
    assert res.path == "resample" and res.pattern == "2:4"


def test_gradient_chunks_are_the_rows_of_one_pass_and_skip_others_samples():
    import woodfisher as wf

    model, data = _tiny(seed=3)
    whole = wf.sample_gradients(model, data, num_grads=70)
    parts = list(gradient_chunks(model, data, 70, rows=chunk_rows(70, 10**6, 8, 30 * 8 * 10**6)))
    assert [lo for _, lo, _ in parts] == [0, 24, 48]  # 3 even chunks of <= 30 rows
    torch.testing.assert_close(torch.cat([G for _, _, G in parts]), whole)
    odd = list(gradient_chunks(model, data, 70, rows=24, which=lambda j: j % 2 == 1))
    assert [(j, lo) for j, lo, _ in odd] == [(1, 24)]
    torch.testing.assert_close(odd[0][2], whole[24:48])


def test_compacted_blocks_answer_like_full_ones(case):
    G, inv, blocks = _build(case)
    d = G.shape[1]
    g = torch.Generator().manual_seed(11)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    before = torch.rand(d, generator=g) < 0.4  # pruned before: zero gradient columns
    G = G * (~before).double()
    units = make_units(case["sizes"], case["block"], max_elements=200)
    acc = GramAccumulator(units)
    acc.add(G)
    inv = acc.finish(case["m"], 0.3)
    inv.forget(~before)
    remove = (torch.rand(d, generator=g) < 0.6) & ~before
    delta, _ = inv.eliminate(remove, torch.where(before, 0.0, w), "joint")
    assert any(p is not None for p in inv.positions)  # some unit was compacted
    F = _dense(G, 0.3, blocks)
    gone = (before | remove).double()
    F_rest = F * (1 - gone)[:, None] * (1 - gone)[None, :] + torch.diag(0.3 * gone)
    dense = torch.linalg.inv(F_rest)
    torch.testing.assert_close(inv.diag(), dense.diagonal(), rtol=1e-9, atol=1e-11)
    V = torch.randn(d, 2, dtype=torch.float64)
    torch.testing.assert_close(inv.mul(V), dense @ V, rtol=1e-9, atol=1e-11)
    idx = torch.tensor([1, d - 2])
    torch.testing.assert_close(inv.columns(idx), dense[:, idx], rtol=1e-9, atol=1e-11)
    want = DenseInverse(F, blocks).constrained_min(remove | before, -torch.where(before, 0.0, w))
    torch.testing.assert_close(delta, want, rtol=1e-9, atol=1e-11)


def test_refreshing_before_every_step_is_the_papers_resampling():
    # refresh=1: a fresh Fisher at the weights each step reaches, over the kept weights only
    # (compacted Grams of picked gradient entries); resample rebuilds the full inverse.
    model, data = _tiny(seed=5)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ra = prune(a, data, 0.8, num_grads=80, block_size=40, recompute=4, recompute_by="downdate",
               refresh=1.0)
    rb = prune(b, data, 0.8, num_grads=80, block_size=40, recompute=4, recompute_by="resample")
    assert (ra.path, rb.path) == ("downdate", "resample")
    assert ra.damp == pytest.approx(rb.damp, rel=1e-9)  # the last step's, from its gradients
    ma, mb = select_modules(a), select_modules(b)
    assert torch.equal(flat_masks(ma), flat_masks(mb))
    torch.testing.assert_close(flat_weights(ma), flat_weights(mb), rtol=1e-8, atol=1e-10)
    # From a pruned model: the first estimate is compacted at once (a factor, here).
    prune(a, data, 0.9, num_grads=80, block_size=40, recompute=2, recompute_by="downdate",
          refresh=1.0)
    prune(b, data, 0.9, num_grads=80, block_size=40, recompute=2, recompute_by="resample")
    assert torch.equal(flat_masks(ma), flat_masks(mb))
    torch.testing.assert_close(flat_weights(ma), flat_weights(mb), rtol=1e-8, atol=1e-10)
    # Without the refresh the steps lean on the first Fisher: other masks.
    c = copy.deepcopy(model)
    prune(c, data, 0.8, num_grads=80, block_size=40, recompute=4, recompute_by="downdate",
          refresh=0.0)
    assert not torch.equal(flat_masks(select_modules(c)), flat_masks(mb))


def test_refresh_steps_follow_the_kept_fraction():
    targets = [0.5, 0.75, 0.875, 0.9]
    assert refresh_steps(targets, 1.0, 0.0) == set()
    assert refresh_steps(targets, 1.0, 1.0) == {1, 2, 3}
    assert refresh_steps(targets, 1.0, 0.25) == {2, 3}  # starts with 25 % and 12.5 % kept
    assert refresh_steps(targets, 0.5, 0.25) == {3}  # measured against the start's 50 %
    model, data = _tiny(seed=6, dtype=torch.float32)
    for bad in (-0.1, 1.5, "all", True):
        with pytest.raises(ValueError, match="refresh must be"):
            prune(copy.deepcopy(model), data, 0.5, num_grads=32, block_size=32, refresh=bad)


@pytest.mark.parametrize("rule", ["joint", "independent"])
def test_the_factor_form_answers_like_the_explicit_inverse(case, rule):
    # finish(factored=True) keeps X = L⁻¹ only; one step's scores and update from it equal
    # the explicit inverse's, and a downdate first turns it into the explicit inverse.
    G = _build(case)[0]
    units = make_units(case["sizes"], case["block"], max_elements=200)
    explicit, factor = GramAccumulator(units), GramAccumulator(units)
    explicit.add(G)
    factor.add(G)
    H, X = explicit.finish(case["m"], 0.3), factor.finish(case["m"], 0.3, factored=True)
    assert X.factored and not H.factored
    torch.testing.assert_close(X.diag(), H.diag(), rtol=1e-9, atol=1e-11)
    g = torch.Generator().manual_seed(31)
    w = torch.randn(G.shape[1], generator=g, dtype=torch.float64)
    remove = torch.rand(G.shape[1], generator=g) < 0.4
    dh, vh = H.eliminate(remove, w, rule, downdate=False)
    dx, vx = X.eliminate(remove, w, rule, downdate=False)
    torch.testing.assert_close(dx, dh, rtol=1e-9, atol=1e-11)
    assert vx == pytest.approx(vh, rel=1e-9)
    again = GramAccumulator(units)
    again.add(G)
    X2 = again.finish(case["m"], 0.3, factored=True)
    H2 = _build(case)[1]
    d2, _ = X2.eliminate(remove, w, rule)  # with the downdate: explicit from here on
    h2, _ = H2.eliminate(remove, w, rule)
    assert not X2.factored
    torch.testing.assert_close(d2, h2, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(X2.block(0), H2.block(0), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("factored", [False, True], ids=["explicit", "factor"])
@pytest.mark.parametrize("picked", [False, True], ids=["full-rows", "picked-columns"])
def test_a_refreshed_inverse_is_the_restricted_inverse_of_the_new_fisher(case, picked, factored):
    G, inv, blocks = _build(case)
    d = G.shape[1]
    g = torch.Generator().manual_seed(21)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    remove = torch.rand(d, generator=g) < 0.6
    inv.eliminate(remove, w, "joint", downdate=False)
    with pytest.raises(RuntimeError, match="refresh"):
        inv.diag()
    with pytest.raises(RuntimeError, match="refresh"):
        inv.eliminate(torch.zeros(d, dtype=torch.bool), w)
    # New gradients, removed weights' entries 0 (their masks zero them).
    G2 = torch.randn(case["m"] + 3, d, generator=g, dtype=torch.float64)
    G2[:, remove] = 0
    acc = inv.regram()
    cols = acc.columns()
    assert set(cols.tolist()) >= set((~remove).nonzero().reshape(-1).tolist())
    for part in (G2[:5], G2[5:]):
        if picked:
            acc.add_columns(part[:, cols])
        else:
            acc.add(part)
    inv.refresh(acc, G2.shape[0], 0.5, factored=factored)
    assert inv.factored == factored
    keep = (~remove).double()
    F2 = _dense(G2, 0.5, blocks)
    F_rest = F2 * keep[:, None] * keep[None, :] + torch.diag(0.5 * (1 - keep))
    want = torch.linalg.inv(F_rest)
    torch.testing.assert_close(inv.diag(), want.diagonal(), rtol=1e-9, atol=1e-11)
    idx = (~remove).nonzero().reshape(-1)[:7]
    torch.testing.assert_close(inv.columns(idx), want[:, idx], rtol=1e-9, atol=1e-11)
