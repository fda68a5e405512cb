"""Tuned baselines: SASRec and a query-aware SASRec, each chosen by a sweep on the valid split.

A baseline is only a fair bar when it gets the care the generative model got. Each setting of a
sweep trains with the same recipe:
- softmax cross-entropy over the whole catalogue at every position (embed/collaborative.py's
  windows, batched by length and cut to their longest window: product histories are short);
- a learning-rate schedule: one epoch of linear warm-up, then cosine decay to a tenth of the peak
  at `max_epochs` (model/training.py `lr_at`), and the generative model's precision rule
  (`train.mixed_precision`: bf16 on a CPU that computes it in hardware, about 1.5x faster here);
- validation after every epoch on the valid split's cases (every event before the case as input,
  the user's earlier items excluded, full catalogue; a seeded draw of `early_stop_cases`), early
  stopping after `patience` epochs and `patience_steps` optimizer steps without a better
  NDCG@10, the best epoch's weights kept.

The sweep's rows and its choice are scored on every valid case.

The sweep's best setting by valid NDCG@10 (recommendation for SASRec, search for the query-aware
model) is then trained at the other seeds (`train.ensemble_seeds`), the same seeds the generative
ensemble uses, so one model compares with one model and three with three.

`query-sasrec` (the personalised search baseline) is SASRec that also reads the query: the input at
each position adds a projection of the MiniLM vector of the query that led to the next event (the
same packaged encoder as the dense baseline), zeros where the next event is a recommendation. It
trains on the train split's searches and recommendations together, and ranks a search case from
the user's whole sequence plus the query.

Outputs: `<warehouse>/models/baselines/<name>/seed-<S>/` (safetensors + config.json + stats.json)
and `<warehouse>/models/baselines/<name>/sweep.json` (every setting's valid scores, epochs, time).
The SASRec of embed_collaborative (features/sasrec) is not changed by this: the identifiers and
the generative model read that one, and the tuned one is only the evaluation's bar.
"""
from __future__ import annotations

import copy
import itertools
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gensar_core.config import PipelineConfig, SASRecSweepConfig
from gensar_core.embed.collaborative import rank_metrics, training_windows
from gensar_core.embed.sasrec import PAD, SASRec, SASRecConfig, baseline_dir, save_sasrec, tuned_seeds
from gensar_core.evaluate.context import EvalContext
from gensar_core.model.training import amp_dtype, autocast, lr_at
from gensar_core.storage import atomic_dir, write_json_atomic

log = logging.getLogger(__name__)

SASREC, QUERY_SASREC = "sasrec", "query-sasrec"
# what each baseline is chosen and early-stopped on
SELECT_TASK = {SASREC: "rec", QUERY_SASREC: "search"}


@dataclass(frozen=True)
class SASRecSettings:
    """One point of a sweep: what a SASRec is and how it trains."""

    lr: float = 1e-3
    dropout: float = 0.2
    dim: int = 64
    layers: int = 2
    max_len: int = 50
    heads: int = 2
    batch_size: int = 256
    weight_decay: float = 0.0


def sweep_settings(sweep: SASRecSweepConfig, seed: int) -> list[SASRecSettings]:
    """The settings a sweep tries: the first of each grid axis (the reference), then a seeded draw
    of `sweep.settings - 1` other points of the grid, without repeats."""
    axes = {k: list(v) for k, v in sweep.grid.items()}
    reference = SASRecSettings(**{k: v[0] for k, v in axes.items()})
    points = [SASRecSettings(**dict(zip(axes, values))) for values in itertools.product(*axes.values())]
    others = [p for p in points if p != reference]
    rng = np.random.default_rng([seed, 11])
    chosen = [others[i] for i in sorted(rng.choice(len(others), min(sweep.settings - 1, len(others)), replace=False))]
    return [reference, *chosen]


