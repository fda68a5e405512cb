"""Float32 linear layers through oneDNN on CPU, for the decoder's hot matmuls.

torch's float32 CPU matmul goes to MKL, which on AMD processors runs its AVX2 kernels (about
95 GFLOP/s a core on this machine's EPYC, oneDNN's AVX-512 ones about 220): `linear(layer, x)`
is `layer(x)` through oneDNN where that applies, with the oneDNN copy of each weight cached.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

_PACKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


# oneDNN's linear with a dense input and output (the op torch.compile's CPU backend uses)
LINEAR_POINTWISE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_applies(x: Tensor) -> bool:
    return LINEAR_POINTWISE and x.device.type == "cpu" and x.dtype == torch.float32


def dense(x: Tensor, weight: Tensor, bias: Optional[Tensor], post: str = "none") -> Tensor:
    """`x @ weight.T + bias` [..., d] -> [..., out] by oneDNN, then `post` ('none' or 'relu');
    `weight` dense or already oneDNN's."""
    if not weight.is_mkldnn:
        weight = weight.contiguous().to_mkldnn()
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, post, [], "")
    return out.view(*x.shape[:-1], -1)


def linear(layer: torch.nn.Linear, x: Tensor, post: str = "none") -> Tensor:
    """`layer(x)` (then ReLU with post='relu'), through oneDNN for float32 on CPU: torch's float32
    CPU matmul goes to MKL, which on AMD processors runs its AVX2 kernels (about 95 GFLOP/s a core
    on this machine's EPYC, oneDNN's AVX-512 ones about 220). The oneDNN copy of the weight is kept
    per layer and made again when the weight changes (training between evaluations)."""
    if not onednn_applies(x):
        out = layer(x)
        return F.relu(out) if post == "relu" else out
    weight = layer.weight
    key = (weight.data_ptr(), weight._version)
    entry = _PACKED.get(layer)
    if entry is None or entry[0] != key:
        entry = _PACKED[layer] = (key, weight.detach().contiguous().to_mkldnn())
    return dense(x, entry[1], layer.bias, post)
