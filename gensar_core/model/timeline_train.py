"""Training of the timeline model (model/timeline.py), read top to bottom like nanoGPT's train.py.

    data      every user's train events as one token timeline; windows of `model.timeline.max_len`
              tokens, re-cut each epoch, batched by length (little padding); plus one ad-hoc
              search window (pseudo-query -> semantic ID) per item and epoch
    model     a small Llama (RoPE, RMSNorm, SwiGLU) from scratch over a word-level vocabulary
    step      next-token cross-entropy on the supervised tokens, AdamW, warm-up + cosine, gradient
              clipping; bf16 autocast on a CPU with native bf16 (1.6x float32 there), float32 on
              one without (where bf16 is emulated: 2.2x slower, `bench/precision.py`); the
              schedule, precision, early stopping and saving are model/training.py's
    validate  every `train.eval_every` steps: NDCG@10 of both tasks on the valid split, full
              ranking with history banned in the beam, exactly as `evaluate` ranks
    keep      the best validation checkpoint; stop after `train.patience` evaluations without gain
    save      the best weights, tokenizer and gensar_model.json into models/<run>/, atomically;
              everything to MLflow

Tasks: `corpus.tasks.rec/search/query` switch the loss on the collaborative IDs, the semantic IDs
and the query words of the timeline (a switched-off task's events stay in as context);
`corpus.tasks.adhoc` adds the ad-hoc windows. `corpus.id_scheme=semantic` gives TIGER-style
single IDs as for the prompted recipe.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from gensar_core import tracking
from gensar_core.config import PipelineConfig
from gensar_core.devices import pick_device
from gensar_core.evaluate.context import EvalContext, user_events
from gensar_core.evaluate.metrics import ndcg_at_k
from gensar_core.identifiers.checkpoint import load_quantiser
from gensar_core.identifiers.naming import token_letters
from gensar_core.model.backbone import Backbone, backbone_label
from gensar_core.model.corpus import apply_id_scheme, enabled_tasks, item_identifier_map, pseudo_queries
from gensar_core.model.distributed import Dist, all_reduce_grads, dist_setup
from gensar_core.model.generative_ranker import GenerativeRanker, ranker_settings
from gensar_core.model.runs import run_name, run_slug, train_seed
from gensar_core.model.timeline import (SEARCH_ID, TimelineCodec, batches, build_tokenizer, collate_windows,
                                        kind_weights, supervised_kinds, training_windows)
from gensar_core.model.training import (BestCheckpoint, amp_dtype, autocast, clip_and_step, grad_scaler, lr_at,
                                        save_model_folder, training_run)
from gensar_core.model.vocab import added_tokens
from gensar_core.storage import Warehouse

log = logging.getLogger(__name__)
VALID_TASKS = ("rec", "search")
# the validation number the best checkpoint is kept by: the mean of the tasks' valid NDCG@10
SELECT_METRIC = "valid/ndcg@10"


# ---------------------------------------------------------------- data
@dataclass
class TimelineData:
    tokenizer: object
    codec: object
    timelines: list            # (ids, kinds, starts) per user
    adhoc: list                # (item_id, pseudo-query) pairs
    identifiers: pd.DataFrame  # with the id scheme applied
    kinds: tuple               # supervised token kinds


def load_data(cfg: PipelineConfig) -> TimelineData:
    wh = Warehouse(cfg.warehouse)
    train = wh.read("splits/train")
    identifiers = apply_id_scheme(wh.read("identifiers/items"), cfg.corpus.id_scheme)
    item_ids = item_identifier_map(identifiers)
    timeline_cfg = cfg.model.timeline
    tokenizer = build_tokenizer(train.loc[train["behavior"] == "search", "query"], added_tokens(cfg))
    codec = TimelineCodec.of(tokenizer, item_ids, timeline_cfg.history_ids)
    timelines = [codec.timeline(user) for user in user_events(train).values()]
    tasks = enabled_tasks(cfg.corpus)
    adhoc = []
    if "adhoc" in tasks and timeline_cfg.adhoc_per_item:
        items = wh.read("curated/items", ["item_id", "title", "text", "categories"])
        rng = np.random.default_rng([cfg.seed, 5])
        queries = pseudo_queries(items, train, cfg.corpus.max_pseudo_queries, rng)
        adhoc = [(str(item), q) for item, qs in queries.items() if str(item) in item_ids for q in qs]
    kinds = supervised_kinds(tasks)
    if not kinds and not adhoc:
        raise ValueError(f"tasks {tasks}: nothing for the timeline model to learn (enable rec, search or query)")
    return TimelineData(tokenizer, codec, timelines, adhoc, identifiers, kinds)


def epoch_windows(data: TimelineData, timeline_cfg, rng: np.random.Generator) -> list:
    """One epoch's training windows (`timeline_cfg`: model.timeline): the timelines re-cut, then
    `adhoc_per_item` ad-hoc windows per item."""
    windows = training_windows(data.timelines, timeline_cfg.max_len, rng, data.kinds) if data.kinds else []
    if data.adhoc and timeline_cfg.adhoc_per_item:
        by_item: dict[str, list[str]] = {}
        for item, query in data.adhoc:
            by_item.setdefault(item, []).append(query)
        for item in sorted(by_item):
            for q in rng.choice(by_item[item], size=timeline_cfg.adhoc_per_item):
                windows.append(data.codec.adhoc(str(q), item))
    return windows


def kind_loss_weights(data: TimelineData, timeline_cfg) -> Optional[np.ndarray]:
    """`model.timeline.loss_weights` as collate_windows takes them, over the kinds this training
    supervises (ad-hoc windows supervise search IDs); None when those weigh the same."""
    kinds = set(data.kinds) | ({SEARCH_ID} if data.adhoc and timeline_cfg.adhoc_per_item else set())
    return kind_weights(**timeline_cfg.loss_weights.model_dump(), kinds=sorted(kinds))


# ---------------------------------------------------------------- model
def build_model(tokenizer, model_cfg, seed: int):
    t = model_cfg.timeline
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=t.d_model, intermediate_size=t.d_ff,
                         num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                         num_key_value_heads=t.num_heads, max_position_embeddings=t.max_len + 8,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def projected(vectors: torch.Tensor, width: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """[N, dim] vectors mapped to [N, width] by a seeded random orthonormal projection (distances
    kept) and scaled to the embedding's init std."""
    projection, _ = torch.linalg.qr(torch.randn(width, vectors.shape[1], generator=generator))
    out = vectors @ projection.T
    return out / out.std().clamp_min(1e-8) * std