# ---------------------------------------------------------------- data
@dataclass
class TrainEvents:
    """The train split as arrays: events grouped by user, oldest first."""

    sequences: list[np.ndarray]   # per user, the global indices of their events
    items: np.ndarray             # (E,) item_idx of each event
    next_query: np.ndarray        # (E,) row in `query_vectors` of the next event's query (0: none)
    query_vectors: np.ndarray     # (Q + 1, d) row 0 zeros


def train_events(ctx: EvalContext, with_queries: bool) -> TrainEvents:
    df = ctx.split("train").sort_values(["user_id", "ts", "position"], kind="stable")
    items = df["item_id"].map(ctx.item_index).to_numpy(dtype=np.int64)
    users = df["user_id"].to_numpy()
    bounds = np.flatnonzero(users[1:] != users[:-1]) + 1
    sequences = [s for s in np.split(np.arange(len(df)), bounds) if len(s)]
    next_query = np.zeros(len(df), dtype=np.int64)
    vectors = np.zeros((1, 1), dtype=np.float32)
    if with_queries:
        is_search = (df["behavior"] == "search").to_numpy() & df["query"].notna().to_numpy()
        texts = df["query"].where(is_search).astype(object).to_numpy()
        unique = sorted({t for t in texts[is_search]})
        row_of = {t: i + 1 for i, t in enumerate(unique)}
        query_row = np.array([row_of[t] if s else 0 for t, s in zip(texts, is_search)], dtype=np.int64)
        for seq in sequences:  # the query of the event after each event of the same user
            next_query[seq[:-1]] = query_row[seq[1:]]
        encoded = ctx.encode_queries(unique)
        vectors = np.concatenate([np.zeros((1, encoded.shape[1]), dtype=np.float32), encoded])
    return TrainEvents(sequences, items, next_query, vectors)


def case_next_queries(ctx: EvalContext, cases: pd.DataFrame, task: str) -> list[np.ndarray]:
    """For each case, the vectors of the query after each item of its `seq` (see SASRec.score)."""
    texts, spans = [], []
    for timeline, query in zip(cases["timeline"], cases["query"]):
        after = [e.get("query") if e.get("behavior") == "search" else None for e in list(timeline)[1:]]
        after.append(query if task == "search" else None)
        spans.append(after)
        texts += [t for t in after if t]
    vectors = dict(zip(texts, ctx.encode_queries(texts))) if texts else {}
    dim = ctx.semantic_vectors.shape[1]
    zero = np.zeros(dim, dtype=np.float32)
    return [np.stack([vectors[t] if t else zero for t in after]) if after else np.zeros((0, dim), np.float32)
            for after in spans]


@dataclass
class ValidCases:
    histories: list
    next_queries: Optional[list]
    targets: np.ndarray
    exclude: list


def valid_cases(ctx: EvalContext, task: str, with_queries: bool) -> ValidCases:
    cases = ctx.cases("valid", task)
    return ValidCases([list(s) for s in cases["seq"]],
                      case_next_queries(ctx, cases, task) if with_queries else None,
                      cases["target"].to_numpy(), list(cases["exclude"]))


def draw(valid: ValidCases, n: Optional[int], seed: int) -> ValidCases:
    """A seeded draw of `n` of the cases (all when `n` is None or not smaller)."""
    if n is None or len(valid.targets) <= n:
        return valid
    rows = np.sort(np.random.default_rng([seed, 29]).choice(len(valid.targets), n, replace=False))
    return ValidCases([valid.histories[i] for i in rows],
                      None if valid.next_queries is None else [valid.next_queries[i] for i in rows],
                      valid.targets[rows], [valid.exclude[i] for i in rows])


def valid_ndcg(model: SASRec, valid: ValidCases) -> float:
    if not len(valid.targets):
        return 0.0
    scores = model.score(valid.histories, next_queries=valid.next_queries)
    return rank_metrics(scores, valid.targets, valid.exclude, 10)["ndcg@10"]


