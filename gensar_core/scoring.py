"""Batch scoring: top-K recommendations for every active user and top-K results for every query of
the day's query log, written to `scores/ds=<ds>/{rec,search}/part-<p>.parquet`.

Users are split into `scoring.partitions` partitions by a stable hash of their id (crc32), so the
partitions can run as parallel tasks (the DAG maps one task per partition) and a rerun of one
partition rewrites only its own files, each with an atomic rename.

- The reference time is the latest curated event (the ingest already cut events at `ds`).
- Active users: users with an event in the `scoring.active_days` days up to the reference time.
  Their case is their latest history (last 5 rec + 5 searches); items they already interacted
  with are left out of their recommendations.
- The day's query log: search events on the reference time's day. Each query is answered with
  the user's history before that search, and the items of that history are left out, the rule
  the evaluation applies to both tasks.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from gensar_core import registry
from gensar_core.config import PipelineConfig
from gensar_core.data.split import histories, order_events
from gensar_core.storage import Warehouse

log = logging.getLogger(__name__)
DAY = 86_400


def partition_of(user_ids: pd.Series, partitions: int) -> np.ndarray:
    """A stable partition number per user id (the same in every process and run)."""
    return np.fromiter((zlib.crc32(str(u).encode()) % partitions for u in user_ids), dtype=np.int64,
                       count=len(user_ids))


def latest_histories(events: pd.DataFrame, max_rec: int, max_search: int) -> pd.DataFrame:
    """One row per user: `history` = the user's most recent events (capped), in time order."""
    ev = order_events(events)
    rec = ev[ev["behavior"] == "rec"].groupby("user_id", sort=False).tail(max_rec) if max_rec else ev.iloc[:0]
    src = ev[ev["behavior"] == "search"].groupby("user_id", sort=False).tail(max_search) if max_search else ev.iloc[:0]
    kept = pd.concat([rec, src]).sort_index()
    records = kept[["user_id", "behavior", "item_id", "query", "ts"]].to_dict("records")
    by_user: dict[str, list] = {}
    for r in records:
        by_user.setdefault(r.pop("user_id"), []).append(r)
    users = ev["user_id"].unique()
    return pd.DataFrame({"user_id": users, "history": [by_user.get(u, []) for u in users]})


def rec_cases(events: pd.DataFrame, ref: int, item_index: dict, active_days: int, max_rec: int,
              max_search: int) -> pd.DataFrame:
    """Cases for users active before the reference time `ref`: user_id, history, exclude (item_idx
    of everything they saw)."""
    active = events.groupby("user_id")["ts"].max()
    active = set(active[active >= ref - active_days * DAY].index)
    ev = events[events["user_id"].isin(active)]
    cases = latest_histories(ev, max_rec, max_search)
    seen = ev.groupby("user_id")["item_id"].agg(lambda s: np.unique(s.map(item_index).dropna().astype(np.int64)))
    cases["exclude"] = cases["user_id"].map(seen)
    cases["query"] = None
    return cases.reset_index(drop=True)


def search_cases(events: pd.DataFrame, ref: int, item_index: dict, max_rec: int, max_search: int) -> pd.DataFrame:
    """Cases for the searches of the reference time's day: user_id, ts, query, history, exclude
    (item_idx of everything the user saw before that search)."""
    day_start = ref - ref % DAY
    ev = order_events(events)
    ev["history"] = histories(ev, max_rec, max_search)
    asked = ((ev["behavior"] == "search") & (ev["ts"] >= day_start)).to_numpy()
    seen: dict = {}
    exclude = []
    # in time order: each of the day's searches leaves out the items of the user's earlier events
    for user, item, is_case in zip(ev["user_id"], ev["item_id"].map(item_index), asked):
        before = seen.setdefault(user, [])
        if is_case:
            exclude.append(np.unique(np.asarray(before, dtype=np.int64)))
        if pd.notna(item):
            before.append(int(item))
    day = ev[asked][["user_id", "ts", "query", "history"]].reset_index(drop=True)
    day["exclude"] = exclude
    return day


def _write_atomic(df: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def score_cases(ranker, cases: pd.DataFrame, task: str, k: int, item_id_of: np.ndarray) -> pd.DataFrame:
    """Long table: one row per (case, rank) with item_id, item_idx and the model's log-prob."""
    rows = []
    ranked = ranker.top_k_unseen(cases, task, k)
    for c, (items, scores) in enumerate(ranked):
        rows += [(c, r + 1, int(i), float(s)) for r, (i, s) in enumerate(zip(items, scores))]
    out = pd.DataFrame(rows, columns=["case", "rank", "item_idx", "score"])
    out["item_id"] = item_id_of[out["item_idx"].to_numpy()] if len(out) else pd.Series(dtype=str)
    keys = ["user_id"] if task == "rec" else ["user_id", "ts", "query"]
    out = cases[keys].iloc[out["case"]].reset_index(drop=True).join(out.drop(columns="case"))
    return out


def run_batch_score(cfg: PipelineConfig, ranker=None, partition: Optional[int] = None) -> dict:
    """Score one partition (or all of them) with `ranker` (default: the champion model)."""
    started = time.perf_counter()
    scfg = cfg.scoring
    wh = Warehouse(cfg.warehouse)
    ds = cfg.ds or "latest"
    ranker = ranker or registry.champion_ranker(cfg)
    items = wh.read("curated/items", ["item_id", "item_idx"]).sort_values("item_idx")
    item_id_of = items["item_id"].to_numpy()
    item_index = dict(zip(items["item_id"], items["item_idx"]))
    events = wh.read("curated/events", ["user_id", "item_id", "ts", "behavior", "query", "session_id"])
    parts = range(scfg.partitions) if partition is None else [partition]
    limits = (ranker.max_rec, ranker.max_search)  # the history the model reads (a timeline model: all of it)
    folder = wh.path("scores", f"ds={ds}")
    stats = {"ds": ds, "partitions": list(parts), "rec_users": 0, "search_queries": 0}
    ref = int(events["ts"].max())  # over every user, so each partition uses the same day
    users = pd.Series(events["user_id"].unique())
    part_of_user = dict(zip(users, partition_of(users, scfg.partitions)))
    event_part = events["user_id"].map(part_of_user).to_numpy()
    for p in parts:
        # a user's cases depend on that user's events only: build them from this partition's
        mine = events[event_part == p]
        rec = rec_cases(mine, ref, item_index, scfg.active_days, *limits)
        src = search_cases(mine, ref, item_index, *limits)
        for task, cases in (("rec", rec), ("search", src)):
            t0 = time.perf_counter()
            scored = score_cases(ranker, cases, task, scfg.top_k, item_id_of) if len(cases) else pd.DataFrame()
            _write_atomic(scored, folder / task / f"part-{p:05d}.parquet")
            log.info("batch_score ds=%s partition %d %s: %d cases in %.1fs", ds, p, task, len(cases),
                     time.perf_counter() - t0)
        stats["rec_users"] += len(rec)
        stats["search_queries"] += len(src)
    seconds = time.perf_counter() - started
    stats.update(seconds=round(seconds, 2), folder=str(folder),
                 users_per_second=round(stats["rec_users"] / seconds, 2) if seconds else None,
                 cases_per_second=round((stats["rec_users"] + stats["search_queries"]) / seconds, 2))
    return stats
