"""The paper's prompted recipe: a plain PyTorch loop (nanoGPT-like) over the `build_corpus`
prompts, for every backbone of `model.prompted` (a small T5 from scratch, SmolLM2, any local
Hugging Face model, LoRA).

    run_train(cfg) -> dict      reads corpus/{task}, writes models/<run>/ (atomic), logs to MLflow

What `run_train` does, in order (each part a function below):
- `load_examples`: the corpus's train and valid examples of the enabled tasks;
- `resume_point`: the last checkpoint of the same config and corpus, when there is one;
- the backbone (`load_backbone`) and the encoded examples;
- `plan_steps`: micro-batches of `model.prompted.batch_size`, `grad_accum` of them per optimizer
  step; the example order of each epoch is a pure function of (seed, epoch) (`epoch_order`:
  tasks mixed by `corpus.tasks.<task>.weight`, then shuffled);
- the loop: AdamW, the shared schedule and precision (model/training.py), gradient clipping;
  `validate` every `train.eval_every` steps and after each epoch: token-weighted loss on the
  valid examples (overall and per task) plus whatever the evaluators return, early stopping on
  `model.prompted.metric` with the best weights kept (training.BestCheckpoint);
- `save_checkpoint` every `save_every` steps and after each epoch under
  `<warehouse>/checkpoints/<run>/step-XXXXXXXX/`: model.safetensors, optimizer.pt, rng.pt (plain
  tensors and dicts: `torch.load(weights_only=True)` reads them), trainer_state.json, the
  tokenizer. A rerun of the same config resumes from the last one (the MLflow run too), and ends
  with the same weights as a run that never stopped (on CPU; GPU kernels may differ in the last
  bits). A run with a different config or corpus starts over. The folder is removed once the
  final model is committed;
- the best weights saved as the model folder (training.save_model_folder).

Multi-GPU: under `torchrun` (WORLD_SIZE > 1) the model is wrapped in DDP, each rank takes every
WORLD_SIZE-th micro-batch, and rank 0 alone writes checkpoints, the model and MLflow records.

Evaluators (the hook for a decoder's ranking metrics): callables `fn(ctx: ValidationContext) ->
dict`, passed to `run_train(cfg, evaluators=[...])` or named in `model.prompted.evaluators` as
'package.module:function'. Their keys (e.g. 'valid/rec/ndcg@5') can be the early-stopping metric.
Callbacks `fn(event, state)` see every optimizer step ('step'), evaluation ('eval') and
checkpoint ('checkpoint'); an exception raised there stops training like a crash would.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import logging
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_model, save_model
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from gensar_core import tracking
from gensar_core.config import PipelineConfig
from gensar_core.devices import pick_device
from gensar_core.model.backbone import Backbone, backbone_label, load_backbone
from gensar_core.model.corpus import enabled_tasks, read_corpus
from gensar_core.model.data import Encoded, collate, encode_examples, n_target_tokens
from gensar_core.model.distributed import Dist, dist_setup
from gensar_core.model.runs import run_name, run_slug, train_seed
from gensar_core.model.training import (BestCheckpoint, amp_dtype, autocast, clip_and_step, grad_scaler, lr_at,
                                        save_model_folder, training_run)
from gensar_core.storage import Warehouse, atomic_dir

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
# settings that do not change the trained weights: a rerun that changes only these resumes
_NO_EFFECT = {"progress", "log_every", "num_threads", "device", "run_name", "run_tag"}
_NO_EFFECT_PROMPTED = {"resume", "keep_checkpoints"}


# ---------------------------------------------------------------- public types
@dataclass
class TrainState:
    step: int = 0                 # optimizer steps done
    epoch: int = 0                # epoch in progress
    micro: int = 0                # micro-batches of this epoch already used (this rank)
    tokens: int = 0               # non-padding tokens seen (all ranks)
    best: Optional[BestCheckpoint] = None  # early stopping and the best weights' folder
    last_loss: Optional[float] = None
    evals: list = field(default_factory=list)
    mlflow_run_id: Optional[str] = None
    fingerprint: str = ""

    @property
    def stopped_early(self) -> bool:
        return self.best is not None and self.best.stop

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        saved = json.loads(text)
        return cls(**{**saved, "best": BestCheckpoint(**saved["best"]) if saved.get("best") else None})


@dataclass
class ValidationContext:
    """What an evaluator gets: the model in eval mode, its tokenizer and kind, and the config."""

    model: torch.nn.Module
    tokenizer: Any
    kind: str
    cfg: PipelineConfig
    step: int
    device: torch.device
    valid: pd.DataFrame           # the validation examples (corpus rows)
    backbone: Backbone


Evaluator = Callable[[ValidationContext], dict]
Callback = Callable[[str, TrainState], None]


# ---------------------------------------------------------------- data and plan
def load_examples(cfg: PipelineConfig, tasks: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(train examples, valid examples, the corpus manifest): valid capped at
    `train.max_valid_examples`, drawn with the pipeline seed so every train seed selects on the
    same examples."""
    corpus, manifest = read_corpus(cfg, tasks)
    train_df = corpus[corpus["split"] == "train"].reset_index(drop=True)
    valid_df = corpus[corpus["split"] == "valid"]
    limit = cfg.train.max_valid_examples
    if limit and len(valid_df) > limit:
        valid_df = valid_df.sample(n=limit, random_state=cfg.seed).sort_index()
    if train_df.empty:
        raise ValueError(f"the corpus has no training examples for tasks {tasks}")
    return train_df, valid_df.reset_index(drop=True), manifest


