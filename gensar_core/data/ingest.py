"""Ingest: raw logs -> curated/items, curated/events, curated/rejected (Spark).

The three tables and a manifest of counts are staged together and swapped into place as one
folder, so readers never see items of one run beside events of another.
"""
from __future__ import annotations

import logging
import time
from collections import Counter

from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from gensar_core.config import PipelineConfig
from gensar_core.data import readers, synth, validate
from gensar_core import storage
from gensar_core.storage import Warehouse, atomic_dir, write_json_atomic

log = logging.getLogger(__name__)

EVENT_COLUMNS = ["user_id", "item_id", "ts", "behavior", "query", "session_id"]


class ReconciliationError(RuntimeError):
    """raw != curated + rejected: a row was lost or duplicated."""


def _wants_synthetic_search(cfg: PipelineConfig) -> bool:
    src = cfg.data.source
    if cfg.data.search.enabled is not None:
        return cfg.data.search.enabled
    return src.kind in ("movielens", "inter_json") or (src.kind == "amazon" and src.queries is None)


def _apply_query_file(events: DataFrame, queries: DataFrame) -> tuple[DataFrame, DataFrame]:
    """Amazon: reviews that match a query-file row become searches. Returns (events, validated queries)."""
    q = validate.with_reason(queries, [
        (F.col("user_id").isNull(), "missing_field", "reviewerID"),
        (F.col("item_id").isNull(), "missing_field", "asin"),
        (F.col("query").isNull(), "missing_field", "query"),
    ])
    q = validate.keep_first(q, ["user_id", "item_id"], "duplicate_query", "reviewerID, asin")
    good = q.where(F.col("reason").isNull()).select(
        F.col("user_id").alias("_qu"), F.col("item_id").alias("_qi"), F.col("query").alias("_qq"))
    matched_keys = events.select(F.col("user_id").alias("_mu"), F.col("item_id").alias("_mi")).distinct()
    q = q.join(matched_keys, (q["user_id"] == matched_keys["_mu"]) & (q["item_id"] == matched_keys["_mi"]), "left")
    q = validate.reject_where(q, F.col("_mu").isNull(), "unmatched_query", "reviewerID, asin").drop("_mu", "_mi")
    ev = events.join(good, (events["user_id"] == good["_qu"]) & (events["item_id"] == good["_qi"]), "left")
    hit = F.col("_qq").isNotNull()
    ev = (ev.withColumn("behavior", F.when(hit, F.lit("search")).otherwise(F.col("behavior")))
            .withColumn("query", F.when(hit, F.col("_qq")).otherwise(F.col("query")))
            .withColumn("session_id", F.when(hit, F.concat_ws("-", "user_id", F.col("ts").cast("string")))
                        .otherwise(F.col("session_id")))
            .drop("_qu", "_qi", "_qq"))
    return ev, q


def _reason_counts(validated: DataFrame) -> dict[str, int]:
    return {(r["reason"] or "curated"): r["count"] for r in validated.groupBy("reason").count().collect()}


def ingest(spark, cfg: PipelineConfig) -> dict:
    """Run the ingest step; returns the manifest (counts per table and reason)."""
    t0 = time.time()
    wh = Warehouse(cfg.warehouse)
    raw_events, raw_items, raw_queries = readers.read_source(spark, cfg.data.source)
    # parse each file once: the raw count is taken from the same cached rows that validation reads
    cached = [df.persist(StorageLevel.MEMORY_AND_DISK) for df in (raw_events, raw_items, raw_queries)
              if df is not None]
    raw_events, raw_items = cached[0], cached[1]
    raw_queries = cached[2] if raw_queries is not None else None
    raw_counts = {"items": raw_items.count(), "events": raw_events.count()}
    if raw_queries is not None:
        raw_counts["queries"] = raw_queries.count()

    items_v = validate.validate_items(raw_items).persist(StorageLevel.MEMORY_AND_DISK)
    previous = wh.curated / "items"
    previous_items = spark.read.parquet(str(previous)) if storage.resolve(wh.curated).exists() and previous.exists() else None
    items = validate.curated_items(items_v, previous_items).persist(StorageLevel.MEMORY_AND_DISK)
    items.count()  # materialise now: the previous table's files go away when the new one is committed
    events_v = validate.validate_events(raw_events, items, cfg.ds).persist(StorageLevel.MEMORY_AND_DISK)
    events = events_v.where(F.col("reason").isNull()).select(*EVENT_COLUMNS)

    rejected = validate.rejected_rows(items_v, "items").unionByName(validate.rejected_rows(events_v, "events"))
    counts = {"items": _reason_counts(items_v), "events": _reason_counts(events_v)}

    if raw_queries is not None:
        events, queries_v = _apply_query_file(events, raw_queries)
        queries_v = queries_v.persist(StorageLevel.MEMORY_AND_DISK)
        rejected = rejected.unionByName(validate.rejected_rows(queries_v, "queries"))
        counts["queries"] = _reason_counts(queries_v)
        cached.append(queries_v)
    if any("malformed_json" in by_reason for by_reason in counts.values()):
        rejected = readers.explain_malformed_json(rejected)  # the parser's message, on rejected rows only
    if _wants_synthetic_search(cfg):
        s = cfg.data.search
        events = synth.synthesize_searches(events, items, s.share, s.seed, s.title_terms)

    manifest = {"ds": cfg.ds, "source": cfg.data.source.kind, "config": cfg.fingerprint(), "tables": {}}
    for table, by_reason in counts.items():
        curated = by_reason.get("curated", 0)
        rejected_n = sum(v for k, v in by_reason.items() if k != "curated")
        if raw_counts[table] != curated + rejected_n:
            raise ReconciliationError(
                f"{table}: {raw_counts[table]} raw rows but {curated} curated + {rejected_n} rejected")
        manifest["tables"][table] = {
            "raw": raw_counts[table], "curated": curated, "rejected": rejected_n,
            "rejected_by_reason": dict(sorted((k, v) for k, v in by_reason.items() if k != "curated")),
        }

    with atomic_dir(wh.curated) as stage:
        items.orderBy("item_idx").coalesce(1).write.parquet(str(stage / "items"))
        events.sortWithinPartitions("user_id", "ts", "item_id").write.parquet(str(stage / "events"))
        rejected.orderBy("table", "source", "row").coalesce(1).write.parquet(str(stage / "rejected"))
        behaviors = Counter({r["behavior"]: r["count"] for r in
                             spark.read.parquet(str(stage / "events")).groupBy("behavior").count().collect()})
        manifest["events_by_behavior"] = dict(sorted(behaviors.items()))
        manifest["seconds"] = round(time.time() - t0, 1)
        write_json_atomic(stage / "_manifest.json", manifest)

    for df in (items_v, items, events_v, *cached):
        df.unpersist()
    log.info("ingest done: %s", format_counts(manifest))
    return manifest


def format_counts(manifest: dict) -> str:
    """Reconciled counts, one line per table."""
    lines = []
    for table, c in manifest["tables"].items():
        reasons = ", ".join(f"{k}={v}" for k, v in c["rejected_by_reason"].items()) or "none"
        lines.append(f"{table}: raw {c['raw']} = curated {c['curated']} + rejected {c['rejected']}"
                     f" ({reasons})")
    if "events_by_behavior" in manifest:
        lines.append("curated events by behavior: " +
                     ", ".join(f"{k}={v}" for k, v in manifest["events_by_behavior"].items()))
    return "\n".join(lines)
