"""OBS-compensated quantization against a dense oracle that re-solves the constrained minimum."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from woodfisher import fisher_inverse
from woodfisher.fisher import DenseInverse
from woodfisher.quant import fake_quantize, obq_blocks, obq_weights, quant_scale, round_to_grid


def _spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    return A @ A.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def _dense_oracle(w, F, step, bits, zero):
    """Fix weights one by one (zeros first); after each, minimise ½(x−w)ᵀF(x−w) over the rest."""
    d = w.numel()
    order = [j for j in range(d) if zero[j]] + [j for j in range(d) if not zero[j]]
    x = w.clone()
    fixed: dict[int, float] = {}
    for j in order:
        fixed[j] = 0.0 if zero[j] else float(round_to_grid(x[j], step[j], bits))
        S = torch.tensor(sorted(fixed))
        R = torch.tensor([i for i in range(d) if i not in fixed], dtype=torch.long)
        dS = torch.tensor([fixed[i] for i in S.tolist()], dtype=w.dtype) - w[S]
        x = w.clone()
        x[S] = w[S] + dS
        if len(R):
            x[R] = w[R] - torch.linalg.solve(F[R][:, R], F[R][:, S] @ dS)
    return x


@pytest.mark.parametrize("case", [dict(d=6, bits=3, seed=0), dict(d=8, bits=2, seed=1),
                                  dict(d=7, bits=1, seed=2), dict(d=5, bits=4, seed=3)])
def test_matches_the_dense_constrained_minimum_oracle(case):
    d, bits, seed = case["d"], case["bits"], case["seed"]
    g = torch.Generator().manual_seed(seed + 10)
    F = _spd(d, seed)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    step = torch.full((d,), float(w.abs().max()) / max(2 ** (bits - 1) - 1, 1), dtype=w.dtype)
    zero = torch.rand(d, generator=g) < 0.3
    got = obq_blocks(w[None], torch.linalg.inv(F)[None], step[None], bits, zero[None])[0]
    want = _dense_oracle(w, F, step, bits, zero)
    assert torch.allclose(got, want, atol=1e-10)
    assert (got[zero] == 0).all()


def test_blocks_are_independent_and_identity_curvature_is_plain_rounding():
    torch.manual_seed(0)
    w = torch.randn(3, 4, dtype=torch.float64)
    step = quant_scale(w, 3).repeat_interleave(4).reshape(3, 4)
    eye = torch.eye(4, dtype=torch.float64).expand(3, 4, 4)
    assert torch.allclose(obq_blocks(w, eye, step, 3), fake_quantize(w, 3))
    F = torch.stack([_spd(4, s) for s in range(3)])
    both = obq_blocks(w, torch.linalg.inv(F), step, 3)
    one = obq_blocks(w[1:2], torch.linalg.inv(F[1:2]), step[1:2], 3)
    assert torch.allclose(both[1], one[0])


def test_pruning_only_is_the_joint_obs_step():
    d = 8
    F = _spd(d, 4)
    w = torch.randn(d, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    zero = torch.tensor([1, 0, 0, 1, 0, 1, 0, 0], dtype=torch.bool)
    fine = torch.full((d,), 1e-4, dtype=torch.float64)  # 16 bits: grid ±3.3 in steps of 1e-4
    got = obq_blocks(w[None], torch.linalg.inv(F)[None], fine[None], 16, zero[None])[0]
    delta = DenseInverse(F).constrained_min(zero, -w)
    assert (w + delta).abs().max() < 3
    assert torch.allclose(got, w + delta, atol=1e-4)
    assert (got[zero] == 0).all()


def _loss(delta, F):
    return float(delta @ F @ delta) / 2


def test_model_layers_prune_quantize_and_beat_round_to_nearest():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    data = [(torch.randn(64, 6, dtype=torch.float64), torch.randint(0, 3, (64,)))]
    fisher = fisher_inverse(net, data, num_grads=64, block_size=16)
    mask = torch.ones(8, 6)
    mask[2] = 0  # prune one filter (output row) of the first layer
    new = obq_weights(fisher, {"0": 3, "2": 2}, masks={"0": mask})
    w0 = net[0].weight.detach()
    assert (new["0"][2] == 0).all()
    step = quant_scale(w0 * mask, 3)
    levels = new["0"] / step[:, None]
    assert torch.allclose(levels, levels.round(), atol=1e-9)
    # OBQ's point of the grid costs less loss than rounding to nearest, under the same F.
    F = fisher.fmul(torch.eye(fisher.layout.d, dtype=torch.float64))
    w = fisher.layout.flatten({"0": w0, "2": net[2].weight.detach()})
    obq = fisher.layout.flatten(new)
    rtn = fisher.layout.flatten({"0": fake_quantize(w0 * mask, 3),
                                 "2": fake_quantize(net[2].weight.detach(), 2)})
    assert _loss(obq - w, F) < _loss(rtn - w, F)


def test_bad_input():
    net = nn.Linear(3, 2)
    data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
    fisher = fisher_inverse(net, data, params=None, num_grads=8)
    name = fisher.layout.names[0]
    with pytest.raises(ValueError, match="unknown layer"):
        obq_weights(fisher, {"nope": 4})
    with pytest.raises(ValueError, match="1..16"):
        obq_weights(fisher, {name: 0})
    with pytest.raises(ValueError, match="mask for"):
        obq_weights(fisher, {name: 4}, masks={name: torch.ones(3)})
    with pytest.raises(ValueError, match="expected w"):
        obq_blocks(torch.zeros(2, 3), torch.zeros(2, 3, 2), torch.ones(2, 3), 4)