def epoch_order(task_index: dict[str, np.ndarray], weights: dict[str, float], seed: int, epoch: int) -> np.ndarray:
    """Example indices of one epoch: each task drawn `weight` x its size, then shuffled."""
    rng = np.random.default_rng([seed, 1_000_003, epoch])
    parts = []
    for task in sorted(task_index):
        idx, w = task_index[task], weights.get(task, 1.0)
        count = int(round(w * len(idx)))
        whole, rest = divmod(count, len(idx)) if len(idx) else (0, 0)
        parts += [idx] * whole
        if rest:
            parts.append(np.sort(rng.choice(idx, size=rest, replace=False)))
    order = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return order[rng.permutation(len(order))]


@dataclass
class EncodedCorpus:
    train: Encoded
    valid: Encoded
    task_index: dict[str, np.ndarray]  # each task's train examples
    weights: dict[str, float]          # each task's examples an epoch, as a multiple of its size
    lengths: np.ndarray                # tokens each train example costs: encoder + decoder, or the sequence
    n_targets: np.ndarray              # supervised tokens of each train example


def encode_corpus(cfg: PipelineConfig, tokenizer, kind: str, train_df: pd.DataFrame, valid_df: pd.DataFrame,
                  tasks: Sequence[str]) -> EncodedCorpus:
    """The examples as token ids, with what the epoch mix and the step's loss weighting need."""
    prompted_cfg = cfg.model.prompted

    def encode(df: pd.DataFrame) -> Encoded:
        return encode_examples(tokenizer, kind, df["input_text"].tolist(), df["target_text"].tolist(),
                               prompted_cfg.max_input_length, prompted_cfg.max_target_length)

    train = encode(train_df)
    task_index = {t: np.flatnonzero(train_df["task"].to_numpy() == t) for t in tasks}
    lengths = np.array([len(x) for x in train.input_ids], dtype=np.int64)
    if kind == "seq2seq":
        lengths += np.array([len(x) for x in train.labels], dtype=np.int64)
    return EncodedCorpus(train, encode(valid_df), {t: i for t, i in task_index.items() if len(i)},
                         {t: getattr(cfg.corpus.tasks, t).weight for t in tasks}, lengths,
                         np.array([int((x != -100).sum()) for x in train.labels], dtype=np.int64))


@dataclass
class StepPlan:
    micro_per_epoch: int          # micro-batches of this rank each epoch
    steps_per_epoch: int
    total_steps: int


