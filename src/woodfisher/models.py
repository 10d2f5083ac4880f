"""Reference networks, built by name.

* ``mlpnet``: MLPNet of the WoodFisher paper, 784-300-100-10 with ReLU (the input width is
  ``prod(input_shape)``, so 64-300-100-10 on 8×8 digits); ``mlpnet-nobias`` without biases.
* ``mlpnet-small`` (784-40-20-10) and ``mlpnet-small-nobias``.
* ``cnn``: two 3×3 conv + BatchNorm + ReLU stages, adaptive pooling, one linear layer.
* ``resnet20``: CIFAR-shape ResNet-20 (He et al. 2016), 3 stages × 3 basic blocks, 16/32/64
  channels, option-A (zero-padding) or option-B (1×1 conv) shortcuts.

Every model records its ``input_shape`` and checks it in ``forward`` (see :func:`check_input`).

Compressors that change a model's architecture (low-rank factorisation, channel removal) replace
submodules by trees of ordinary ``torch.nn`` layers. :func:`module_spec` describes such a tree as
plain data (types from :data:`MODULE_TYPES` and their constructor arguments) and
:func:`replace_modules` rebuilds it, so a checkpoint reloads the changed architecture from its
model spec alone, without importing the compressor's code.

Example:
    >>> model = build_model("mlpnet", input_shape=(1, 8, 8))
    >>> model(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CNN",
    "MLPNet",
    "MODELS",
    "ResNet20",
    "MODULE_TYPES",
    "ResNet50",
    "ShapeError",
    "build_model",
    "check_input",
    "module_from_spec",
    "module_spec",
    "register_module_type",
    "replace_modules",
    "swapped_modules",
]


class ShapeError(ValueError):
    """Input data does not have the shape a model was built for."""


def check_input(model: nn.Module, x: torch.Tensor) -> None:
    """Check that a batch ``x`` fits ``model``'s recorded ``input_shape``.

    Models without an ``input_shape`` attribute (a user's own) are not checked.

    Args:
        model: The model.
        x: A batch of shape ``(N, *input_shape)``.

    Raises:
        ShapeError: If the shapes differ; the message names both.
    """
    expected = getattr(model, "input_shape", None)
    if expected is None:
        return
    got = tuple(x.shape[1:])
    if x.dim() != len(expected) + 1 or got != tuple(expected):
        name = getattr(model, "name", type(model).__name__)
        raise ShapeError(
            f"model {name} expects input of shape (N, {', '.join(map(str, expected))}), "
            f"got {tuple(x.shape)}; build the model for this data's input shape "
            f"(build_model(..., input_shape={got}))"
        )


def _check_shape(input_shape: Sequence[int], need_image: bool, name: str) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be positive sizes, got {tuple(input_shape)}")
    if need_image and len(shape) != 3:
        raise ValueError(f"model {name} needs input_shape (C, H, W), got {shape}")
    return shape


class MLPNet(nn.Module):
    """Fully connected ReLU network on the flattened input (fc1, fc2, ..., last layer logits).

    Args:
        input_shape: Shape of one sample; the first layer has ``prod(input_shape)`` inputs.
        num_classes: Number of outputs.
        hidden: Hidden layer widths.
        bias: Whether the linear layers have biases.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        hidden: Sequence[int] = (300, 100),
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.input_shape = _check_shape(input_shape, False, "mlpnet")
        self.name = "mlpnet"
        widths = [math.prod(self.input_shape), *hidden, num_classes]
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True), start=1):
            setattr(self, f"fc{i}", nn.Linear(a, b, bias=bias))
        self.num_layers = len(widths) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        check_input(self, x)
        x = x.flatten(1)
        for i in range(1, self.num_layers + 1):
            x = getattr(self, f"fc{i}")(x)
            if i < self.num_layers:
                x = F.relu(x)
        return x


