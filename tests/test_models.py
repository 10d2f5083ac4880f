from __future__ import annotations

import pytest
import torch

from woodfisher.models import MODELS, ShapeError, build_model, check_input

CASES = [
    dict(name=name, input_shape=shape)
    for name in sorted(MODELS)
    for shape in (
        [(3, 32, 32), (1, 28, 28)] if name.startswith("resnet") else [(1, 28, 28), (1, 8, 8)]
    )
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['name']}-{c['input_shape']}")
def test_output_shape(case):
    torch.manual_seed(0)
    model = build_model(case["name"], case["input_shape"], num_classes=7).eval()
    out = model(torch.randn(3, *case["input_shape"]))
    assert out.shape == (3, 7)


@pytest.mark.parametrize(
    "name, widths, bias",
    [
        ("mlpnet", [(300, 784), (100, 300), (10, 100)], True),
        ("mlpnet-nobias", [(300, 784), (100, 300), (10, 100)], False),
        ("mlpnet-small", [(40, 784), (20, 40), (10, 20)], True),
        ("mlpnet-small-nobias", [(40, 784), (20, 40), (10, 20)], False),
    ],
)
def test_mlp_architecture(name, widths, bias):
    model = build_model(name)
    layers = [model.fc1, model.fc2, model.fc3]
    assert [tuple(m.weight.shape) for m in layers] == widths
    assert all((m.bias is not None) == bias for m in layers)


def test_mlp_adapts_to_digits():
    assert build_model("mlpnet", (1, 8, 8)).fc1.weight.shape == (300, 64)


def test_resnet20_size_and_shortcuts():
    a = build_model("resnet20", (3, 32, 32))
    b = build_model("resnet20", (3, 32, 32), shortcut="B")
    n_a = sum(p.numel() for p in a.parameters())
    assert 0.26e6 < n_a < 0.28e6  # ResNet-20 has ~0.27M parameters (He et al. 2016)
    assert sum(p.numel() for p in b.parameters()) > n_a
    assert b(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_unknown_model():
    with pytest.raises(ValueError, match=r"unknown model 'vgg'.*mlpnet"):
        build_model("vgg")


def test_bad_kwargs_and_shapes():
    with pytest.raises(ValueError, match="shortcut"):
        build_model("resnet20", (3, 32, 32), shortcut="C")
    with pytest.raises(ValueError, match="bad keyword"):
        build_model("cnn", wrong=1)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        build_model("cnn", (784,))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_input_shape_mismatch(name):
    model = build_model(name, (3, 32, 32) if name.startswith("resnet") else (1, 8, 8))
    with pytest.raises(ShapeError) as err:
        model(torch.randn(2, 1, 28, 28))
    assert "expects input of shape" in str(err.value) and "(2, 1, 28, 28)" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_check_input_ignores_foreign_models():
    check_input(torch.nn.Linear(3, 2), torch.zeros(4, 3))


def test_resnet50_size_and_shape():
    model = build_model("resnet50", (3, 32, 32), num_classes=1000).eval()
    assert sum(p.numel() for p in model.parameters()) == 25_557_032  # torchvision's resnet50
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 1000)
