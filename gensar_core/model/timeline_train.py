"""Training of the timeline model (model/timeline.py), read top to bottom like nanoGPT's train.py.

    data      every user's train events as one token timeline; windows of `model.timeline.max_len`
              tokens, re-cut each epoch, batched by length (little padding); plus one ad-hoc
              search window (pseudo-query -> semantic ID) per item and epoch
    model     a small Llama (RoPE, RMSNorm, SwiGLU) from scratch over a word-level vocabulary
    step      next-token cross-entropy on the supervised tokens, AdamW, warm-up + cosine, gradient
              clipping; bf16 autocast on a CPU with native bf16 (1.6x float32 there), float32 on
              one without (where bf16 is emulated: 2.2x slower, `bench/precision.py`)
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
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from gensar_core import tracking
from gensar_core.config import PipelineConfig
from gensar_core.devices import pick_device
from gensar_core.model.distributed import Dist, all_reduce_grads, dist_setup
from gensar_core.storage import Warehouse, atomic_dir, write_json_atomic

log = logging.getLogger(__name__)
VALID_TASKS = ("rec", "search")
# the validation number each `model.timeline.select` keeps the best checkpoint by
SELECT = {"mean": "valid/ndcg@10", "geomean": "valid/geomean_ndcg@10"}


# ---------------------------------------------------------------- data
@dataclass
class TimelineData:
    tokenizer: object
    codec: object
    timelines: list            # (ids, kinds, starts) per user
    events: list               # the events each timeline is written from (dicts), per user
    adhoc: list                # (item_id, pseudo-query) pairs
    identifiers: pd.DataFrame  # with the id scheme applied
    kinds: tuple               # supervised token kinds


def load_data(cfg: PipelineConfig) -> TimelineData:
    from gensar_core.model.corpus import apply_id_scheme, enabled_tasks, item_identifier_map, pseudo_queries
    from gensar_core.evaluate.context import user_events
    from gensar_core.model.timeline import ALIGN, TimelineCodec, build_tokenizer, item_token, supervised_kinds
    from gensar_core.model.vocab import added_tokens

    wh = Warehouse(cfg.warehouse)
    train = wh.read("splits/train")
    identifiers = apply_id_scheme(wh.read("identifiers/items"), cfg.corpus.id_scheme)
    item_ids = item_identifier_map(identifiers)
    tcfg = cfg.model.timeline
    extra = added_tokens(cfg)
    if tcfg.item_tokens:
        extra += sorted(item_token(ids) for ids in item_ids.values())
    tokenizer = build_tokenizer(train.loc[train["behavior"] == "search", "query"], extra)
    codec = TimelineCodec.of(tokenizer, item_ids, tcfg.history_ids)
    events = list(user_events(train).values())
    timelines = [codec.timeline(user) for user in events]
    tasks = enabled_tasks(cfg.corpus)
    adhoc = []
    if "adhoc" in tasks and tcfg.adhoc_per_item:
        items = wh.read("curated/items", ["item_id", "title", "text", "categories"])
        rng = np.random.default_rng([cfg.seed, 5])
        queries = pseudo_queries(items, train, cfg.corpus.max_pseudo_queries, rng)
        adhoc = [(str(item), q) for item, qs in queries.items() if str(item) in item_ids for q in qs]
    # the align task supervises the codes history_ids writes (none without it)
    kinds = tuple(k for k in supervised_kinds(tasks)
                  if k != ALIGN or (tcfg.history_ids and tcfg.loss_weights.align > 0))
    if not kinds and not adhoc:
        raise ValueError(f"tasks {tasks}: nothing for the timeline model to learn (enable rec, search or query)")
    return TimelineData(tokenizer, codec, timelines, events, adhoc, identifiers, kinds)


def epoch_windows(data: TimelineData, tcfg, rng: np.random.Generator) -> list:
    """One epoch's training windows (`tcfg`: model.timeline): the timelines re-cut, with a share
    `search_as_rec` of the search events, drawn afresh, written as recommendation clicks when rec
    is trained; then `adhoc_per_item` ad-hoc windows per item."""
    from gensar_core.model.timeline import REC_ID, searches_as_rec, training_windows

    timelines = data.timelines
    if tcfg.search_as_rec and REC_ID in data.kinds:
        timelines = [data.codec.timeline(searches_as_rec(user, tcfg.search_as_rec, rng)) for user in data.events]
    windows = training_windows(timelines, tcfg.max_len, rng, data.kinds) if data.kinds else []
    if data.adhoc and tcfg.adhoc_per_item:
        by_item: dict[str, list[str]] = {}
        for item, query in data.adhoc:
            by_item.setdefault(item, []).append(query)
        for item in sorted(by_item):
            for q in rng.choice(by_item[item], size=tcfg.adhoc_per_item):
                windows.append(data.codec.adhoc(str(q), item))
    return windows


def kind_loss_weights(data: TimelineData, tcfg, scale: Optional[dict] = None) -> Optional[np.ndarray]:
    """`model.timeline.loss_weights`, each times its `scale` (by task, 1 if absent), as
    collate_windows takes them, over the kinds this training supervises (ad-hoc windows supervise
    search IDs); None when those weigh the same."""
    from gensar_core.model.timeline import SEARCH_ID, kind_weights

    kinds = set(data.kinds) | ({SEARCH_ID} if data.adhoc and tcfg.adhoc_per_item else set())
    weights = {task: w * (scale or {}).get(task, 1.0) for task, w in tcfg.loss_weights.model_dump().items()}
    return kind_weights(**weights, kinds=sorted(kinds))


# ---------------------------------------------------------------- model
def build_model(tokenizer, mcfg, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    t = mcfg.timeline
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=t.d_model, intermediate_size=t.d_ff,
                         num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                         num_key_value_heads=t.num_heads, max_position_embeddings=t.max_len + 8,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Llama has no dropout but on attention weights (which would take sdpa off its flash kernel):
    # these drop embedding features and each sublayer's output, in training only
    if t.embed_dropout:
        model.get_input_embeddings().register_forward_hook(output_dropout(t.embed_dropout))
    if t.resid_dropout:
        for layer in model.model.layers:
            layer.self_attn.register_forward_hook(output_dropout(t.resid_dropout))
            layer.mlp.register_forward_hook(output_dropout(t.resid_dropout))
    return model


def output_dropout(p: float):
    """A forward hook that applies dropout to a module's output (the first element of a tuple
    output, as attention returns (output, weights)) while the module is training."""
    def hook(module, args, out):
        if isinstance(out, tuple):
            return (torch.nn.functional.dropout(out[0], p, module.training),) + out[1:]
        return torch.nn.functional.dropout(out, p, module.training)
    return hook


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
    from gensar_core.identifiers.naming import token_letters

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


@torch.no_grad()
def init_item_embeddings(model, tokenizer, identifiers: pd.DataFrame, collaborative: pd.DataFrame, seed: int) -> int:
    """Start each item token's embedding from the item's collaborative vector (the SASRec item
    table its collaborative ID was learned from), mapped by `projected`. Returns the rows set."""
    from gensar_core.model.prompts import ItemIds
    from gensar_core.model.timeline import item_token

    weight = model.get_input_embeddings().weight
    vocab = tokenizer.get_vocab()
    vectors = dict(zip(collaborative["item_idx"].astype(int), collaborative["vector"]))
    rows = [(vocab.get(item_token(ItemIds(r.semantic_id, r.collaborative_id))), vectors.get(int(r.item_idx)))
            for r in identifiers.itertuples()]
    rows = [(token, v) for token, v in rows if token is not None and v is not None]
    if not rows:
        return 0
    std = float(getattr(model.config, "initializer_range", 0.02))
    matrix = torch.tensor(np.stack([np.asarray(v, np.float32) for _, v in rows]))
    out = projected(matrix, weight.shape[1], std, torch.Generator().manual_seed(seed + 1))
    weight[torch.tensor([token for token, _ in rows])] = out.to(weight.dtype)
    return len(rows)


def initial_model(tokenizer, mcfg, wh: Warehouse, seed: int, identifiers: pd.DataFrame):
    """The model training starts from: seeded, with the identifier embeddings taken from the
    warehouse's quantiser when `model.timeline.init_ids_from_codes`, and the item tokens' from the
    collaborative item vectors when `model.timeline.item_tokens` and `init_items_from_vectors`."""
    model = build_model(tokenizer, mcfg, seed)
    if mcfg.timeline.init_ids_from_codes:
        from gensar_core.identifiers.checkpoint import load_quantiser

        folder = wh.path("identifiers", "quantiser")
        if not folder.exists():
            raise FileNotFoundError(f"model.timeline.init_ids_from_codes needs the quantiser that learn_identifiers "
                                    f"writes to {folder} (run that step, or set the option false)")
        rows = init_id_embeddings(model, tokenizer, load_quantiser(folder), seed)
        log.info("%d identifier token embeddings start from the quantiser's code vectors", rows)
    if mcfg.timeline.item_tokens and mcfg.timeline.init_items_from_vectors:
        rows = init_item_embeddings(model, tokenizer, identifiers, wh.read("features/collaborative"), seed)
        log.info("%d item token embeddings start from the collaborative item vectors", rows)
    return model


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX). oneDNN reports bf16
    support on any AVX-512 CPU, but without these it converts in software: measured 2.2x slower
    than float32 for a training step on such a CPU, against 1.6x faster on one with them."""
    import torch.cpu

    return bool(torch.backends.mkldnn.is_available() and (torch.cpu._is_avx512_bf16_supported()
                                                          or torch.cpu._is_amx_tile_supported()))


