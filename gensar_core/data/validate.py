"""Validation and quarantine: every raw row gets exactly one outcome, curated or a reason.

Checks run in a fixed order and a row is rejected for the first one it fails, so the reasons
are stable across runs. Rejected rows keep their file, line and raw text.

Reasons: undecodable_text (not UTF-8), empty_line, malformed_json (with the parser's message),
malformed_row, missing_field, wrong_type, bad_timestamp, after_run_date, not_clicked (KuaiSAR
impressions without a click), duplicate_item, unknown_item, duplicate_event, duplicate_query and
unmatched_query (an Amazon query row with no review).
"""
from __future__ import annotations

import datetime as dt

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

REJECTED_COLUMNS = ["table", "source", "row", "reason", "detail", "raw"]

# epoch seconds above this are milliseconds (1e11 s is the year 5138)
_MS_THRESHOLD = 1e11
_MAX_TS = 4102444800  # 2100-01-01: later timestamps are typos, not events


def run_date_end(ds: str | None) -> int | None:
    """Epoch seconds of the end of run date `ds` (UTC), the cut-off for events."""
    if ds is None:
        return None
    day = dt.date.fromisoformat(ds) + dt.timedelta(days=1)
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc).timestamp())


def parse_timestamp(raw: Column) -> Column:
    """Epoch seconds (int64) from seconds, milliseconds or an ISO date/time string; null if none."""
    num = raw.try_cast("double")
    secs_from_num = F.when(num > _MS_THRESHOLD, num / 1000).otherwise(num)
    iso = F.coalesce(
        F.try_to_timestamp(raw, F.lit("yyyy-MM-dd HH:mm:ss")),
        F.try_to_timestamp(raw, F.lit("yyyy-MM-dd'T'HH:mm:ss")),
        F.try_to_timestamp(raw, F.lit("yyyy-MM-dd HH:mm:ss.SSS")),
        F.try_to_timestamp(raw, F.lit("yyyy-MM-dd")),
    )
    return F.floor(F.coalesce(secs_from_num, F.unix_timestamp(iso).cast("double"))).cast("long")


def with_reason(df: DataFrame, checks: list[tuple[Column, str, str]]) -> DataFrame:
    """Add `reason`/`detail` of the first failing check, null where all pass. The reader's parse
    error (`error`, `error_detail`: the line is not UTF-8, empty, not JSON, or cannot be split)
    always comes first."""
    read_error = F.col("error").isNotNull()
    reason, detail = F.when(read_error, F.col("error")), F.when(read_error, F.col("error_detail"))
    for failed, why, what in checks:
        reason, detail = reason.when(failed, F.lit(why)), detail.when(failed, F.lit(what))
    return df.withColumn("reason", reason).withColumn("detail", detail)


def reject_where(df: DataFrame, failed: Column, reason: str, detail: str) -> DataFrame:
    """Reject the rows not yet rejected for which `failed` holds."""
    hit = F.col("reason").isNull() & failed
    # both from the incoming columns: set one after the other, `hit` would read the new reason
    # and leave every such row's detail null
    return df.withColumns({"reason": F.when(hit, F.lit(reason)).otherwise(F.col("reason")),
                           "detail": F.when(hit, F.lit(detail)).otherwise(F.col("detail"))})


def keep_first(df: DataFrame, keys: list[str], reason: str, detail: str) -> DataFrame:
    """Among rows not yet rejected, reject all but the first (by file and line) of each key."""
    w = Window.partitionBy(*keys).orderBy("source", "row")
    rank = F.when(F.col("reason").isNull(), F.row_number().over(w))
    return reject_where(df, rank > 1, reason, detail)


def validate_items(raw: DataFrame) -> DataFrame:
    """Raw items + reason/detail columns (null reason = curated)."""
    df = with_reason(raw, [
        (F.col("item_id").isNull(), "missing_field", "item_id"),
        (F.col("title").isNull() & (F.coalesce(F.length("text"), F.lit(0)) == 0), "missing_field", "title"),
    ])
    return keep_first(df, ["item_id"], "duplicate_item", "item_id")


