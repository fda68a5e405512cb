"""Nightly incremental identifiers: keep every existing ID, give new items cold-start IDs.

`identifiers.mode: incremental` (the nightly setting): when `identifiers/items` and its quantiser
exist, items of `curated/items` without an ID get one from the trained quantiser through
`assign_cold_start` (semantic embedding only, unique against the table, no retraining), and every
existing ID stays as it is, so a model trained on yesterday's IDs still decodes today's table.
Without a previous table it falls back to training (`run_learn_identifiers`).
"""
from __future__ import annotations

import logging
import shutil
import time

import numpy as np
import pandas as pd

from gensar_core.config import PipelineConfig
from gensar_core.identifiers.assign import assign_cold_start, to_arrow
from gensar_core.storage import Warehouse, atomic_dir, write_json_atomic, write_table

log = logging.getLogger(__name__)


def has_identifiers(cfg: PipelineConfig) -> bool:
    wh = Warehouse(cfg.warehouse)
    return (wh.identifiers / "items").exists() and (wh.identifiers / "quantiser").exists()


def run_extend_identifiers(cfg: PipelineConfig) -> dict:
    started = time.perf_counter()
    wh = Warehouse(cfg.warehouse)
    existing = wh.read("identifiers/items")
    items = wh.read("curated/items", ["item_id", "item_idx"])
    merged = existing[["item_id", "item_idx"]].merge(items, on="item_id", how="left", suffixes=("", "_now"))
    moved = merged[merged["item_idx_now"].notna() & (merged["item_idx_now"] != merged["item_idx"])]
    if len(moved):
        raise ValueError(f"{len(moved)} items changed item_idx since their IDs were assigned "
                         f"(e.g. {moved['item_id'].iloc[0]!r}); incremental IDs need a stable catalogue index")
    new = items[~items["item_id"].isin(existing["item_id"])].sort_values("item_idx")
    table = existing
    if len(new):
        sem = wh.read("features/semantic", ["item_idx", "vector"]).set_index("item_idx")
        lacking = np.setdiff1d(new["item_idx"], sem.index)
        if len(lacking):
            raise ValueError(f"{len(lacking)} new items have no semantic embedding (e.g. item_idx "
                             f"{lacking[:5].tolist()}): run embed_semantic first")
        vectors = pd.DataFrame({"item_idx": new["item_idx"].to_numpy(), "item_id": new["item_id"].to_numpy(),
                                "vector": [sem.loc[i, "vector"] for i in new["item_idx"]]})
        cold = assign_cold_start(wh.identifiers / "quantiser", vectors, existing)
        table = pd.concat([existing, cold[existing.columns]], ignore_index=True).sort_values("item_idx",
                                                                                           ignore_index=True)
    for b in ("semantic", "collaborative"):
        if table[f"{b}_id"].duplicated().any():
            raise AssertionError(f"duplicate {b}_id after cold start: this is a bug")
    metrics = {"mode": "incremental", "n_items": len(table), "n_new_items": len(new),
               "n_existing_items": len(existing), "seconds": round(time.perf_counter() - started, 2)}
    current = wh.identifiers
    with atomic_dir(current) as stage:
        for keep in ("quantiser", "codebook_usage.png", "metrics.json"):
            src = current / keep
            if src.is_dir():
                shutil.copytree(src, stage / keep)
            elif src.exists():
                shutil.copy2(src, stage / keep)
        write_table(to_arrow(table), stage / "items")
        write_json_atomic(stage / "incremental.json", metrics)
    log.info("identifiers: %d existing kept, %d new items got cold-start IDs", len(existing), len(new))
    return metrics
