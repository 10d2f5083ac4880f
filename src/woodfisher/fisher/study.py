"""How close are WoodFisher, diagonal Fisher and K-FAC to the exact inverse Hessian?

The paper's section 5.1 in miniature, on one layer of a small network where the exact Hessian
``H`` is affordable (d up to a few thousand weights). Every estimate uses the same damp ``λ``
and is compared with ``(H + λI)⁻¹``:

- **the inverse itself**: relative Frobenius error, and a window of the matrix for heatmaps;
- **IHVPs**: cosine and relative error of ``F̂⁻¹v`` against ``(H + λI)⁻¹v`` for random ``v``
  and for the exact Newton direction ``(H + λI)⁻¹∇L``, and the loss decrease along each
  direction ``−F̂⁻¹∇L`` (at step 1 and at the best step of a grid);
- **the quadratic model**: predicted (``∇Lᵀδ + ½δᵀF̂δ``) against actual loss change of OBS
  pruning with each estimate, for single weights and for sets of weights at several
  sparsities.

WoodFisher is swept over the number of gradients ``m`` and the block size; the exact empirical
Fisher over all ``N`` samples, the diagonal Fisher and K-FAC are the references. By default the
model is a 64-40-20-10 MLP trained briefly on scikit-learn's digits; any small model and its
data can be given instead. :mod:`woodfisher.fisher.study_plots` draws the figures.

OBS pruning is written out here (``ρ_q = w_q²/(2[F⁻¹]_qq)``, the joint step by
``constrained_min``) because the curvature package does not import :mod:`woodfisher.pruning`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from woodfisher.fisher.base import DenseInverse, InverseCurvature
from woodfisher.fisher.blocks import EmpiricalFisherInverse
from woodfisher.fisher.diagonal import DiagonalFisherInverse
from woodfisher.fisher.exact import exact_hessian
from woodfisher.fisher.kfac import kfac_inverse
from woodfisher.gradients import _EvalMode, gradient_layout, sample_gradients
from woodfisher.params import weight_param

logger = logging.getLogger(__name__)

#: Largest layer (weights) the study accepts: the Hessian is d² doubles, its inverse as many.
MAX_STUDY_WEIGHTS = 4000
#: Step sizes tried along each direction ``−F̂⁻¹∇L`` (the "best step" decrease).
STEP_GRID = tuple(2.0 ** k for k in range(-10, 3))


def builtin_model(
    seed: int = 0, hidden: Sequence[int] = (40, 20), steps: int = 300, lr: float = 0.05
) -> tuple[nn.Module, Tensor, Tensor]:
    """The default subject: an MLP 64-…-10 trained briefly on scikit-learn's digits (float64).

    Args:
        seed: Seeds the initialisation and the training batches.
        hidden: Hidden widths.
        steps: SGD steps (batch 64, momentum 0.9).
        lr: Learning rate.

    Returns:
        ``(model, X, Y)`` with all 1797 samples.
    """
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float64)
    Y = torch.tensor(y, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    widths = [64, *hidden, 10]
    mods: list[nn.Module] = []
    for i in range(len(widths) - 1):
        mods += [nn.Linear(widths[i], widths[i + 1]), nn.ReLU()]
    model = nn.Sequential(*mods[:-1]).double()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        idx = torch.randint(0, X.shape[0], (64,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[idx]), Y[idx]).backward()
        opt.step()
    return model.eval(), X, Y


def resolve_layer(model: nn.Module, layer: str | int | None) -> str:
    """The module name of the studied layer.

    Args:
        model: The model.
        layer: A module name, an index into the Linear/Conv layers (0 = first), or None for
            the second such layer (the first if there is only one).

    Returns:
        The module name.

    Raises:
        ValueError: If the layer does not exist or has more than :data:`MAX_STUDY_WEIGHTS`
            weights.
    """
    modules, layout = gradient_layout(model)
    names = list(modules)
    if layer is None:
        layer = 1 if len(names) > 1 else 0
    if isinstance(layer, str) and layer.lstrip("-").isdigit():
        layer = int(layer)
    if isinstance(layer, int):
        if not 0 <= layer < len(names):
            raise ValueError(
                f"layer index {layer} out of range; the model's Linear/Conv layers are "
                f"{names} (index 0..{len(names) - 1})"
            )
        layer = names[layer]
    if layer not in modules:
        raise ValueError(f"unknown layer {layer!r}; choose from {names}")
    size = layout.sizes[names.index(layer)]
    if size > MAX_STUDY_WEIGHTS:
        fits = [n for n, s in zip(names, layout.sizes, strict=True) if s <= MAX_STUDY_WEIGHTS]
        raise ValueError(
            f"layer {layer!r} has {size} weights; the exact Hessian needs d² memory, so the "
            f"study takes at most {MAX_STUDY_WEIGHTS}: choose --layer from {fits or names}"
        )
    return layer


class _LossAt:
    """The mean loss over (X, Y) with the studied weight replaced by ``w`` (flat)."""

    def __init__(self, model: nn.Module, module: nn.Module, X: Tensor, Y: Tensor,
                 loss_fn: Callable[[Tensor, Tensor], Tensor]):
        self.model, self.X, self.Y, self.loss_fn = model, X, Y, loss_fn
        self.param = weight_param(module)
        self.w0 = self.param.detach().clone()

    def __call__(self, w: Tensor) -> float:
        with torch.no_grad(), _EvalMode(self.model):
            self.param.copy_(w.reshape(self.param.shape))
            try:
                return float(self.loss_fn(self.model(self.X), self.Y))
            finally:
                self.param.copy_(self.w0)


def _cos(a: Tensor, b: Tensor) -> Tensor:
    return nn.functional.cosine_similarity(a, b, dim=0)


def _newton_metrics(
    est: InverseCurvature | None, grad: Tensor, newton: Tensor, w: Tensor, loss: _LossAt
) -> dict[str, float]:
    direction = grad if est is None else est.mul(grad)
    base = loss(w)
    decrease = {eta: base - loss(w - eta * direction) for eta in STEP_GRID}
    best = max(decrease, key=lambda e: decrease[e])
    return {
        "newton_cos": float(_cos(direction, newton)),
        "newton_rel_err": float(torch.linalg.norm(direction - newton) / torch.linalg.norm(newton)),
        "loss_decrease_unit": decrease[1.0],
        "loss_decrease_best": decrease[best],
        "best_step": best,
    }


def _ihvp_metrics(est: InverseCurvature, Hinv: Tensor, R: Tensor) -> dict[str, float]:
    dense = est.columns(torch.arange(est.d))
    got, ref = est.mul(R), Hinv @ R
    err = torch.linalg.norm(got - ref, dim=0) / torch.linalg.norm(ref, dim=0)
    return {
        "rel_frobenius": float(torch.linalg.norm(dense - Hinv) / torch.linalg.norm(Hinv)),
        "ihvp_rel_err_random": float(err.mean()),
        "ihvp_cos_random": float(_cos(got, ref).mean()),
    }


def _fidelity(
    est: InverseCurvature, w: Tensor, grad: Tensor, loss: _LossAt, singles: Tensor,
    sparsities: Sequence[float],
) -> dict[str, list]:
    """Predicted vs actual loss change of OBS pruning with ``est``.

    The prediction is the local quadratic model ``∇Lᵀδ + ½δᵀF̂δ`` of the step ``δ`` with the
    exact gradient, so that only the curvature differs between estimates (the model need not
    sit at a minimum); ``obs`` keeps ``½δᵀF̂δ`` alone, OBS's own prediction at a minimum.
    """
    base = loss(w)
    cols = est.columns(singles)  # (d, n)
    diag_q = cols[singles, torch.arange(singles.numel())]
    deltas, kind = [], []
    for j, q in enumerate(singles.tolist()):
        deltas.append(-(w[q] / diag_q[j]) * cols[:, j])
        kind.append("single")
    saliency = w * w / (2 * est.diag())
    order = torch.argsort(saliency)
    for s in sparsities:
        remove = torch.zeros_like(w, dtype=torch.bool)
        remove[order[: round(s * w.numel())]] = True
        deltas.append(est.constrained_min(remove, -w))
        kind.append(f"{s:g}")
    D = torch.stack(deltas, dim=1)  # (d, n)
    curvature = 0.5 * (D * est.fmul(D)).sum(0)
    return {
        "predicted": (grad @ D + curvature).tolist(),
        "actual": [loss(w + D[:, j]) - base for j in range(D.shape[1])],
        "obs": curvature.tolist(),
        "kind": kind,
    }


def _rank_corr(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (ties broken by order; continuous values rarely tie)."""
    if len(a) < 2:
        return float("nan")
    ra = torch.argsort(torch.argsort(torch.tensor(a, dtype=torch.float64))).double()
    rb = torch.argsort(torch.argsort(torch.tensor(b, dtype=torch.float64))).double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def label(row: dict) -> str:
    """A short name of an estimate: ``WoodFisher m=100 B=20``, ``K-FAC``, ...

    Returns:
        The label.
    """
    if row["estimator"] != "WoodFisher":
        return row["estimator"]
    block = "full" if row["block_size"] is None else row["block_size"]
    return f"WoodFisher m={row['num_grads']} B={block}"