def curated_items(validated: DataFrame, previous: DataFrame | None = None) -> DataFrame:
    """item_id, item_idx, title, text, categories.

    item_idx is dense 0..N-1 in item_id order on the first run. Later runs keep every index the
    previous `curated/items` gave, append new items after them (in item_id order), and carry
    over items the new catalogue no longer lists: an item's index, and so its identifier and its
    embedding rows, never change or get reused.
    """
    ok = validated.where(F.col("reason").isNull()).select(
        "item_id",
        F.coalesce("title", "text").alias("title"),
        F.coalesce("text", "title").alias("text"),
        F.coalesce("categories", F.array().cast("array<string>")).alias("categories"),
    )
    if previous is None:
        return ok.select("item_id", (F.row_number().over(Window.orderBy("item_id")) - 1).cast("long")
                         .alias("item_idx"), "title", "text", "categories")
    prev = previous.select("item_id", "item_idx", "title", "text", "categories")
    start = prev.agg(F.coalesce(F.max("item_idx") + 1, F.lit(0))).first()[0]
    known = ok.join(prev.select("item_id", "item_idx"), "item_id", "inner")
    new = ok.join(prev.select("item_id"), "item_id", "left_anti")
    new = new.withColumn("item_idx", (F.row_number().over(Window.orderBy("item_id")) - 1 + F.lit(start)).cast("long"))
    gone = prev.join(ok.select("item_id"), "item_id", "left_anti")
    cols = ["item_id", "item_idx", "title", "text", "categories"]
    return known.select(*cols).unionByName(new.select(*cols)).unionByName(gone.select(*cols))


def validate_events(raw: DataFrame, items: DataFrame, ds: str | None) -> DataFrame:
    """Raw events + ts (epoch seconds) + reason/detail (null reason = curated)."""
    ts = parse_timestamp(F.col("ts_raw"))
    cutoff = run_date_end(ds)
    df = raw.withColumn("ts", ts)
    behavior_ok = F.col("behavior").isin("rec", "search")
    checks = [
        (F.col("user_id").isNull(), "missing_field", "user_id"),
        (F.col("item_id").isNull(), "missing_field", "item_id"),
        (F.col("ts_raw").isNull(), "missing_field", "ts"),
        (F.col("behavior").isNull() | ~behavior_ok, "wrong_type", "behavior (must be rec or search)"),
        (F.col("rating").isNotNull() & F.col("rating").try_cast("double").isNull(), "wrong_type", "rating"),
        (F.col("ts").isNull(), "bad_timestamp", "ts (not a number or ISO date)"),
        ((F.col("ts") <= 0) | (F.col("ts") >= _MAX_TS), "bad_timestamp", "ts (out of range)"),
        ((F.col("behavior") == "search") & F.col("query").isNull(), "missing_field", "query"),
    ]
    if cutoff is not None:
        checks.append((F.col("ts") >= cutoff, "after_run_date", f"ts (after the end of ds={ds})"))
    df = with_reason(df, checks)

    known = items.select(F.col("item_id").alias("_known")).distinct()
    df = df.join(F.broadcast(known), df["item_id"] == known["_known"], "left")
    df = reject_where(df, F.col("_known").isNull(), "unknown_item", "item_id").drop("_known")
    return keep_first(df.withColumn("_q", F.coalesce("query", F.lit(""))),
                       ["user_id", "item_id", "ts", "behavior", "_q"],
                       "duplicate_event", "user_id, item_id, ts, behavior, query").drop("_q")


def rejected_rows(validated: DataFrame, table: str) -> DataFrame:
    return validated.where(F.col("reason").isNotNull()).select(
        F.lit(table).alias("table"), "source", "row", "reason", "detail", "raw")
