"""Collaborative item embeddings: a SASRec model trained on users' click sequences.

Each user's sequence interleaves both behaviours (recommendation clicks and clicks after a
search) in time order, so items clicked in similar contexts end up close whatever the channel.
The item table of the trained model is the collaborative embedding; the model itself is kept as
the SASRec baseline.

Training objective: softmax cross-entropy over the full catalogue at every position (predict the
next item). With a few thousand items this is cheap on a CPU and trains much faster and better
than SASRec's original one-sampled-negative binary loss. Each epoch cuts every user's sequence
into windows of `max_len` + 1 items from the end, with a fresh random boundary shift, so long
histories are fully used and the windows differ between epochs.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gensar_core.config import CollaborativeEmbedConfig, PipelineConfig
from gensar_core.devices import pick_device
from gensar_core.embed.sasrec import PAD, SASRec, SASRecConfig, load_sasrec, save_sasrec
from gensar_core.embed.vectors import vectors_table
from gensar_core.storage import Warehouse, atomic_dir, write_json_atomic, write_table

__all__ = [
    "SASRec", "load_sasrec", "save_sasrec", "user_sequences", "train_sasrec", "rank_metrics",
    "evaluate_next_item", "running_histories", "run_embed_collaborative",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- data
def user_sequences(events: pd.DataFrame, item_index: dict[str, int]) -> dict[str, list[int]]:
    """user_id -> item_idx of the user's events, ordered by (ts, position). Both behaviours."""
    known = events["item_id"].isin(item_index.keys())
    if not known.all():
        raise ValueError(f"{int((~known).sum())} events name items missing from curated/items")
    ev = events.sort_values(["user_id", "ts", "position"], kind="stable")
    idx = ev["item_id"].map(item_index).to_numpy(dtype=np.int64)
    users = ev["user_id"].to_numpy()
    out: dict[str, list[int]] = {}
    # users are contiguous after the sort: split at the boundaries
    bounds = np.flatnonzero(users[1:] != users[:-1]) + 1
    for chunk_users, chunk in zip(np.split(users, bounds), np.split(idx, bounds)):
        if len(chunk):
            out[str(chunk_users[0])] = chunk.tolist()
    return out


def running_histories(users: Sequence, values: Sequence, start: dict) -> list[list]:
    """For events sorted by user (then time): what each event's user had before it, as a list,
    that is the user's `start` list followed by the values of their earlier events here. A split
    with several events a user ranks each from everything before it."""
    out, so_far, current = [], [], object()
    for user, value in zip(users, values):
        if user != current:
            current, so_far = user, list(start.get(user, []))
        out.append(list(so_far))
        so_far.append(value)
    return out


def training_windows(sequences: Sequence[Sequence[int]], max_len: int, rng: np.random.Generator) -> np.ndarray:
    """(W, max_len + 1) left-padded windows of model ids (item_idx + 1), cut from the end.

    The newest window always ends at the last item; the others end at a boundary shifted by a
    random offset, so every transition is trained each epoch and window edges move.
    """
    width = max_len + 1
    rows = []
    for seq in sequences:
        ids = np.asarray(seq, dtype=np.int64) + 1
        n = len(ids)
        if n < 2:
            continue  # no (input, next item) pair
        ends = [n] + list(range(n - int(rng.integers(1, max_len + 1)), 1, -max_len))
        for end in ends:
            window = ids[max(0, end - width):end]
            row = np.zeros(width, dtype=np.int64)
            row[width - len(window):] = window
            rows.append(row)
    return np.stack(rows) if rows else np.zeros((0, width), dtype=np.int64)


# ---------------------------------------------------------------- training
def train_sasrec(
    sequences: Sequence[Sequence[int]],
    num_items: int,
    cfg: CollaborativeEmbedConfig,
    seed: int = 2025,
    progress: bool = True,
) -> tuple[SASRec, list[float]]:
    """Train on item_idx sequences; returns the model (eval mode) and the mean loss per epoch.

    Same seed, data and config give the same weights on CPU. The global torch RNG is forked, so
    training does not disturb the caller's random state.
    """
    device = pick_device(cfg.device)
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = SASRec(SASRecConfig(num_items=num_items, dim=cfg.dim, layers=cfg.layers,
                                    heads=cfg.heads, max_len=cfg.max_len, dropout=cfg.dropout))
        model.to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        bar = tqdm(range(cfg.epochs), desc="sasrec", unit="epoch", disable=not progress)
        for _ in bar:
            windows = training_windows(sequences, cfg.max_len, rng)
            windows = torch.from_numpy(windows[rng.permutation(len(windows))])
            total, count = 0.0, 0
            for start in range(0, len(windows), cfg.batch_size):
                batch = windows[start:start + cfg.batch_size].to(device)
                inputs, targets = batch[:, :-1], batch[:, 1:]
                logits = model.logits(model(inputs))
                # targets are model ids; column j of the logits is model id j + 1
                loss = F.cross_entropy(logits.reshape(-1, num_items), (targets - 1).reshape(-1),
                                       ignore_index=PAD - 1, reduction="sum")
                n = int((targets != PAD).sum())
                opt.zero_grad(set_to_none=True)
                (loss / max(n, 1)).backward()
                opt.step()
                total, count = total + loss.item(), count + n
            losses.append(total / max(count, 1))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return model.eval(), losses


