"""Quantiser checkpoints: weights in safetensors (never pickle) + architecture in JSON.

A checkpoint folder holds
    model.safetensors   every parameter and buffer (codebooks, input scales included)
    config.json         {"kind", "format_version", "spec": QuantiserSpec, ...extra}
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import load_file, save_file

from gensar_core.identifiers.quantiser import DualQuantiser, QuantiserSpec

KIND = "gensar.dual_residual_quantiser"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_quantiser(model: DualQuantiser, folder: Union[str, Path], extra: Optional[dict] = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS), metadata={"kind": KIND})
    payload = {"kind": KIND, "format_version": FORMAT_VERSION, "spec": model.spec.to_dict(), **(extra or {})}
    (folder / CONFIG).write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    return folder


def load_quantiser(folder: Union[str, Path], device: str = "cpu") -> DualQuantiser:
    """Rebuild a trained DualQuantiser (eval mode) from a checkpoint folder."""
    folder = Path(folder)
    if not (folder / CONFIG).exists() or not (folder / WEIGHTS).exists():
        raise FileNotFoundError(f"{folder} is not a quantiser checkpoint (needs {CONFIG} and {WEIGHTS})")
    payload = json.loads((folder / CONFIG).read_text())
    if payload.get("kind") != KIND:
        raise ValueError(f"{folder / CONFIG}: kind {payload.get('kind')!r}, expected {KIND!r}")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{folder}: checkpoint format {payload['format_version']} is newer than this code")
    model = DualQuantiser(QuantiserSpec.from_dict(payload["spec"]))
    model.load_state_dict(load_file(str(folder / WEIGHTS), device=device))
    return model.to(torch.device(device)).eval()