@torch.no_grad()
def init_id_embeddings(model, tokenizer, quantiser, seed: int) -> int:
    """Start each identifier token's embedding from its code vector in the quantiser: codes near
    each other in a codebook start near each other. A level's codebook [K, dim] is mapped to the
    model's width by `projected`. Returns the number of rows set."""
    spec = quantiser.spec
    letters = token_letters(spec.shared_levels, spec.specific_levels)
    levels = [(quantiser.shared, i, letter) for i, letter in enumerate(letters.shared)]
    levels += [(quantiser.semantic, i, letter) for i, letter in enumerate(letters.semantic)]
    levels += [(quantiser.collaborative, i, letter) for i, letter in enumerate(letters.collaborative)]
    weight = model.get_input_embeddings().weight
    vocab = tokenizer.get_vocab()
    generator = torch.Generator().manual_seed(seed)
    std = float(getattr(model.config, "initializer_range", 0.02))
    rows = 0
    for stack, level, letter in levels:
        vectors = projected(stack.codebooks[level].detach().float().cpu(), weight.shape[1], std, generator)
        for code in range(vectors.shape[0]):
            token = vocab.get(f"<{letter}_{code}>")
            if token is not None:
                weight[token] = vectors[code].to(weight.dtype)
                rows += 1
    return rows


def initial_model(tokenizer, model_cfg, wh: Warehouse, seed: int):
    """The model training starts from: seeded, with the identifier embeddings taken from the
    warehouse's quantiser when `model.timeline.init_ids_from_codes`."""
    model = build_model(tokenizer, model_cfg, seed)
    if model_cfg.timeline.init_ids_from_codes:
        folder = wh.path("identifiers", "quantiser")
        if not folder.exists():
            raise FileNotFoundError(f"model.timeline.init_ids_from_codes needs the quantiser that learn_identifiers "
                                    f"writes to {folder} (run that step, or set the option false)")
        rows = init_id_embeddings(model, tokenizer, load_quantiser(folder), seed)
        log.info("%d identifier token embeddings start from the quantiser's code vectors", rows)
    return model


