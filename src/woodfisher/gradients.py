"""Per-sample (or per-mini-batch) loss gradients of the selected weights, as one (m, d) matrix.

The rows are what the empirical Fisher is built from (see ``DESIGN.md``):
``F = damp·I + (1/m)·Σ g gᵀ``. Gradients come from ``torch.func`` (``functional_call`` +
``vmap(grad)``), a chunk of rows at a time so that memory stays bounded.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import grad, vmap
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from woodfisher.batch import (
    Inputs,
    batch_len,
    call_functional,
    call_model,
    cat,
    default_loss,
    describe,
    map_tensors,
    split_batch,
    take,
    to_device,
)
from woodfisher.params import (
    Layout,
    Target,
    flat_masks,
    select_modules,
    weight_mask,
    weight_param,
)

LossFn = Callable[[object, Tensor], Tensor]
logger = logging.getLogger(__name__)


def resolve_modules(
    model: nn.Module, params: Sequence[str] | str | dict[str, Target | nn.Module] | None = None
) -> dict[str, Target]:
    """The weights that take part.

    Args:
        model: The network.
        params: None for the default selection (:func:`woodfisher.params.select_params`), a
            dict of targets (or of modules, standing for their ``weight``), or names: full
            parameter name patterns (``"fc1.weight"``, ``"*.in_proj_weight"``) or module names
            (``"fc1"``, standing for that module's weight).

    Returns:
        Layout name to target, in order.

    Raises:
        ValueError: If a name matches nothing or the list is empty.
    """
    if params is None:
        return select_modules(model)
    if isinstance(params, dict):
        return {
            n: t if isinstance(t, Target) else _module_target(model, n, t)
            for n, t in params.items()
        }
    return select_modules(model, params=param_patterns(model, params))


def param_patterns(model: nn.Module, params: Sequence[str] | str) -> list[str]:
    """Parameter name patterns from names that may also be module names (``"fc1"`` stands for
    ``"fc1.weight"``).

    Returns:
        Patterns for :func:`woodfisher.params.select_params`'s ``params``.

    Raises:
        ValueError: If the list is empty.
    """
    if isinstance(params, str):
        params = [params]
    if not params:
        raise ValueError("params is an empty list; pass None for the default selection")
    named = dict(model.named_modules())
    return [
        (f"{p}.weight" if p else "weight") if p in named and hasattr(named[p], "weight") else p
        for p in params
    ]


def _module_target(model: nn.Module, name: str, module: nn.Module) -> Target:
    for t in select_modules(model, params=f"{name}.weight" if name else "weight").values():
        if t.module is module:
            return t
    raise ValueError(f"module {name!r} has no prunable weight")


def gradient_layout(
    model: nn.Module, params: Sequence[str] | str | dict[str, Target | nn.Module] | None = None
) -> tuple[dict[str, Target], Layout]:
    """The targets and the flat layout that :func:`sample_gradients` uses for its columns.

    Returns:
        ``(targets, layout)``; ``layout.d`` is the number of columns of the gradients.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> gradient_layout(net)[1].sizes
        (12, 6)
    """
    modules = resolve_modules(model, params)
    return modules, Layout.of(modules)


def iter_batches(data: object) -> Iterator[tuple[Inputs, Tensor]]:
    """Turn ``data`` into a stream of ``(inputs, targets)`` batches.

    A ``torch.utils.data.Dataset`` (not a DataLoader) yields single samples, which become
    batches of one; a pair ``(X, Y)`` of tensors is one batch; anything else is iterated as
    batches (see :func:`woodfisher.batch.split_batch` for the forms a batch may take).

    Args:
        data: A Dataset, a DataLoader, an iterable of batches or a pair of tensors.

    Yields:
        ``(inputs, targets)`` with a leading batch dimension.

    Raises:
        ValueError: If an item is not a batch.
    """
    if isinstance(data, Dataset) and not isinstance(data, DataLoader):
        for i in range(len(data)):  # type: ignore[arg-type]
            item = data[i]
            if isinstance(item, (tuple, list)) and len(item) >= 2:
                x0 = item[0]
                x0 = x0 if isinstance(x0, (dict, tuple, list)) else torch.as_tensor(x0)
                item = (x0, torch.as_tensor(item[1]))
            elif isinstance(item, dict):
                item = {k: torch.as_tensor(v) for k, v in item.items()}
            inputs, y = split_batch(item, i)
            yield map_tensors(inputs, lambda t: t.unsqueeze(0)), y.reshape(1, *y.shape)
        return
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, Tensor) for t in data)
        and data[0].shape[:1] == data[1].shape[:1]
    ):
        yield data[0], data[1]
        return
    for i, item in enumerate(data):  # type: ignore[attr-defined]
        yield split_batch(item, i)


def take_samples(
    stream: Iterator[tuple[Inputs, Tensor]], n: int, buffer: list
) -> tuple[Inputs, Tensor] | None:
    """Pull exactly ``n`` samples from ``stream`` (leftovers stay in ``buffer``).

    Returns:
        ``(inputs, targets)`` with ``n`` rows, or None if the stream ran out first (``buffer``
        then holds what was found).
    """
    have = sum(batch_len(b[0]) for b in buffer)
    while have < n:
        try:
            x, y = next(stream)
        except StopIteration:
            return None
        buffer.append((x, y))
        have += batch_len(x)
    x = cat([b[0] for b in buffer])
    y = torch.cat([b[1] for b in buffer])
    buffer.clear()
    if batch_len(x) > n:
        buffer.append((take(x, slice(n, None)), y[n:]))
    return take(x, slice(0, n)), y[:n]


_default_loss = default_loss


class _EvalMode:
    """Put every submodule in eval mode and restore each one's own mode afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modes: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> None:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        for m, mode in self.modes:
            m.training = mode


def _param_names(model: nn.Module, modules: dict[str, Target]) -> list[str]:
    """Full parameter names (``fc1.weight`` or ``fc1.weight_orig``) of the selected weights."""
    ids = {id(p): n for n, p in model.named_parameters()}
    names = []
    for mname, mod in modules.items():
        p = weight_param(mod)
        if id(p) not in ids:
            raise ValueError(f"module {mname!r} is not part of the model's parameters")
        names.append(ids[id(p)])
    return names


def layer_patches(module: nn.Module, x: Tensor) -> Tensor:
    """Inputs of a Linear or Conv2d as (n, locations, features) in the weight's column order.

    Raises:
        NotImplementedError: For other layers and convolutions ``unfold`` cannot express.
    """
    if isinstance(module, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1])
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or isinstance(module.padding, str) or module.padding_mode != "zeros":
            raise NotImplementedError(
                "only Conv2d with groups=1, integer padding and padding_mode='zeros' unfolds "
                f"into patches; got {module}"
            )
        cols = nn.functional.unfold(
            x, module.kernel_size, module.dilation, module.padding, module.stride
        )
        # A conv whose weight lives in another basis (woodfisher.frequency.DCTConv2d: DCT
        # coefficients) maps the spatial patches into that basis.
        to_basis = getattr(module, "patches_to_weight_basis", None)
        if to_basis is not None:
            cols = to_basis(cols)
        return cols.transpose(1, 2)
    raise NotImplementedError(f"Linear and Conv2d layers unfold into patches, got {type(module)}")


