"""Dense oracles for small models: the exact Hessian and empirical Fisher of the mean loss.

Shipped in the package (as curvlinops ships its functorch references) so that users and tests can
check any estimate against the real thing. Memory is ``d²``: keep ``d`` to a few thousand.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import hessian

from woodfisher.batch import Inputs, call_functional, cat, to_device
from woodfisher.gradients import (
    LossFn,
    _default_loss,
    _EvalMode,
    _param_names,
    gradient_layout,
    iter_batches,
    sample_gradients,
)


def _all_data(data: object) -> tuple[Inputs, Tensor]:
    batches = list(iter_batches(data))
    if not batches:
        raise ValueError("data is empty")
    return cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def exact_hessian(
    model: nn.Module,
    data: object,
    loss_fn: LossFn | None = None,
    params: Sequence[str] | str | dict | None = None,
) -> Tensor:
    """Hessian of the mean loss over all of ``data`` w.r.t. the flat selected weights.

    Args:
        model: A small network (runs in eval mode; modes are restored).
        data: All samples to average over (anything :func:`sample_gradients` accepts).
        loss_fn: Mean loss over a batch; default cross-entropy.
        params: Layers, as for :func:`~woodfisher.gradients.sample_gradients`.

    Returns:
        A (d, d) tensor in the flat layout of :func:`~woodfisher.gradients.gradient_layout`.

    Raises:
        ValueError: If ``data`` is empty.

    Example:
        >>> net = nn.Linear(2, 1, bias=False)
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> net = net.double()
        >>> mse = lambda out, y: ((out.squeeze(-1) - y) ** 2).mean()
        >>> exact_hessian(net, (X, torch.zeros(2, dtype=torch.float64)), mse)
        tensor([[1., 0.],
                [0., 4.]], dtype=torch.float64)
    """
    loss_fn = loss_fn or _default_loss
    modules, layout = gradient_layout(model, params)
    names = _param_names(model, modules)
    state = {k: v.detach() for k, v in {**dict(model.named_parameters()),
                                         **dict(model.named_buffers())}.items()}
    X, Y = _all_data(data)
    w0 = torch.cat([state[n].reshape(-1) for n in names])
    X = to_device(X, w0.device, w0.dtype)
    Y = Y.to(w0.device)
    shapes = [state[n].shape for n in names]

    def loss_of(w: Tensor) -> Tensor:
        full = dict(state)
        for n, part, shape in zip(names, torch.split(w, layout.sizes), shapes, strict=True):
            full[n] = part.reshape(shape)
        return loss_fn(call_functional(model, full, X), Y)

    with _EvalMode(model):
        return hessian(loss_of)(w0).detach()


def exact_empirical_fisher(
    model: nn.Module,
    data: object,
    loss_fn: LossFn | None = None,
    params: Sequence[str] | str | dict | None = None,
) -> Tensor:
    """Undamped empirical Fisher ``(1/N) Σ g gᵀ`` over every sample of ``data``.

    Returns:
        A (d, d) tensor.

    Raises:
        ValueError: If ``data`` is empty.
    """
    X, Y = _all_data(data)
    G = sample_gradients(model, [(X, Y)], loss_fn, num_grads=Y.shape[0], params=params)
    return G.T @ G / G.shape[0]
