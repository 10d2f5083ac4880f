"""What a pruned frequency-domain (or spatial) network costs: multiplies and parameters.

Our accounting (the paper's FLOP formula was not retrieved; its speed-ups are theoretical), per
example, for a layer with ``C_in`` input channels, k×k kernels, ``P = H_out·W_out`` output
positions and ``nnz`` kept coefficients:

* **dense spatial**: ``C_in/groups · C_out · k² · P`` multiply-accumulates (``count_flops``);
* **frequency, multiply only**: ``nnz · P`` — every kept coefficient multiplies one transformed
  input value per output position, and because the DCT is orthonormal
  (``⟨patch, W⟩ = ⟨DCT(patch), C⟩``) the products land directly in the spatial output; no
  inverse transform is needed;
* **frequency, with the transform**: plus the 2-D DCT of every input patch, done separably and
  shared by all output channels: the k-point DCT of each row segment (``H_pad · W_out`` of them
  per channel, k² MACs each, reused by the k patches that overlap vertically) and then of each
  patch's k columns (k³ MACs per patch): ``C_in · (H_pad · W_out · k² + P · k³)``;
* **spatial equivalent**: the layer run as an ordinary conv with the inverse-DCT kernel
  (``nnz`` of the spatial kernel × ``P``; a sparse set of coefficients gives a dense kernel in
  general, so this is usually the dense count).

Layers that stay spatial count their nonzero weights' MACs (``count_flops``' ``nonzero_macs``),
so spatial DNS and gradual pruning are measured on the same scale (multiply only; sparse
spatial kernels need no transform).

Example:
    >>> from woodfisher.frequency.layers import DCTConv2d
    >>> net = nn.Sequential(DCTConv2d(2, 4, 3, padding=1))
    >>> report = frequency_cost(net, torch.zeros(1, 2, 6, 6))
    >>> row = report["layers"][0]
    >>> row["dense_macs"], row["multiply_macs"], row["transform_macs"]  # 2·(8·6·9 + 36·27)
    (2592, 2592, 2808)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from woodfisher.flops import count_flops, run_model
from woodfisher.frequency.layers import DCTConv2d
from woodfisher.params import effective_weight

__all__ = ["frequency_cost", "transform_macs"]


def transform_macs(module: nn.Conv2d, input_shape: Sequence[int], output_shape: Sequence[int]
                   ) -> int:
    """MACs of the separable 2-D DCT of every input patch of one example (see the module doc).

    Args:
        module: The conv (its kernel size and padding are used).
        input_shape: ``(C_in, H_in, W_in)`` of one example.
        output_shape: ``(C_out, H_out, W_out)`` of one example.

    Returns:
        ``C_in · (H_pad · W_out · k² + H_out · W_out · k³)``.
    """
    c_in, h_in = int(input_shape[0]), int(input_shape[1])
    h_out, w_out = int(output_shape[-2]), int(output_shape[-1])
    k = module.kernel_size[0]
    pad = module.padding[0] if isinstance(module.padding, tuple) else 0
    if module.padding == "same":
        pad = (module.dilation[0] * (k - 1)) // 2
    h_pad = h_in + 2 * pad
    return c_in * (h_pad * w_out * k * k + h_out * w_out * k ** 3)


def _shapes(model: nn.Module, example_inputs: object) -> dict[str, tuple[tuple, tuple]]:
    names = {m: n for n, m in model.named_modules()}
    seen: dict[str, tuple[tuple, tuple]] = {}

    def hook(mod: nn.Module, args: tuple, out: Tensor) -> None:
        seen.setdefault(names[mod], (tuple(args[0].shape[1:]), tuple(out.shape[1:])))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, nn.Conv2d)]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            run_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return seen


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def frequency_cost(
    model: nn.Module, example_inputs: object, layers: Sequence[str] | None = None
) -> dict[str, Any]:
    """Per-layer and overall multiplies and parameters of a (partly) frequency-domain model.

    Args:
        model: The network (DCTConv2d layers count in the frequency domain, others spatially).
        example_inputs: A batch, as for :func:`woodfisher.count_flops`.
        layers: The compressed layers the ``selected`` totals cover; default the DCTConv2d
            layers and every layer with a pruning mask.

    Returns:
        ``{"layers": [per-layer dict], "selected": totals, "model": totals}``. A layer dict has
        ``name, domain, numel, kept, compression, dense_macs, multiply_macs, transform_macs,
        spatial_equivalent_macs``; totals have ``numel, kept, compression, dense_macs,
        multiply_macs, with_transform_macs, speedup_multiply_only, speedup_with_transform``.
    """
    flops = count_flops(model, example_inputs)
    shapes = _shapes(model, example_inputs)
    modules = dict(model.named_modules())
    if layers is None:
        layers = [f.name for f in flops.layers
                  if isinstance(modules[f.name], DCTConv2d)
                  or hasattr(modules[f.name], "weight_mask")]
    rows = []
    for f in flops.layers:
        mod = modules[f.name]
        w = effective_weight(mod)
        kept = int((w != 0).sum())
        row = {"name": f.name, "domain": "spatial", "numel": f.weight_numel, "kept": kept,
               "compression": _ratio(f.weight_numel, kept), "dense_macs": f.macs,
               "multiply_macs": f.nonzero_macs, "transform_macs": 0,
               "spatial_equivalent_macs": f.nonzero_macs}
        if isinstance(mod, DCTConv2d):
            spatial = mod.spatial_weight()
            row.update(
                domain="frequency",
                multiply_macs=round(kept * f.macs_per_weight),
                transform_macs=transform_macs(mod, *shapes[f.name]),
                spatial_equivalent_macs=round(int((spatial != 0).sum()) * f.macs_per_weight),
            )
        rows.append(row)

    def totals(group: list[dict[str, Any]]) -> dict[str, Any]:
        numel = sum(r["numel"] for r in group)
        kept = sum(r["kept"] for r in group)
        dense = sum(r["dense_macs"] for r in group)
        mult = sum(r["multiply_macs"] for r in group)
        full = mult + sum(r["transform_macs"] for r in group)
        return {"numel": numel, "kept": kept, "compression": _ratio(numel, kept),
                "dense_macs": dense, "multiply_macs": mult, "with_transform_macs": full,
                "speedup_multiply_only": _ratio(dense, mult),
                "speedup_with_transform": _ratio(dense, full)}

    chosen = set(layers)
    return {"layers": rows, "selected": totals([r for r in rows if r["name"] in chosen]),
            "model": totals(rows)}
