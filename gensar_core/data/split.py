"""Splits: k-core filtering, leave-one-out or chronological, each sample with its history.

Plain pandas functions over the curated events table (one row per event). A user's sequence is
ordered by (ts, item_id) so ties break the same way in every run.

Every event becomes a sample. Its history is the user's earlier events, both behaviours
interleaved in time order, keeping the last `max_rec_history` recommendation clicks and the last
`max_search_history` searches (each with its query and clicked item), as in the paper.
"""
from __future__ import annotations

import logging
from collections import deque

import numpy as np
import pandas as pd
import pyarrow as pa

from gensar_core.config import PipelineConfig, SplitConfig
from gensar_core.storage import Warehouse, atomic_dir, write_json_atomic, write_table

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
HISTORY_TYPE = pa.list_(pa.struct([
    ("behavior", pa.string()), ("item_id", pa.string()), ("query", pa.string()), ("ts", pa.int64()),
]))
SAMPLE_SCHEMA = pa.schema([
    ("user_id", pa.string()), ("item_id", pa.string()), ("ts", pa.int64()), ("behavior", pa.string()),
    ("query", pa.string()), ("session_id", pa.string()), ("position", pa.int64()), ("history", HISTORY_TYPE),
])


def order_events(events: pd.DataFrame) -> pd.DataFrame:
    """Events sorted per user by time (ties by item), with a fresh index."""
    return events.sort_values(["user_id", "ts", "item_id"], kind="mergesort").reset_index(drop=True)


def kcore_filter(events: pd.DataFrame, k: int) -> pd.DataFrame:
    """Keep users and items with at least k events each, repeated until both hold."""
    if k <= 1:
        return events
    while True:
        users = events["user_id"].map(events["user_id"].value_counts())
        items = events["item_id"].map(events["item_id"].value_counts())
        keep = (users >= k) & (items >= k)
        if keep.all():
            return events
        events = events[keep]


def leave_one_out(events: pd.DataFrame, valid_events: int) -> pd.Series:
    """Per user: last event test, the `valid_events` before it valid, the rest train. At least one
    train event stays per user (users with < 3 events: all train)."""
    pos = events.groupby("user_id", sort=False).cumcount()
    size = events.groupby("user_id", sort=False)["user_id"].transform("size")
    first_valid = np.maximum(size - 1 - valid_events, 1)
    split = np.where(size < 3, "train", np.where(pos == size - 1, "test",
                                                 np.where(pos >= first_valid, "valid", "train")))
    return pd.Series(split, index=events.index)


def chronological(events: pd.DataFrame, train_share: float, valid_share: float) -> pd.Series:
    """Global time cut: the earliest train_share of events train, the next valid_share valid."""
    t_train, t_valid = np.quantile(events["ts"].to_numpy(), [train_share, train_share + valid_share])
    ts = events["ts"]
    return pd.Series(np.where(ts <= t_train, "train", np.where(ts <= t_valid, "valid", "test")),
                     index=events.index)


def histories(events: pd.DataFrame, max_rec: int, max_search: int) -> list[list[dict]]:
    """For each event (ordered by `order_events`), its capped interleaved history."""
    out: list[list[dict]] = []
    users = events["user_id"].to_numpy()
    behaviors = events["behavior"].to_numpy()
    items = events["item_id"].to_numpy()
    queries = events["query"].to_numpy()
    tss = events["ts"].to_numpy()
    rec: deque = deque(maxlen=max_rec)
    search: deque = deque(maxlen=max_search)
    current = None
    for i in range(len(events)):
        if users[i] != current:
            current = users[i]
            rec.clear()
            search.clear()
        # both deques hold (position, entry); merging by position restores time order
        merged = sorted([*rec, *search], key=lambda pe: pe[0])
        out.append([e for _, e in merged])
        entry = {"behavior": behaviors[i], "item_id": items[i], "query": queries[i], "ts": int(tss[i])}
        if behaviors[i] == "search":
            if max_search:
                search.append((i, entry))
        elif max_rec:
            rec.append((i, entry))
    return out


def make_samples(events: pd.DataFrame, cfg: SplitConfig) -> pd.DataFrame:
    """k-core filter, order, assign splits and histories. Adds `position`, `split`, `history`."""
    events = order_events(kcore_filter(events, cfg.kcore))
    events["position"] = events.groupby("user_id", sort=False).cumcount().astype("int64")
    if cfg.strategy == "leave_one_out":
        events["split"] = leave_one_out(events, cfg.valid_events)
    else:
        events["split"] = chronological(events, cfg.train_share, cfg.valid_share)
    events["history"] = histories(events, cfg.max_rec_history, cfg.max_search_history)
    return events


def run_split(cfg: PipelineConfig) -> dict:
    """Read curated/events, write splits/{train,valid,test} and splits/_manifest.json."""
    wh = Warehouse(cfg.warehouse)
    events = wh.read("curated/events", columns=["user_id", "item_id", "ts", "behavior", "query", "session_id"])
    raw_n = len(events)
    samples = make_samples(events, cfg.split)
    manifest = {
        "strategy": cfg.split.strategy, "kcore": cfg.split.kcore, "events_in": raw_n,
        "events_after_kcore": len(samples), "users": int(samples["user_id"].nunique()),
        "items": int(samples["item_id"].nunique()), "config": cfg.fingerprint(), "splits": {},
    }
    with atomic_dir(wh.splits) as stage:
        for name in SPLITS:
            part = samples[samples["split"] == name]
            table = pa.Table.from_pandas(part[SAMPLE_SCHEMA.names], schema=SAMPLE_SCHEMA, preserve_index=False)
            write_table(table, stage / name)
            manifest["splits"][name] = {
                "samples": len(part),
                "by_behavior": {k: int(v) for k, v in part["behavior"].value_counts().sort_index().items()},
            }
        write_json_atomic(stage / "_manifest.json", manifest)
    log.info("split done: %s", format_split(manifest))
    return manifest


def format_split(manifest: dict) -> str:
    lines = [f"{manifest['strategy']}, {manifest['kcore']}-core: {manifest['events_in']} events -> "
             f"{manifest['events_after_kcore']} ({manifest['users']} users, {manifest['items']} items)"]
    for name, s in manifest["splits"].items():
        by = ", ".join(f"{k}={v}" for k, v in s["by_behavior"].items())
        lines.append(f"  {name}: {s['samples']} samples ({by})")
    return "\n".join(lines)