class CNN(nn.Module):
    """Small CNN: conv3×3-BN-ReLU-maxpool, conv3×3-BN-ReLU-adaptive avgpool(4), linear.

    Works for any ``(C, H, W)`` with ``H, W >= 2`` (28×28 Fashion-MNIST, 8×8 digits).

    Args:
        input_shape: ``(C, H, W)``.
        num_classes: Number of outputs.
        channels: Output channels of the two conv layers.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        channels: Sequence[int] = (16, 32),
    ) -> None:
        super().__init__()
        self.input_shape = _check_shape(input_shape, True, "cnn")
        self.name = "cnn"
        c, h, w = self.input_shape
        if h < 2 or w < 2:
            raise ValueError(f"model cnn needs H, W >= 2, got input_shape {self.input_shape}")
        c1, c2 = channels
        self.conv1 = nn.Conv2d(c, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(c2 * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        check_input(self, x)
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        return self.fc(x.flatten(1))


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut_kind = shortcut
        self.pad = c_out - c_in
        self.stride = stride
        self.shortcut: nn.Module = nn.Identity()
        if (stride != 1 or c_in != c_out) and shortcut == "B":
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def _short(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut_kind == "A" and (self.stride != 1 or self.pad):
            x = x[:, :, :: self.stride, :: self.stride]
            return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return self.shortcut(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self._short(x))


class ResNet20(nn.Module):
    """CIFAR ResNet-20: conv3×3(16), 3 stages × 3 basic blocks (16, 32, 64), avgpool, linear.

    Args:
        input_shape: ``(C, H, W)``; CIFAR is ``(3, 32, 32)``, other sizes work too.
        num_classes: Number of outputs.
        shortcut: ``"A"`` (parameter-free zero padding, the paper's CIFAR choice) or ``"B"``
            (1×1 conv + BN where the shape changes).
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (3, 32, 32),
        num_classes: int = 10,
        shortcut: str = "A",
    ) -> None:
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        self.input_shape = _check_shape(input_shape, True, "resnet20")
        self.name = "resnet20"
        self.conv1 = nn.Conv2d(self.input_shape[0], 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, c_in = [], 16
        for c_out, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for b in range(3):
                blocks.append(_BasicBlock(c_in, c_out, stride if b == 0 else 1, shortcut))
                c_in = c_out
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        check_input(self, x)
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class _Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: 1×1 reduce, 3×3 (carrying the stride), 1×1 expand ×4."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.downsample(x))


class ResNet50(nn.Module):
    """ImageNet ResNet-50 (v1.5): 7×7/2 stem + max-pool, bottleneck stages (3, 4, 6, 3) of
    widths 64/128/256/512 (×4 out), global average pool, linear.

    25.56 M parameters at 1000 classes, as torchvision's ``resnet50``. Any (C, H, W) input with
    H, W ≥ 1 works (the stem and pools shrink it to 1×1 at worst).

    Args:
        input_shape: ``(C, H, W)``; ImageNet is ``(3, 224, 224)``.
        num_classes: Number of outputs.
    """

    def __init__(
        self, input_shape: Sequence[int] = (3, 224, 224), num_classes: int = 1000
    ) -> None:
        super().__init__()
        self.input_shape = _check_shape(input_shape, True, "resnet50")
        self.name = "resnet50"
        self.conv1 = nn.Conv2d(self.input_shape[0], 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        c_in, stages = 64, []
        for width, depth, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            blocks = []
            for b in range(depth):
                blocks.append(_Bottleneck(c_in, width, stride if b == 0 else 1))
                c_in = width * _Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        check_input(self, x)
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _mlp(hidden: tuple[int, ...], bias: bool) -> Callable[..., nn.Module]:
    def make(input_shape: Sequence[int], num_classes: int, **kw) -> nn.Module:
        return MLPNet(input_shape, num_classes, hidden=kw.pop("hidden", hidden),
                      bias=kw.pop("bias", bias), **kw)

    return make


#: Name -> constructor ``(input_shape, num_classes, **kwargs) -> nn.Module``.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlpnet": _mlp((300, 100), True),
    "mlpnet-nobias": _mlp((300, 100), False),
    "mlpnet-small": _mlp((40, 20), True),
    "mlpnet-small-nobias": _mlp((40, 20), False),
    "cnn": lambda input_shape, num_classes, **kw: CNN(input_shape, num_classes, **kw),
    "resnet20": lambda input_shape, num_classes, **kw: ResNet20(input_shape, num_classes, **kw),
    "resnet50": lambda input_shape, num_classes, **kw: ResNet50(input_shape, num_classes, **kw),
}


def build_model(
    name: str,
    input_shape: Sequence[int] = (1, 28, 28),
    num_classes: int = 10,
    **kwargs,
) -> nn.Module:
    """Build a registered model for a given input shape.

    Args:
        name: One of ``MODELS``.
        input_shape: Shape of one sample, e.g. ``DatasetSplits.input_shape``.
        num_classes: Number of outputs.
        **kwargs: Passed to the model class (e.g. ``shortcut="B"`` for ``resnet20``).

    Returns:
        The model, with ``name`` set to the registry name.

    Raises:
        ValueError: If ``name`` is unknown, or the input shape or keyword arguments do not
            suit the model.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    try:
        model = MODELS[name](tuple(input_shape), num_classes, **kwargs)
    except TypeError as e:
        raise ValueError(f"bad keyword arguments {sorted(kwargs)} for model {name!r}: {e}") from e
    model.name = name
    return model


#: Layer types :func:`module_spec` can describe, with the constructor arguments it records. A
#: checkpoint names only these (data, not code), so loading one runs no code it carries.
MODULE_TYPES: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "Linear": (nn.Linear, ("in_features", "out_features")),
    "Conv1d": (nn.Conv1d, ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                           "dilation", "groups", "padding_mode")),
    "Conv2d": (nn.Conv2d, ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                           "dilation", "groups", "padding_mode")),
    "BatchNorm1d": (nn.BatchNorm1d, ("num_features", "eps", "momentum", "affine",
                                     "track_running_stats")),
    "BatchNorm2d": (nn.BatchNorm2d, ("num_features", "eps", "momentum", "affine",
                                     "track_running_stats")),
    "Identity": (nn.Identity, ()),
    "Sequential": (nn.Sequential, ()),
}


def module_spec(module: nn.Module) -> dict:
    """Describe a tree of :data:`MODULE_TYPES` layers as plain data.

    Weights are not part of the description (they travel in the state dict); pruning state
    (``weight_orig``/``weight_mask``) does not change it.

    Args:
        module: A module of one of the types in :data:`MODULE_TYPES` (exact types, not
            subclasses); a ``Sequential`` may nest them.

    Returns:
        ``{"type": name, "args": {...}}`` (with ``"children"`` for a ``Sequential``).

    Raises:
        ValueError: If the tree holds a type that cannot be described.

    Example:
        >>> spec = module_spec(nn.Sequential(nn.Linear(4, 2, bias=False), nn.Linear(2, 3)))
        >>> spec["children"][0]
        {'type': 'Linear', 'args': {'in_features': 4, 'out_features': 2, 'bias': False}}
        >>> module_from_spec(spec)
        Sequential(
          (0): Linear(in_features=4, out_features=2, bias=False)
          (1): Linear(in_features=2, out_features=3, bias=True)
        )
    """
    kind = type(module).__name__
    if kind not in MODULE_TYPES or MODULE_TYPES[kind][0] is not type(module):
        raise ValueError(
            f"cannot describe a {type(module).__name__} module; describable types: "
            f"{sorted(MODULE_TYPES)} (make the replaced layers out of these)"
        )
    cls, names = MODULE_TYPES[kind]
    args = {}
    for name in names:
        value = getattr(module, name)
        args[name] = list(value) if isinstance(value, tuple) else value
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        args["bias"] = module.bias is not None
    spec: dict = {"type": kind, "args": args}
    if cls.__module__.startswith("woodfisher."):
        spec["module"] = cls.__module__  # where module_from_spec finds (registers) the class
    if kind == "Sequential":
        spec["children"] = [module_spec(child) for child in module]
    return spec


def module_from_spec(spec: dict) -> nn.Module:
    """Build the module :func:`module_spec` described (freshly initialised weights).

    Args:
        spec: ``{"type", "args"[, "children"]}``.

    Returns:
        The module.

    Raises:
        ValueError: If the type is not in :data:`MODULE_TYPES` or the arguments do not fit it.
    """
    kind = spec.get("type") if isinstance(spec, dict) else None
    home = spec.get("module") if isinstance(spec, dict) else None
    if kind not in MODULE_TYPES and isinstance(home, str) and home.startswith("woodfisher."):
        try:
            importlib.import_module(home)  # a woodfisher layer registers itself on import
        except ImportError as e:
            raise ValueError(f"module type {kind!r} needs {home}, which failed to import: {e}"
                             ) from e
    if kind not in MODULE_TYPES:
        raise ValueError(
            f"unknown module type {kind!r} in a model spec; known: {sorted(MODULE_TYPES)}"
        )
    cls = MODULE_TYPES[kind][0]
    if kind == "Sequential":
        return nn.Sequential(*(module_from_spec(c) for c in spec.get("children", [])))
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.get("args", {}).items()}
    try:
        return cls(**args)
    except (TypeError, ValueError) as e:
        raise ValueError(f"bad arguments {args} for a {kind} in a model spec: {e}") from e


def register_module_type(cls: type[nn.Module], arg_names: Sequence[str]) -> None:
    """Let :func:`module_spec` describe a woodfisher layer class (e.g. ``DCTConv2d``).

    A checkpoint then records every such layer of a model by itself (see
    :func:`swapped_modules`) and rebuilds it on load, importing the class's module by name — a
    module of the woodfisher package only, so a checkpoint still carries data, not code.

    Args:
        cls: The class; its module must be inside the ``woodfisher`` package.
        arg_names: The constructor arguments to record (read back as attributes).

    Raises:
        ValueError: If ``cls`` lives outside the woodfisher package.
    """
    if not cls.__module__.startswith("woodfisher."):
        raise ValueError(f"only woodfisher layer classes can be registered, got {cls!r}")
    MODULE_TYPES[cls.__name__] = (cls, tuple(arg_names))


def swapped_modules(model: nn.Module) -> dict[str, dict]:
    """Descriptions of every submodule whose class was registered with
    :func:`register_module_type` (layers ``build_model`` never makes).

    Args:
        model: Any module.

    Returns:
        Dotted name to :func:`module_spec`, in registration order.
    """
    return {
        name: module_spec(mod) for name, mod in model.named_modules()
        if name and type(mod).__module__.startswith("woodfisher.")
        and MODULE_TYPES.get(type(mod).__name__, (None,))[0] is type(mod)
    }


def replace_modules(model: nn.Module, specs: dict[str, dict]) -> nn.Module:
    """Replace submodules of ``model``, in place, by modules built from their descriptions.

    Args:
        model: The model (e.g. freshly built by :func:`build_model`).
        specs: Dotted submodule name (``"layer1.0.conv1"``) to a :func:`module_spec`.

    Returns:
        ``model``.

    Raises:
        ValueError: If a name is not a submodule of ``model`` or a description is bad.
    """
    for name, spec in specs.items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"model spec replaces {name!r}, which is not a submodule of this "
                f"{getattr(model, 'name', type(model).__name__)} model"
            ) from None
        model.set_submodule(name, module_from_spec(spec))
    return model
