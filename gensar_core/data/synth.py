"""Semi-synthetic search log for data without real queries.

The Amazon product-search benchmarks (Ai et al. 2017, Van Gysel et al. 2016) turn a purchase
into a search whose query is the bought item's category path: its category words, lower-cased,
stop words and repeats removed. We follow that protocol, seeded:

1. An interaction becomes a search when u(seed, user, item, ts) < share, where u is a uniform
   number from a 64-bit hash of those values. The choice is a pure function of the row, so it
   does not depend on partitioning or on what else is in the log, and a rerun gives the same log.
2. Its query is the clicked item's category words (MovieLens: its genres) in catalogue order,
   optionally followed by `title_terms` words of the item's title (lower-cased, 3+ letters, no
   stop words, no digits), taken from a position picked by a second hash. The default is 0, the
   benchmark protocol: category words alone, so a query names a set of items and the user's
   history tells them apart.
3. The search gets session id `<user>-<ts>`; recommendation events keep a null session.
"""
from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

STOP_WORDS = [
    "a", "an", "and", "are", "as", "at", "be", "by", "for", "from", "in", "into", "is", "it",
    "its", "of", "on", "or", "that", "the", "this", "to", "with", "les", "la", "le", "de",
    "der", "die", "das", "el", "del", "ii", "iii", "part", "&",
]
_BUCKETS = 1_000_000


def uniform(seed: int, *cols: str) -> Column:
    """A seeded uniform number in [0, 1) from the given columns."""
    return F.pmod(F.xxhash64(F.lit(seed), *cols), F.lit(_BUCKETS)) / F.lit(float(_BUCKETS))


def _words(col: Column, pattern: str) -> Column:
    return F.filter(F.split(F.lower(col), pattern),
                    lambda w: (F.length(w) > 0) & ~w.isin(*STOP_WORDS))


def category_query(categories: Column, title: Column, pick: Column, title_terms: int) -> Column:
    """Query text from an item's categories and `title_terms` title words starting at `pick`."""
    cat_words = _words(F.array_join(categories, " "), r"[^a-z0-9']+")
    title_words = F.filter(_words(F.coalesce(title, F.lit("")), r"[^a-z]+"), lambda w: F.length(w) >= 3)
    n = F.size(title_words)
    start = (F.floor(pick * n) + 1).cast("int")
    chosen = (F.when(n > 0, F.slice(title_words, start, title_terms))
              .otherwise(F.array().cast("array<string>"))) if title_terms > 0 else F.array().cast("array<string>")
    words = F.array_distinct(F.concat(cat_words, chosen))
    return F.when(F.size(words) > 0, F.array_join(words, " "))


def synthesize_searches(events: DataFrame, items: DataFrame, share: float, seed: int,
                        title_terms: int) -> DataFrame:
    """Turn a seeded share of curated 'rec' events into 'search' events with category queries."""
    meta = items.select("item_id", F.col("categories").alias("_cats"), F.col("title").alias("_title"))
    df = events.join(F.broadcast(meta), "item_id", "left")
    query = category_query(F.col("_cats"), F.col("_title"), uniform(seed + 1, "user_id", "item_id", "ts"),
                           title_terms)
    chosen = ((F.col("behavior") == "rec") & (uniform(seed, "user_id", "item_id", "ts") < share)
              & query.isNotNull())
    return df.select(
        *[c for c in events.columns if c not in ("behavior", "query", "session_id")],
        F.when(chosen, F.lit("search")).otherwise(F.col("behavior")).alias("behavior"),
        F.when(chosen, query).otherwise(F.col("query")).alias("query"),
        F.when(chosen, F.concat_ws("-", "user_id", F.col("ts").cast("string")))
         .otherwise(F.col("session_id")).alias("session_id"),
    ).select(*events.columns)
