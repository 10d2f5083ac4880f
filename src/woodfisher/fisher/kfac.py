"""K-FAC (Martens & Grosse 2015; Grosse & Martens 2016 for convolutions), a baseline.

Per layer with weight ``W`` (out × in, row-major flattened), the empirical Fisher block is
approximated by a Kronecker product ``S ⊗ A`` with ``A = E[a aᵀ]`` (layer inputs) and
``S = E[δ δᵀ]`` (per-sample loss gradients with respect to the layer's outputs, true labels).
Then ``(S ⊗ A)⁻¹ vec(X) = vec(S⁻¹ X A⁻¹)``. Only weights are pruned, so the bias is left out of
``A`` (weight-only curvature). For a Conv2d, ``a`` are unfolded input patches: ``A`` averages
over samples and spatial locations, ``S`` sums the output gradients' outer products over
locations and averages over samples, so that ``S ⊗ A`` matches a single location exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from woodfisher.batch import batch_len, call_model, default_loss, to_device
from woodfisher.fisher.base import InverseCurvature, spd_inverse
from woodfisher.fisher.blocks import check_damp
from woodfisher.gradients import (
    LossFn,
    _EvalMode,
    gradient_layout,
    iter_batches,
    layer_out_grads,
    layer_patches,
)
from woodfisher.params import Layout, weight_param

# Above this many weights in one layer the dense (B, B) Kronecker block that the generic joint
# OBS step needs is too big to form.
MAX_DENSE_LAYER = 4096


def _no_kfac(name: str, err: Exception) -> ValueError:
    return ValueError(
        f"K-FAC cannot model weight {name!r}: {err}. Use method='woodfisher' or 'diag-fisher' "
        f"(any weight), or leave it out with skip=[{name!r}]"
    )


class KFACInverse(InverseCurvature):
    """Inverse of the Kronecker-factored Fisher, one block per layer.

    Damping ``λ`` uses Tikhonov π-splitting: ``A + π√λ I`` and ``S + (√λ/π) I`` with
    ``π = sqrt((tr A / dim A) / (tr S / dim S))`` (``π = 1`` without ``pi_damping``).

    Args:
        factors: Layer name to ``(A, S)``, in layout order; ``A`` is (in, in), ``S`` (out, out).
        damp: ``λ > 0``.
        pi_damping: Split the damping with π.

    Attributes:
        A, S: Undamped factors per layer; ``A_inv``, ``S_inv`` the damped inverses;
        ``pi`` the π of each layer.

    Raises:
        ValueError: If the damping is bad or a factor is not square.

    Example:
        >>> A, S = torch.eye(2, dtype=torch.float64), 2 * torch.eye(3, dtype=torch.float64)
        >>> KFACInverse({"fc": (A, S)}, damp=1e-12, pi_damping=False).diag()[:2]
        tensor([0.5000, 0.5000], dtype=torch.float64)
    """

    def __init__(self, factors: dict[str, tuple[Tensor, Tensor]], damp: float = 1e-3,
                 pi_damping: bool = True):
        self.damp = check_damp(damp)
        self.names = tuple(factors)
        self.A, self.S, self.A_inv, self.S_inv, self.pi = {}, {}, {}, {}, {}
        sizes = []
        root = math.sqrt(self.damp)
        for name, (A, S) in factors.items():
            for label, M in (("A", A), ("S", S)):
                if M.ndim != 2 or M.shape[0] != M.shape[1]:
                    raise ValueError(
                        f"{label} of layer {name!r} must be square, got {tuple(M.shape)}"
                    )
            pi = 1.0
            if pi_damping:
                ta, ts = float(A.trace()) / A.shape[0], float(S.trace()) / S.shape[0]
                pi = math.sqrt(ta / ts) if ta > 0 and ts > 0 else 1.0
            eye_a = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
            eye_s = torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
            self.A[name], self.S[name], self.pi[name] = A, S, pi
            self.A_inv[name] = spd_inverse(A + pi * root * eye_a)
            self.S_inv[name] = spd_inverse(S + root / pi * eye_s)
            sizes.append(A.shape[0] * S.shape[0])
        first = next(iter(factors.values()))[0]
        self.dtype, self.device = first.dtype, first.device
        self.d = sum(sizes)
        offsets = [0, *torch.tensor(sizes).cumsum(0).tolist()]
        self.blocks = tuple((offsets[i], offsets[i + 1]) for i in range(len(sizes)))

    def _shape(self, i: int) -> tuple[int, int]:
        name = self.names[i]
        return self.S[name].shape[0], self.A[name].shape[0]

    @staticmethod
    def _kron_mul(left: Tensor, right: Tensor, X: Tensor) -> Tensor:
        """``(left ⊗ right) vec(X)`` for row-major ``vec`` and symmetric ``right``.

        ``X`` is (o·n, k); two matmuls (``left @ X`` over rows, then ``· right`` over
        columns), so k vectors cost two matmuls, not k pairs.
        """
        o, n, k = left.shape[0], right.shape[0], X.shape[1]
        Y = (left @ X.reshape(o, n * k)).view(o, n, k)
        Z = Y.transpose(1, 2).reshape(o * k, n) @ right  # (o, k, n) rows
        return Z.view(o, k, n).transpose(1, 2).reshape(o * n, k)

    def _matmat(self, V: Tensor) -> Tensor:
        out = torch.empty_like(V)
        for (s, e), name in zip(self.blocks, self.names, strict=True):
            out[s:e] = self._kron_mul(self.S_inv[name], self.A_inv[name], V[s:e])
        return out

    def fmul(self, v: Tensor) -> Tensor:
        """``F v`` for the damped Kronecker factors ``(S + (√λ/π)I) ⊗ (A + π√λ I)``.

        Args:
            v: Shape (d,) or (d, k).

        Returns:
            A tensor of the shape of ``v``.
        """
        V = self._check_vectors(v)
        out = torch.empty_like(V)
        root = math.sqrt(self.damp)
        for (s, e), name in zip(self.blocks, self.names, strict=True):
            A, S, pi = self.A[name], self.S[name], self.pi[name]
            A_d = A + pi * root * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
            S_d = S + root / pi * torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
            out[s:e] = self._kron_mul(S_d, A_d, V[s:e])
        return out.reshape(v.shape)

    def diag(self) -> Tensor:
        """Outer product of ``diag(S⁻¹)`` and ``diag(A⁻¹)`` per layer.

        Returns:
            A (d,) tensor.
        """
        return torch.cat([
            torch.outer(self.S_inv[n].diagonal(), self.A_inv[n].diagonal()).reshape(-1)
            for n in self.names
        ])

    def block(self, b: int) -> Tensor:
        """``S⁻¹ ⊗ A⁻¹`` of layer ``b``.

        Returns:
            A (B, B) tensor.
        """
        name = self.names[b]
        return torch.kron(self.S_inv[name], self.A_inv[name])

    def columns(self, idx: Tensor) -> Tensor:
        """Columns of ``F⁻¹``: ``vec(S⁻¹[:, r] A⁻¹[c, :])`` for entry ``(r, c)`` of a layer.

        Returns:
            A (d, len(idx)) tensor.
        """
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.device).reshape(-1)
        out = torch.zeros(self.d, idx.numel(), dtype=self.dtype, device=self.device)
        for i, (s, e) in enumerate(self.blocks):
            sel = ((idx >= s) & (idx < e)).nonzero().reshape(-1)
            if sel.numel() == 0:
                continue
            name, (o, n) = self.names[i], self._shape(i)
            r, c = (idx[sel] - s) // n, (idx[sel] - s) % n
            cols = self.S_inv[name][:, r].T[:, :, None] * self.A_inv[name][c][:, None, :]
            out[s:e, sel] = cols.reshape(-1, o * n).T
        return out

    def principal_blocks(self, index: Tensor) -> Tensor:
        """``[S⁻¹ ⊗ A⁻¹]_QQ`` for every row ``Q`` of ``index`` (each inside one layer).

        Returns:
            (G, g, g) tensor.
        """
        index = torch.as_tensor(index, dtype=torch.long, device=self.device)
        G, g = index.shape
        out = torch.empty(G, g, g, dtype=self.dtype, device=self.device)
        if G == 0:
            return out
        block_of, crossing = self._block_of(index)
        block_of = block_of[:, 0]
        for b in torch.unique(block_of[~crossing]).tolist():
            rows = ((block_of == b) & ~crossing).nonzero().reshape(-1)
            name, (_, n) = self.names[b], self._shape(b)
            local = index[rows] - self.blocks[b][0]
            r, c = local // n, local % n
            out[rows] = (
                self.S_inv[name][r[:, :, None], r[:, None, :]]
                * self.A_inv[name][c[:, :, None], c[:, None, :]]
            )
        self._crossing_blocks(index, crossing, out)
        return out

    def constrained_min(
        self, fixed: Tensor, values: Tensor, linear: Tensor | None = None
    ) -> Tensor:
        """The generic block-wise solve for layers up to ``MAX_DENSE_LAYER`` weights.

        Returns:
            The minimiser, as :meth:`InverseCurvature.constrained_min`.

        Raises:
            NotImplementedError: If a layer touched by ``fixed`` is too big for a dense block.
        """
        fixed_b = fixed.to(torch.bool)
        for (s, e), name in zip(self.blocks, self.names, strict=True):
            if e - s > MAX_DENSE_LAYER and fixed_b[s:e].any():
                raise NotImplementedError(
                    f"joint OBS with K-FAC needs the dense {e - s}×{e - s} inverse of layer "
                    f"{name!r} (limit {MAX_DENSE_LAYER} weights); use update='independent'"
                )
        return super().constrained_min(fixed, values, linear)


def kfac_factors(
    model: nn.Module,
    data: object,
    loss_fn: LossFn | None = None,
    num_batches: int = 10,
    params: Sequence[str] | str | dict | None = None,
) -> tuple[dict[str, tuple[Tensor, Tensor]], Layout]:
    """Estimate ``A`` and ``S`` of each selected layer from forward and backward passes.

    The loss must be a mean over the batch; its output gradients are rescaled by the batch
    size so that ``δ`` is the per-sample gradient (the convention of the per-sample empirical
    Fisher). The model runs in eval mode (as in :func:`~woodfisher.gradients.sample_gradients`).

    Returns:
        ``(factors, layout)``.

    Raises:
        ValueError: If ``num_batches < 1`` or the data is empty.
    """
    if isinstance(num_batches, bool) or int(num_batches) != num_batches or num_batches < 1:
        raise ValueError(f"num_batches must be a positive integer, got {num_batches!r}")
    loss_fn = loss_fn or default_loss
    modules, layout = gradient_layout(model, params)
    for n, t in modules.items():
        if t.attr != "weight" or not isinstance(t.module, (nn.Linear, nn.Conv2d)):
            raise _no_kfac(n, NotImplementedError(
                f"K-FAC supports the weight of Linear and Conv2d layers, got {t.kind} "
                f"({type(t.module).__name__}.{t.attr})"
            ))
        if isinstance(t.module, nn.Conv2d) and t.module.groups != 1:
            raise _no_kfac(n, NotImplementedError(
                f"grouped convolution (groups={t.module.groups}) has no Kronecker factors here"
            ))
    first = weight_param(next(iter(modules.values())))
    dtype, device = first.dtype, first.device
    A = {n: None for n in modules}
    S = {n: None for n in modules}
    seen: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}

    def hook(name):
        def fn(mod, inp, out):
            seen[name] = inp[0].detach()
            outputs[name] = out
        return fn

    handles = [t.module.register_forward_hook(hook(n)) for n, t in modules.items()]
    count = 0
    try:
        with _EvalMode(model):
            for k, (x, y) in enumerate(iter_batches(data)):
                if k >= num_batches:
                    break
                x = to_device(x, device, dtype)
                loss = loss_fn(call_model(model, x), y.to(device))
                names = list(modules)
                grads = torch.autograd.grad(loss, [outputs[n] for n in names])
                n_batch = batch_len(x)
                for n, g in zip(names, grads, strict=True):
                    a = layer_patches(modules[n].module, seen[n])  # (n, L, in)
                    dl = layer_out_grads(modules[n].module, g) * n_batch  # per-sample δ
                    a2 = torch.einsum("nli,nlj->ij", a, a) / a.shape[1]
                    s2 = torch.einsum("nli,nlj->ij", dl, dl)
                    A[n] = a2 if A[n] is None else A[n] + a2
                    S[n] = s2 if S[n] is None else S[n] + s2
                count += n_batch
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise ValueError("data yielded no batches; K-FAC needs at least one")
    return {n: (A[n] / count, S[n] / count) for n in modules}, layout


def kfac_inverse(
    model: nn.Module,
    data: object,
    loss_fn: LossFn | None = None,
    num_batches: int = 10,
    params: Sequence[str] | str | dict | None = None,
    damp: float = 1e-3,
    pi_damping: bool = True,
) -> KFACInverse:
    """Build a :class:`KFACInverse` from ``num_batches`` batches of ``data``.

    Args:
        model: The network (Linear and Conv2d layers).
        data: Batches of ``(x, y)``, as for :func:`~woodfisher.gradients.sample_gradients`.
        loss_fn: Mean loss over a batch; default cross-entropy.
        num_batches: Batches to average over.
        params: Layers, as for :func:`~woodfisher.gradients.sample_gradients`.
        damp: ``λ > 0``.
        pi_damping: Tikhonov π-splitting of the damping.

    Returns:
        The inverse, in the flat layout of :func:`~woodfisher.gradients.gradient_layout`.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> X, Y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> kfac_inverse(net, [(X, Y)], num_batches=1).blocks
        ((0, 12), (12, 18))
    """
    factors, _ = kfac_factors(model, data, loss_fn, num_batches, params)
    return KFACInverse(factors, damp, pi_damping)
