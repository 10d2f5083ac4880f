"""Factorised layers as ordinary ``nn.Sequential`` chains of Linear/Conv2d modules.

* ``"svd"``: a Linear ``W ≈ A B`` becomes ``Linear(in→r) → Linear(r→out)``; a k×k convolution
  (T, S, k, k), read as the T × S·k² matrix, becomes ``k×k conv S→r → 1×1 conv r→T``.
* ``"tucker2"`` (Kim et al. 2016; RENE's 3-core TT with tied ranks): ``1×1 S→r_in → k×k
  r_in→r_out → 1×1 r_out→T``, with ``r_in = min(r, S)`` and ``r_out = min(r, T)`` for a rank
  ``r``; factors from HOOI (tensorly ``partial_tucker``).
* ``"cp"`` (RENE's CP3, Lebedev et al. 2015 with one depthwise stage): ``1×1 S→r → depthwise k×k
  (groups=r) → 1×1 r→T``; factors from CP-ALS of the (T, k², S) regrouped kernel (tensorly
  ``parafac`` with SVD initialisation, float64, unit-norm input; a degenerate result is re-run
  with a ridge term).

Stride, padding and dilation go to the spatial stage, the bias to the last stage. Linear layers
and 1×1 convolutions are always factorised by SVD. With ``row_weight``/``col_weight`` the
decompositions minimise ``Σ r_i c_j (W - Ŵ)²_ij`` instead of the plain squared error (scale,
decompose, unscale: exact for weights separable into rows × columns); see
:func:`fisher_scales`.

Example:
    >>> import torch
    >>> from torch import nn
    >>> conv = nn.Conv2d(4, 6, 3, padding=1)
    >>> seq = factorise(conv, "tucker2", 6)
    >>> x = torch.randn(2, 4, 5, 5)
    >>> torch.allclose(seq(x), conv(x), atol=1e-5)
    True
    >>> factor_params(conv, "tucker2", 2), factor_params(conv, "tucker2", 6)
    (56, 268)
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from woodfisher.lowrank.measures import single_threaded

__all__ = [
    "METHODS",
    "compose",
    "describe",
    "factor_params",
    "factorise",
    "factorised_layers",
    "fisher_scales",
    "max_rank",
    "method_for",
    "shell",
    "skip_reason",
    "stage_params",
    "useful_max_rank",
]

#: Decompositions for convolutions (Linear layers and 1×1 convolutions always use ``"svd"``).
METHODS = ("svd", "tucker2", "cp")

# CP-ALS: a sum of component norms this many times the tensor's norm means cancelling terms.
_CP_DEGENERACY = 10.0
_CP_RIDGE = 1e-3


def _kernel(module: nn.Module) -> tuple[int, int]:
    return tuple(module.kernel_size) if isinstance(module, nn.Conv2d) else (1, 1)


def skip_reason(module: nn.Module) -> str | None:
    """Why ``module`` cannot be factorised, or None if it can.

    Returns:
        A short reason (``"grouped convolution"``, ...) or None.
    """
    if isinstance(module, nn.Linear):
        return None
    if type(module) is not nn.Conv2d:
        return f"{type(module).__name__} is not a Linear or Conv2d"
    if module.groups != 1:
        return f"grouped convolution (groups={module.groups})"
    return None


def method_for(module: nn.Module, method: str) -> str:
    """The decomposition ``module`` gets when ``method`` is asked for (``"svd"`` for matrices).

    Returns:
        ``"svd"``, ``"tucker2"`` or ``"cp"``.

    Raises:
        ValueError: If ``method`` is unknown.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    return "svd" if _kernel(module) == (1, 1) else method