def plan_steps(examples_per_epoch: int, prompted_cfg, train_cfg, world: int) -> StepPlan:
    """How many micro-batches and optimizer steps an epoch and the whole training take."""
    micro = math.ceil(examples_per_epoch / prompted_cfg.batch_size) // world
    if micro == 0:
        raise ValueError(f"{examples_per_epoch} examples per epoch make no batch of {prompted_cfg.batch_size} on {world} ranks")
    per_epoch = math.ceil(micro / prompted_cfg.grad_accum)
    total = per_epoch * train_cfg.epochs
    return StepPlan(micro, per_epoch, min(total, train_cfg.max_steps) if train_cfg.max_steps else total)


def _load_evaluator(spec: str) -> Evaluator:
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"evaluator {spec!r} must look like 'package.module:function'")
    return getattr(importlib.import_module(module), name)


def train_fingerprint(cfg: PipelineConfig, corpus_hash: str) -> str:
    train_settings = {k: v for k, v in cfg.train.model_dump(mode="json").items() if k not in _NO_EFFECT}
    model = cfg.model.model_dump(mode="json")
    model["prompted"] = {k: v for k, v in model["prompted"].items() if k not in _NO_EFFECT_PROMPTED}
    blob = json.dumps({"train": train_settings, "model": model,
                       "corpus": cfg.corpus.model_dump(mode="json"), "corpus_hash": corpus_hash,
                       "identifiers": cfg.identifiers.model_dump(mode="json"), "seed": cfg.seed},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- checkpoints
def _checkpoints(root: Path) -> list[Path]:
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if re.fullmatch(r"step-\d{8}", p.name) and (p / STATE_FILE).exists())


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack([s for s in torch.cuda.get_rng_state_all()]) if torch.cuda.device_count() else None
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def save_checkpoint(root: Path, state: TrainState, model, optimizer, scaler, tokenizer, keep: int) -> Path:
    target = root / f"step-{state.step:08d}"
    with atomic_dir(target) as stage:
        save_model(model, str(stage / "model.safetensors"))
        torch.save(optimizer.state_dict(), stage / "optimizer.pt")
        torch.save(_rng_state(), stage / "rng.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), stage / "scaler.pt")
        tokenizer.save_pretrained(stage / "tokenizer")
        (stage / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state), indent=1))
    for old in _checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(path: Path, model, optimizer, scaler, device) -> TrainState:
    load_model(model, str(path / "model.safetensors"), device=str(device))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    if scaler is not None and (path / "scaler.pt").exists():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    _set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return TrainState.from_json((path / STATE_FILE).read_text())


def resume_point(root: Path, fingerprint: str, resume: bool, dist: Dist) -> Optional[Path]:
    """The last checkpoint under `root` of the same config and corpus (None: start over, and
    what is there of another config is removed)."""
    last = None
    found = _checkpoints(root) if resume else []
    if found:
        saved = json.loads((found[-1] / STATE_FILE).read_text())
        if saved.get("fingerprint") == fingerprint:
            last = found[-1]
        elif dist.main:
            log.warning("checkpoints under %s are of another config or corpus: starting over", root)
    if last is None and dist.main and root.exists():
        shutil.rmtree(root)
    dist.barrier()
    return last


# ---------------------------------------------------------------- validation
@torch.no_grad()
def validation_loss(model, enc: Encoded, tasks: Sequence[str], pad_id: int, kind: str, batch_size: int,
                    device, autocast, dist: Dist) -> dict[str, float]:
    """Token-weighted loss over the validation examples, overall and per task."""
    model.eval()
    sums: dict[str, list[float]] = {}
    tasks = np.asarray(tasks)
    for task in sorted(set(tasks.tolist())):
        idx = np.flatnonzero(tasks == task)[dist.rank::dist.world]
        loss_sum, n_tok = 0.0, 0
        for i in range(0, len(idx), batch_size):
            batch = {k: v.to(device) for k, v in collate(enc, idx[i: i + batch_size], pad_id, kind).items()}
            n = n_target_tokens(batch)
            with autocast():
                loss = model(**batch).loss
            loss_sum += float(loss) * n
            n_tok += n
        sums[task] = [loss_sum, n_tok]
    keys = sorted(sums)
    flat = dist.sum([x for k in keys for x in sums[k]], device)
    out, total, tokens = {}, 0.0, 0
    for j, k in enumerate(keys):
        s, n = flat[2 * j], flat[2 * j + 1]
        if n:
            out[f"valid/{k}/loss"] = s / n
        total, tokens = total + s, tokens + n
    if tokens:
        out["valid/loss"] = total / tokens
    model.train()
    return out


