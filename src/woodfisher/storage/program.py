"""Program the cells once, then read them back as often as a trial needs.

Every stored weight's code has ``P × K`` slots (polarity cells × digit cells); a weight with
``r`` copies has each slot written to ``r`` cells, whose reads are averaged before decoding.

Example:
    >>> import torch
    >>> from woodfisher.storage.channel import gaussian_channel
    >>> from woodfisher.storage.codes import Strategy, build_layer_code
    >>> w = torch.tensor([[0.5, -1.0], [0.25, 0.0]])
    >>> code = build_layer_code("fc", w, w != 0, Strategy.parse("sign"), gaussian_channel(120.0))
    >>> cells = program([code], [torch.tensor([1, 2, 3])])
    >>> cells.targets.numel()  # 1 + 2 + 3 copies of one cell each
    6
    >>> [t.round(decimals=3).tolist() for t in read_back(cells, gaussian_channel(120.0))]
    [[0.5, -1.0, 0.25]]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from woodfisher.storage.channel import Channel
from woodfisher.storage.codes import LayerCode

__all__ = ["Programmed", "program", "read_back"]


@dataclass
class Programmed:
    """Cells holding the codes of several layers.

    Attributes:
        codes: The layer codes.
        copies: Per layer, (n,) copies of each stored weight.
        targets: (cells,) target conductance of every cell.
        slot_copies: (slots,) cells behind each slot.
        slot_ids: (cells,) the slot each cell belongs to.
        shapes: Per layer, the (n, P, K) slot shape.
    """

    codes: list[LayerCode]
    copies: list[Tensor]
    targets: Tensor
    slot_copies: Tensor
    slot_ids: Tensor
    shapes: list[torch.Size]


def program(codes: list[LayerCode], copies: list[Tensor]) -> Programmed:
    """Lay out the cells: each slot's target repeated by its weight's copies.

    Args:
        codes: Layer codes.
        copies: Per layer, (n,) int copies (>= 1) of each stored weight.

    Returns:
        The programmed cells.

    Raises:
        ValueError: If a layer's copies do not match its stored weights or are below 1.
    """
    targets, slot_copies, shapes = [], [], []
    for code, r in zip(codes, copies, strict=True):
        r = torch.as_tensor(r, dtype=torch.long).reshape(-1)
        if r.numel() != code.target.numel() or (r.numel() and int(r.min()) < 1):
            raise ValueError(
                f"layer {code.name!r}: need one copy count >= 1 per stored weight "
                f"({code.target.numel()}), got {r.numel()} counts"
            )
        slots = code.slot_targets()
        shapes.append(slots.shape)
        per_slot = r.repeat_interleave(int(slots[0].numel())) if slots.numel() else r
        targets.append(slots.reshape(-1).repeat_interleave(per_slot))
        slot_copies.append(per_slot)
    all_copies = torch.cat(slot_copies) if slot_copies else torch.zeros(0, dtype=torch.long)
    return Programmed(
        codes=list(codes),
        copies=[torch.as_tensor(r, dtype=torch.long).reshape(-1) for r in copies],
        targets=torch.cat(targets) if targets else torch.zeros(0, dtype=torch.float64),
        slot_copies=all_copies,
        slot_ids=torch.arange(all_copies.numel()).repeat_interleave(all_copies),
        shapes=shapes,
    )


def read_back(cells: Programmed, channel: Channel,
              generator: torch.Generator | None = None) -> list[Tensor]:
    """Read every cell once, average each slot's copies and decode.

    Args:
        cells: The programmed cells.
        channel: The cell model.
        generator: Randomness of this read (the channel's own by default).

    Returns:
        Per layer, (n,) decoded stored weights (float64).
    """
    reads = channel(cells.targets, generator)
    sums = torch.zeros(cells.slot_copies.numel(), dtype=torch.float64).index_add_(
        0, cells.slot_ids, reads)
    means = sums / cells.slot_copies.clamp(min=1)
    out, start = [], 0
    for code, shape in zip(cells.codes, cells.shapes, strict=True):
        size = int(torch.Size(shape).numel())
        out.append(code.decode(means[start:start + size].reshape(shape)))
        start += size
    return out