def _dims(module: nn.Module) -> tuple[int, int, int]:
    """(T, S, k²) of a Linear or Conv2d."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, 1
    return module.out_channels, module.in_channels, math.prod(_kernel(module))


def max_rank(module: nn.Module, method: str) -> int:
    """The largest meaningful rank: exact reconstruction is possible at it.

    ``svd``: ``min(T, S·k²)``; ``tucker2``: ``max(S, T)`` (each mode clipped to its size);
    ``cp``: the product of the two smallest sides of the (T, k², S) kernel.

    Returns:
        The rank.
    """
    t, s, k2 = _dims(module)
    method = method_for(module, method)
    if method == "svd":
        return min(t, s * k2)
    if method == "tucker2":
        return max(s, t)
    a, b, _ = sorted((t, s, k2))
    return a * b


def _tied(module: nn.Module, rank: int) -> tuple[int, int]:
    t, s, _ = _dims(module)
    return min(rank, t), min(rank, s)


def stage_params(module: nn.Module, method: str, rank: int) -> list[int]:
    """Weights of each stage of the factorised layer, in call order.

    Returns:
        ``svd``: ``[r·S·k², r·T]``; ``tucker2``: ``[S·r_in, r_in·r_out·k², r_out·T]``;
        ``cp``: ``[r·S, r·k², r·T]``.
    """
    t, s, k2 = _dims(module)
    method = method_for(module, method)
    if method == "svd":
        return [rank * s * k2, rank * t]
    if method == "tucker2":
        r_out, r_in = _tied(module, rank)
        return [s * r_in, r_in * r_out * k2, r_out * t]
    return [rank * s, rank * k2, rank * t]


def factor_params(module: nn.Module, method: str, rank: int) -> int:
    """Weights of the factorised layer (biases not counted, as for the dense weight).

    Returns:
        The sum of :func:`stage_params`.
    """
    return sum(stage_params(module, method, rank))


def useful_max_rank(module: nn.Module, method: str) -> int:
    """The largest rank whose factorised layer has fewer weights than the dense one (0: none).

    Returns:
        The rank, at most :func:`max_rank`.
    """
    dense = module.weight.numel()
    hi = max_rank(module, method)
    lo = 0
    while lo < hi:  # params grow with the rank, so bisect
        mid = (lo + hi + 1) // 2
        if factor_params(module, method, mid) < dense:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _check_rank(module: nn.Module, method: str, rank: int) -> int:
    top = max_rank(module, method)
    if isinstance(rank, bool) or int(rank) != rank or not 1 <= rank <= top:
        raise ValueError(
            f"rank must be an integer in 1..{top} (full rank of this {method_for(module, method)} "
            f"factorisation of a {tuple(module.weight.shape)} weight), got {rank!r}"
        )
    return int(rank)


def shell(module: nn.Module, method: str, rank: int) -> nn.Sequential:
    """The factorised structure of ``module`` at ``rank``, freshly initialised (no fit).

    Returns:
        An ``nn.Sequential`` of Linear or Conv2d modules.

    Raises:
        ValueError: If the module cannot be factorised or the rank is out of range.
    """
    reason = skip_reason(module)
    if reason:
        raise ValueError(f"cannot factorise this module: {reason}")
    rank = _check_rank(module, method, rank)
    method = method_for(module, method)
    bias = module.bias is not None
    dev, dt = module.weight.device, module.weight.dtype
    if isinstance(module, nn.Linear):
        seq = nn.Sequential(nn.Linear(module.in_features, rank, bias=False),
                            nn.Linear(rank, module.out_features, bias=bias))
        return seq.to(dev, dt)
    t, s, _ = _dims(module)
    spatial = dict(kernel_size=module.kernel_size, stride=module.stride, padding=module.padding,
                   dilation=module.dilation, padding_mode=module.padding_mode)
    if method == "svd":
        seq = nn.Sequential(nn.Conv2d(s, rank, bias=False, **spatial),
                            nn.Conv2d(rank, t, 1, bias=bias))
    elif method == "tucker2":
        r_out, r_in = _tied(module, rank)
        seq = nn.Sequential(nn.Conv2d(s, r_in, 1, bias=False),
                            nn.Conv2d(r_in, r_out, bias=False, **spatial),
                            nn.Conv2d(r_out, t, 1, bias=bias))
    else:
        seq = nn.Sequential(nn.Conv2d(s, rank, 1, bias=False),
                            nn.Conv2d(rank, rank, groups=rank, bias=False, **spatial),
                            nn.Conv2d(rank, t, 1, bias=bias))
    return seq.to(dev, dt)


def fisher_scales(fisher_diag: Tensor, method: str) -> tuple[Tensor, Tensor]:
    """Row and column weights from a layer's diagonal Fisher, for weighted decompositions.

    ``F`` (the weight's shape) is replaced by the separable ``r cᵀ`` with ``r_i = Σ_j F_ij``
    and ``c_j = Σ_i F_ij / Σ F`` (the independence model of a nonnegative table), so that the
    weighted error ``Σ F_ij Δ_ij²`` is approximated by one that scaling solves exactly. Columns
    are the unfolding's columns for ``"svd"`` (input channel × kernel position) and the input
    channels for ``"tucker2"``/``"cp"``.

    Args:
        fisher_diag: Nonnegative tensor of the weight's shape.
        method: The decomposition the weights are for (after :func:`method_for`).

    Returns:
        ``(row_weight (T,), col_weight (S·k²,) or (S,))``, strictly positive.
    """
    f = fisher_diag.detach().double().clamp_min(0)
    if f.ndim == 4 and method != "svd":
        rows, cols = f.sum((1, 2, 3)), f.sum((0, 2, 3))
    else:
        mat = f.reshape(f.shape[0], -1)
        rows, cols = mat.sum(1), mat.sum(0)
    total = float(rows.sum())
    if total <= 0:
        return torch.ones_like(rows), torch.ones_like(cols)
    cols = cols / total
    # A floor keeps the unscaling finite where a channel saw no gradient.
    return rows.clamp_min(1e-8 * float(rows.mean())), cols.clamp_min(1e-8 * float(cols.mean()))


def _svd_factors(mat: Tensor, rank: int, rw: Tensor | None, cw: Tensor | None):
    m = mat.double()
    sr = rw.double().sqrt().to(m.device) if rw is not None else None
    sc = cw.double().sqrt().to(m.device) if cw is not None else None
    if sr is not None:
        m = m * sr[:, None]
    if sc is not None:
        m = m * sc[None, :]
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    root = s[:rank].sqrt()
    a, b = u[:, :rank] * root, root[:, None] * vh[:rank]
    if sr is not None:
        a = a / sr[:, None]
    if sc is not None:
        b = b / sc[None, :]
    return a, b


def _tucker2_factors(w: Tensor, rank: int, rw: Tensor | None, cw: Tensor | None, n_iter: int):
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    t, s = w.shape[:2]
    r_out, r_in = min(rank, t), min(rank, s)
    x = w.double()
    sr = rw.double().sqrt().to(x.device) if rw is not None else torch.ones(t, dtype=x.dtype)
    sc = cw.double().sqrt().to(x.device) if cw is not None else torch.ones(s, dtype=x.dtype)
    x = x * sr[:, None, None, None] * sc[None, :, None, None]
    if r_out == t and r_in == s:  # full rank: identity factors reproduce W exactly
        core, u_out, u_in = x, torch.eye(t, dtype=x.dtype), torch.eye(s, dtype=x.dtype)
    else:
        with tl.backend_context("pytorch"):
            (core, (u_out, u_in)), _ = partial_tucker(
                x, rank=[r_out, r_in], modes=[0, 1], init="svd", n_iter_max=n_iter
            )
    return u_out / sr[:, None], core, u_in / sc[:, None]


def _cp_factors(w: Tensor, rank: int, rw: Tensor | None, cw: Tensor | None, n_iter: int):
    import tensorly as tl
    from tensorly.decomposition import parafac

    t, s, kh, kw = w.shape
    x = w.double().permute(0, 2, 3, 1).reshape(t, kh * kw, s)  # (T, k², S) as RENE regroups
    sr = rw.double().sqrt() if rw is not None else torch.ones(t, dtype=x.dtype)
    sc = cw.double().sqrt() if cw is not None else torch.ones(s, dtype=x.dtype)
    x = x * sr[:, None, None] * sc[None, None, :]
    norm = float(torch.linalg.norm(x))
    if norm == 0:
        zeros = [torch.zeros(n, rank, dtype=x.dtype) for n in (t, kh * kw, s)]
        return zeros
    x = x / norm

    def run(ridge: float):
        # tensorly warns when the SVD initialisation asks for more vectors than a side has (it
        # pads them at random, which is what we want for ranks above a side).
        with tl.backend_context("pytorch"), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            weights, factors = parafac(x, rank, n_iter_max=n_iter, init="svd", tol=1e-10,
                                       l2_reg=ridge, random_state=0)
        a, b, c = factors
        return [a * weights, b, c]

    def degenerate(f):
        if not all(torch.isfinite(v).all() for v in f):
            return True
        sizes = f[0].norm(dim=0) * f[1].norm(dim=0) * f[2].norm(dim=0)
        return float(sizes.sum()) > _CP_DEGENERACY  # x has norm 1

    factors = run(0.0)
    if degenerate(factors):
        factors = run(_CP_RIDGE)
        if not all(torch.isfinite(v).all() for v in factors):
            raise ValueError(
                f"CP-ALS failed (non-finite factors) on a {tuple(w.shape)} kernel at rank {rank}; "
                "use method='tucker2' or a smaller rank"
            )
    a, b, c = factors
    # Equal column norms across the three factors: same function, better conditioned training.
    na, nb, nc = (f.norm(dim=0).clamp_min(1e-30) for f in (a, b, c))
    g = (na * nb * nc) ** (1 / 3)
    a, b, c = a * (g / na), b * (g / nb), c * (g / nc)
    return [a * norm / sr[:, None], b, c / sc[:, None]]


@torch.no_grad()
@single_threaded
def factorise(
    module: nn.Module,
    method: str,
    rank: int,
    row_weight: Tensor | None = None,
    col_weight: Tensor | None = None,
    iters: int | None = None,
) -> nn.Sequential:
    """Factorise a Linear or Conv2d at ``rank`` (a new module; ``module`` is left untouched).

    Args:
        module: The dense layer (its effective weight is read, pruning masks applied).
        method: ``"svd"``, ``"tucker2"`` or ``"cp"`` (matrices always use SVD).
        rank: The rank, ``1..max_rank(module, method)``.
        row_weight: Optional positive (T,) weights of the output channels.
        col_weight: Optional positive weights of the columns (see :func:`fisher_scales`).
        iters: Iterations of CP-ALS (default 100) or HOOI (default 50; Tucker-2).

    Returns:
        The factorised layer, in ``module``'s dtype and device.

    Raises:
        ValueError: If the module cannot be factorised, the rank is out of range, or CP-ALS
            fails.
    """
    from woodfisher.params import effective_weight

    seq = shell(module, method, rank)
    method = method_for(module, method)
    w = effective_weight(module)
    dt = w.dtype
    if method == "svd":
        a, b = _svd_factors(w.reshape(w.shape[0], -1), rank, row_weight, col_weight)
        seq[0].weight.copy_(b.reshape(seq[0].weight.shape).to(dt))
        seq[1].weight.copy_(a.reshape(seq[1].weight.shape).to(dt))
    elif method == "tucker2":
        u_out, core, u_in = _tucker2_factors(w, rank, row_weight, col_weight, iters or 50)
        seq[0].weight.copy_(u_in.T.reshape(seq[0].weight.shape).to(dt))
        seq[1].weight.copy_(core.to(dt))
        seq[2].weight.copy_(u_out.reshape(seq[2].weight.shape).to(dt))
    else:
        a, b, c = _cp_factors(w, rank, row_weight, col_weight, iters or 100)
        seq[0].weight.copy_(c.T.reshape(seq[0].weight.shape).to(dt))
        seq[1].weight.copy_(b.T.reshape(seq[1].weight.shape).to(dt))
        seq[2].weight.copy_(a.reshape(seq[2].weight.shape).to(dt))
    if module.bias is not None:
        seq[-1].bias.copy_(module.bias.detach())
    return seq


def _weight(module: nn.Module, detach: bool) -> Tensor:
    from woodfisher.params import effective_weight, weight_mask, weight_param

    if detach:
        return effective_weight(module)
    mask = weight_mask(module)
    return weight_param(module) * mask if mask is not None else weight_param(module)


def _dense_kernel(conv: nn.Conv2d, detach: bool = True) -> Tensor:
    """A (grouped) convolution's weight as the equivalent dense (out, in, kh, kw) kernel."""
    w = _weight(conv, detach)
    if conv.groups == 1:
        return w
    if conv.groups == conv.in_channels == conv.out_channels:  # depthwise: a diagonal
        eye = torch.eye(conv.in_channels, dtype=w.dtype, device=w.device)
        return eye[:, :, None, None] * w
    return _grouped(conv, w)


def _grouped(conv: nn.Conv2d, w: Tensor) -> Tensor:
    out = w.new_zeros(conv.out_channels, conv.in_channels, *w.shape[2:])
    go, gi = conv.out_channels // conv.groups, conv.in_channels // conv.groups
    for g in range(conv.groups):
        out[g * go:(g + 1) * go, g * gi:(g + 1) * gi] = w[g * go:(g + 1) * go]
    return out


def is_factorised(module: nn.Module) -> bool:
    """Whether ``module`` is a chain this module builds (2–3 Linear, or 2–3 Conv2d).

    Returns:
        True or False.
    """
    if type(module) is not nn.Sequential or not 2 <= len(module) <= 3:
        return False
    kinds = {type(m) for m in module}
    return kinds in ({nn.Linear}, {nn.Conv2d}) and (len(module) == 2 or kinds == {nn.Conv2d})


def compose(seq: nn.Sequential, detach: bool = True) -> Tensor:
    """The dense weight a factorised chain computes (effective weights, masks applied).

    Args:
        seq: A factorised chain (see :func:`is_factorised`).
        detach: False to keep autograd history (for reconstruction losses).

    Returns:
        A tensor of the original layer's weight shape.

    Raises:
        ValueError: If ``seq`` is not a factorised chain.
    """
    if not is_factorised(seq):
        raise ValueError("not a factorised layer (an nn.Sequential of 2-3 Linear/Conv2d modules)")
    if isinstance(seq[0], nn.Linear):
        return _weight(seq[1], detach) @ _weight(seq[0], detach)
    w = _dense_kernel(seq[0], detach)
    for conv in list(seq)[1:]:
        k = _dense_kernel(conv, detach)
        if k.shape[2:] == (1, 1):
            w = torch.einsum("or,rshw->oshw", k[:, :, 0, 0], w)
        elif w.shape[2:] == (1, 1):
            w = torch.einsum("orhw,rs->oshw", k, w[:, :, 0, 0])
        else:
            raise ValueError("a factorised chain has at most one spatial (k×k) stage")
    return w


def describe(seq: nn.Sequential) -> dict[str, object]:
    """Method and rank of a factorised chain, read from its structure.

    Returns:
        ``{"method", "rank", "ranks", "params"}`` (``ranks``: the inner widths).
    """
    if not is_factorised(seq):
        raise ValueError("not a factorised layer (an nn.Sequential of 2-3 Linear/Conv2d modules)")
    widths = [m.weight.shape[0] for m in list(seq)[:-1]]
    if len(seq) == 2:
        method = "svd"
    else:
        method = "cp" if seq[1].groups == seq[1].in_channels > 1 else "tucker2"
    return {"method": method, "rank": max(widths), "ranks": widths,
            "params": sum(m.weight.numel() for m in seq)}


def factorised_layers(model: nn.Module) -> dict[str, dict[str, object]]:
    """Every factorised layer of ``model`` with :func:`describe`'s summary.

    Returns:
        Module name to summary, in ``named_modules`` order.
    """
    return {n: describe(m) for n, m in model.named_modules() if is_factorised(m)}
