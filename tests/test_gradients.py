"""Per-sample gradients against a loop of single-sample backward passes."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset

from woodfisher.gradients import gradient_layout, sample_gradients
from woodfisher.params import weight_param


def mlp(bias: bool) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5, bias=bias), nn.Tanh(), nn.Linear(5, 3, bias=bias))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
        nn.Linear(3 * 4 * 4, 3),
    )


def layernorm_net() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3))


MODELS = [
    {"name": "mlp_bias", "make": lambda: mlp(True), "shape": (6,)},
    {"name": "mlp_nobias", "make": lambda: mlp(False), "shape": (6,)},
    {"name": "cnn_bn", "make": cnn, "shape": (2, 4, 4)},
    {"name": "layernorm", "make": layernorm_net, "shape": (6,)},
]


def loop_gradients(model, X, Y, spg=1):
    """Oracle: one ordinary backward pass per row."""
    modules, _ = gradient_layout(model)
    params = [weight_param(m) for m in modules.values()]
    rows = []
    model.eval()
    for i in range(0, X.shape[0], spg):
        loss = nn.functional.cross_entropy(model(X[i:i + spg]), Y[i:i + spg])
        gs = torch.autograd.grad(loss, params)
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


@pytest.fixture(params=MODELS, ids=lambda c: c["name"])
def case(request):
    torch.manual_seed(0)
    model = request.param["make"]().double()
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        # Non-trivial running statistics, so that eval mode differs from train mode.
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(16, *request.param["shape"], dtype=torch.float64) * 2 + 1)
    X = torch.randn(12, *request.param["shape"], dtype=torch.float64)
    Y = torch.randint(0, 3, (12,))
    return model, X, Y


def test_matches_loop(case):
    model, X, Y = case
    model.train()
    G = sample_gradients(model, (X, Y), num_grads=12, chunk_size=5)
    assert model.training and all(m.training for m in model.modules())
    torch.testing.assert_close(G, loop_gradients(model, X, Y), rtol=1e-10, atol=1e-12)
    assert G.dtype == torch.float64


def test_samples_per_grad_is_mean(case):
    model, X, Y = case
    G = sample_gradients(model, (X, Y), num_grads=3, samples_per_grad=4)
    torch.testing.assert_close(G, loop_gradients(model, X, Y, spg=4), rtol=1e-10, atol=1e-12)
    single = loop_gradients(model, X, Y)
    torch.testing.assert_close(G, single.reshape(3, 4, -1).mean(1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["loader", "dataset", "list"])
def test_data_forms(kind):
    torch.manual_seed(1)
    model = mlp(True).double()
    X, Y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    data = {
        "loader": DataLoader(TensorDataset(X, Y), batch_size=3),
        "dataset": TensorDataset(X, Y),
        "list": [(X[:4], Y[:4]), (X[4:], Y[4:])],
    }[kind]
    G = sample_gradients(model, data, num_grads=7, chunk_size=2)
    torch.testing.assert_close(G, loop_gradients(model, X[:7], Y[:7]), rtol=1e-10, atol=1e-12)


def test_pruned_entries_exactly_zero():
    torch.manual_seed(2)
    model = mlp(True).double()
    mask = (torch.rand(5, 6) > 0.5).double()
    prune.custom_from_mask(model[0], "weight", mask)
    X, Y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    G = sample_gradients(model, (X, Y), num_grads=8)
    first = G[:, :30].reshape(8, 5, 6)
    assert torch.all(first[:, mask == 0] == 0)
    assert torch.all(first[:, mask == 1] != 0)
    torch.testing.assert_close(G, loop_gradients(model, X, Y) * torch.cat(
        [mask.reshape(-1), torch.ones(15, dtype=torch.float64)]), rtol=1e-10, atol=1e-12)


def test_params_subset_by_name():
    torch.manual_seed(3)
    model = mlp(False).double()
    X, Y = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    full = sample_gradients(model, (X, Y), num_grads=4)
    only = sample_gradients(model, (X, Y), num_grads=4, params=["2"])
    torch.testing.assert_close(only, full[:, 30:])


def test_float32_follows_model():
    model = mlp(True)
    X, Y = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    assert sample_gradients(model, (X, Y), num_grads=4).dtype == torch.float32


def test_data_runs_out():
    model = mlp(True)
    X, Y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    with pytest.raises(ValueError, match="needs 6 samples, found 5"):
        sample_gradients(model, (X, Y), num_grads=3, samples_per_grad=2)


def test_nonfinite_gradient():
    model = mlp(True)
    X, Y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    X[2, 0] = float("nan")
    with pytest.raises(ValueError, match="gradient 2 is not finite"):
        sample_gradients(model, (X, Y), num_grads=4)


@pytest.mark.parametrize("bad", [{"num_grads": 0}, {"samples_per_grad": -1}, {"chunk_size": 1.5}])
def test_bad_counts(bad):
    X, Y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match=next(iter(bad))):
        sample_gradients(mlp(True), (X, Y), **bad)


def test_unknown_module_name():
    X, Y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match="matches no prunable weight"):
        sample_gradients(mlp(True), (X, Y), num_grads=2, params=["fc9"])


def test_picked_columns_are_those_entries_of_the_full_rows(case):
    model, X, Y = case
    modules, layout = gradient_layout(model)
    mask = (torch.rand(weight_param(next(iter(modules.values()))).shape,
                       generator=torch.Generator().manual_seed(3)) > 0.4).double()
    prune.custom_from_mask(next(iter(modules.values())).module, "weight", mask)
    full = sample_gradients(model, (X, Y), num_grads=6, samples_per_grad=2, chunk_size=4)
    g = torch.Generator().manual_seed(4)
    for cols in (torch.arange(3, layout.d - 2), torch.randperm(layout.d, generator=g)[:17]):
        got = sample_gradients(model, (X, Y), num_grads=6, samples_per_grad=2, chunk_size=4,
                               columns=cols)
        torch.testing.assert_close(got, full[:, cols], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="columns must lie"):
        sample_gradients(model, (X, Y), num_grads=2, columns=torch.tensor([layout.d]))


class _Centering(nn.Module):
    """Subtracts the batch mean: samples interact, so one backward pass over the batch is not
    the per-sample gradients."""

    def forward(self, x):
        return x - x.mean(0, keepdim=True)


@pytest.mark.parametrize("kind", ["sum-loss", "coupled-samples"])
def test_gradients_stay_per_sample_where_one_backward_pass_cannot_give_them(kind):
    torch.manual_seed(5)
    X, Y = torch.randn(9, 6, dtype=torch.float64), torch.randint(0, 3, (9,))
    if kind == "sum-loss":
        model = mlp(True).double()

        def loss_fn(out, y):
            return nn.functional.cross_entropy(out, y, reduction="sum")
    else:
        model = nn.Sequential(nn.Linear(6, 5), _Centering(), nn.Tanh(), nn.Linear(5, 3)).double()
        loss_fn = None
    G = sample_gradients(model, (X, Y), num_grads=9, chunk_size=9, loss_fn=loss_fn)
    modules, _ = gradient_layout(model)
    params = [weight_param(m) for m in modules.values()]
    want = []
    for i in range(9):  # one sample per row, alone in its forward pass
        out = model(X[i:i + 1])
        loss = (loss_fn or nn.functional.cross_entropy)(out, Y[i:i + 1])
        want.append(torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)]))
    torch.testing.assert_close(G, torch.stack(want), rtol=1e-10, atol=1e-12)