def token_loss(model, batch: dict, denominator=None):
    """The batch's next-token loss: the mean over supervised tokens (Hugging Face's own), or with
    `loss_weights` (timeline.kind_weights) the weighted sum over the weights' sum. `denominator`:
    the global batch's (token count, or weight sum) under torchrun, where each process holds a share."""
    if "loss_weights" not in batch:
        kwargs = {"num_items_in_batch": torch.tensor(denominator)} if denominator is not None else {}
        return model(input_ids=batch["input_ids"], labels=batch["labels"], **kwargs).loss
    weights = batch["loss_weights"][:, 1:]
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], reduction="none")
    return (ce * weights).sum() / (weights.sum() if denominator is None else denominator)


def train_step(model, optimizer, batch: dict, lr: float, max_grad_norm: Optional[float], amp,
               dist: Dist = Dist(), scaler=None) -> float:
    """One optimizer step on `batch` (this process's share of the global batch under torchrun);
    returns the global batch's mean loss per supervised token (weighted, with `loss_weights`).
    `scaler`: fp16's loss scaling (training.grad_scaler)."""
    backward = (lambda x: scaler.scale(x).backward()) if scaler is not None else (lambda x: x.backward())
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    # right-padded windows under a causal mask: padding only ever follows the real tokens, so no
    # attention mask is needed (and sdpa takes its flash kernel)
    if dist.world == 1:
        with amp():
            loss = token_loss(model, batch)
        backward(loss)
    else:
        # each process sums its tokens' losses over the global count, and the gradients are
        # summed: exactly the one-process gradient of the global batch's mean
        if not len(batch["labels"]):
            share = 0
        elif "loss_weights" in batch:
            share = float(batch["loss_weights"][:, 1:].sum())
        else:
            share = int((batch["labels"][:, 1:] != -100).sum())
        total = dist.sum([share], batch["labels"].device)[0]
        if share:
            with amp():
                loss = token_loss(model, batch, total)
            backward(loss)
        else:  # a process with no window this step still joins the collectives
            loss = torch.zeros(())
        all_reduce_grads(model)
        loss = torch.tensor(dist.sum([float(loss.detach())], batch["labels"].device)[0])
    clip_and_step(model, optimizer, scaler, max_grad_norm)
    return float(loss.detach())


# ---------------------------------------------------------------- validation
def valid_cases(cfg: PipelineConfig, limit: Optional[int]) -> dict[str, pd.DataFrame]:
    """The valid cases training selects checkpoints on: at most `limit` a task, drawn with the
    pipeline seed, not the train seed, so the replicas of `evaluate.seeds` select on the same cases."""
    ctx = EvalContext(cfg)
    out = {}
    for task in VALID_TASKS:
        cases = ctx.cases("valid", task)
        if limit and len(cases) > limit:
            cases = cases.iloc[np.sort(np.random.default_rng([cfg.seed, 9]).choice(len(cases), limit, replace=False))]
        out[task] = cases.reset_index(drop=True)
    return out


def validate(ranker, cases: dict[str, pd.DataFrame], k: int = 10) -> dict[str, float]:
    """valid/{task}_ndcg@10 (full ranking, history banned) and their mean valid/ndcg@10."""
    ranker.model.eval()
    metrics = {}
    for task, df in cases.items():
        if task in ranker.tasks and len(df):
            lists = ranker.rank(df, task, k)
            metrics[f"valid/{task}_ndcg@{k}"] = ndcg_at_k(lists, df["target"].tolist(), k)
    ranker.model.train()
    scores = [v for v in metrics.values()]
    metrics[f"valid/ndcg@{k}"] = float(np.mean(scores)) if scores else 0.0
    return metrics


class WeightAverage:
    """An exponential moving average of a model's parameters, swapped in for validation. It starts
    at zero and is divided by 1 - decay^n after n updates (Adam's bias correction): an average of
    the trained weights alone, not of the random start, so a short training is averaged sensibly
    too; after a few hundred updates it is the plain average (0.99^900 = 1e-4)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.shadow = [torch.zeros_like(p, memory_format=torch.preserve_format).detach() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        for avg, p in zip(self.shadow, model.parameters()):
            avg.mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module):
        """The average in the model's parameters inside the block, the trained weights after."""
        params = list(model.parameters())
        trained = [p.detach().clone() for p in params]
        correction = 1 - self.decay ** max(1, self.updates)
        with torch.no_grad():
            for avg, p in zip(self.shadow, params):
                p.copy_(avg / correction)
        try:
            yield
        finally:
            with torch.no_grad():
                for weights, p in zip(trained, params):
                    p.copy_(weights)


