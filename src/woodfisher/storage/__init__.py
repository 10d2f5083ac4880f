"""Storing compressed networks on noisy analog memory (Isik et al., ACM TECS 2023).

Weights go to analog cells (PCM by default) that read back with noise; robust codes (sign
protection, adaptive ranges with a corrected decode, repetition, digit splitting) and an
allocation of cells by importance (the Fisher diagonal from the WoodFisher engine) keep the
accuracy while using far fewer cells than error-corrected digital storage. See
``docs/storage.md``.

Example:
    >>> import torch
    >>> y = pcm_channel(seed=0)(torch.tensor([0.0, 12.5, 25.0]))
    >>> y.shape
    torch.Size([3])
"""

from woodfisher.storage.allocation import allocate, entropy_bits
from woodfisher.storage.channel import (
    CHANNELS,
    Channel,
    GaussianChannel,
    PCMChannel,
    TableChannel,
    gaussian_channel,
    make_channel,
    pcm_channel,
    table_channel,
)
from woodfisher.storage.codes import TOKENS, LayerCode, Strategy, build_layer_code
from woodfisher.storage.footprint import digital_baselines, ecc_cells, mask_bits
from woodfisher.storage.mapping import CellMap, compander
from woodfisher.storage.simulate import fisher_diagonal, simulate, trial_seed

__all__ = [
    "CHANNELS",
    "TOKENS",
    "CellMap",
    "Channel",
    "GaussianChannel",
    "LayerCode",
    "PCMChannel",
    "Strategy",
    "TableChannel",
    "allocate",
    "build_layer_code",
    "compander",
    "digital_baselines",
    "ecc_cells",
    "entropy_bits",
    "fisher_diagonal",
    "gaussian_channel",
    "make_channel",
    "mask_bits",
    "pcm_channel",
    "simulate",
    "table_channel",
    "trial_seed",
]