def autocast(device: torch.device, mode: str):
    """bf16 autocast where it pays: on CUDA, and on a CPU with native bf16 (`native_cpu_bf16`);
    `no` turns it off, `bf16` forces it, `fp16` is for CUDA only."""
    if device.type == "cpu":
        if mode in ("no", "fp16") or (mode == "auto" and not native_cpu_bf16()):
            return contextlib.nullcontext()
    elif mode == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if mode == "fp16" else torch.bfloat16)


# ---------------------------------------------------------------- step
def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


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
               dist: Dist = Dist()) -> float:
    """One optimizer step on `batch` (this process's share of the global batch under torchrun);
    returns the global batch's mean loss per supervised token (weighted, with `loss_weights`)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    # right-padded windows under a causal mask: padding only ever follows the real tokens, so no
    # attention mask is needed (and sdpa takes its flash kernel)
    if dist.world == 1:
        with amp():
            loss = token_loss(model, batch)
        loss.backward()
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
            loss.backward()
        else:  # a process with no window this step still joins the collectives
            loss = torch.zeros(())
        all_reduce_grads(model)
        loss = torch.tensor(dist.sum([float(loss.detach())], batch["labels"].device)[0])
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    return float(loss.detach())


# ---------------------------------------------------------------- validation
def valid_cases(cfg: PipelineConfig, limit: Optional[int]) -> dict[str, pd.DataFrame]:
    """The valid cases training selects checkpoints on: at most `limit` a task, drawn with the
    pipeline seed, not the train seed, so the replicas of `evaluate.seeds` select on the same cases."""
    from gensar_core.evaluate.context import EvalContext

    ctx = EvalContext(cfg)
    out = {}
    for task in VALID_TASKS:
        cases = ctx.cases("valid", task)
        if limit and len(cases) > limit:
            cases = cases.iloc[np.sort(np.random.default_rng([cfg.seed, 9]).choice(len(cases), limit, replace=False))]
        out[task] = cases.reset_index(drop=True)
    return out


def validate(ranker, cases: dict[str, pd.DataFrame], k: int = 10) -> dict[str, float]:
    """valid/{task}_ndcg@10 (full ranking, history banned), their mean valid/ndcg@10 and their
    geometric mean valid/geomean_ndcg@10."""
    from gensar_core.evaluate.metrics import ndcg_at_k

    ranker.model.eval()
    metrics = {}
    for task, df in cases.items():
        if task in ranker.tasks and len(df):
            lists = ranker.rank(df, task, k)
            metrics[f"valid/{task}_ndcg@{k}"] = ndcg_at_k(lists, df["target"].tolist(), k)
    ranker.model.train()
    scores = [v for v in metrics.values()]
    metrics[f"valid/ndcg@{k}"] = float(np.mean(scores)) if scores else 0.0
    metrics[f"valid/geomean_ndcg@{k}"] = float(np.exp(np.mean(np.log(np.maximum(scores, 1e-9))))) if scores else 0.0
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


# ---------------------------------------------------------------- checkpointing
@dataclass
class Progress:
    step: int = 0
    epoch: int = 0
    best: float = -1.0
    best_step: int = -1
    bad_evals: int = 0
    evals: list = field(default_factory=list)
    supervised_tokens: int = 0
    tokens: int = 0
    losses: list = field(default_factory=list)  # the global batch's mean loss, every step
    task_best: dict = field(default_factory=dict)   # each validated task's best NDCG@10 so far
    task_scale: dict = field(default_factory=dict)  # each task's loss-weight factor (decay_stale_tasks)
    started: float = field(default_factory=time.perf_counter)


def validate_and_keep(progress: Progress, model, ranker, cases, select: str, ckpt, average=None) -> dict:
    """Validate (the weight average when there is one), save the weights to `ckpt` atomically when
    `select`'s number beats the best so far, and record the evaluation in `progress`."""
    from safetensors.torch import save_model

    with average.applied(model) if average else contextlib.nullcontext():
        metrics = validate(ranker, cases)
        value = metrics[SELECT[select]]
        improved = value > progress.best
        if improved:
            with atomic_dir(ckpt) as stage:
                save_model(model, str(stage / "model.safetensors"))
    progress.evals.append({"step": progress.step, "epoch": progress.epoch,
                           "seconds": round(time.perf_counter() - progress.started, 2), **metrics})
    if improved:
        progress.best, progress.best_step, progress.bad_evals = value, progress.step, 0
    else:
        progress.bad_evals += 1
    log.info("step %d (epoch %d): %s, best %.4f at step %d", progress.step, progress.epoch,
             {k: round(v, 4) for k, v in metrics.items()}, progress.best, progress.best_step)
    return metrics