def analyze_hessian(
    model: nn.Module | None = None,
    data: tuple[Tensor, Tensor] | None = None,
    *,
    layer: str | int | None = None,
    num_grads: Sequence[int] = (10, 30, 100, 300, 1000),
    block_sizes: Sequence[int | None] = (None, 50, 20),
    damp: float = 1e-3,
    num_samples: int = 1000,
    seed: int = 0,
    num_vectors: int = 8,
    num_single: int = 40,
    sparsities: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
    window: int = 48,
    steps: int = 300,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Compare curvature estimates of one layer with its exact damped Hessian.

    Args:
        model: The network (float64 is best); None for :func:`builtin_model`.
        data: ``(X, Y)`` with at least ``num_samples`` samples; required with ``model``.
        layer: Module name or index among the Linear/Conv layers (see :func:`resolve_layer`).
        num_grads: Numbers of gradients ``m`` for WoodFisher (values above ``num_samples``
            are skipped).
        block_sizes: WoodFisher block sizes (None = the full matrix).
        damp: ``λ``, added to the Hessian and used by every estimate.
        num_samples: Samples ``N`` over which loss, Hessian and Fisher are taken.
        seed: Seeds the built-in model, the sample draw and the test vectors.
        num_vectors: Random vectors for the IHVP comparison.
        num_single: Single weights pruned for the quadratic-model fidelity.
        sparsities: Sparsities of the layer for the sets of weights pruned jointly.
        window: Side of the heatmap window (the top-left corner of each inverse).
        steps: Training steps of the built-in model.
        loss_fn: ``loss_fn(outputs, targets)`` -> mean loss; default cross-entropy.
        log: Called with a line of progress at each phase (e.g. ``print``); None for quiet.

    Returns:
        A JSON-able dict: ``setup`` (model, layer, d, N, damp, seed, Hessian extreme
        eigenvalues, loss, gradient norm), ``rows`` (one per estimate: ``estimator``,
        ``num_grads``, ``block_size``, ``rel_frobenius``, ``ihvp_rel_err_random``,
        ``ihvp_cos_random``, ``newton_cos``, ``newton_rel_err``, ``loss_decrease_unit``,
        ``loss_decrease_best``, ``best_step``, ``seconds``), ``windows`` (label → the window of
        the inverse) and ``fidelity`` (label → predicted, actual, obs, kind, spearman).

    Raises:
        ValueError: On a model without data, a bad ``num_samples`` or layer.
    """
    loss_fn = loss_fn or nn.functional.cross_entropy
    log = log or (lambda msg: None)
    if model is None:
        log(f"training the built-in MLP on digits ({steps} steps)")
        model, X, Y = builtin_model(seed, steps=steps)
        subject = f"built-in MLP 64-40-20-10 on digits ({steps} SGD steps)"
    else:
        if data is None:
            raise ValueError("a model needs its data: pass data=(X, Y)")
        X, Y = data
        subject = type(model).__name__
    model = model.eval()
    if not 1 <= num_samples <= X.shape[0]:
        raise ValueError(f"num_samples must be in [1, {X.shape[0]}], got {num_samples}")
    name = resolve_layer(model, layer)
    module = dict(model.named_modules())[name]
    params = [name]
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(X.shape[0], generator=gen)[:num_samples]
    dtype = weight_param(module).dtype
    Xs, Ys = X[perm].to(dtype), Y[perm]
    Ys = Ys.to(dtype) if Ys.is_floating_point() else Ys

    log(f"exact Hessian of layer {name} over {num_samples} samples")
    t0 = time.perf_counter()
    H = exact_hessian(model, (Xs, Ys), loss_fn, params=params)
    d = H.shape[0]
    eye = torch.eye(d, dtype=H.dtype)
    Hd = H + damp * eye
    Hinv = torch.linalg.inv(Hd)
    eigs = torch.linalg.eigvalsh(H)
    logger.info("exact Hessian d=%d in %.1fs", d, time.perf_counter() - t0)
    G = sample_gradients(model, (Xs, Ys), loss_fn, num_grads=num_samples, params=params)
    grad = G.mean(0)
    newton = Hinv @ grad
    R = torch.randn(d, num_vectors, generator=gen, dtype=H.dtype)
    w = weight_param(module).detach().reshape(-1).clone()
    loss = _LossAt(model, module, Xs, Ys, loss_fn)
    N = num_samples
    blocks = [b if b is not None and b < d else None for b in block_sizes]
    blocks = list(dict.fromkeys(blocks))  # B >= d is the full matrix
    ms = [m for m in num_grads if m <= N]
    if not ms:
        raise ValueError(f"every num_grads {list(num_grads)} exceeds num_samples={N}")
    m_max = max(ms)

    estimates: list[tuple[dict, Callable[[], InverseCurvature]]] = [
        ({"estimator": "exact Hessian (check)", "num_grads": None, "block_size": None},
         lambda: DenseInverse(Hd)),
        ({"estimator": "exact empirical Fisher", "num_grads": N, "block_size": None},
         lambda: DenseInverse(G.T @ G / N + damp * eye)),
    ]
    for m in ms:
        for b in blocks:
            estimates.append((
                {"estimator": "WoodFisher", "num_grads": m, "block_size": b},
                lambda m=m, b=b: EmpiricalFisherInverse(G[:m], b, damp),
            ))
    estimates.append(({"estimator": "diagonal Fisher", "num_grads": m_max, "block_size": 1},
                      lambda: DiagonalFisherInverse(G[:m_max], damp)))
    batches = [(Xs[i:i + 100], Ys[i:i + 100]) for i in range(0, N, 100)]
    estimates.append(({"estimator": "K-FAC", "num_grads": N, "block_size": d},
                      lambda: kfac_inverse(model, batches, loss_fn, num_batches=len(batches),
                                           params=params, damp=damp)))

    # The heatmaps and the fidelity scatter show a few estimates, not the whole sweep.
    shown = {"exact Hessian (check)", "K-FAC", "diagonal Fisher",
             f"WoodFisher m={m_max} B=full"}
    if blocks[-1] is not None:
        shown.add(f"WoodFisher m={m_max} B={blocks[-1]}")
    singles = torch.randperm(d, generator=gen)[: min(num_single, d)]
    rows, windows, fidelity = [], {}, {}
    log(f"{len(estimates)} estimates: inverse, IHVPs, Newton directions, OBS fidelity")
    for row, build in estimates:
        t = time.perf_counter()
        est = build()
        row = {**row, **_ihvp_metrics(est, Hinv, R), **_newton_metrics(est, grad, newton, w, loss)}
        row["seconds"] = time.perf_counter() - t
        rows.append(row)
        lab = label(row)
        if lab in shown:
            k = min(window, d)
            windows[lab] = est.columns(torch.arange(k))[:k].tolist()
            fid = _fidelity(est, w, grad, loss, singles, sparsities)
            fid["spearman"] = _rank_corr(fid["predicted"], fid["actual"])
            fidelity[lab] = fid
    gd = {"estimator": "gradient (no curvature)", "num_grads": None, "block_size": None,
          **_newton_metrics(None, grad, newton, w, loss)}
    rows.append(gd)
    setup = {
        "model": subject, "layer": name, "d": d, "num_samples": N, "damp": damp, "seed": seed,
        "hessian_min_eig": float(eigs[0]), "hessian_max_eig": float(eigs[-1]),
        "loss": loss(w), "grad_norm": float(grad.norm()), "num_grads": ms,
        "block_sizes": blocks, "sparsities": list(sparsities), "window": min(window, d),
        "step_grid": list(STEP_GRID),
    }
    if not all(math.isfinite(r.get("rel_frobenius", 0.0)) for r in rows):
        logger.warning("some estimate gave a non-finite error; check damp")
    return {"setup": setup, "rows": rows, "windows": windows, "fidelity": fidelity}
