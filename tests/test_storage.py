"""woodfisher.storage: channels, codes, allocation, accounting, Monte Carlo (notes B7)."""

from __future__ import annotations

import heapq
import itertools
import json
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from woodfisher.data import load_dataset
from woodfisher.models import build_model
from woodfisher.storage import (
    CellMap,
    Strategy,
    allocate,
    build_layer_code,
    ecc_cells,
    gaussian_channel,
    make_channel,
    pcm_channel,
    simulate,
    table_channel,
)
from woodfisher.storage.allocation import allocation_objective, entropy_bits
from woodfisher.storage.program import program, read_back
from woodfisher.train import train

# A monotone but curved channel (means ∝ √level) whose std grows with the level.
LEVELS = torch.linspace(0, 25, 11, dtype=torch.float64)
CURVED = dict(levels=LEVELS.tolist(), means=(2 * LEVELS.sqrt() + 1).tolist(),
              stds=(0.2 + 0.02 * LEVELS).tolist())


def _reads(code, copies, channel, draws, seed=0):
    """Decoded weights of ``draws`` independent programmings (draws, n)."""
    memory = program([code], [copies])
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([read_back(memory, channel, gen)[0] for _ in range(draws)])


# ----------------------------------------------------------------------------- channels


def test_pcm_programming_noise_matches_the_aihwkit_polynomial():
    ch = pcm_channel(seed=0)
    for g in (5.0, 12.5, 25.0):
        gh = g / 25
        sigma = -1.1731 * gh**2 + 1.9650 * gh + 0.26348
        y = ch(torch.full((200_000,), g))
        assert abs(float(y.std()) / sigma - 1) < 0.01  # SE of a std: 1/√(2n) = 0.16 %
        assert abs(float(y.mean()) - g) < 4 * sigma / math.sqrt(200_000)


def test_pcm_closed_form_moments_where_reads_clip_at_zero():
    ch = pcm_channel(seed=1)
    g = torch.full((400_000,), 0.2)  # σ ≈ 0.28 µS: a third of the reads clip to 0
    y = ch(g)
    assert (y == 0).float().mean() > 0.2
    se = float(y.std()) / math.sqrt(len(y))
    assert abs(float(y.mean()) - float(ch.mean(torch.tensor(0.2)))) < 4 * se
    assert abs(float(y.std()) / float(ch.std(torch.tensor(0.2))) - 1) < 0.01


def test_channels_are_seeded():
    g = torch.linspace(0, 25, 50)
    assert torch.equal(pcm_channel(seed=3)(g), pcm_channel(seed=3)(g))
    assert not torch.equal(pcm_channel(seed=3)(g), pcm_channel(seed=4)(g))
    drift = pcm_channel(seed=3, drift_time=3600, read_noise=True)
    assert torch.equal(drift(g), pcm_channel(seed=3, drift_time=3600, read_noise=True)(g))


def test_drift_shrinks_reads_and_the_corrected_map_undoes_it():
    ch = pcm_channel(drift_time=86400.0, read_noise=True)
    assert float(ch.mean(torch.tensor(20.0))) < 0.8 * 20  # (t/t0)^-ν with ν ≈ 0.05
    m = CellMap(ch, "corrected")
    u = torch.full((200_000,), 0.6, dtype=torch.float64)
    u_hat = m.decode(ch(m.encode(u), torch.Generator().manual_seed(0)))
    assert abs(float(u_hat.mean()) - 0.6) < 0.002  # characterised mean, 20k reads per level
    assert float(CellMap(ch, "linear").bias(torch.tensor(0.6))) < -0.1


def test_gaussian_channel_snr():
    ch = gaussian_channel(snr_db=20.0, g_max=25.0)
    assert ch.sigma == pytest.approx(2.5)
    assert ch.snr_db == pytest.approx(20.0)


def test_targets_outside_the_range_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 25\]"):
        pcm_channel()(torch.tensor([26.0]))


@pytest.mark.parametrize(
    "levels, means, stds, match",
    [
        ([0, 1, 2], [0, 2, 1], [0.1, 0.1, 0.1], "means must increase"),
        ([0, 1, 2], [0, 1, 2], [0.1, -0.1, 0.1], "stds must be >= 0"),
        ([0, 2, 1], [0, 1, 2], [0.1, 0.1, 0.1], "levels must increase"),
        ([0, 1], [0, 1, 2], [0.1, 0.1, 0.1], "one length"),
        ([0, 1], [0, float("nan")], [0.1, 0.1], "NaN"),
    ],
)
def test_bad_channel_tables(levels, means, stds, match):
    with pytest.raises(ValueError, match=match):
        table_channel(levels, means, stds)