# ---------------------------------------------------------------- evaluation
def rank_metrics(scores: np.ndarray, targets: Sequence[int], exclude: Sequence[Sequence[int]], k: int = 10) -> dict:
    """HR@k and NDCG@k of full-catalogue ranking, one target per row.

    `exclude[i]` (e.g. the user's training items) are removed from row i's ranking before the
    target is ranked, as RecBole does: a target that is itself excluded counts as a miss.
    Ties count against the target (rank = number of items scoring strictly higher).
    """
    scores = np.array(scores, dtype=np.float32, copy=True)
    rows = np.arange(len(scores))
    for i, items in enumerate(exclude):
        if len(items):
            scores[i, np.asarray(list(items), dtype=np.int64)] = -np.inf
    targets = np.asarray(targets, dtype=np.int64)
    target_scores = scores[rows, targets]
    rank = (scores > target_scores[:, None]).sum(axis=1)
    rank = np.where(np.isneginf(target_scores), scores.shape[1], rank)
    hit = rank < k
    return {
        f"hr@{k}": float(hit.mean()) if len(hit) else 0.0,
        f"ndcg@{k}": float(np.where(hit, 1.0 / np.log2(rank + 2), 0.0).mean()) if len(hit) else 0.0,
        "n": int(len(hit)),
    }


def evaluate_next_item(
    model: SASRec, train: dict[str, list[int]], heldout: pd.DataFrame, item_index: dict[str, int],
    k: int = 10,
) -> dict:
    """Rank each held-out event's item given everything the user did before it.

    The model sees the user's train sequence plus earlier held-out events (a split can hold
    several per user); every item the user had before the event is excluded from the ranking.
    """
    held = heldout.sort_values(["user_id", "ts", "position"], kind="stable")
    targets = [item_index[item_id] for item_id in held["item_id"]]
    if not targets:
        return {f"hr@{k}": 0.0, f"ndcg@{k}": 0.0, "n": 0}
    histories = running_histories(held["user_id"].astype(str).tolist(), targets, train)
    return rank_metrics(model.score(histories), targets, histories, k)


# ---------------------------------------------------------------- pipeline step
def run_embed_collaborative(cfg: PipelineConfig, progress: bool = True) -> dict:
    """Step embed_collaborative: `splits/train` -> `features/collaborative` + `features/sasrec`.

    Every item_idx gets a row; items never clicked in train keep vectors shaped only by the
    softmax pushing them down (their random init plus small updates), never a missing row.
    """
    started = time.perf_counter()
    wh = Warehouse(cfg.warehouse)
    ccfg = cfg.embed.collaborative
    items = wh.read("curated/items", columns=["item_id", "item_idx"]).sort_values("item_idx")
    num_items = len(items)
    if not np.array_equal(items["item_idx"].to_numpy(), np.arange(num_items)):
        raise ValueError("curated/items: item_idx must be dense 0..N-1")
    item_index = dict(zip(items["item_id"].astype(str), items["item_idx"].astype(int)))

    event_cols = ["user_id", "item_id", "ts", "position"]
    train = user_sequences(wh.read("splits/train", columns=event_cols), item_index)
    users = sorted(train)  # fixed order: the windows, hence the weights, do not depend on dict order
    model, losses = train_sasrec([train[u] for u in users], num_items, ccfg, cfg.seed, progress)

    seen = {i for seq in train.values() for i in seq}
    stats = {
        "items": num_items,
        "dim": ccfg.dim,
        "users": len(train),
        "train_events": sum(len(s) for s in train.values()),
        "items_unseen_in_train": num_items - len(seen),
        "epochs": ccfg.epochs,
        "final_loss": round(losses[-1], 4) if losses else math.nan,
        "device": str(model.device),
    }
    if (wh.splits / "valid").exists():
        valid = evaluate_next_item(model, train, wh.read("splits/valid", columns=event_cols), item_index)
        stats.update({"valid_hr@10": round(valid["hr@10"], 4), "valid_ndcg@10": round(valid["ndcg@10"], 4),
                      "valid_events": valid["n"]})

    # Two outputs, one swap each; the inner (sasrec) commits just before the outer, so a
    # failure anywhere in the body leaves both previous outputs in place.
    with atomic_dir(wh.path("features", "collaborative")) as table_stage:
        with atomic_dir(wh.path("features", "sasrec")) as model_stage:
            write_table(vectors_table(np.arange(num_items), model.item_embeddings()), table_stage)
            save_sasrec(model, model_stage)
            stats["seconds"] = round(time.perf_counter() - started, 2)
            meta = {**stats, "losses": [round(x, 4) for x in losses], "config": cfg.fingerprint()}
            write_json_atomic(model_stage / "stats.json", meta)
            # '_'-prefixed files are skipped by Parquet dataset readers (pyarrow and Spark)
            write_json_atomic(table_stage / "_meta.json", meta)
    log.info("embed_collaborative: %s", stats)
    return stats
