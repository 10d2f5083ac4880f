"""Frequency-domain dynamic pruning of convolutions (FDNP, Liu et al., NeurIPS 2018).

Convolution kernels are pruned in the basis of their orthonormal 2-D DCT: a
:class:`DCTConv2d` holds the coefficients as its ``weight`` (so masks, the inverse Fisher,
``woodfisher.prune`` and checkpoints work on them unchanged), :func:`fdnp` trains a model while
Dynamic Network Surgery's rule prunes and splices coefficients (per band for BA-FDNP), and
:func:`frequency_cost` counts what the result costs. See ``docs/fdnp.md``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    >>> _ = net(torch.zeros(1, 1, 6, 6))
    >>> to_frequency(net)["converted"]
    ['0']
    >>> type(net[0]).__name__
    'DCTConv2d'
"""

from woodfisher.frequency.cost import frequency_cost, transform_macs
from woodfisher.frequency.dct import band_index, band_sizes, dct2, dct_matrix, idct2
from woodfisher.frequency.dns import (
    band_factors,
    dns_moments,
    hysteresis_mask,
    splice_gradients,
    update_probability,
)
from woodfisher.frequency.fdnp import CRITERIA, DOMAINS, FDNPConfig, FDNPError, fdnp
from woodfisher.frequency.layers import (
    DCTConv2d,
    eligible_convs,
    frequency_layers,
    ineligible_reason,
    to_frequency,
    to_spatial,
)
from woodfisher.frequency.outputs import plot_bands, plot_history, run_fdnp
from woodfisher.frequency.saliency import (
    coefficient_inverse_diag,
    prune_oneshot,
    woodfisher_scales,
)
from woodfisher.frequency.surgery import ALLOCATIONS, DynamicPruner, band_kept_fractions

__all__ = [
    # layers and transform
    "DCTConv2d",
    "to_frequency",
    "to_spatial",
    "frequency_layers",
    "eligible_convs",
    "ineligible_reason",
    "dct_matrix",
    "dct2",
    "idct2",
    "band_index",
    "band_sizes",
    # dynamic pruning
    "fdnp",
    "FDNPConfig",
    "FDNPError",
    "DOMAINS",
    "CRITERIA",
    "ALLOCATIONS",
    "DynamicPruner",
    "band_factors",
    "band_kept_fractions",
    "dns_moments",
    "hysteresis_mask",
    "splice_gradients",
    "update_probability",
    # second order
    "coefficient_inverse_diag",
    "woodfisher_scales",
    "prune_oneshot",
    # cost and outputs
    "frequency_cost",
    "transform_macs",
    "run_fdnp",
    "plot_history",
    "plot_bands",
]