def test_table_channel_from_csv(tmp_path):
    path = tmp_path / "cell.csv"
    path.write_text("level,mean,std\n0,0.1,0.2\n10,9,0.5\n20,21,0.3\n")
    ch = make_channel(f"table:{path}")
    assert float(ch.mean(torch.tensor(15.0))) == pytest.approx(15.0)
    assert float(ch.std(torch.tensor(5.0))) == pytest.approx(0.35)
    path.write_text("0,0.1,0.2\n10,0.05,0.5\n")
    with pytest.raises(ValueError, match="increase"):
        make_channel(f"table:{path}")


@pytest.mark.parametrize("spec, match", [("flash", "unknown channel"),
                                         ("pcm:speed=2", "unknown option"),
                                         ("gaussian:snr=x", "needs a number"),
                                         ("table", "needs a file")])
def test_bad_channel_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        make_channel(spec)


# -------------------------------------------------------------------------------- codes


@pytest.mark.parametrize("tokens", [["sign"], ["sign", "adaptive"], ["sign", "split"],
                                    ["sign", "adaptive", "split"]])
def test_sign_protection_never_flips_a_sign(tokens):
    torch.manual_seed(0)
    w = torch.randn(40, 50) * 0.1
    noisy = gaussian_channel(snr_db=6.0)  # σ = half the range: reads are mostly noise
    code = build_layer_code("fc", w, torch.ones_like(w, dtype=torch.bool),
                            Strategy.parse(tokens), noisy)
    decoded = _reads(code, torch.ones(w.numel(), dtype=torch.long), noisy, draws=20)
    assert ((decoded * code.target) >= 0).all()
    naive = build_layer_code("fc", w, torch.ones_like(w, dtype=torch.bool),
                             Strategy.parse("naive"), noisy)
    flipped = (_reads(naive, torch.ones(w.numel(), dtype=torch.long), noisy, 5)
               * naive.target < 0)
    assert flipped.float().mean() > 0.2  # the same channel does flip naive signs


@pytest.mark.parametrize("r", [1, 4])
def test_repetition_divides_the_variance_by_r(r):
    ch = gaussian_channel(snr_db=30.0)  # constant σ
    w = torch.full((1000,), 0.3, dtype=torch.float64)
    w[0] = 1.0  # the range s
    code = build_layer_code("fc", w, torch.ones(1000, dtype=torch.bool),
                            Strategy.parse(["sign"]), ch)
    decoded = _reads(code, torch.full((1000,), r), ch, draws=100)[:, 1:]  # 99 900 reads
    sigma_w = 1.0 * ch.sigma / ch.g_max  # scale × σ / range
    assert float(decoded.var()) == pytest.approx(sigma_w**2 / r, rel=0.05)
    assert float(code.var[1]) == pytest.approx(sigma_w**2, rel=1e-6)


def test_predistortion_gives_an_unbiased_decode():
    ch = table_channel(**CURVED)
    u = torch.tensor([0.05, 0.3, 0.55, 0.9], dtype=torch.float64).repeat(50_000)
    gen = torch.Generator().manual_seed(0)
    for kind, should_be_unbiased in (("corrected", True), ("linear", False)):
        m = CellMap(ch, kind)
        err = (m.decode(ch(m.encode(u), gen)) - u).reshape(-1, 4)
        z = err.mean(0).abs() / (err.std(0) / math.sqrt(err.shape[0]))
        assert bool((z < 3).all()) == should_be_unbiased, (kind, z)


def test_companded_decode_is_nearly_unbiased_and_denser_where_weights_are():
    ch = pcm_channel()
    torch.manual_seed(0)
    from woodfisher.storage import compander

    u = torch.randn(20_000).abs().clamp(max=3) / 3  # dense near 0
    m = CellMap(ch, "companded", compander(u))
    assert float(m.var(torch.tensor(0.05))) < float(CellMap(ch, "companded").var(
        torch.tensor(0.05)))
    probe = torch.full((200_000,), 0.4, dtype=torch.float64)
    est = m.decode(ch(m.encode(probe), torch.Generator().manual_seed(1)))
    assert abs(float(est.mean()) - 0.4) < 0.002


def test_split_digits_round_trip_and_beat_one_cell_of_the_same_size():
    ch = pcm_channel()
    torch.manual_seed(0)
    w = torch.randn(3000, dtype=torch.float64) * 0.05
    keep = torch.ones_like(w, dtype=torch.bool)
    split = build_layer_code("fc", w, keep, Strategy.parse("sign,adaptive,split"), ch)
    assert 2 <= split.levels <= 32
    quiet = gaussian_channel(snr_db=200.0)
    exact = build_layer_code("fc", w, keep, Strategy.parse("sign,split"), quiet)
    ones = torch.ones(w.numel(), dtype=torch.long)
    assert torch.allclose(_reads(exact, ones, quiet, 1)[0], w, atol=1e-9)
    rep = build_layer_code("fc", w, keep, Strategy.parse("sign,adaptive"), ch, reads=2)
    mse_split = float(((_reads(split, ones, ch, 5) - w) ** 2).mean())
    mse_rep = float(((_reads(rep, 2 * ones, ch, 5) - w) ** 2).mean())
    assert mse_split < mse_rep  # two cells as digits beat two averaged copies