# ---------------------------------------------------------------- training
def length_batches(windows: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[torch.Tensor]:
    """The epoch's windows in batches of similar length, each cut to its longest window, in a
    random order. Product catalogues have short histories (Amazon Office: median 7 items), so
    full-width windows would be mostly padding: grouping by length saves that compute."""
    lengths = (windows != PAD).sum(axis=1)
    order = np.lexsort((rng.random(len(windows)), lengths))  # by length, ties in random order
    batches = []
    for start in range(0, len(order), batch_size):
        rows = windows[order[start:start + batch_size]]
        width = int((rows != PAD).sum(axis=1).max())
        batches.append(torch.from_numpy(rows[:, rows.shape[1] - width:]))
    return [batches[i] for i in rng.permutation(len(batches))]


def fit_sasrec(events: TrainEvents, valid: ValidCases, num_items: int, settings: SASRecSettings,
               sweep: SASRecSweepConfig, seed: int, query_aware: bool, progress: bool = True,
               precision: str = "auto") -> tuple[SASRec, dict]:
    """One setting: train with the schedule, validate every epoch, keep the best epoch's weights.
    Returns the model (eval mode, float32) and {best_epoch, epochs, valid_ndcg10, seconds, curve}."""
    started = time.perf_counter()
    dtype = amp_dtype(torch.device("cpu"), precision)
    rng = np.random.default_rng(seed)
    item_of = torch.from_numpy(np.concatenate([[PAD], events.items + 1]))  # window id -> model item id
    query_of = torch.from_numpy(np.concatenate([[0], events.next_query]))
    query_table = torch.from_numpy(events.query_vectors)
    curve, best, best_state, bad, best_step = [], -1.0, None, 0, 0
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SASRec(SASRecConfig(num_items=num_items, dim=settings.dim, layers=settings.layers,
                                    heads=settings.heads, max_len=settings.max_len, dropout=settings.dropout,
                                    query_dim=events.query_vectors.shape[1] if query_aware else 0))
        opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        windows = training_windows(events.sequences, settings.max_len, rng)
        steps_per_epoch = max(1, -(-len(windows) // settings.batch_size))  # the count varies a little by epoch
        total, step = sweep.max_epochs * steps_per_epoch, 0
        bar = tqdm(range(sweep.max_epochs), desc=f"{'query-' if query_aware else ''}sasrec", unit="epoch",
                   disable=not progress)
        for epoch in bar:
            model.train()
            if epoch:
                windows = training_windows(events.sequences, settings.max_len, rng)
            for batch in length_batches(windows, settings.batch_size, rng):
                ids = item_of[batch]
                inputs, targets = ids[:, :-1], ids[:, 1:]
                with autocast(torch.device("cpu"), dtype):
                    queries = model.query_proj(query_table)[query_of[batch[:, :-1]]] if query_aware else None
                    logits = model.logits(model(inputs, queries))
                loss = F.cross_entropy(logits.float().reshape(-1, num_items), (targets - 1).reshape(-1),
                                       ignore_index=PAD - 1)
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, total, settings.lr, steps_per_epoch, "cosine", 0.1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
            score = valid_ndcg(model, valid)
            curve.append(round(score, 5))
            bar.set_postfix(valid_ndcg10=f"{score:.4f}", best=f"{max(best, score):.4f}")
            if not progress and epoch % 10 == 9:
                log.info("epoch %d: valid NDCG@10 %.4f (best %.4f)", epoch + 1, score, max(best, score))
            if score > best:
                best, best_state, bad, best_step = score, copy.deepcopy(model.state_dict()), 0, step
            else:
                bad += 1
                if bad >= sweep.patience and step - best_step >= sweep.patience_steps:
                    break
    model.load_state_dict(best_state)
    trace = {"best_epoch": int(np.argmax(curve)) + 1, "epochs": len(curve), "valid_ndcg10": round(best, 5),
             "seconds": round(time.perf_counter() - started, 2), "curve": curve}
    return model.eval(), trace


def parameter_count(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


# ---------------------------------------------------------------- the step
def tune_one(ctx: EvalContext, name: str, progress: bool = True) -> dict:
    """Sweep `name` on valid, train the winner at every seed, write its folder atomically."""
    cfg = ctx.cfg
    sweep = cfg.baselines.sasrec if name == SASREC else cfg.baselines.query_sasrec
    query_aware = name == QUERY_SASREC
    events = train_events(ctx, query_aware)
    valid = {task: valid_cases(ctx, task, query_aware) for task in ("rec", "search")}
    select = SELECT_TASK[name]
    # early stopping reads a draw of the valid cases (each epoch scores them all); the sweep's
    # choice reads every one
    stopping = draw(valid[select], sweep.early_stop_cases, cfg.seed)
    grid = sweep_settings(sweep, cfg.seed)
    if query_aware and cfg.baselines.query_sasrec_from_sasrec:
        chosen = baseline_dir(cfg.warehouse, SASREC) / "sweep.json"
        if chosen.exists():  # start from the architecture SASRec's sweep chose
            best = SASRecSettings(**json.loads(chosen.read_text())["chosen"])
            grid = [replace(best, lr=s.lr, dropout=s.dropout) for s in grid]
            grid = list(dict.fromkeys(grid))
    rows, winner = [], None
    for i, settings in enumerate(grid, 1):
        log.info("%s: setting %d of %d: %s", name, i, len(grid), settings)
        model, trace = fit_sasrec(events, stopping, ctx.n_items, settings, sweep, cfg.seed, query_aware, progress,
                                  cfg.train.mixed_precision)
        other = "search" if select == "rec" else "rec"
        rows.append({"settings": asdict(settings), f"valid_{select}_ndcg10": round(valid_ndcg(model, valid[select]), 5),
                     f"valid_{other}_ndcg10": round(valid_ndcg(model, valid[other]), 5),
                     "best_epoch": trace["best_epoch"], "epochs": trace["epochs"], "seconds": trace["seconds"],
                     "parameters": parameter_count(model)})
        log.info("%s: %s", name, rows[-1])
        if winner is None or rows[-1][f"valid_{select}_ndcg10"] > winner[0][f"valid_{select}_ndcg10"]:
            winner = (rows[-1], model, trace)  # ties: the earlier setting
    best_row, best_model, best_trace = winner
    settings = SASRecSettings(**best_row["settings"])
    trained = {}
    with atomic_dir(baseline_dir(cfg.warehouse, name)) as stage:
        for seed in tuned_seeds(cfg.seed, cfg.train.ensemble_seeds):
            # the sweep already trained the winner at the config's seed (the same weights on CPU)
            model, trace = (best_model, best_trace) if seed == cfg.seed else fit_sasrec(
                events, stopping, ctx.n_items, settings, sweep, seed, query_aware, progress, cfg.train.mixed_precision)
            save_sasrec(model, stage / f"seed-{seed}")
            trained[seed] = {**trace, "parameters": parameter_count(model)}
            write_json_atomic(stage / f"seed-{seed}" / "stats.json", {**trained[seed], "settings": asdict(settings)})
        summary = {"name": name, "selected_on": f"valid {select} NDCG@10, full catalogue", "chosen": asdict(settings),
                   "sweep": rows, "seeds": trained, "config": cfg.fingerprint()}
        write_json_atomic(stage / "sweep.json", summary)
    return summary


def run_tune_baselines(cfg: PipelineConfig, progress: bool = True) -> dict:
    """Step tune_baselines: splits + features -> models/baselines/{sasrec,query-sasrec}."""
    torch.set_num_threads(cfg.train.num_threads or torch.get_num_threads())
    ctx = EvalContext(cfg)
    out = {}
    for name in cfg.baselines.tune:
        started = time.perf_counter()
        summary = tune_one(ctx, name, progress)
        out[name] = {"chosen": summary["chosen"], "settings_tried": len(summary["sweep"]),
                     "seconds": round(time.perf_counter() - started, 1)}
        log.info("tune_baselines %s: %s", name, out[name])
    return out