def decay_stale_tasks(progress: Progress, metrics: dict, decay: float) -> None:
    """After a validation, multiply by `decay` the loss scale (`progress.task_scale`) of each task
    whose valid NDCG@10 did not beat its own best so far (`model.timeline.stale_task_decay`)."""
    for task in VALID_TASKS:
        value = metrics.get(f"valid/{task}_ndcg@10")
        if value is None:
            continue
        if value > progress.task_best.get(task, -math.inf):
            progress.task_best[task] = value
        elif decay < 1:
            progress.task_scale[task] = progress.task_scale.get(task, 1.0) * decay
            log.info("%s did not gain on valid: its loss weight is now %.3g of the configured",
                     task, progress.task_scale[task])


# ---------------------------------------------------------------- tracking
@contextlib.contextmanager
def start_tracking(cfg: PipelineConfig, name: str, tasks, label: str, params: dict):
    """The MLflow run of this training, with the config and `params` logged."""
    tracking.silence_mlflow_warnings()
    with tracking.start_run(cfg, name, {"gensar.step": "train", "gensar.backbone": label,
                                        "gensar.tasks": "+".join(tasks), "gensar.kind": "causal",
                                        "gensar.formulation": "timeline"}) as run:
        tracking.log_params_from_config(cfg)
        tracking.log_params(params)
        yield run


