"""All beams of an input in one row: which generated tokens each beam sees, and the tensor moves
between the packed, per-beam and padded layouts that the decoder states share."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class BeamTree:
    """Which generated tokens each beam descends from, when all beams of an input share one row.

    Generated tokens are appended to the row step by step (slot = position among generated
    tokens); `grow` takes the beams just chosen (flat source rows, input-major) and returns which
    slots each new beam sees: its ancestors' and its own [users, width, slots].
    """

    def __init__(self, users: int, device):
        self.seen = torch.zeros(users, 1, 0, dtype=torch.bool, device=device)

    def grow(self, src_rows: Tensor) -> Tensor:
        users, old_width, slots = self.seen.shape
        width = src_rows.numel() // users
        parent = src_rows.view(users, width) - torch.arange(users, device=src_rows.device)[:, None] * old_width
        inherited = self.seen.gather(1, parent[:, :, None].expand(-1, -1, slots))
        own = torch.eye(width, dtype=torch.bool, device=src_rows.device).expand(users, -1, -1)
        self.seen = torch.cat([inherited, own], dim=2)
        return self.seen

    def step(self, src_rows: Tensor, tokens: Tensor,
             need: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Grow by the chosen beams and their new tokens [users * width]: (visibility [users, n,
        slots], tokens [users, n], pick). n = width, pick None, unless `need` [users * width]
        (bool) says the pass is the last one and only some beams need it (see `only`)."""
        seen = self.grow(src_rows)
        users, width, _ = seen.shape
        tokens = tokens.view(users, width)
        if need is None:
            return seen, tokens, None
        pick, seen = self.only(seen, need.view(users, width))
        return seen, tokens.gather(1, pick), pick

    @staticmethod
    def only(seen: Tensor, need: Tensor) -> tuple[Tensor, Tensor]:
        """The final pass over the beams that `need` it [users, width] (bool), needed ones first:
        (pick [users, n] beam positions, their visibility [users, n, slots - width + n]). Rows
        with fewer than n needed beams fill up with others (computed, never wrong, just unused).
        Their new tokens are appended as n slots, so the tree is not grown past this pass."""
        users, width, slots = seen.shape
        n = int(need.sum(1).max())
        pick = need.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :n]
        older = seen[:, :, :slots - width].gather(1, pick[:, :, None].expand(-1, -1, slots - width))
        own = torch.eye(n, dtype=torch.bool, device=seen.device).expand(users, -1, -1)
        return pick, torch.cat([older, own], dim=2)


def spread(hidden: Tensor, pick: Optional[Tensor], width: int) -> Tensor:
    """Hidden states of the picked beams [users, n, d] -> [users * width, d], zeros elsewhere."""
    users, _, d = hidden.shape
    if pick is None:
        return hidden.reshape(users * width, d)
    out = hidden.new_zeros(users, width, d)
    return out.scatter_(1, pick[:, :, None].expand(-1, -1, d), hidden).view(users * width, d)


def unpack(packed: Tensor, where: Tensor, shape: torch.Size) -> Tensor:
    """Rows of the real tokens [tokens, w] -> the padded layout [users, S, w], zeros at padding."""
    out = packed.new_zeros(shape.numel(), packed.shape[-1])
    return out.index_copy_(0, where, packed).view(*shape, -1)


def additive(visible: Tensor, dtype) -> Tensor:
    """Boolean visibility -> additive attention mask (0 where visible, the dtype's minimum elsewhere)."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, torch.finfo(dtype).min)
