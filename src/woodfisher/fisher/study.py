"""How close are WoodFisher, diagonal Fisher and K-FAC to the exact inverse Hessian?

A self-contained study on a small network (the paper's section 5.1 in miniature): train a
64-40-20-10 MLP briefly on scikit-learn's bundled digits, take the exact Hessian and empirical
Fisher of one layer, and compare each estimate's inverse with the inverse of the damped exact
Hessian ``H + damp·I``: relative Frobenius error, and IHVP relative error and cosine on random
and on gradient vectors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from woodfisher.fisher.base import DenseInverse, InverseCurvature
from woodfisher.fisher.blocks import EmpiricalFisherInverse
from woodfisher.fisher.diagonal import DiagonalFisherInverse
from woodfisher.fisher.exact import exact_hessian
from woodfisher.fisher.kfac import kfac_inverse
from woodfisher.gradients import sample_gradients

logger = logging.getLogger(__name__)


def _digits(dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return torch.tensor(X / 16.0, dtype=dtype), torch.tensor(y, dtype=torch.long)


def _train(model: nn.Module, X: Tensor, Y: Tensor, steps: int, lr: float, gen: torch.Generator):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        idx = torch.randint(0, X.shape[0], (64,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[idx]), Y[idx]).backward()
        opt.step()


def _metrics(est: InverseCurvature, Hinv: Tensor, R: Tensor, Gv: Tensor) -> dict[str, float]:
    dense = est.columns(torch.arange(est.d))
    out = {"rel_frobenius": float(torch.linalg.norm(dense - Hinv) / torch.linalg.norm(Hinv))}
    for name, V in (("random", R), ("grad", Gv)):
        got, ref = est.mul(V), Hinv @ V
        err = torch.linalg.norm(got - ref, dim=0) / torch.linalg.norm(ref, dim=0)
        cos = nn.functional.cosine_similarity(got, ref, dim=0)
        out[f"ihvp_rel_err_{name}"] = float(err.mean())
        out[f"ihvp_cos_{name}"] = float(cos.mean())
    return out


def analyze_hessian(
    out_png: str | Path | None = None,
    seed: int = 0,
    hidden: Sequence[int] = (40, 20),
    layer: int | None = 1,
    num_grads: Sequence[int] = (10, 100, 1000),
    block_sizes: Sequence[int | None] = (None, 50, 20),
    damp: float = 1e-3,
    num_samples: int = 1000,
    steps: int = 300,
    lr: float = 0.05,
    num_vectors: int = 8,
) -> list[dict]:
    """Compare curvature estimates with the exact damped Hessian on a tiny digits MLP.

    Args:
        out_png: Where to write a bar chart of the relative Frobenius errors (None: no plot).
        seed: Seeds the initialisation, training batches and test vectors.
        hidden: Hidden widths of the MLP 64-…-10.
        layer: Index of the Linear layer to study (0 = first); None for all weights.
        num_grads: Numbers of gradients ``m`` for WoodFisher.
        block_sizes: WoodFisher block sizes (None = the full matrix).
        damp: Damping added to the Hessian and used by every estimate.
        num_samples: Samples over which the Hessian and Fisher are taken (at most 1797).
        steps: SGD steps of training before the study.
        lr: SGD learning rate.
        num_vectors: Random and gradient vectors for the IHVP comparison.

    Returns:
        One dict per estimate: ``estimator``, ``num_grads``, ``block_size``, ``rel_frobenius``,
        ``ihvp_rel_err_random``, ``ihvp_cos_random``, ``ihvp_rel_err_grad``, ``ihvp_cos_grad``,
        ``seconds``, plus ``d``, ``damp``, ``seed`` and ``hessian_min_eig``.

    Raises:
        ValueError: If ``num_samples`` is out of range or ``layer`` does not exist.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    X, Y = _digits(torch.float64)
    if not 1 <= num_samples <= X.shape[0]:
        raise ValueError(f"num_samples must be in [1, {X.shape[0]}], got {num_samples}")
    widths = [64, *hidden, 10]
    mods: list[nn.Module] = []
    for i in range(len(widths) - 1):
        mods += [nn.Linear(widths[i], widths[i + 1]), nn.ReLU()]
    model = nn.Sequential(*mods[:-1]).double()
    _train(model, X, Y, steps, lr, gen)
    linear = [str(i) for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    if layer is not None and not 0 <= layer < len(linear):
        raise ValueError(f"layer must be in [0, {len(linear)}) or None, got {layer}")
    params = linear if layer is None else [linear[layer]]
    perm = torch.randperm(X.shape[0], generator=gen)[:num_samples]
    Xs, Ys = X[perm], Y[perm]

    t0 = time.perf_counter()
    H = exact_hessian(model, (Xs, Ys), params=params)
    d = H.shape[0]
    eye = torch.eye(d, dtype=H.dtype)
    Hinv = torch.linalg.inv(H + damp * eye)
    min_eig = float(torch.linalg.eigvalsh(H)[0])
    logger.info("exact Hessian d=%d in %.1fs, min eigenvalue %.2e", d, time.perf_counter() - t0,
                min_eig)
    G = sample_gradients(model, (Xs, Ys), num_grads=num_samples, params=params)
    R = torch.randn(d, num_vectors, generator=gen, dtype=H.dtype)
    Gv = torch.cat([G.mean(0, keepdim=True), G[: num_vectors - 1]]).T

    rows: list[dict] = []

    def add(name: str, m: int | None, block: int | None, build):
        t = time.perf_counter()
        est = build()
        row = {"estimator": name, "num_grads": m, "block_size": block}
        row.update(_metrics(est, Hinv, R, Gv))
        row.update(seconds=time.perf_counter() - t, d=d, damp=damp, seed=seed,
                   hessian_min_eig=min_eig)
        rows.append(row)

    add("exact Hessian (check)", None, None, lambda: DenseInverse(H + damp * eye))
    add("exact empirical Fisher", num_samples, None,
        lambda: DenseInverse(G.T @ G / num_samples + damp * eye))
    for m in num_grads:
        if m > num_samples:
            logger.warning("skipping num_grads=%d > num_samples=%d", m, num_samples)
            continue
        for b in block_sizes:
            add("WoodFisher", m, b if b is not None and b < d else None,
                lambda m=m, b=b: EmpiricalFisherInverse(G[:m], b, damp))
    m_diag = min(max(num_grads), num_samples)
    add("diagonal Fisher", m_diag, 1, lambda: DiagonalFisherInverse(G[:m_diag], damp))
    batches = [(Xs[i:i + 100], Ys[i:i + 100]) for i in range(0, num_samples, 100)]
    add("K-FAC", num_samples, d, lambda: kfac_inverse(
        model, batches, num_batches=len(batches), params=params, damp=damp))
    if out_png is not None:
        plot_hessian_study(rows, out_png)
    return rows


def _label(row: dict) -> str:
    if row["estimator"] != "WoodFisher":
        return row["estimator"]
    block = "full" if row["block_size"] is None else row["block_size"]
    return f"WoodFisher m={row['num_grads']} B={block}"


def print_hessian_table(rows: list[dict], console=None) -> None:
    """Print the study's rows as a rich table.

    Args:
        rows: The output of :func:`analyze_hessian`.
        console: A ``rich.console.Console``; default one on stdout.
    """
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    first = rows[0] if rows else {}
    table = Table(title=f"inverse vs exact (H + {first.get('damp')}·I)⁻¹, d={first.get('d')}, "
                        f"min eig(H)={first.get('hessian_min_eig', float('nan')):.2e}")
    cols = ["rel_frobenius", "ihvp_rel_err_random", "ihvp_cos_random", "ihvp_rel_err_grad",
            "ihvp_cos_grad", "seconds"]
    table.add_column("estimate")
    for c in cols:
        table.add_column(c.replace("ihvp_", "").replace("_", " "), justify="right")
    for row in rows:
        table.add_row(_label(row), *(f"{row[c]:.3g}" for c in cols))
    console.print(table)


def plot_hessian_study(rows: list[dict], out_png: str | Path) -> Path:
    """Bar chart (log scale) of each estimate's relative Frobenius error; written atomically.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    labels = [_label(r) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    ax.barh(labels, [max(r["rel_frobenius"], 1e-16) for r in rows], color="tab:blue")
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("‖F̂⁻¹ − (H + λI)⁻¹‖_F / ‖(H + λI)⁻¹‖_F")
    ax.set_title(f"inverse curvature vs exact Hessian (d={rows[0]['d']}, λ={rows[0]['damp']})")
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out)
    return out