# ---------------------------------------------------------------- the run
@dataclass
class Progress:
    step: int = 0
    epoch: int = 0
    evals: list = field(default_factory=list)
    supervised_tokens: int = 0
    tokens: int = 0
    losses: list = field(default_factory=list)  # the global batch's mean loss, every step
    started: float = field(default_factory=time.perf_counter)


def validate_and_keep(progress: Progress, best: BestCheckpoint, model, ranker, cases, average=None) -> dict:
    """Validate (the weight average when there is one), keep the weights when the mean valid
    NDCG@10 beats the best so far (`best`), and record the evaluation in `progress`."""
    with average.applied(model) if average else contextlib.nullcontext():
        metrics = validate(ranker, cases)
        best.record(progress.step, metrics[SELECT_METRIC], model)
    progress.evals.append({"step": progress.step, "epoch": progress.epoch,
                           "seconds": round(time.perf_counter() - progress.started, 2), **metrics})
    log.info("step %d (epoch %d): %s, best %.4f at step %d", progress.step, progress.epoch,
             {k: round(v, 4) for k, v in metrics.items()}, best.best, best.best_step)
    return metrics


def log_step(progress: Progress, loss: float, lr: float) -> None:
    elapsed = time.perf_counter() - progress.started
    tracking.log_metrics({"train/loss": loss, "train/lr": lr, "train/epoch": progress.epoch,
                          "train/supervised_tokens_per_s": progress.supervised_tokens / elapsed}, step=progress.step)


def planned_steps(cfg: PipelineConfig, data: TimelineData, seed: int, rng: np.random.Generator) -> tuple[int, int]:
    """(optimizer steps an epoch, steps in all): `train.epochs` of a first epoch's batches (cut
    with `seed`, batched with the training's `rng`), capped by `train.max_steps`."""
    train_cfg, t = cfg.train, cfg.model.timeline
    per_epoch = len(batches(epoch_windows(data, t, np.random.default_rng(seed)), t.tokens_per_batch, rng))
    total = per_epoch * train_cfg.epochs
    return per_epoch, min(train_cfg.max_steps, total) if train_cfg.max_steps else total