def log_step(progress: Progress, loss: float, lr: float) -> None:
    elapsed = time.perf_counter() - progress.started
    tracking.log_metrics({"train/loss": loss, "train/lr": lr, "train/epoch": progress.epoch,
                          "train/supervised_tokens_per_s": progress.supervised_tokens / elapsed}, step=progress.step)


# ---------------------------------------------------------------- the run
def run_train_timeline(cfg: PipelineConfig) -> dict:
    """splits + identifiers -> models/<run>/ (the best validation checkpoint), one MLflow run."""
    from safetensors.torch import load_model

    from gensar_core.model.backbone import Backbone, backbone_label
    from gensar_core.model.corpus import enabled_tasks
    from gensar_core.model.generative_ranker import GenerativeRanker, ranker_settings
    from gensar_core.model.timeline import batches, collate_windows
    from gensar_core.model.runs import run_name, run_slug, train_seed

    t_start = time.perf_counter()
    tcfg, mcfg = cfg.train, cfg.model
    seed = train_seed(cfg)
    if tcfg.num_threads:
        torch.set_num_threads(tcfg.num_threads)
    dist = dist_setup(tcfg.device)  # under torchrun: this process's share of every batch
    device = pick_device(tcfg.device, dist.local_rank)
    tasks = enabled_tasks(cfg.corpus)
    name = run_name(cfg, tasks, backbone_label(mcfg))
    wh = Warehouse(cfg.warehouse)

    data = load_data(cfg)
    model = initial_model(data.tokenizer, mcfg, wh, seed, data.identifiers).to(device)
    model.train()
    source = {"formulation": "timeline", "max_len": mcfg.timeline.max_len, **mcfg.timeline.model_dump()}
    backbone = Backbone(model=model, tokenizer=data.tokenizer, kind="causal", label=backbone_label(mcfg),
                        source=source)
    ranker = GenerativeRanker(backbone, data.identifiers, **ranker_settings(cfg, validation=True),
                              tasks=[t for t in VALID_TASKS if t in tasks], name=name)
    cases = valid_cases(cfg, tcfg.max_valid_examples) if dist.main else None

    rng = np.random.default_rng(seed)
    steps_per_epoch = len(batches(epoch_windows(data, mcfg.timeline, np.random.default_rng(seed)),
                                  mcfg.timeline.tokens_per_batch, rng))
    total = steps_per_epoch * tcfg.epochs if not tcfg.max_steps else min(tcfg.max_steps, steps_per_epoch * tcfg.epochs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=(0.9, 0.98))
    amp = lambda: autocast(device, tcfg.mixed_precision)  # noqa: E731
    with amp():
        log.info("training on %s in %s", device, torch.get_autocast_dtype(device.type)
                 if torch.is_autocast_enabled(device.type) else torch.float32)
    eval_every = tcfg.eval_every or steps_per_epoch
    loss_weights = kind_loss_weights(data, mcfg.timeline)
    average = WeightAverage(model, mcfg.timeline.ema_decay) if mcfg.timeline.ema_decay else None
    ckpt = wh.path("checkpoints", run_slug(name), "best")
    track = cfg.tracking.enabled and dist.main  # rank 0 alone talks to MLflow

    def evaluate_and_keep() -> None:
        """Rank 0 validates and keeps the best weights; every process learns whether to stop."""
        nonlocal loss_weights
        if dist.main:
            metrics = validate_and_keep(progress, model, ranker, cases, mcfg.timeline.select, ckpt, average)
            decay_stale_tasks(progress, metrics, mcfg.timeline.stale_task_decay)
            scales = {f"train/{task}_loss_scale": f for task, f in progress.task_scale.items()}
            progress.evals[-1].update(scales)
            if track:
                tracking.log_metrics({**metrics, **scales, "valid/best": progress.best}, step=progress.step)
        progress.bad_evals, progress.best_step, progress.task_scale = dist.broadcast(
            (progress.bad_evals, progress.best_step, progress.task_scale) if dist.main else None)
        loss_weights = kind_loss_weights(data, mcfg.timeline, progress.task_scale)

    params = {"derived.run_name": name, "derived.total_steps": total, "derived.steps_per_epoch": steps_per_epoch,
              "derived.users": len(data.timelines), "derived.parameters": sum(p.numel() for p in model.parameters())}
    with start_tracking(cfg, name, tasks, backbone.label, params) if track else contextlib.nullcontext() as run:
        bar = tqdm(total=total, desc=f"train {name}", disable=not (tcfg.progress and dist.main), dynamic_ncols=True)
        progress = Progress()
        stop = False
        while progress.step < total and not stop:
            windows = epoch_windows(data, mcfg.timeline, rng)
            for index in batches(windows, mcfg.timeline.tokens_per_batch, rng):
                # every process draws the same global batch and trains on its share of the windows
                shard = index[dist.rank::dist.world]
                batch = collate_windows(windows, shard, data.tokenizer.pad_token_id, loss_weights,
                                        mcfg.timeline.pad_batch_shape)
                batch = {k: v.to(device) for k, v in batch.items()}
                lr = lr_at(progress.step, total, tcfg.lr, tcfg.warmup_steps, tcfg.min_lr_ratio)
                loss = train_step(model, optimizer, batch, lr, tcfg.max_grad_norm, amp, dist)
                if average:
                    average.update(model)
                progress.step += 1
                progress.losses.append(loss)
                supervised, tokens = dist.sum([int((batch["labels"] != -100).sum()), batch["input_ids"].numel()], device)
                progress.supervised_tokens += int(supervised)
                progress.tokens += int(tokens)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", epoch=progress.epoch)
                if track and progress.step % tcfg.log_every == 0:
                    log_step(progress, loss, lr)
                if progress.step % eval_every == 0 or progress.step == total:
                    evaluate_and_keep()
                    if tcfg.patience and progress.bad_evals >= tcfg.patience:
                        stop = True
                if stop or progress.step >= total:
                    break
            progress.epoch += 1
        bar.close()
        seconds = time.perf_counter() - progress.started
        if not dist.main:  # rank 0 writes the model; the others are done
            dist.barrier()
            return {"run_name": name, "rank": dist.rank, "world_size": dist.world, "steps": progress.step,
                    "losses": progress.losses}

        if progress.best_step >= 0:
            load_model(model, str(ckpt / "model.safetensors"), device=str(device))
        model.eval()
        best_eval = next((e for e in progress.evals if e["step"] == progress.best_step), {})
        out_dir = wh.path("models", run_slug(name))
        result = {"run_name": name, "model_dir": str(out_dir), "formulation": "timeline", "tasks": tasks,
                  "steps": progress.step, "total_steps": total, "epochs_done": progress.epoch,
                  "stopped_early": stop, "best_metric": progress.best, "best_step": progress.best_step,
                  "world_size": dist.world,
                  "metric": SELECT[mcfg.timeline.select], "loop_seconds": round(seconds, 2),
                  "train/supervised_tokens_per_s": progress.supervised_tokens / max(1e-9, seconds),
                  "train/tokens_per_s": progress.tokens / max(1e-9, seconds),
                  "mlflow_run_id": run.info.run_id if track else None,
                  **{k: v for k, v in best_eval.items() if k.startswith("valid/")}}
        save_run(cfg, wh, out_dir, backbone, progress, result, track)
        dist.barrier()
    result["seconds"] = round(time.perf_counter() - t_start, 2)
    log.info("train: %s", {k: result[k] for k in ("run_name", "steps", "best_metric", "best_step", "seconds")})
    return result


def save_run(cfg: PipelineConfig, wh: Warehouse, out_dir: Path, backbone, progress: Progress, result: dict,
             track: bool) -> None:
    """The trained model (its best weights), tokenizer, gensar_model.json and training history
    into `out_dir` atomically, the metrics beside it, the folder to MLflow."""
    from gensar_core.model.backbone import save_trained
    from gensar_core.model.runs import log_model_artifacts

    with atomic_dir(out_dir) as stage:
        save_trained(backbone, stage, {"run_name": result["run_name"], "tasks": result["tasks"],
                                       "formulation": "timeline", "max_len": cfg.model.timeline.max_len,
                                       "history_ids": cfg.model.timeline.history_ids,
                                       "identifiers": cfg.identifiers.model_dump(mode="json"),
                                       "metrics": result, "config_fingerprint": cfg.fingerprint()})
        write_json_atomic(stage / "train_history.json", {"evals": progress.evals, "losses": progress.losses})
    if track:
        log_model_artifacts(cfg, wh, out_dir)
        tracking.log_metrics({"final/steps": progress.step, "final/best_metric": progress.best})
    write_json_atomic(wh.path("models", f"{out_dir.name}.metrics.json"), result)