def test_quantized_weights_decode_onto_their_grid():
    torch.manual_seed(0)
    w = torch.randn(16, 30)
    keep = torch.ones_like(w, dtype=torch.bool)
    quiet = gaussian_channel(snr_db=60.0)
    code = build_layer_code("fc", w, keep, Strategy.parse("sign,adaptive"), quiet, quant_bits=4)
    from woodfisher.quant import fake_quantize

    q = fake_quantize(w.double(), 4).reshape(-1)
    decoded = _reads(code, torch.ones(w.numel(), dtype=torch.long), quiet, 3)
    assert torch.equal(decoded, q.expand_as(decoded))  # noise < half a step: exact


@pytest.mark.parametrize("bad, match", [
    ("naive,sign", "naive"), ("sign,pair", "one sign protection"), ("sign,magic", "unknown"),
    ("fisher,magnitude", "one allocation"), ("", "empty"), ("sign,sign", "repeats")])
def test_bad_strategies(bad, match):
    with pytest.raises(ValueError, match=match):
        Strategy.parse(bad)


# --------------------------------------------------------------------------- allocation


def _brute_force(cost, budget, r_max):
    best = None
    for rs in itertools.product(range(1, r_max + 1), repeat=len(cost)):
        if sum(rs) <= budget:
            value = sum(c / r for c, r in zip(cost, rs, strict=True))
            best = value if best is None else min(best, value)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_greedy_allocation_matches_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 7, (1,), generator=gen))
    cost = torch.rand(n, generator=gen, dtype=torch.float64) ** 3 * 10
    budget = n + int(torch.randint(0, 2 * n + 1, (1,), generator=gen))
    r = allocate(cost, budget, r_max=5)
    assert int(r.sum()) <= budget and int(r.min()) >= 1
    assert allocation_objective(cost, r) == pytest.approx(
        _brute_force(cost.tolist(), budget, 5), rel=1e-12)


def test_allocation_matches_a_heap_greedy_and_spreads_equal_costs():
    gen = torch.Generator().manual_seed(0)
    cost = torch.rand(2000, generator=gen, dtype=torch.float64) ** 4
    r = allocate(cost, 5000)
    heap = [(-c / 2, i, 1) for i, c in enumerate(cost.tolist())]
    heapq.heapify(heap)
    ref = [1] * len(cost)
    for _ in range(5000 - len(cost)):
        _, i, k = heapq.heappop(heap)
        ref[i] = k + 1
        heapq.heappush(heap, (-cost[i].item() / ((k + 1) * (k + 2)), i, k + 1))
    assert allocation_objective(cost, r) == pytest.approx(
        allocation_objective(cost, torch.tensor(ref)), rel=1e-12)
    even = allocate(torch.ones(10, dtype=torch.float64), 25)
    assert int(even.sum()) == 25 and int(even.max() - even.min()) <= 1


def test_allocation_refuses_a_budget_below_one_cell_per_weight():
    with pytest.raises(ValueError, match="below one copy"):
        allocate(torch.ones(5), 4)


# --------------------------------------------------------------------------- accounting


def _toy(prune_first=True):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 20), nn.ReLU(), nn.Linear(20, 10))
    if prune_first:
        mask = (torch.arange(64 * 20) % 4 != 0).reshape(20, 64).float()  # 25 % pruned
        torch_prune.custom_from_mask(net[1], "weight", mask)
    return net


def test_accounting_matches_a_hand_count(tmp_path):
    digits = load_dataset("digits")
    net = _toy()
    rep = simulate(net, digits.test, "sign", cells=2, trials=1)
    kept = 64 * 20 * 3 // 4 + 20 * 10  # 960 + 200
    bits = 2 * 32 + kept + 64 * 20  # two scales, a sign per stored weight, layer 1's bitmap
    assert rep["stored_weights"] == kept
    assert rep["analog_cells"] == 2 * kept
    assert rep["digital_bits"] == bits
    assert rep["digital_cells"] == math.ceil(bits / 64) * 72
    assert rep["total_cells"] == 2 * kept + math.ceil(bits / 64) * 72
    assert rep["cells_per_weight"] == pytest.approx(rep["total_cells"] / (64 * 20 + 20 * 10))
    assert rep["footprint_ratio"] == pytest.approx(36 * (64 * 20 + 200) / rep["total_cells"])
    assert rep["other_params"] == 20 + 10  # the biases
    int8 = math.ceil((8 * 1480 + 32 * 30) / 64) * 72
    assert rep["baselines"]["int8"]["cells"] == int8
    assert ecc_cells(32 * 1480) == 36 * 1480
    assert entropy_bits(torch.tensor([1, 1, 1, 2])) == 4  # 4 · H(1/4) = 3.25 -> 4
    json.dumps(rep)


