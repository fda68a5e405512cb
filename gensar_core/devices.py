"""Where a step computes: the one rule every step (embeddings, quantiser, training) follows."""
from __future__ import annotations

from typing import Optional

import torch


def pick_device(name: Optional[str] = None, local_rank: int = 0) -> torch.device:
    """`name` when the config gives one; else this process's GPU when there is one (its local
    rank's, under torchrun); else the CPU."""
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device(f"cuda:{local_rank}")
    return torch.device("cpu")
