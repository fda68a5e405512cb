"""Spark ingest rate against a single-process pandas reading of the same files.

    python bench/ingest.py [--events 5000000] [--master local[2]]

Generates a generic-layout CSV log (events + items, with a share of bad rows), then, in one run:
  1. the pipeline's Spark ingest (parse, validate, quarantine, dedupe, write Parquet), and
  2. a single-process pandas baseline over the same files doing the same checks and writes.
Prints events/second for both and the ratio. The machine is shared and noisy: compare the
ratio, not the absolute numbers.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gensar_core.config import PipelineConfig  # noqa: E402
from gensar_core.data.ingest import format_counts, ingest  # noqa: E402
from gensar_core.data.spark import spark_session  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"


def generate(n_events: int, n_items: int = 50_000, n_users: int = 200_000, seed: int = 0) -> tuple[Path, Path]:
    """A CSV log with ~1% bad rows (unknown items, bad timestamps, duplicates); cached by size."""
    folder = OUT / f"log-{n_events}"
    events_csv, items_csv = folder / "events.csv", folder / "items.csv"
    if events_csv.exists() and items_csv.exists():
        return events_csv, items_csv
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    items = pd.DataFrame({"item_id": [f"i{k}" for k in range(n_items)],
                          "title": [f"item number {k}" for k in range(n_items)],
                          "categories": rng.choice(["a|b", "c", "d|e|f"], n_items)})
    items.to_csv(items_csv, index=False)
    item = rng.zipf(1.3, n_events) % n_items
    item = np.where(rng.random(n_events) < 0.003, n_items + 7, item)  # unknown items
    ts = (1_600_000_000 + rng.integers(0, 10_000_000, n_events)).astype(str)
    ts = np.where(rng.random(n_events) < 0.003, "not-a-time", ts)
    behavior = np.where(rng.random(n_events) < 0.3, "search", "rec")
    events = pd.DataFrame({"user_id": "u" + pd.Series(rng.integers(0, n_users, n_events)).astype(str),
                           "item_id": "i" + pd.Series(item).astype(str), "ts": ts, "behavior": behavior,
                           "query": np.where(behavior == "search", "some query words", "")})
    dup = events.sample(frac=0.003, random_state=seed)
    events = pd.concat([events, dup], ignore_index=True)
    events.to_csv(events_csv, index=False)
    return events_csv, items_csv


def pandas_baseline(events_csv: Path, items_csv: Path, out: Path) -> dict:
    """The same work in one process: read, parse, validate, quarantine, dedupe, write Parquet."""
    items = pd.read_csv(items_csv, dtype=str, keep_default_na=False)
    ev = pd.read_csv(events_csv, dtype=str, keep_default_na=False)
    ev["row"] = np.arange(2, len(ev) + 2)
    ts = pd.to_numeric(ev["ts"], errors="coerce")
    reason = pd.Series(None, index=ev.index, dtype=object)
    reason[(ev["user_id"] == "") | (ev["item_id"] == "")] = "missing_field"
    reason[reason.isna() & ~ev["behavior"].isin(["rec", "search"])] = "wrong_type"
    reason[reason.isna() & ts.isna()] = "bad_timestamp"
    reason[reason.isna() & ~ev["item_id"].isin(set(items["item_id"]))] = "unknown_item"
    dup = ev.assign(ts=ts)[reason.isna()].duplicated(["user_id", "item_id", "ts", "behavior", "query"])
    reason[dup[dup].index] = "duplicate_event"
    good = ev[reason.isna()].assign(ts=ts[reason.isna()].astype("int64"))
    out.mkdir(parents=True, exist_ok=True)
    good.drop(columns="row").to_parquet(out / "events.parquet", index=False)
    ev[reason.notna()].assign(reason=reason[reason.notna()]).to_parquet(out / "rejected.parquet", index=False)
    return {"raw": len(ev), "curated": len(good), "rejected": int(reason.notna().sum())}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--events", type=int, default=5_000_000)
    p.add_argument("--master", default="local[2]")
    args = p.parse_args()

    t = time.time()
    events_csv, items_csv = generate(args.events)
    print(f"log: {events_csv} ({events_csv.stat().st_size / 1e6:.0f} MB), generated/cached in {time.time() - t:.0f}s")
    work = OUT / "work"
    shutil.rmtree(work, ignore_errors=True)

    t = time.time()
    base = pandas_baseline(events_csv, items_csv, work / "pandas")
    pandas_s = time.time() - t

    cfg = PipelineConfig.model_validate({
        "warehouse": str(work / "spark"),
        "spark": {"master": args.master, "shuffle_partitions": 8, "driver_memory": "6g"},
        "data": {"source": {"kind": "generic", "format": "csv", "events": str(events_csv), "items": str(items_csv),
                            "item_columns": {"item": "item_id", "title": "title", "categories": "categories"},
                            "event_columns": {"user": "user_id", "item": "item_id", "ts": "ts",
                                              "behavior": "behavior", "query": "query"}}},
    })
    spark = spark_session(cfg.spark)
    spark.range(1).count()  # session start-up is not ingest work
    t = time.time()
    manifest = ingest(spark, cfg)
    spark_s = time.time() - t
    spark.stop()

    ev = manifest["tables"]["events"]
    print(format_counts(manifest))
    print(f"pandas baseline: raw {base['raw']} = curated {base['curated']} + rejected {base['rejected']}")
    assert ev["raw"] == base["raw"], "both must read every row"
    spark_rate, pandas_rate = ev["raw"] / spark_s, base["raw"] / pandas_s
    print(f"spark ingest  ({args.master}): {spark_s:7.1f} s  {spark_rate:12,.0f} events/s")
    print(f"pandas single process  : {pandas_s:7.1f} s  {pandas_rate:12,.0f} events/s")
    print(f"ratio spark/pandas (events/s): {spark_rate / pandas_rate:.2f}")


if __name__ == "__main__":
    main()