def layer_out_grads(module: nn.Module, g: Tensor) -> Tensor:
    """Gradients w.r.t. a Linear's or Conv2d's outputs as (n, locations, out)."""
    if isinstance(module, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def _outer_product_ready(modules: dict[str, Target]) -> bool:
    """Whether every selected weight's per-sample gradient is an outer product of the layer's
    inputs and output gradients (plain Linear and unfoldable Conv2d weights)."""
    for t in modules.values():
        mod = t.module
        if t.attr != "weight" or type(mod) not in (nn.Linear, nn.Conv2d):
            return False
        if isinstance(mod, nn.Conv2d) and (
            mod.groups != 1 or isinstance(mod.padding, str) or mod.padding_mode != "zeros"
        ):
            return False
    return True


#: Above this many entries, selected columns come from the full outer product (one matmul)
#: rather than from products of gathered entries summed over samples and locations.
GATHER_ENTRIES = 1 << 25


@contextlib.contextmanager
def _requiring_grad(modules: dict[str, Target]) -> Iterator[list[Tensor]]:
    """The selected weights' parameters, made to require grad (frozen ones too) meanwhile."""
    params = [weight_param(t) for t in modules.values()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield params
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def _outer_product_grads(
    model: nn.Module, modules: dict[str, Target], x: Inputs, y: Tensor, loss_fn: LossFn,
    rows: int, s: int, picks: Sequence[Tensor | None] | None = None,
) -> tuple[Tensor, ...]:
    """Per-row gradients from one forward and backward pass over the ``rows · s`` samples.

    A weight's per-sample gradient is ``Σ_locations δ aᵀ`` (``a`` its layer's inputs, ``δ`` the
    sample's loss gradient w.r.t. the layer's outputs), so no per-sample pass is needed. The
    loss must be a mean of per-sample terms and samples must not interact (eval mode); the
    caller checks one row against plain autograd before trusting this.
    """
    names = list(modules)
    seen: dict[str, list[tuple[Tensor, Tensor]]] = {n: [] for n in names}

    def hook(name):
        def fn(mod, inp, out):
            seen[name].append((inp[0].detach(), out))
        return fn

    handles = [t.module.register_forward_hook(hook(n)) for n, t in modules.items()]
    try:
        with _requiring_grad(modules):
            loss = loss_fn(call_model(model, x), y)
            outs = [out for n in names for _, out in seen[n]]
            grads = iter(torch.autograd.grad(loss, outs, allow_unused=True))
    finally:
        for h in handles:
            h.remove()
    n_batch = rows * s
    result = []
    for i, n in enumerate(names):
        mod = modules[n].module
        pick = None if picks is None else picks[i]
        total = None
        for inp, out in seen[n]:
            g = next(grads)
            if g is None:
                g = torch.zeros_like(out)
            a = layer_patches(mod, inp)
            # The mean's gradient is 1/N of each sample's; a row averages s samples.
            dl = layer_out_grads(mod, g) * (n_batch / s)
            a = a.reshape(rows, -1, a.shape[-1])
            dl = dl.reshape(rows, -1, dl.shape[-1])
            few = pick is not None and 3 * pick.numel() <= modules[n].weight.numel()
            if few and a.shape[1] * pick.numel() * rows <= GATHER_ENTRIES:
                # Only the picked entries W[o, j]: Σ over samples/locations of δ_o a_j.
                # Entries as rows of (features, ...) copies, which gather fast.
                width = a.shape[-1]
                dl_t, a_t = dl.permute(2, 0, 1).contiguous(), a.permute(2, 0, 1).contiguous()
                part = dl_t.index_select(0, pick // width) * a_t.index_select(0, pick % width)
                part = (part[:, :, 0] if part.shape[2] == 1 else part.sum(2)).T
            elif pick is not None and a.shape[1] == 1:
                # Most entries picked, one location: all products as (entries, rows) rows, then
                # the picked rows (a contiguous gather).
                full = dl[:, 0].T[:, None, :] * a[:, 0].T[None, :, :]  # (out, in, rows)
                part = full.reshape(-1, rows).index_select(0, pick).T
            else:
                part = torch.bmm(dl.mT, a).reshape(rows, -1)
                if pick is not None:
                    part = part[:, pick]
            total = part if total is None else total + part
        result.append(total if pick is not None else
                      total.reshape(rows, *modules[n].weight.shape))
    return tuple(result)


def sample_gradients(
    model: nn.Module,
    data: object,
    loss_fn: LossFn | None = None,
    num_grads: int = 100,
    samples_per_grad: int = 1,
    params: Sequence[str] | str | dict[str, Target | nn.Module] | None = None,
    seed: int = 0,
    chunk_size: int = 64,
    progress: bool = False,
    columns: Tensor | None = None,
) -> Tensor:
    """Loss gradients of the selected weights, one row per sample (or per mini-batch).

    Row ``i`` is the gradient of ``loss_fn`` over samples ``i·s … i·s + s − 1`` (``s =
    samples_per_grad``, the paper's fisher-mini-bsz) with respect to the flat weights in the
    order of :func:`gradient_layout`. Samples are taken from ``data`` in the order given; shuffle
    the data yourself for a random subset. The model runs in eval mode (BatchNorm uses its
    running statistics, dropout is off) and every submodule's mode is restored afterwards.
    Pruned entries (``weight_mask == 0``) are exactly zero.

    Args:
        model: The network; gradients have its device and dtype.
        data: A Dataset, a DataLoader, an iterable of ``(x, y)`` batches or a pair ``(X, Y)``.
        loss_fn: ``loss_fn(output, target) -> scalar``, a mean over the batch; default
            cross-entropy.
        num_grads: Number of rows ``m``.
        samples_per_grad: Samples averaged into each row.
        params: None for every Linear/Conv weight, module names, or a dict of modules.
        seed: Seeds torch's random number generator (forked, so the global state is left alone)
            for any randomness inside the model; the sample order does not depend on it.
        chunk_size: Rows computed in one vectorised call (bounds memory).
        progress: Show a progress bar on stderr.
        columns: Only these flat indices, in this order (``G[:, columns]``); for Linear and
            Conv2d weights only those entries are computed.

    Returns:
        A (num_grads, d) tensor, or (num_grads, len(columns)).

    Raises:
        ValueError: If an argument is out of range, ``data`` holds fewer than
            ``num_grads·samples_per_grad`` samples, or a gradient is not finite.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> X, Y = torch.randn(10, 4), torch.randint(0, 2, (10,))
        >>> sample_gradients(net, (X, Y), num_grads=5, samples_per_grad=2).shape
        torch.Size([5, 18])
    """
    for name, val in (("num_grads", num_grads), ("samples_per_grad", samples_per_grad),
                      ("chunk_size", chunk_size)):
        if isinstance(val, bool) or int(val) != val or val < 1:
            raise ValueError(f"{name} must be a positive integer, got {val!r}")
    loss_fn = loss_fn or _default_loss
    modules, layout = gradient_layout(model, params)
    names = _param_names(model, modules)
    masks = [weight_mask(m) for m in modules.values()]
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    state = {k: v.detach() for k, v in state.items()}
    first = weight_param(next(iter(modules.values())))
    device, dtype = first.device, first.dtype

    def loss_of(weights: tuple[Tensor, ...], x: Inputs, y: Tensor) -> Tensor:
        full = dict(state)
        full.update(zip(names, weights, strict=True))
        return loss_fn(call_functional(model, full, x), y)

    per_row = vmap(grad(loss_of), in_dims=(None, 0, 0))
    row_grad = grad(loss_of)

    def looped(weights: tuple[Tensor, ...], x: Inputs, y: Tensor) -> tuple[Tensor, ...]:
        # For models with data-dependent Python control flow (Hugging Face attention masks
        # check ``mask.all()``), which vmap cannot batch: the same gradients, one row at a time.
        rows = [row_grad(weights, take(x, i), y[i]) for i in range(y.shape[0])]
        return tuple(torch.stack(parts) for parts in zip(*rows, strict=True))

    vectorised = True
    # Plain Linear/Conv2d weights: per-sample gradients as outer products from one ordinary
    # backward pass (several times faster than vmap, and no torch.func import), once one row
    # has matched plain autograd.
    outer = _outer_product_ready(modules)
    checked = False
    weights = tuple(state[n] for n in names)
    s = samples_per_grad
    # Per layer: where its picked columns go in the output, and which of its entries they are.
    places: list[tuple[Tensor, Tensor] | None] = [None] * len(names)
    if columns is not None:
        columns = torch.as_tensor(columns, dtype=torch.long, device=device).reshape(-1)
        if columns.numel() and (int(columns.min()) < 0 or int(columns.max()) >= layout.d):
            raise ValueError(f"columns must lie in [0, {layout.d})")
        for i, (off, size) in enumerate(zip(layout.offsets, layout.sizes, strict=True)):
            at = ((columns >= off) & (columns < off + size)).nonzero().reshape(-1)
            if at.numel() and int(at[-1]) - int(at[0]) + 1 == at.numel():
                at = slice(int(at[0]), int(at[-1]) + 1)  # a run: a plain (fast) copy
            places[i] = (at, columns[at] - off)
    picks = None if columns is None else [p[1] for p in places]
    if columns is None:
        out = torch.empty(num_grads, layout.d, dtype=dtype, device=device)
    else:
        # Column-major (returned as its transpose): picked entries are computed as (entries,
        # rows), written and summed that way.
        out_t = torch.empty(columns.numel(), num_grads, dtype=dtype, device=device)
        out = out_t.T
    stream, buffer = iter_batches(data), []
    done = 0
    bar = tqdm(total=num_grads, desc="gradients", file=sys.stderr, disable=not progress)
    with _EvalMode(model), torch.random.fork_rng(devices=[]), bar:
        torch.manual_seed(seed)
        while done < num_grads:
            rows = min(chunk_size, num_grads - done)
            got = take_samples(stream, rows * s, buffer)
            if got is None:
                found = done * s + sum(b[0].shape[0] for b in buffer)
                raise ValueError(
                    f"data ran out: num_grads={num_grads} × samples_per_grad={s} needs "
                    f"{num_grads * s} samples, found {found}"
                )
            x, y = got
            x = to_device(x, device, dtype)
            y = y.to(device)
            grads = None
            if outer:
                try:
                    grads = _outer_product_grads(model, modules, x, y, loss_fn, rows, s, picks)
                except Exception as err:  # noqa: BLE001 - vmap below names the model's errors
                    if checked:
                        raise
                    outer, grads = False, None
                    logger.info("outer-product gradients failed (%s); using vmap", err)
                if outer and not checked:
                    outer = checked = _matches_autograd(
                        model, modules, take(x, slice(0, s)), y[:s], loss_fn,
                        [g[0] for g in grads], masks, picks,
                    )
                    if not outer:
                        grads = None
                        logger.info("outer-product gradients differ from autograd; using vmap")
            x = map_tensors(x, lambda t, r=rows: t.reshape(r, s, *t.shape[1:]) if t.ndim else t)
            y = y.reshape(rows, s, *y.shape[1:])
            try:
                if grads is None:
                    grads = per_row(weights, x, y) if vectorised else looped(weights, x, y)
            except Exception as err:  # noqa: BLE001 - the model's own errors, named
                grads = None
                if vectorised:
                    with contextlib.suppress(Exception):
                        grads = looped(weights, x, y)
                    if grads is not None:
                        vectorised = False
                        logger.info("vmap failed (%s); per-sample gradients row by row", err)
                        bar.set_description("gradients (row by row)")
                if grads is None:
                    raise ValueError(
                        f"per-sample gradients failed on inputs {describe(x)} (rows × samples "
                        f"× ...): {type(err).__name__}: {' '.join(str(err).split())[:300]}"
                    ) from err
            block = out[done:done + rows]
            for g, mask, off, size, place in zip(grads, masks, layout.offsets, layout.sizes,
                                                 places, strict=True):
                # Written straight into the output. The mask already zeroes these through the
                # forward pre-hook; multiply anyway so that a model that bypasses the hook
                # still yields exact zeros.
                g = g.reshape(rows, -1)
                if place is not None:
                    at, local = place
                    if g.shape[1] != local.numel():  # vmap's full rows
                        g = g[:, local]
                    g_t = g.T  # (entries, rows): contiguous from the outer-product path
                    if mask is not None:
                        g_t = g_t * mask.reshape(-1)[local][:, None]
                    if isinstance(at, slice):
                        out_t[at, done:done + rows].copy_(g_t)
                    else:
                        out_t[:, done:done + rows].index_copy_(0, at, g_t.to(dtype))
                    continue
                dst = block[:, off:off + size]
                if mask is not None:
                    torch.mul(g, mask.reshape(1, -1), out=dst)
                else:
                    dst.copy_(g)
            # NaN/Inf always reach the sum (one read, no bool copy); scan only then.
            total = block.sum() if columns is None else out_t[:, done:done + rows].sum()
            if not torch.isfinite(total) and not torch.isfinite(block).all():
                bad = done + int((~torch.isfinite(block)).any(dim=1).nonzero()[0])
                raise ValueError(
                    f"gradient {bad} is not finite (NaN or Inf); check the loss and data"
                )
            done += rows
            bar.update(rows)
    return out


def _matches_autograd(
    model: nn.Module, modules: dict[str, Target], x: Inputs, y: Tensor, loss_fn: LossFn,
    rows: Sequence[Tensor], masks: Sequence[Tensor | None],
    picks: Sequence[Tensor] | None = None,
) -> bool:
    """Whether one row's outer-product gradient equals autograd's on its samples alone (a sum
    loss, samples that interact, or a layer called in a way the outer product misses fail)."""
    with _requiring_grad(modules) as params:
        ref = torch.autograd.grad(loss_fn(call_model(model, x), y), params, allow_unused=True)
    for i, (got, want, mask) in enumerate(zip(rows, ref, masks, strict=True)):
        if picks is not None:
            want = None if want is None else want.reshape(-1)[picks[i]]
            mask = None if mask is None else mask.reshape(-1)[picks[i]]
        want = torch.zeros_like(got) if want is None else want
        if mask is not None:
            got, want = got * mask, want * mask
        scale = float(want.abs().max()) or 1.0
        if not torch.allclose(got, want, rtol=0, atol=1e-4 * scale):
            return False
    return True


def mean_gradient(
    model: nn.Module,
    data: object,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    *,
    params: Sequence[str] | str | dict[str, Target | nn.Module] | None = None,
    max_samples: int | None = None,
) -> Tensor:
    """Gradient of the mean loss over ``data`` w.r.t. the selected weights, as one flat vector.

    One backward pass per batch (not per sample), so it is cheap for many samples: the
    first-order term of WoodTaylor and Newton or influence directions ``F⁻¹∇L`` use it.
    The model runs in eval mode (modes are restored); pruned entries are exactly 0.

    Args:
        model: The network.
        data: Batches of ``(inputs, targets)`` (or a Dataset, or an ``(X, Y)`` pair).
        loss_fn: ``loss_fn(outputs, targets)`` -> mean loss; default cross-entropy.
        params: Which weights, as for :func:`sample_gradients`.
        max_samples: Use at most this many samples (the first ones); None for all.

    Returns:
        A (d,) tensor in the layout of :func:`woodfisher.gradients.gradient_layout`.

    Raises:
        ValueError: If ``data`` holds no samples or the gradient is not finite.

    Example:
        >>> from torch import nn
        >>> net = nn.Linear(2, 2, bias=False)
        >>> mean_gradient(net, (torch.randn(5, 2), torch.tensor([0, 1, 0, 1, 1]))).shape
        torch.Size([4])
    """
    loss_fn = loss_fn or _default_loss
    modules, _ = gradient_layout(model, params)
    weights = [weight_param(m) for m in modules.values()]
    dtype, device = weights[0].dtype, weights[0].device
    total = [torch.zeros_like(w) for w in weights]
    count = 0
    with _EvalMode(model):
        for x, y in iter_batches(data):
            if max_samples is not None and count >= max_samples:
                break
            if max_samples is not None:
                x, y = take(x, slice(0, max_samples - count)), y[: max_samples - count]
            x = to_device(x, device, dtype)
            n = batch_len(x)
            loss = loss_fn(call_model(model, x), y.to(device)) * n
            for t, g in zip(total, torch.autograd.grad(loss, weights, allow_unused=True),
                            strict=True):
                if g is not None:
                    t += g
            count += n
    if count == 0:
        raise ValueError("data holds no samples; pass at least one (inputs, targets) batch")
    flat = torch.cat([t.reshape(-1) for t in total]) / count
    # Gradients w.r.t. weight_orig carry the mask already; zero anyway for models that bypass it.
    flat = flat * flat_masks(modules).to(flat.device)
    if not torch.isfinite(flat).all():
        raise ValueError("the mean gradient is not finite (NaN or Inf); check the loss and data")
    return flat