def run_train_timeline(cfg: PipelineConfig) -> dict:
    """splits + identifiers -> models/<run>/ (the best validation checkpoint), one MLflow run."""
    # ---- where, on what, with which seed
    t_start = time.perf_counter()
    train_cfg, model_cfg = cfg.train, cfg.model
    seed = train_seed(cfg)
    if train_cfg.num_threads:
        torch.set_num_threads(train_cfg.num_threads)
    dist = dist_setup(train_cfg.device)  # under torchrun: this process's share of every batch
    device = pick_device(train_cfg.device, dist.local_rank)
    tasks = enabled_tasks(cfg.corpus)
    name = run_name(cfg, tasks, backbone_label(model_cfg))
    wh = Warehouse(cfg.warehouse)
    track = cfg.tracking.enabled and dist.main  # rank 0 alone talks to MLflow

    # ---- data, model, and the ranker that validates it as evaluation will rank
    data = load_data(cfg)
    model = initial_model(data.tokenizer, model_cfg, wh, seed).to(device)
    model.train()
    source = {"formulation": "timeline", "max_len": model_cfg.timeline.max_len, **model_cfg.timeline.model_dump()}
    backbone = Backbone(model=model, tokenizer=data.tokenizer, kind="causal", label=backbone_label(model_cfg),
                        source=source)
    ranker = GenerativeRanker(backbone, data.identifiers, ranker_settings(cfg, validation=True),
                              tasks=[t for t in VALID_TASKS if t in tasks], name=name)
    cases = valid_cases(cfg, train_cfg.max_valid_examples) if dist.main else None

    # ---- optimizer, schedule, precision, what is kept
    rng = np.random.default_rng(seed)
    steps_per_epoch, total = planned_steps(cfg, data, seed, rng)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay, betas=(0.9, 0.98))
    dtype = amp_dtype(device, train_cfg.mixed_precision)
    amp = lambda: autocast(device, dtype)  # noqa: E731
    scaler = grad_scaler(dtype)
    log.info("training on %s in %s", device, dtype or torch.float32)
    eval_every = train_cfg.eval_every or steps_per_epoch
    loss_weights = kind_loss_weights(data, model_cfg.timeline)
    average = WeightAverage(model, model_cfg.timeline.ema_decay) if model_cfg.timeline.ema_decay else None
    best = BestCheckpoint(str(wh.path("checkpoints", run_slug(name), "best")), "max", train_cfg.patience)
    progress = Progress()

    def evaluate_and_keep() -> None:
        """Rank 0 validates and keeps the best weights; every process learns whether to stop."""
        nonlocal best
        if dist.main:
            metrics = validate_and_keep(progress, best, model, ranker, cases, average)
            if track:
                tracking.log_metrics({**metrics, "valid/best": best.best}, step=progress.step)
        best = dist.broadcast(best if dist.main else None)

    # ---- the loop
    params = {"derived.run_name": name, "derived.total_steps": total, "derived.steps_per_epoch": steps_per_epoch,
              "derived.users": len(data.timelines), "derived.parameters": sum(p.numel() for p in model.parameters())}
    tags = {"gensar.backbone": backbone.label, "gensar.tasks": "+".join(tasks), "gensar.kind": "causal",
            "gensar.formulation": "timeline"}
    with training_run(cfg, name, tags, params) if track else contextlib.nullcontext() as run:
        bar = tqdm(total=total, desc=f"train {name}", disable=not (train_cfg.progress and dist.main), dynamic_ncols=True)
        while progress.step < total and not best.stop:
            windows = epoch_windows(data, model_cfg.timeline, rng)
            for index in batches(windows, model_cfg.timeline.tokens_per_batch, rng):
                # every process draws the same global batch and trains on its share of the windows
                shard = index[dist.rank::dist.world]
                batch = collate_windows(windows, shard, data.tokenizer.pad_token_id, loss_weights,
                                        model_cfg.timeline.pad_batch_shape)
                batch = {k: v.to(device) for k, v in batch.items()}
                lr = lr_at(progress.step, total, train_cfg.lr, train_cfg.warmup_steps, train_cfg.schedule, train_cfg.min_lr_ratio)
                loss = train_step(model, optimizer, batch, lr, train_cfg.max_grad_norm, amp, dist, scaler)
                if average:
                    average.update(model)
                progress.step += 1
                progress.losses.append(loss)
                supervised, tokens = dist.sum([int((batch["labels"] != -100).sum()), batch["input_ids"].numel()], device)
                progress.supervised_tokens += int(supervised)
                progress.tokens += int(tokens)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", epoch=progress.epoch)
                if track and progress.step % train_cfg.log_every == 0:
                    log_step(progress, loss, lr)
                if progress.step % eval_every == 0 or progress.step == total:
                    evaluate_and_keep()
                if best.stop or progress.step >= total:
                    break
            progress.epoch += 1
        bar.close()
        seconds = time.perf_counter() - progress.started
        if not dist.main:  # rank 0 writes the model; the others are done
            dist.barrier()
            return {"run_name": name, "rank": dist.rank, "world_size": dist.world, "steps": progress.step,
                    "losses": progress.losses}

        # ---- the best weights, saved
        best.restore(model, device)
        best_eval = next((e for e in progress.evals if e["step"] == best.best_step), {})
        out_dir = wh.path("models", run_slug(name))
        result = {"run_name": name, "model_dir": str(out_dir), "formulation": "timeline", "tasks": tasks,
                  "steps": progress.step, "total_steps": total, "epochs_done": progress.epoch,
                  "stopped_early": best.stop, "best_metric": best.best, "best_step": best.best_step,
                  "world_size": dist.world, "metric": SELECT_METRIC, "loop_seconds": round(seconds, 2),
                  "train/supervised_tokens_per_s": progress.supervised_tokens / max(1e-9, seconds),
                  "train/tokens_per_s": progress.tokens / max(1e-9, seconds),
                  "mlflow_run_id": run.info.run_id if track else None,
                  **{k: v for k, v in best_eval.items() if k.startswith("valid/")}}
        meta = {"run_name": name, "tasks": tasks, "formulation": "timeline", "max_len": model_cfg.timeline.max_len,
                "history_ids": model_cfg.timeline.history_ids, "identifiers": cfg.identifiers.model_dump(mode="json")}
        save_model_folder(cfg, out_dir, backbone, meta, {"evals": progress.evals, "losses": progress.losses},
                          result, track, {"final/steps": progress.step, "final/best_metric": best.best})
        dist.barrier()
    result["seconds"] = round(time.perf_counter() - t_start, 2)
    log.info("train: %s", {k: result[k] for k in ("run_name", "steps", "best_metric", "best_step", "seconds")})
    return result
