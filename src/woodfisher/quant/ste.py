"""Quantization-aware fine-tuning: forward passes see fake-quantized weights (straight through).

Inside :func:`quant_aware`, each module's weight (its ``weight_orig`` when pruned, so masks keep
working) is parametrized as ``w + (q(w) − w).detach()``: the loss is that of the quantized
model, and its gradient reaches the float weights unchanged (the straight-through estimator of
Bengio et al. 2013). On exit the float weights are replaced by their quantized values, so the
model ends on the grid.

Example:
    >>> import torch
    >>> from torch import nn
    >>> lin = nn.Linear(4, 2)
    >>> with quant_aware({"fc": lin}, {"fc": 2}):
    ...     loss = lin(torch.ones(1, 4)).sum()
    ...     loss.backward()
    >>> len(torch.unique(lin.weight.detach()[0].abs())) <= 2  # on a 2-bit grid: 0 or one step
    True
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from woodfisher.params import Target, owner
from woodfisher.quant.uniform import check_bits, fake_quantize


class _StraightThrough(nn.Module):
    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits

    def forward(self, w: Tensor) -> Tensor:
        return w + (fake_quantize(w, self.bits) - w).detach()


@contextmanager
def quant_aware(
    modules: Mapping[str, nn.Module | Target], bits: Mapping[str, int]
) -> Iterator[None]:
    """Train with fake-quantized weights; leave the weights quantized.

    Args:
        modules: Name to module or :class:`~woodfisher.params.Target` (as
            :func:`woodfisher.params.select_modules` gives them).
        bits: Module name to bit width (modules not named are left alone).

    Yields:
        Nothing; train the model inside the block (``woodfisher.train`` keeps masks).

    Raises:
        ValueError: If a name is unknown or a width is outside 1..16.
    """
    for name, b in bits.items():
        if name not in modules:
            raise ValueError(f"bits names unknown module {name!r}; known: {sorted(modules)}")
        check_bits(b, f"bits[{name!r}]")
    done = []
    try:
        for name, b in bits.items():
            # parametrize the module itself: a Target only stands for one of its tensors
            target = modules[name]
            mod = owner(target)
            attr = target.attr if isinstance(target, Target) else "weight"
            tensor = f"{attr}_orig" if hasattr(mod, f"{attr}_orig") else attr
            parametrize.register_parametrization(mod, tensor, _StraightThrough(int(b)))
            done.append((mod, attr, tensor))
        yield
    finally:
        for mod, attr, tensor in done:
            parametrize.remove_parametrizations(mod, tensor, leave_parametrized=True)
            if tensor != attr:
                mask = getattr(mod, f"{attr}_mask")
                with torch.no_grad():
                    getattr(mod, tensor).mul_(mask)  # a pruned weight reads as 0
                    setattr(mod, attr, getattr(mod, tensor) * mask)