def test_quantized_storage_of_a_pruned_model_decodes_onto_the_grid():
    # Oracle: the model quantized by hand (fake_quantize of each effective weight, zeros kept).
    # At 80 dB a read is far inside half a grid step, so every draw decodes exactly that model.
    from woodfisher.quant import fake_quantize
    from woodfisher.train import evaluate

    test = load_dataset("digits").test
    net = _toy()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rep = simulate(net, test, "sign,adaptive", cells=1, trials=2, quant_bits=3,
                   channel="gaussian:snr=80")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    by_hand = _toy(prune_first=False)
    with torch.no_grad():
        for i in (1, 3):
            by_hand[i].weight.copy_(fake_quantize(net[i].weight.detach(), 3))
    expected = evaluate(by_hand, test)["accuracy"]
    assert rep["clean_accuracy"] == pytest.approx(expected)
    assert rep["accuracies"] == pytest.approx([expected, expected])
    assert rep["stored_weights"] <= 64 * 20 * 3 // 4 + 20 * 10  # pruned weights take no cell
    assert rep["other_params"] == 20 + 10


# ------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def digits_model():
    splits = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("mlpnet-small", splits.input_shape, splits.num_classes)
    train(model, splits.train, epochs=8, lr=0.05, batch_size=64, progress=False)
    return model, splits


def test_simulate_leaves_the_model_untouched_and_keeps_the_contract(digits_model):
    model, splits = digits_model
    pruned = _toy()
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    simulate(pruned, load_dataset("digits").test, "sign,adaptive", cells=1, trials=2)
    assert all(torch.equal(before[k], v) for k, v in pruned.state_dict().items())
    fisher_data = [(splits.train.tensors[0][:200], splits.train.tensors[1][:200])]
    rep = simulate(model, splits.test, ["sign", "adaptive", "fisher"], cells=1.5, trials=3,
                   fisher_data=fisher_data, fisher_grads=100)
    for key in ("accuracy_mean", "accuracy_std", "clean_accuracy", "cells_per_weight",
                "digital_bits", "footprint_ratio"):
        assert isinstance(rep[key], (int, float)), key
    assert rep["analog_cells"] <= 1.5 * rep["stored_weights"]
    assert rep["digital_bits_by_kind"]["allocation"] > 0
    assert rep["predicted_loss_increase"] is not None
    again = simulate(model, splits.test, ["sign", "adaptive", "fisher"], cells=1.5, trials=3,
                     fisher_data=fisher_data, fisher_grads=100)
    assert again["accuracies"] == rep["accuracies"]  # seeded
    json.dumps(rep)


def test_strategies_order_at_a_fixed_footprint(digits_model):
    """B7.6 on the toy model: naive <= sign <= +adaptive <= +fisher in loss, 20 seeds."""
    model, splits = digits_model
    fisher_data = [(splits.train.tensors[0][:300], splits.train.tensors[1][:300])]
    channel = "pcm:drift=86400,read,scale=3"  # harsh enough to separate the codes
    losses = {}
    for strategy, cells in (("naive", 2), ("sign", 1), ("sign,adaptive", 1),
                            ("sign,adaptive,fisher", 1.25)):
        rep = simulate(model, splits.test, strategy, cells=cells, trials=20, channel=channel,
                       fisher_data=fisher_data, fisher_grads=300, granularity="row")
        losses[strategy] = (rep["loss_mean"], rep["cells_per_weight"])
    values = [v[0] for v in losses.values()]
    assert values == sorted(values, reverse=True), losses
    footprints = [v[1] for v in losses.values()]
    assert max(footprints) < 1.4 * min(footprints)


@pytest.mark.parametrize("kwargs, match", [
    (dict(cells=0.5), "cells must be >= 1"),
    (dict(cells=float("nan")), "finite"),
    (dict(trials=0), "trials"),
    (dict(strategy="sign", cells=1.5), "multiple of 1"),
    (dict(strategy="pair", cells=1), "below one copy"),
    (dict(strategy="sign,fisher"), "fisher_data"),
    (dict(quant_bits=0), "quant_bits"),
    (dict(channel="nope"), "unknown channel"),
    (dict(side_coding="zip"), "side_coding"),
])
def test_simulate_bad_input(kwargs, match):
    net = _toy(prune_first=False)
    with pytest.raises(ValueError, match=match):
        simulate(net, load_dataset("digits").test, **{"trials": 1, **kwargs})
