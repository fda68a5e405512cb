"""What both training formulations share, written once: the learning-rate schedule, the choice of
precision, early stopping with the best checkpoint kept on disk, the MLflow run of a training, and
the atomic save of the trained model folder.

The loops themselves stay in their own modules, each readable top to bottom: the timeline model
(model/timeline_train.py, the default) and the paper's prompted recipe (model/prompted_train.py).
torch is imported at the top: this module exists to train.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors.torch import load_model, save_model

from gensar_core import tracking
from gensar_core.config import PipelineConfig
from gensar_core.model.backbone import save_trained
from gensar_core.model.runs import log_model_artifacts
from gensar_core.storage import Warehouse, atomic_dir, resolve, write_json_atomic


# ---------------------------------------------------------------- schedule
def lr_at(step: int, total: int, peak: float, warmup: int, schedule: str = "cosine",
          min_ratio: float = 0.0) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warm-up over `warmup` steps,
    then `schedule` (cosine or linear decay to `min_ratio` x peak at `total`, or constant)."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return peak * (min_ratio + (1 - min_ratio) * decay)


# ---------------------------------------------------------------- precision
def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX). oneDNN reports bf16
    support on any AVX-512 CPU, but without these it converts in software: measured 2.2x slower
    than float32 for a training step on such a CPU, against 1.6x faster on one with them."""
    return bool(torch.backends.mkldnn.is_available() and (torch.cpu._is_avx512_bf16_supported()
                                                          or torch.cpu._is_amx_tile_supported()))


def amp_dtype(device: torch.device, mode: str) -> Optional[torch.dtype]:
    """The autocast dtype of `train.mixed_precision` on `device` (None: full precision).
    'auto': bf16 on a GPU that has it (else fp16, with loss scaling) and on a CPU with native
    bf16 (`native_cpu_bf16`), full precision on any other CPU; fp16 is for GPUs only."""
    if mode == "no":
        return None
    if device.type == "cuda":
        if mode == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if mode == "fp16" else torch.bfloat16
    if mode == "fp16" or (mode == "auto" and not native_cpu_bf16()):
        return None
    return torch.bfloat16


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """The autocast context of `amp_dtype`'s choice (none for full precision)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(dtype: Optional[torch.dtype]):
    """fp16 needs loss scaling; bf16 and full precision do not."""
    return torch.amp.GradScaler("cuda") if dtype == torch.float16 else None


def clip_and_step(model: torch.nn.Module, optimizer, scaler, max_grad_norm: Optional[float]) -> None:
    """The optimizer step once the gradients are in: unscaled (fp16), clipped to `max_grad_norm`."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


# ---------------------------------------------------------------- early stopping
@dataclass
class BestCheckpoint:
    """Early stopping on a validation number, with the best weights kept in `folder`.

    `record` is called after every validation: a better number saves the weights (atomically),
    a worse one counts towards `patience` (0: never stop). Plain fields, so a resumable training
    keeps it in its JSON state and torchrun broadcasts it."""

    folder: str
    mode: str = "max"             # 'max' or 'min': which way is better
    patience: int = 0
    best: Optional[float] = None
    best_step: int = -1
    bad_evals: int = 0

    def record(self, step: int, value: float, model: Optional[torch.nn.Module]) -> bool:
        """Whether `value` beats the best so far; when it does and `model` is given (the process
        that writes), its weights are saved."""
        improved = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        if improved:
            self.best, self.best_step, self.bad_evals = value, step, 0
            if model is not None:
                with atomic_dir(Path(self.folder)) as stage:
                    save_model(model, str(stage / "model.safetensors"))
                    (stage / "step.json").write_text(json.dumps({"step": step, "metric": value}))
        else:
            self.bad_evals += 1
        return improved

    @property
    def stop(self) -> bool:
        return bool(self.patience) and self.bad_evals >= self.patience

    def restore(self, model: torch.nn.Module, device) -> None:
        """The best weights back into `model` (nothing when no validation was recorded)."""
        if self.best_step >= 0:
            load_model(model, str(resolve(Path(self.folder)) / "model.safetensors"), device=str(device))


# ---------------------------------------------------------------- tracking and saving
@contextlib.contextmanager
def training_run(cfg: PipelineConfig, name: str, tags: Mapping[str, str], params: Mapping[str, Any],
                 run_id: Optional[str] = None):
    """The MLflow run of one training; a new run logs the config and `params`, a resumed one
    (`run_id`) continues as it was."""
    tracking.silence_mlflow_warnings()
    with tracking.start_run(cfg, name, {"gensar.step": "train", **tags}, run_id=run_id) as run:
        if run_id is None:
            tracking.log_params_from_config(cfg)
            tracking.log_params(params)
        yield run


def save_model_folder(cfg: PipelineConfig, out_dir: Path, backbone, meta: dict, history: dict, result: dict,
                      track: bool, final_metrics: Mapping[str, float]) -> None:
    """The trained model (weights, tokenizer, gensar_model.json with `meta`) and its training
    `history` into `out_dir` atomically, `result` beside it as `<run>.metrics.json`, and the folder
    and `final_metrics` to MLflow when `track`."""
    wh = Warehouse(cfg.warehouse)
    backbone.model.eval()
    with atomic_dir(out_dir) as stage:
        save_trained(backbone, stage, {**meta, "metrics": result, "config_fingerprint": cfg.fingerprint()})
        write_json_atomic(stage / "train_history.json", history)
    if track:
        log_model_artifacts(cfg, wh, out_dir)
        tracking.log_metrics(final_metrics)
    write_json_atomic(wh.path("models", f"{out_dir.name}.metrics.json"), result)