# ---------------------------------------------------------------- the step
def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def run_train(cfg: PipelineConfig, evaluators: Sequence[Evaluator] = (),
              callbacks: Sequence[Callback] = ()) -> dict:
    """corpus -> models/<run>/ (weights + tokenizer + gensar_model.json), logged to MLflow."""
    t_start = time.perf_counter()
    train_cfg, prompted_cfg = cfg.train, cfg.model.prompted
    seed = train_seed(cfg)
    if train_cfg.num_threads:
        torch.set_num_threads(train_cfg.num_threads)
    dist = dist_setup(train_cfg.device)
    device = pick_device(train_cfg.device, dist.local_rank)
    evaluators = list(evaluators) + [_load_evaluator(s) for s in prompted_cfg.evaluators]
    track = dist.main and cfg.tracking.enabled  # rank 0 alone talks to MLflow

    # ---- data; is there a checkpoint of this config to resume?
    tasks = enabled_tasks(cfg.corpus)
    train_df, valid_df, manifest = load_examples(cfg, tasks)
    fingerprint = train_fingerprint(cfg, manifest["content_hash"])
    wh = Warehouse(cfg.warehouse)
    name = run_name(cfg, tasks, backbone_label(cfg.model))
    ckpt_root = wh.path("checkpoints", run_slug(name))
    last = resume_point(ckpt_root, fingerprint, prompted_cfg.resume, dist)

    # ---- model and encoded examples
    saved_tokenizer = AutoTokenizer.from_pretrained(str(last / "tokenizer")) if last is not None else None
    scratch = prompted_cfg.backbone == "t5-scratch"  # its tokenizer is learnt from the corpus
    texts = pd.concat([train_df["input_text"], train_df["target_text"]]) if scratch else None
    backbone = load_backbone(cfg, corpus_texts=texts, tokenizer=saved_tokenizer, seed=seed)
    tokenizer, kind = backbone.tokenizer, backbone.kind
    pad_id = tokenizer.pad_token_id
    model = backbone.model.to(device)
    model.train()
    data = encode_corpus(cfg, tokenizer, kind, train_df, valid_df, tasks)
    enc_train, enc_valid, task_index, weights = data.train, data.valid, data.task_index, data.weights

    # ---- optimizer, schedule, precision; the state to start from
    plan = plan_steps(len(epoch_order(task_index, weights, seed, 0)), prompted_cfg, train_cfg, dist.world)
    total_steps = plan.total_steps
    optimizer = torch.optim.AdamW(_param_groups(model, train_cfg.weight_decay), lr=train_cfg.lr, betas=(0.9, 0.98),
                                  eps=1e-8, fused=device.type == "cuda")
    warmup = min(train_cfg.warmup_steps, max(0, total_steps - 1))
    dtype = amp_dtype(device, train_cfg.mixed_precision)
    amp = lambda: autocast(device, dtype)  # noqa: E731
    scaler = grad_scaler(dtype)
    torch.manual_seed(seed + dist.rank)
    state = TrainState(fingerprint=fingerprint,
                       best=BestCheckpoint(str(ckpt_root / "best"), prompted_cfg.metric_mode, train_cfg.patience))
    if last is not None:
        state = load_checkpoint(last, model, optimizer, scaler, device)
        log.info("resuming %s from %s (step %d)", name, last.name, state.step)
    resumed_from = state.step if last is not None else None
    ddp_model = model
    if dist.world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    def validate() -> dict:
        """The valid loss and the evaluators' numbers; the best weights kept by `prompted_cfg.metric`."""
        metrics = validation_loss(model, enc_valid, valid_df["task"].tolist(), pad_id, kind,
                                  prompted_cfg.batch_size, device, amp, dist) if len(valid_df) else {}
        if evaluators and dist.main:
            model.eval()
            ctx = ValidationContext(model=model, tokenizer=tokenizer, kind=kind, cfg=cfg, step=state.step,
                                    device=device, valid=valid_df, backbone=backbone)
            for fn in evaluators:
                metrics.update(fn(ctx) or {})
            model.train()
        metrics = dist.broadcast(metrics)
        if not metrics:
            return metrics
        if prompted_cfg.metric not in metrics:
            raise KeyError(f"model.prompted.metric {prompted_cfg.metric!r} is not among the validation metrics "
                           f"{sorted(metrics)}")
        state.best.record(state.step, float(metrics[prompted_cfg.metric]), model if dist.main else None)
        state.evals.append({"step": state.step, **{k: float(v) for k, v in metrics.items()}})
        if track:
            tracking.log_metrics({**metrics, "valid/best": state.best.best}, step=state.step)
        for cb in callbacks:
            cb("eval", state)
        return metrics

    def checkpoint() -> None:
        if dist.main:
            save_checkpoint(ckpt_root, state, model, optimizer, scaler, tokenizer, prompted_cfg.keep_checkpoints)
        dist.barrier()
        for cb in callbacks:
            cb("checkpoint", state)

    # ---- the loop, in its MLflow run (a resumed training continues its run)
    tags = {"gensar.backbone": backbone.label, "gensar.tasks": "+".join(tasks), "gensar.kind": kind,
            "gensar.formulation": "prompted"}
    params = {"derived.run_name": name, "derived.total_steps": total_steps,
              "derived.steps_per_epoch": plan.steps_per_epoch, "derived.train_examples": len(train_df),
              "derived.valid_examples": len(valid_df), "derived.world_size": dist.world,
              "derived.device": device.type, "derived.kind": kind,
              "derived.parameters": sum(p.numel() for p in model.parameters()),
              "derived.trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    run_ctx = training_run(cfg, name, tags, params, run_id=state.mlflow_run_id) if track else contextlib.nullcontext()
    t_loop = time.perf_counter()
    tokens_at_start = state.tokens
    with run_ctx as run:
        if track:
            state.mlflow_run_id = run.info.run_id
            if resumed_from is not None:
                tracking.set_tags({"gensar.resumed_from_step": resumed_from})
        bar = tqdm(total=total_steps, initial=state.step, desc=f"train {name}",
                   disable=not (train_cfg.progress and dist.main), dynamic_ncols=True)
        window_loss, window_n, window_tok, window_t = 0.0, 0, 0, time.perf_counter()
        try:
            while state.step < total_steps and not state.stopped_early:
                order = epoch_order(task_index, weights, seed, state.epoch)
                micro = [order[i: i + prompted_cfg.batch_size] for i in range(0, len(order), prompted_cfg.batch_size)]
                micro = micro[dist.rank::dist.world][:plan.micro_per_epoch]
                while state.micro < len(micro) and state.step < total_steps:
                    group = micro[state.micro: state.micro + prompted_cfg.grad_accum]
                    lr = lr_at(state.step, total_steps, train_cfg.lr, warmup, train_cfg.schedule, train_cfg.min_lr_ratio)
                    step_loss = optimizer_step(ddp_model, model, optimizer, scaler, enc_train, group, data.n_targets,
                                               pad_id, kind, device, amp, lr, train_cfg.max_grad_norm, dist)
                    state.micro += len(group)
                    state.step += 1
                    step_tokens = int(sum(data.lengths[b].sum() for b in group)) * dist.world
                    state.tokens += step_tokens
                    state.last_loss = step_loss
                    window_loss, window_n, window_tok = window_loss + step_loss, window_n + 1, window_tok + step_tokens
                    bar.update(1)
                    bar.set_postfix(loss=f"{step_loss:.3f}", epoch=state.epoch)
                    if track and (state.step % train_cfg.log_every == 0 or state.step == total_steps):
                        now = time.perf_counter()
                        tracking.log_metrics({"train/loss": window_loss / window_n, "train/lr": lr,
                                              "train/tokens_per_s": window_tok / max(1e-9, now - window_t),
                                              "train/epoch": state.epoch + state.micro / len(micro)}, step=state.step)
                        window_loss, window_n, window_tok, window_t = 0.0, 0, 0, now
                    epoch_done = state.micro >= len(micro)
                    if (train_cfg.eval_every and state.step % train_cfg.eval_every == 0) or epoch_done \
                            or state.step == total_steps:
                        validate()
                    if epoch_done:
                        state.epoch, state.micro = state.epoch + 1, 0
                    if state.step % prompted_cfg.save_every == 0 or epoch_done or state.step == total_steps \
                            or state.stopped_early:
                        checkpoint()
                    for cb in callbacks:
                        cb("step", state)
                    if state.stopped_early:
                        break
            seconds = time.perf_counter() - t_loop

            # ---- the final model: the best weights by the validation metric (else the last)
            state.best.restore(model, device)
            out_dir = wh.path("models", run_slug(name))
            result = {
                "run_name": name, "model_dir": str(out_dir), "mlflow_run_id": state.mlflow_run_id,
                "tasks": tasks, "kind": kind, "backbone": backbone.label, "device": str(device),
                "world_size": dist.world, "steps": state.step, "total_steps": total_steps,
                "epochs_done": state.epoch, "stopped_early": state.stopped_early,
                "resumed_from_step": resumed_from, "train/final_loss": state.last_loss,
                "best_metric": state.best.best, "best_step": state.best.best_step, "metric": prompted_cfg.metric,
                "tokens": state.tokens, "train/tokens_per_s": (state.tokens - tokens_at_start) / max(1e-9, seconds),
                "train_examples": len(train_df), "valid_examples": len(valid_df),
                "loop_seconds": round(seconds, 2),
            }
            if state.evals:
                result.update({k: v for k, v in state.evals[-1].items() if k.startswith("valid/")})
            if dist.main:
                meta = {"run_name": name, "tasks": tasks, "identifiers": cfg.identifiers.model_dump(mode="json"),
                        "max_input_length": prompted_cfg.max_input_length, "max_target_length": prompted_cfg.max_target_length,
                        "corpus_hash": manifest["content_hash"]}
                final = {"final/steps": state.step, "final/tokens_per_s": result["train/tokens_per_s"],
                         **({"final/best_metric": state.best.best} if state.best.best is not None else {})}
                save_model_folder(cfg, out_dir, backbone, meta, {"evals": state.evals}, result, track, final)
                shutil.rmtree(ckpt_root, ignore_errors=True)
            dist.barrier()
        finally:
            bar.close()
    result["seconds"] = round(time.perf_counter() - t_start, 2)
    log.info("train: %s", {k: result[k] for k in ("run_name", "steps", "best_metric", "seconds")})
    return result


def optimizer_step(ddp_model, model, optimizer, scaler, enc: Encoded, group: list, n_targets: np.ndarray,
                   pad_id: int, kind: str, device, amp, lr: float, max_grad_norm: Optional[float], dist: Dist) -> float:
    """One optimizer step over the micro-batches `group` (gradients accumulated, DDP syncing on the
    last); returns the step's loss, the token-weighted mean over the whole step."""
    for g in optimizer.param_groups:
        g["lr"] = lr
    n_target = int(sum(n_targets[b].sum() for b in group))
    step_loss = 0.0
    for j, idx in enumerate(group):
        batch = {k: v.to(device, non_blocking=True) for k, v in collate(enc, idx, pad_id, kind).items()}
        n = n_target_tokens(batch)
        sync = j == len(group) - 1 or dist.world == 1
        with contextlib.nullcontext() if sync else ddp_model.no_sync():
            with amp():
                loss = ddp_model(**batch).loss
            scaled = loss * (n / max(1, n_target))
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        step_loss += loss.detach().item() * n / max(1, n_target)
    clip_and_step(model, optimizer, scaler, max_grad_norm)
    optimizer.zero_grad(set_to_none=True)
    return step_loss
