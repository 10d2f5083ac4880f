"""``prune()``: one-shot (or k-step) pruning of a model in place, with a JSON-able report.

Data flows one way: data → gradients → inverse curvature (:func:`build_inverse`) → scores →
selection → update → masks. Everything is computed before the model changes, and any failure
restores the model as it was.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import Tensor, nn

from woodfisher.batch import batch_len, call_model, default_loss, describe, split_batch, take
from woodfisher.device import model_device, to_device
from woodfisher.distributed import Group, rank_report
from woodfisher.fisher.base import InverseCurvature
from woodfisher.params import (
    Layout,
    Target,
    flat_masks,
    flat_weights,
    select_modules,
    select_params,
    weight_param,
)
from woodfisher.pruning import obs
from woodfisher.pruning import woodtaylor as wt
from woodfisher.pruning.downdate import downdate_applies, run_downdate
from woodfisher.pruning.masks import _Snapshot, apply_masks, compute_masks
from woodfisher.pruning.methods import (
    DEFAULTS,
    Method,
    _woodtaylor,
    get_method,
    resolve_update,
)
from woodfisher.pruning.patterns import parse_pattern
from woodfisher.pruning.schedule import auto_steps, interpolate
from woodfisher.pruning.select import SCOPES, check_sparsity, select_by_sparsity
from woodfisher.pruning.structured import StructuredPlan, make_plan


@dataclass
class Curvature:
    """What a method's curvature step hands to pruning.

    Attributes:
        inv: The inverse curvature, or None for magnitude pruning.
        mean_grad: (d,) mean sampled gradient ``ḡ`` (used by WoodTaylor), or None.
        fmul: ``v ↦ F v`` for the same ``F`` as ``inv`` (the operator's own product), used to
            report the quadratic model's value; else None.
        damp: The absolute damp used, or None.
        relative_damp: ``damp / mean(diag(GᵀG/m))`` when damp was set relative, else None.
        times: Seconds spent in ``"gradients"`` and ``"inverse"``.
    """

    inv: InverseCurvature | None
    mean_grad: Tensor | None = None
    fmul: Callable[[Tensor], Tensor] | None = None
    damp: float | None = None
    relative_damp: float | None = None
    times: dict[str, float] = field(default_factory=dict)


@dataclass
class LayerResult:
    """Sparsity of one pruned weight after pruning.

    Attributes:
        name: The weight's layout name (module name for a module's ``weight``).
        shape: Its shape.
        numel: Its number of entries.
        sparsity: Its fraction of zeros.
        kind: ``linear``, ``conv``, ``attention_qkv``, ``rnn_ih``, ... (see
            :data:`woodfisher.params.KINDS`).
        parts: Sparsity of each named row range (q/k/v of a packed attention projection, the
            gates of a recurrent weight); empty for other kinds.
    """

    name: str
    shape: list[int]
    numel: int
    sparsity: float
    kind: str = "linear"
    parts: dict[str, float] = field(default_factory=dict)


@dataclass
class PruneResult:
    """Report of one :func:`prune` call.

    Attributes:
        method: The method's name.
        update: The update rule used (``"independent"`` if a joint step had to fall back).
        sparsity: Fraction of zeros over all selected weights.
        layers: Per-layer results.
        predicted_increase: Predicted loss increase summed over steps (see ``predicted_by``).
        predicted_by: ``"quadratic-model"``: ``ḡᵀδ + ½δᵀFδ`` at the applied update, with ``F``
            the curvature's own product (every curvature method); ``"saliency-sum"``: sum of
            the pruned weights' saliencies (the independent-rule estimate); ``"none"`` for
            magnitude.
        saliency_sum: Sum of the saliencies of the pruned weights (the score sum for magnitude).
        times: Seconds per phase: gradients, inverse, selection, update, damp_search.
        steps: The sparsity reached after each recomputation step.
        damp: Absolute damp of the last step (None for magnitude).
        relative_damp: The relative damp used, if damp was relative or "auto".
        damp_search: Relative damp → held-out loss, when ``damp="auto"``.
        seed: The seed used.
        options: All options, JSON-able.
        pattern: The pruning pattern (``"unstructured"``, ``"2:4"``, ``"block:4x4"``,
            ``"channels"``).
        target: ``"params"`` or ``"flops"`` (what ``sparsity`` counted).
        structure: For patterns and FLOP targets: groups removed per layer, skipped layers,
            what compensated for removed channels, MACs removed; None otherwise.
        taylor: For ``method="woodtaylor"``: its options, the Newton scale of each step and
            the held-out loss of every scale tried (see :mod:`woodfisher.pruning.woodtaylor`).
        skipped: Every parameter of the model that was not pruned, with the reason.
        path: How the steps got their curvature: ``"downdate"`` (one Fisher, downdated
            through the steps; see :mod:`woodfisher.pruning.downdate`) or ``"resample"``
            (fresh gradients and inverse at every step).
        ranks: For a job over several processes, every rank's flat range, phase times and
            peak memory; None in one process.
    """

    method: str
    update: str
    sparsity: float
    layers: list[LayerResult]
    predicted_increase: float | None
    predicted_by: str
    saliency_sum: float | None
    times: dict[str, float]
    steps: list[float]
    damp: float | None
    relative_damp: float | None
    damp_search: dict[str, float] | None
    seed: int
    options: dict[str, object]
    pattern: str = "unstructured"
    target: str = "params"
    structure: dict[str, object] | None = None
    taylor: dict[str, object] | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    path: str = "resample"
    ranks: list[dict[str, object]] | None = None

    def to_dict(self) -> dict[str, object]:
        """A JSON-serialisable dict of the report.

        Returns:
            Plain dicts, lists, numbers and strings.
        """
        return asdict(self)


def _loss_name(loss_fn: Callable | None) -> str:
    if loss_fn is None:
        return "cross_entropy"
    return getattr(loss_fn, "__name__", type(loss_fn).__name__)


def _batches(data: Iterable) -> Iterable[tuple[object, Tensor]]:
    for i, batch in enumerate(data):
        yield split_batch(batch, i)


def check_data(model: nn.Module, data: Iterable, loss_fn: Callable | None = None) -> float:
    """Run the first batch through the model to check that data and loss fit it.

    Args:
        model: The model (run under ``no_grad``; callers put it in eval mode).
        data: Iterable of ``(inputs, targets)`` batches.
        loss_fn: ``loss_fn(outputs, targets)`` -> scalar; default cross-entropy.

    Returns:
        The loss of the first batch.

    Raises:
        ValueError: If data is empty, a one-shot iterator or not batches of pairs, the
            forward or loss fails (the message names the shapes), or the loss is not finite.
    """
    loss_fn = loss_fn or default_loss
    try:
        it = iter(data)
        if it is data:
            # Gradients, checks and damp search each read data from the start.
            raise ValueError(
                "data must be re-iterable (a list or a DataLoader), not a one-shot iterator "
                f"({type(data).__name__})"
            )
    except TypeError as err:
        raise ValueError(
            f"data must be an iterable of (inputs, targets) batches, got {type(data).__name__}"
        ) from err
    x, y = to_device(_first(it), model_device(model))
    try:
        with torch.no_grad():
            out = call_model(model, x)
    except Exception as err:
        raise ValueError(
            f"data does not fit the model: inputs {describe(x)} (targets {describe(y)}) failed "
            f"with {type(err).__name__}: {' '.join(str(err).split())[:300]}"
        ) from err
    try:
        with torch.no_grad():
            loss = loss_fn(out, y)
    except ValueError:
        raise
    except Exception as err:
        raise ValueError(
            f"the loss failed on the model's output for targets {describe(y)}: "
            f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
        ) from err
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
    if not torch.isfinite(loss):
        raise ValueError(
            f"the loss on the first batch is not finite ({float(loss)}); check data and model"
        )
    return float(loss)


def _first(it) -> tuple[object, Tensor]:
    batch = next(it, None)
    if batch is None:
        raise ValueError("data is empty; pass an iterable of (inputs, targets) batches")
    return next(iter(_batches([batch])))


def build_inverse(
    method: Method, model: nn.Module, data: Iterable, modules: dict[str, nn.Module], options: dict
) -> Curvature:
    """Sample gradients and build the inverse curvature that ``method`` needs.

    This is the only place pruning talks to the curvature engine (tests monkeypatch it).

    Args:
        method: The method.
        model: The model (eval mode, weights as they are now).
        data: Iterable of ``(inputs, targets)`` batches.
        modules: The selected modules (layout order).
        options: ``loss_fn, num_grads, samples_per_grad, block_size, damp`` (absolute float or
            None for relative), ``relative_damp, seed, progress``.

    Returns:
        The curvature bundle.
    """
    if method.curvature is None:
        return Curvature(None)
    from woodfisher.curvature import fisher_inverse

    op = fisher_inverse(
        model,
        data,
        method.curvature,
        options["loss_fn"],
        params=modules,
        num_grads=options["num_grads"],
        samples_per_grad=options["samples_per_grad"],
        block_size=options["block_size"],
        damp=options["damp"],
        relative_damp=(
            None if options["damp"] is not None or method.curvature == "kfac"
            else options["relative_damp"]
        ),
        mean_grad=method.needs_mean_grad,
        seed=options["seed"],
        progress=options["progress"],
    )
    return Curvature(op.inv, op.mean_grad, op.fmul, op.damp, op.relative_damp, op.times)


def _step(
    modules: dict[str, nn.Module],
    layout: Layout,
    method: Method,
    curv: Curvature,
    target: float,
    scope: str,
    layer_sparsity: Mapping[str, float] | None,
    update: str,
    taylor: wt.TaylorStep | None = None,
) -> dict[str, object]:
    """One prune step to ``target``: score, select, update, then apply. Returns its stats."""
    t0 = time.perf_counter()
    w = flat_weights(modules)
    present = flat_masks(modules)
    inv, grad = curv.inv, curv.mean_grad
    inv_diag = inv.diag() if inv is not None else None
    saliency = method.saliency
    if taylor is not None and taylor.options["saliency"]:
        saliency = _woodtaylor
    taylor_saliency = saliency is _woodtaylor
    inv_grad = inv.mul(grad.to(inv.dtype)) if taylor_saliency else None
    scores = saliency(w, inv, inv_diag, grad if taylor_saliency else None, inv_grad)
    remove = select_by_sparsity(scores, present, layout, target, scope, layer_sparsity)
    t_select = time.perf_counter() - t0

    t0 = time.perf_counter()
    used = update
    zero = remove | ~present
    step_grad = grad if method.newton == "paper" else None
    if update == "none" or inv is None:
        delta = -torch.where(remove, w, torch.zeros_like(w))
    elif taylor is not None:
        try:
            base, newton = wt.split_update(update, w, remove, present, inv, grad, inv_diag)
        except NotImplementedError:
            used = "independent"
            base, newton = wt.split_update(used, w, remove, present, inv, grad, inv_diag)
        alpha = taylor.options["scale"]
        if taylor.search is not None:
            alpha = taylor.search.choose(
                taylor.model, modules, layout,
                lambda a: obs.finish_update(w, base + a * newton, zero),
            )
        taylor.scales.append(float(alpha))
        delta = base + alpha * newton
    elif update == "independent":
        delta = obs.independent_update(w, remove, inv, step_grad, inv_diag)
    else:
        try:
            delta = obs.joint_update(w, remove, inv, step_grad, ~present)
        except NotImplementedError:
            # K-FAC may not offer exact constrained steps for big layers.
            used = "independent"
            delta = obs.independent_update(w, remove, inv, step_grad, inv_diag)
    new_w = obs.finish_update(w, delta, zero)
    applied = (new_w - w).to(delta.dtype)
    sal = scores[remove].double()
    if taylor_saliency:
        # ρ includes the constant -½ḡᵀF⁻¹ḡ; count it once, not once per weight.
        const = -0.5 * float(torch.dot(grad.double(), inv_grad.double()))
        saliency_sum = float((sal - const).sum()) + const
    else:
        saliency_sum = float(sal.sum())
    if curv.fmul is not None:
        predicted, by = obs.quadratic_model(applied, curv.fmul, grad), "quadratic-model"
    elif inv is not None:
        predicted, by = saliency_sum, "saliency-sum"
    else:
        predicted, by = None, "none"
    masks = compute_masks(modules, ~zero)
    apply_masks(None, modules, masks, layout.split(new_w))
    t_update = time.perf_counter() - t0
    return {
        "update": used,
        "saliency_sum": saliency_sum,
        "predicted": predicted,
        "by": by,
        "selection": t_select,
        "update_time": t_update,
    }


def _held_out(data: Iterable, skip: int, n: int) -> list[tuple[Tensor, Tensor]]:
    out, seen, taken = [], 0, 0
    for x, y in _batches(data):
        b = batch_len(x)
        lo = max(0, skip - seen)
        seen += b
        if lo >= b:
            continue
        hi = min(b, lo + n - taken)
        out.append((take(x, slice(lo, hi)), y[lo:hi]))
        taken += hi - lo
        if taken >= n:
            break
    return out


def evaluate_loss(model: nn.Module, batches: Iterable, loss_fn: Callable | None = None) -> float:
    """Mean loss of ``model`` (eval mode, no grad) over ``(inputs, targets)`` batches.

    Args:
        model: The model.
        batches: Iterable of ``(inputs, targets)``.
        loss_fn: Mean-reduced loss; default cross-entropy.

    Returns:
        The sample-weighted mean loss (``inf`` if not finite).

    Raises:
        ValueError: If there are no batches.
    """
    loss_fn = loss_fn or default_loss
    total, count = 0.0, 0
    was = model.training
    device = model_device(model)
    model.eval()
    try:
        with torch.no_grad():
            for x, y in _batches(batches):
                x, y = to_device((x, y), device)
                n = batch_len(x)
                total += float(loss_fn(call_model(model, x), y)) * n
                count += n
    finally:
        model.train(was)
    if count == 0:
        raise ValueError("no held-out samples to evaluate on")
    value = total / count
    return value if math.isfinite(value) else math.inf


def prune(
    model: nn.Module,
    data: Iterable,
    sparsity: float | None,
    method: str = "woodfisher",
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    *,
    pattern: str = "unstructured",
    target: str = "params",
    example_inputs: object | None = None,
    layers: Sequence[str] | str | None = None,
    skip: Sequence[str] | str | None = None,
    params: Sequence[str] | str | None = None,
    scope: str = "global",
    layer_sparsity: Mapping[str, float] | None = None,
    update: str | None = None,
    num_grads: int | None = None,
    samples_per_grad: int = DEFAULTS["samples_per_grad"],
    block_size: int | None = DEFAULTS["block_size"],
    damp: float | str | None = None,
    relative_damp: float | None = None,
    recompute: int | str = DEFAULTS["recompute"],
    recompute_by: str = DEFAULTS["recompute_by"],
    refresh: float = DEFAULTS["refresh"],
    seed: int = 0,
    val_data: Iterable | None = None,
    taylor: Mapping[str, object] | None = None,
    progress: bool = False,
) -> PruneResult:
    """Prune ``model`` in place to ``sparsity`` over the selected weights.

    Weights are scored by ``method`` (lower goes first), the lowest are removed until the
    target is met exactly, the rest compensate by the ``update`` rule, and the result is stored
    as ``torch.nn.utils.prune`` masks (see :func:`~woodfisher.pruning.masks.bake`). The model
    is evaluated in eval mode throughout; its training flags are restored at the end.

    Args:
        model: The model; changed in place.
        data: Iterable of ``(inputs, targets)`` batches; gradients come from its first
            ``num_grads · samples_per_grad`` samples.
        sparsity: Target fraction of zeros in [0, 1), counted over all selected weights,
            weights pruned before included; with ``target="flops"`` the fraction of the
            model's multiply-accumulates removed; with an N:M pattern None (implied: 1 − N/M
            in every layer the pattern fits), or less for an intermediate step.
        method: A key of :data:`~woodfisher.pruning.methods.METHODS`.
        loss_fn: ``loss_fn(outputs, targets)`` -> mean loss; default cross-entropy.
        layers: ``fnmatch`` patterns of modules whose weights to prune (default: every
            weight :func:`~woodfisher.params.select_params` selects: Linear, convolutions,
            attention projections, recurrent gate matrices).
        skip: Patterns of module or parameter names to leave alone.
        params: Patterns of full parameter names to prune instead of the default selection
            (``"*.weight"``, ``"encoder.*.in_proj_weight"``); embeddings only this way.
        pattern: ``"unstructured"``, ``"N:M"`` (e.g. ``"2:4"``), ``"block:RxC"`` or
            ``"channels"`` (see :mod:`woodfisher.pruning.patterns`). Groups are scored by group
            OBS and selected globally (saliency per weight, or per MAC with
            ``target="flops"``); layers a pattern does not fit are skipped and reported,
            unless named in ``layers``.
        target: ``"params"`` or ``"flops"`` (rank by saliency per MAC removed).
        example_inputs: A batch for counting MACs and tracing channels; default the inputs of
            the first batch of ``data``.
        scope: ``"global"`` (one threshold over all layers) or ``"layerwise"``.
        layer_sparsity: Per-layer target overrides (module name → sparsity).
        update: ``"none"``, ``"independent"`` (the paper's summed single-weight OBS steps) or
            ``"joint"`` (exact OBS per block); default: the method's.
        num_grads: Gradients to sample (for kfac: batches); default 1000 (kfac: 50).
        samples_per_grad: Samples averaged into one gradient (the paper's fisher-mini-bsz).
        block_size: Block size of the block-diagonal empirical Fisher; None for one full block
            (per layer blocks never cross layers).
        damp: Absolute damp (float); None for ``DEFAULTS["relative_damp"] · mean(diag(GᵀG/m))``;
            ``"auto"`` to pick the relative damp from ``DEFAULTS["damp_grid"]`` by the loss on
            held-out samples (``val_data`` or the samples of ``data`` after the gradients').
        relative_damp: Damp as a multiple of ``mean(diag(GᵀG/m))``, recomputed from each
            step's gradients, so that one value suits any gradient scale; None for
            ``DEFAULTS["relative_damp"]``. Only with ``damp=None``, and not for ``"kfac"``
            (its factors are not on the empirical Fisher's scale).
        recompute: Number of steps to reach the target (sparsities from
            :func:`~woodfisher.pruning.schedule.interpolate`, ``DEFAULTS["schedule"]``), with
            fresh gradients and a fresh inverse at each; ``"auto"`` (the default) takes as many
            as :func:`~woodfisher.pruning.schedule.auto_steps` needs so that no step removes
            more than ``DEFAULTS["max_step_removed"]`` of the remaining weights (1 for
            magnitude).
        recompute_by: How the steps get their curvature: ``"downdate"`` samples the gradients
            once and removes each step's weights from the block inverses by Schur complements
            (fast, exact greedy OBS on one Fisher; see :mod:`woodfisher.pruning.downdate`),
            ``"resample"`` samples fresh gradients and rebuilds every inverse at each step
            (the paper's recomputation); ``"auto"`` downdates WoodFisher when ``block_size``
            is at most twice ``num_grads`` and resamples otherwise.
        refresh: On the downdate path, re-estimate the Fisher (the same samples, at the
            weights reached so far, over the kept weights only) before every step that starts
            with at most this fraction of the weights the prune started with: 0 never, 1
            before every step, the default, which computes the paper's resampling (see
            :func:`~woodfisher.pruning.downdate.refresh_steps`). A refresh at fraction ``f``
            costs ``f²`` of the first estimate; fewer refreshes are faster, and whether they
            keep the accuracy depends on the model (docs/scale.md).
        seed: Seed for gradient sampling; recorded in the result.
        val_data: Held-out batches for ``damp="auto"`` and for the Newton scale of
            ``"woodtaylor"``.
        taylor: Options of ``method="woodtaylor"`` (see
            :data:`~woodfisher.pruning.woodtaylor.TAYLOR_DEFAULTS`): ``scale`` (``"auto"``:
            chosen per step from ``grid`` by the loss on held-out samples, ``val_data`` or the
            samples of ``data`` after those used for gradients; or a number in [0, 2]),
            ``grid``, ``grad_samples`` (samples for ``ḡ``; None: the Fisher's ``m``),
            ``saliency`` (first-order term in the ranking too).
        progress: Show progress bars.

    Returns:
        The report.

    Raises:
        ValueError: On bad input (sparsity outside [0, 1) or below the current one, unknown
            method/scope/update/layer, no prunable modules, data that does not fit the model, a
            non-finite loss, bad ``taylor`` options or no held-out samples for them). The model
            is then left exactly as it was.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3))
        >>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
        >>> prune(net, data, 0.5, method="magnitude").sparsity
        0.5
    """
    pat = parse_pattern(pattern)
    implied = pat.implied_sparsity
    if sparsity is None:
        if implied is None:
            raise ValueError(
                f"sparsity is required for pattern {pat}; only N:M patterns imply one"
            )
        sparsity = implied
    check_sparsity(sparsity)
    if implied is not None and sparsity > implied + 1e-9:
        raise ValueError(
            f"pattern {pat} keeps {pat.n} of every {pat.m} weights, i.e. sparsity "
            f"{implied:g} in the layers it fits, but sparsity={sparsity!r} was asked; pass "
            f"sparsity=None (implied) or at most {implied:g}"
        )
    if pat.structured and layer_sparsity:
        raise ValueError(
            f"layer_sparsity works with the unstructured pattern only, not {pat}; use "
            "layers/skip to choose the layers"
        )
    meth = get_method(method)
    upd = resolve_update(meth, update)
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose from {list(SCOPES)}")
    if recompute != "auto" and (
        isinstance(recompute, bool) or not isinstance(recompute, int) or recompute < 1
    ):
        raise ValueError(f"recompute must be a positive integer or 'auto', got {recompute!r}")
    if num_grads is None:
        num_grads = (
            DEFAULTS["kfac_num_batches"] if meth.curvature == "kfac" else DEFAULTS["num_grads"]
        )
    for name, value in (("num_grads", num_grads), ("samples_per_grad", samples_per_grad)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if block_size is not None and (
        isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1
    ):
        raise ValueError(f"block_size must be a positive integer or None, got {block_size!r}")
    if not (
        damp is None
        or damp == "auto"
        or (
            isinstance(damp, (int, float))
            and not isinstance(damp, bool)
            and math.isfinite(damp)
            and damp > 0
        )
    ):
        raise ValueError(
            f"damp must be a positive float, None (relative default) or 'auto', got {damp!r}"
        )
    if relative_damp is not None:
        if not (
            isinstance(relative_damp, (int, float))
            and not isinstance(relative_damp, bool)
            and math.isfinite(relative_damp)
            and relative_damp > 0
        ):
            raise ValueError(f"relative_damp must be a positive float, got {relative_damp!r}")
        if damp is not None:
            raise ValueError(
                f"give damp or relative_damp, not both (got damp={damp!r}, "
                f"relative_damp={relative_damp!r})"
            )
        if meth.curvature == "kfac":
            raise ValueError(
                "relative_damp is relative to the empirical Fisher's diagonal, which K-FAC does "
                "not build; give kfac an absolute damp"
            )
    if taylor is not None and meth.newton != "safe":
        raise ValueError(
            f"taylor options are for method='woodtaylor', not {method!r}; drop taylor= or "
            "choose woodtaylor"
        )
    taylor_opts = wt.check_taylor(taylor) if meth.newton == "safe" else None
    selection = select_params(model, layers, skip, params)
    modules = selection.targets
    layout = Layout.of(modules)
    if recompute_by == "downdate" and (pat.structured or target != "params"):
        raise ValueError(
            f"recompute_by='downdate' prunes single weights by count; pattern={str(pat)!r}, "
            f"target={target!r} need recompute_by='resample' (or 'auto')"
        )
    unstructured = not pat.structured and target == "params"
    use_downdate = downdate_applies(
        meth.curvature if unstructured else None, meth.needs_mean_grad, num_grads, block_size,
        layout.d, recompute_by,
    )
    if layer_sparsity:
        for name, s in layer_sparsity.items():
            if name not in modules:
                raise ValueError(
                    f"layer_sparsity names unknown layer {name!r}; selected: {list(modules)}"
                )
            check_sparsity(s, f"layer_sparsity[{name!r}]")
    if (isinstance(refresh, bool) or not isinstance(refresh, (int, float))
            or not 0.0 <= refresh <= 1.0):
        raise ValueError(f"refresh must be a fraction in [0, 1], got {refresh!r}")
    options = {
        "loss_fn": loss_fn,
        "num_grads": num_grads,
        "samples_per_grad": samples_per_grad,
        "block_size": block_size,
        "damp": None if damp == "auto" else damp,
        "relative_damp": DEFAULTS["relative_damp"] if relative_damp is None else relative_damp,
        "seed": seed,
        "progress": progress,
        "taylor": taylor_opts,
        "downdate": use_downdate,
        "refresh": refresh,
        "group": _group(use_downdate),
    }
    public = {
        "sparsity": sparsity,
        "method": method,
        "loss_fn": _loss_name(loss_fn),
        "layers": [layers] if isinstance(layers, str) else (list(layers) if layers else None),
        "skip": [skip] if isinstance(skip, str) else (list(skip) if skip else None),
        "params": [params] if isinstance(params, str) else (list(params) if params else None),
        "scope": scope,
        "layer_sparsity": dict(layer_sparsity) if layer_sparsity else None,
        "update": upd,
        "num_grads": num_grads,
        "samples_per_grad": samples_per_grad,
        "block_size": block_size,
        "damp": damp,
        "relative_damp": relative_damp,
        "recompute": recompute,
        "recompute_by": recompute_by,
        "refresh": refresh,
        "seed": seed,
        "schedule": DEFAULTS["schedule"],
        "pattern": str(pat),
        "target": target,
        "taylor": None if taylor_opts is None else {**taylor_opts,
                                                    "grid": list(taylor_opts["grid"])},
    }
    if target not in ("params", "flops"):
        raise ValueError(f"unknown target {target!r}; choose from ['params', 'flops']")

    flags = {mod: mod.training for mod in model.modules()}
    snap = _Snapshot(dict(model.named_modules()))
    model.eval()
    try:
        check_data(model, data, loss_fn)
        if taylor_opts is not None and taylor_opts["scale"] == "auto":
            used = max(num_grads * samples_per_grad, taylor_opts["grad_samples"] or 0)
            options["taylor_val"] = (
                list(val_data) if val_data is not None
                else _held_out(data, used, DEFAULTS["val_samples"])
            )
            if not options["taylor_val"]:
                raise ValueError(
                    "woodtaylor chooses its Newton scale on held-out samples, but data has none "
                    f"after the {used} used for the Fisher and the gradient: pass val_data, more "
                    "data, or taylor={'scale': 0.0} (WoodFisher's step)"
                )
        example = example_inputs if example_inputs is not None else _first(iter(data))[0]

        def plan_for(net, mods):
            return make_plan(net, mods, layout, pat, target, example, explicit=layers is not None)

        plan = plan_for(model, modules)
        search, t_search = None, 0.0
        if damp == "auto" and meth.curvature not in (None, "kfac"):
            t0 = time.perf_counter()
            val = (
                list(val_data)
                if val_data is not None
                else _held_out(data, num_grads * samples_per_grad, DEFAULTS["val_samples"])
            )
            if not val:
                raise ValueError(
                    "damp='auto' needs held-out samples: data has none after the "
                    f"{num_grads * samples_per_grad} used for gradients; pass val_data"
                )
            search = {}
            for rel in DEFAULTS["damp_grid"]:
                trial = copy.deepcopy(model)
                trial_modules = select_modules(trial, layers, skip, params)
                _run(
                    trial,
                    trial_modules,
                    layout,
                    meth,
                    data,
                    sparsity,
                    scope,
                    layer_sparsity,
                    upd,
                    {**options, "relative_damp": rel},
                    recompute,
                    plan and plan_for(trial, trial_modules),
                )
                search[repr(rel)] = evaluate_loss(trial, val, loss_fn)
            best = min(search, key=lambda k: search[k])  # first of equals: dict order
            options["relative_damp"] = float(best)
            t_search = time.perf_counter() - t0
        stats = _run(
            model,
            modules,
            layout,
            meth,
            data,
            sparsity,
            scope,
            layer_sparsity,
            upd,
            options,
            recompute,
            plan,
        )
    except BaseException:
        snap.restore()
        raise
    finally:
        for mod, flag in flags.items():
            mod.train(flag)

    stats["times"]["damp_search"] = t_search
    present = flat_masks(modules)
    layer_results = []
    for name, tgt in modules.items():
        layer_results.append(_layer_result(name, tgt, layout.split(present)[name]))
    return PruneResult(
        method=method,
        update=stats["update"],
        sparsity=float((~present).sum()) / layout.d,
        layers=layer_results,
        predicted_increase=stats["predicted"],
        predicted_by=stats["by"],
        saliency_sum=stats["saliency_sum"],
        times=stats["times"],
        steps=stats["steps"],
        damp=stats["damp"],
        relative_damp=stats["relative_damp"],
        damp_search=search,
        seed=seed,
        options=public,
        pattern=str(pat),
        target=target,
        structure=plan.report(modules) if plan is not None else None,
        taylor=stats.get("taylor"),
        skipped=selection.skipped,
        path=stats.get("path", "resample"),
        ranks=stats.get("ranks"),
    )


def _group(use_downdate: bool) -> Group:
    """The ranks a prune splits over: all of a torchrun job on the downdate path, else one."""
    group = Group.from_torch()
    if group.distributed and not use_downdate and group.rank == 0:
        import warnings

        warnings.warn(
            f"this prune takes the resample path, which is not split: each of the {group.world} "
            "ranks computes all of it (same result, P times the work); pass "
            "recompute_by='downdate' (--recompute-by downdate) to split it",
            stacklevel=3,
        )
    return group if use_downdate else Group.local()


def _layer_result(name: str, target: Target, present: Tensor) -> LayerResult:
    numel = present.numel()
    parts = {
        part: float((~present[rows]).sum()) / max(present[rows].numel(), 1)
        for part, rows in target.parts().items()
    }
    return LayerResult(
        name,
        list(weight_param(target).shape),
        numel,
        float((~present).sum()) / numel,
        target.kind,
        parts,
    )


def _run(
    model, modules, layout, meth, data, sparsity, scope, layer_sparsity, upd, options, recompute,
    plan: StructuredPlan | None = None,
) -> dict:
    """All recomputation steps on ``model``; returns the summed stats."""

    def progress() -> float:
        if plan is not None:
            return plan.progress(modules)
        return float((~flat_masks(modules)).sum()) / layout.d

    current = progress()
    if plan is not None:
        options = {**options, "block_size": plan.block_sizes(options["block_size"])}
    kind = DEFAULTS["schedule"]
    if recompute == "auto":
        # Magnitudes do not change between steps, so more steps would only repeat the work.
        recompute = (
            1 if meth.curvature is None
            else auto_steps(current, sparsity, DEFAULTS["max_step_removed"])
        )
    targets = interpolate(current, sparsity, recompute, kind)
    # Overridden layers follow the same schedule towards their own targets.
    per_layer = {}
    for name, s in (layer_sparsity or {}).items():
        off, size = layout.offsets[layout.names.index(name)], layout.sizes[layout.names.index(name)]
        now = float((~flat_masks(modules)[off : off + size]).sum()) / size
        per_layer[name] = interpolate(now, s, recompute, kind)
    if options.get("downdate") and plan is None:
        steps = [
            {name: sched[step] for name, sched in per_layer.items()} or None
            for step in range(len(targets))
        ]
        group = options["group"]
        stats = run_downdate(
            model, modules, layout, data, targets, steps, scope, upd, options, group
        )
        if group.distributed:
            stats["ranks"] = [
                {**bounds, **rep} for bounds, rep in zip(stats["ranks"], rank_report(group),
                                                         strict=True)
            ]
        else:
            stats["ranks"] = None
        return stats
    times = {"gradients": 0.0, "inverse": 0.0, "selection": 0.0, "update": 0.0}
    out = {
        "update": upd,
        "saliency_sum": 0.0,
        "predicted": 0.0,
        "by": "none",
        "steps": [],
        "damp": None,
        "relative_damp": None,
        "times": times,
    }
    taylor = None
    if options.get("taylor") is not None:
        opts = options["taylor"]
        search = None
        if opts["scale"] == "auto":
            search = wt.ScaleSearch(options["taylor_val"], options["loss_fn"] or default_loss,
                                    opts["grid"])
        taylor = wt.TaylorStep(opts, model, search)
    for step, target in enumerate(targets):
        overrides = {name: sched[step] for name, sched in per_layer.items()} or None
        curv = build_inverse(meth, model, data, modules, options)
        for k, v in curv.times.items():
            times[k] += v
        if taylor is not None and taylor.options["grad_samples"] is not None:
            from woodfisher.curvature import mean_gradient

            t0 = time.perf_counter()
            curv.mean_grad = mean_gradient(
                model, data, options["loss_fn"], params=modules,
                max_samples=taylor.options["grad_samples"],
            ).to(curv.inv.dtype)
            times["gradients"] += time.perf_counter() - t0
        if plan is None:
            st = _step(modules, layout, meth, curv, target, scope, overrides, upd, taylor)
        else:
            if taylor is not None:
                # Patterns apply WoodFisher's step (α = 0): the structured plan selects, updates
                # and applies in one go, with no place for the held-out scale search.
                curv = replace(curv, mean_grad=None)
                taylor.scales.append(0.0)
            st = plan.step(modules, layout, replace(meth, needs_mean_grad=False)
                           if taylor is not None else meth, curv, target, scope, upd)
        times["selection"] += st["selection"]
        times["update"] += st["update_time"]
        if st["update"] != upd:
            out["update"] = st["update"]
        out["saliency_sum"] += st["saliency_sum"]
        out["by"] = st["by"]
        out["predicted"] = (
            None if st["predicted"] is None else (out["predicted"] or 0.0) + st["predicted"]
        )
        out["steps"].append(progress())
        out["damp"], out["relative_damp"] = curv.damp, curv.relative_damp
    if taylor is not None:
        out["taylor"] = taylor.report()
    return out
