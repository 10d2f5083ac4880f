"""A test-local stand-in for the curvature engine: dense empirical Fisher from a gradient loop.

F = damp·I + GᵀG/m (block-diagonal), inverted densely through :class:`DenseInverse`.
"""

import torch
import torch.nn.functional as F

from woodfisher.fisher import DenseInverse, make_blocks
from woodfisher.params import Layout, weight_param
from woodfisher.pruning import Curvature
from woodfisher.pruning.methods import relative_damp_scale


def loop_gradients(model, data, modules, num, loss_fn=None):
    """Per-sample gradients by single backward passes (masked entries come out zero)."""
    loss_fn = loss_fn or F.cross_entropy
    rows = []
    for x, y in data:
        for i in range(x.shape[0]):
            if len(rows) == num:
                break
            model.zero_grad()
            loss_fn(model(x[i : i + 1]), y[i : i + 1]).backward()
            rows.append(torch.cat([weight_param(m).grad.reshape(-1) for m in modules.values()]))
    model.zero_grad()
    return torch.stack(rows).double()


def fake_build_inverse(method, model, data, modules, options):
    if method.curvature is None:
        return Curvature(None)
    G = loop_gradients(model, data, modules, options["num_grads"], options["loss_fn"])
    m, d = G.shape
    rel = None
    if options["damp"] is None:
        rel = options["relative_damp"]
        damp = rel * relative_damp_scale(G)
    else:
        damp = float(options["damp"])
    Fm = damp * torch.eye(d, dtype=torch.float64) + G.T @ G / m
    if method.curvature == "diagonal":
        inv = DenseInverse(torch.diag(torch.diag(Fm)), make_blocks([d], 1))
    elif method.curvature == "kfac":
        inv = NoJointInverse(Fm)
    else:
        inv = DenseInverse(Fm, make_blocks(Layout.of(modules).sizes, options["block_size"]))
    mean = G.mean(0) if method.needs_mean_grad else None
    return Curvature(inv, mean, lambda v: inv.F @ v, damp, rel, {"gradients": 0.0, "inverse": 0.0})


class NoJointInverse(DenseInverse):
    """Like K-FAC for big layers: no exact constrained step."""

    def constrained_min(self, fixed, values, linear=None):
        raise NotImplementedError("no joint step")
