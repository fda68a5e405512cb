"""Amazon, KuaiSAR and the generic CSV/Parquet layout through real Spark, with good and bad rows."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from helpers import config, json_lines, read, rejected_by_row, write_lines
from pyspark.sql import functions as F

from gensar_core.data.ingest import ingest
from gensar_core.data.readers import IngestError


# ----------------------------------------------------------------------------- Amazon
def _amazon(tmp_path, with_queries: bool):
    meta = json_lines(tmp_path / "meta.json", [
        {"asin": "A1", "title": "USB Cable", "description": "A cable.",
         "categories": [["Electronics", "Computers & Accessories", "Cables"]]},
        # Amazon 2014 metadata: Python dict literals, read without eval
        "{'asin': 'A2', 'title': 'Mouse', 'categories': [['Electronics', 'Mice']], 'brand': 'Logi'}",
        {"asin": "A3", "title": "Keyboard", "category": ["Electronics", "Keyboards"],
         "description": ["Mechanical", "keys"]},
        "{not json at all",                                   # line 4: neither JSON nor a literal
        {"title": "no asin here"},                            # line 5
    ])
    reviews = json_lines(tmp_path / "reviews.json", [
        {"reviewerID": "U1", "asin": "A1", "overall": 5.0, "unixReviewTime": 1400000000},
        {"reviewerID": "U1", "asin": "A2", "overall": 4.0, "unixReviewTime": 1400000100},
        {"reviewerID": "U2", "asin": "A3", "overall": 3.0, "unixReviewTime": 1400000200},
        {"reviewerID": "U2", "asin": "A1", "overall": 3.0, "unixReviewTime": 1400000300},
        {"reviewerID": "U2", "asin": "A9", "overall": 3.0, "unixReviewTime": 1400000400},   # 5 unknown item
        {"reviewerID": "U3", "overall": 3.0, "unixReviewTime": 1400000500},                # 6 no asin
        {"reviewerID": "U3", "asin": "A1", "overall": "great", "unixReviewTime": 1400000600},  # 7 rating
        {"reviewerID": "U3", "asin": "A1", "overall": 4.0, "unixReviewTime": "soon"},      # 8 bad ts
        "[1, 2",                                                                           # 9 malformed
        {"reviewerID": "U1", "asin": "A1", "overall": 5.0, "unixReviewTime": 1400000000},  # 10 duplicate
    ])
    source = {"kind": "amazon", "reviews": str(reviews), "meta": str(meta)}
    if with_queries:
        source["queries"] = str(json_lines(tmp_path / "queries.json", [
            {"reviewerID": "U1", "asin": "A2", "query": "electronics mice"},
            {"reviewerID": "U2", "asin": "A3", "query": "electronics keyboards"},
            {"reviewerID": "U2", "asin": "A3", "query": "keyboards again"},     # 3 duplicate pair
            {"reviewerID": "U9", "asin": "A1", "query": "nobody bought this"},  # 4 no such review
            {"reviewerID": "U1", "asin": "A1"},                                 # 5 no query
        ]))
    return source


def test_amazon_reviews_meta_and_queries(spark, tmp_path):
    cfg = config(tmp_path, _amazon(tmp_path, with_queries=True))
    manifest = ingest(spark, cfg)
    for table in ("items", "events", "queries"):
        c = manifest["tables"][table]
        assert c["raw"] == c["curated"] + c["rejected"], table
    assert rejected_by_row(cfg.warehouse, "items") == {4: "malformed_json", 5: "missing_field"}
    assert rejected_by_row(cfg.warehouse, "events") == {
        5: "unknown_item", 6: "missing_field", 7: "wrong_type", 8: "bad_timestamp",
        9: "malformed_json", 10: "duplicate_event"}
    assert rejected_by_row(cfg.warehouse, "queries") == {
        3: "duplicate_query", 4: "unmatched_query", 5: "missing_field"}

    items = read(cfg.warehouse / "curated" / "items").set_index("item_id")
    assert items.loc["A1", "categories"].tolist() == ["Electronics", "Computers & Accessories", "Cables"]
    assert items.loc["A2", "title"] == "Mouse" and "Logi" in items.loc["A2", "text"]
    assert "Mechanical" in items.loc["A3", "text"]
    events = read(cfg.warehouse / "curated" / "events").set_index(["user_id", "item_id"])
    assert events.loc[("U1", "A2"), "behavior"] == "search"
    assert events.loc[("U1", "A2"), "query"] == "electronics mice"
    assert events.loc[("U2", "A3"), "query"] == "electronics keyboards"
    assert events.loc[("U1", "A1"), "behavior"] == "rec"


def _details(wh, table: str) -> dict[int, tuple[str, str]]:
    rej = read(wh / "curated" / "rejected")
    rej = rej[rej["table"] == table]
    return {int(r): (reason, detail) for r, reason, detail in zip(rej["row"], rej["reason"], rej["detail"])}


def test_line_level_rejections_name_the_problem(spark, tmp_path):
    """Empty, blank, malformed and non-UTF-8 lines each get their own reason and a detail that
    says what is wrong and where; the good lines around them are curated and the counts add up."""
    good = [json.dumps({"reviewerID": f"U{k}", "asin": "A1", "overall": 4.0, "unixReviewTime": 1400000000 + k})
            for k in range(3)]
    reviews = write_lines(tmp_path / "reviews.json", [
        good[0],
        "",                                                                                # 2
        '{"reviewerID": "U1" "asin": "A2", "overall": 4.0, "unixReviewTime": 1400000100}',  # 3
        b'{"reviewerID": "U\xff2", "asin": "A1", "overall": 4.0, "unixReviewTime": 1}',    # 4
        good[1],
        "   ",                                                                             # 6
        '{"reviewerID": "U2", "asin": "A1", "overall": 4.0',                               # 7 cut short
        '{"reviewerID": "U3", "asin": "A1", "asin": "A2", "unixReviewTime": 1400000300}',  # 8
        # U+FFFD is valid text; the bad byte is the lone 0x80 after it, 24 bytes in
        '{"reviewerID": "U\ufffd", "\x80"}'.encode("utf-8").replace(b"\xc2\x80", b"\x80"),  # 9
        good[2],
    ])
    meta = json_lines(tmp_path / "meta.json", [
        {"asin": "A1", "title": "USB Cable"},
        "{'asin': 'A9', 'title': 'Broken'",                    # 2: a Python literal cut short
        "",                                                    # 3
    ])
    cfg = config(tmp_path, {"kind": "amazon", "reviews": str(reviews), "meta": str(meta)},
                 data={"search": {"enabled": False}})
    manifest = ingest(spark, cfg)

    assert _details(cfg.warehouse, "events") == {
        2: ("empty_line", "the line is empty"),
        3: ("malformed_json", "Expecting ',' delimiter: line 1 column 21 (char 20)"),
        4: ("undecodable_text", "invalid UTF-8 byte 0xFF at byte offset 17 of the line"),
        6: ("empty_line", "the line holds only whitespace"),
        7: ("malformed_json", "Expecting ',' delimiter: line 1 column 50 (char 49)"),
        8: ("malformed_json", "duplicate key 'asin' in an object"),
        9: ("undecodable_text", "invalid UTF-8 byte 0x80 at byte offset 24 of the line"),
    }
    assert _details(cfg.warehouse, "items") == {
        2: ("malformed_json", ("neither JSON (Expecting property name enclosed in double quotes: line 1 "
                               "column 2 (char 1)) nor a Python literal ('{' was never closed at column 1)")),
        3: ("empty_line", "the line is empty"),
    }
    events = manifest["tables"]["events"]
    assert events == {"raw": 10, "curated": 3, "rejected": 7, "rejected_by_reason": {
        "empty_line": 2, "malformed_json": 3, "undecodable_text": 2}}
    assert manifest["tables"]["items"] == {"raw": 3, "curated": 1, "rejected": 2, "rejected_by_reason": {
        "empty_line": 1, "malformed_json": 1}}
    curated = read(cfg.warehouse / "curated" / "events").sort_values("ts")
    assert curated["user_id"].tolist() == ["U0", "U1", "U2"]
    assert curated["ts"].tolist() == [1400000000, 1400000001, 1400000002]
    rejected = read(cfg.warehouse / "curated" / "rejected")
    assert rejected.loc[(rejected["table"] == "events") & (rejected["row"] == 3), "raw"].iloc[0].startswith(
        '{"reviewerID": "U1" "asin"')


def test_python_parser_runs_on_rejected_rows_only(spark, tmp_path):
    """The JSON parser's message comes from a Python UDF: it must sit above the quarantine filter
    in the physical plan, so that good lines never go through Python."""
    from gensar_core.data import readers, validate

    reviews = json_lines(tmp_path / "reviews.json", [{"reviewerID": "U1", "asin": "A1"}, "[1,"])
    raw = readers._read_json_lines(spark, reviews, "reviews", readers._REVIEW_SCHEMA).select(
        "source", "row", "error", "error_detail", F.col("line").alias("raw"))
    explained = readers.explain_malformed_json(validate.rejected_rows(validate.with_reason(raw, []), "events"))
    plan = explained._jdf.queryExecution().executedPlan().toString()
    # the tree prints top-down: the quarantine filter must come between the UDF and the file scan
    assert "Filter" in plan[plan.index("BatchEvalPython"):plan.index("FileScan text")], plan
    assert [(r["row"], r["reason"], r["detail"]) for r in explained.collect()] == [
        (2, "malformed_json", "Expecting value: line 1 column 4 (char 3)")]


def test_amazon_without_query_file_synthesises_category_queries(spark, tmp_path):
    cfg = config(tmp_path, _amazon(tmp_path, with_queries=False), data={"search": {"share": 1.0, "title_terms": 0}})
    ingest(spark, cfg)
    events = read(cfg.warehouse / "curated" / "events").set_index(["user_id", "item_id"])
    assert (events["behavior"] == "search").all()
    assert events.loc[("U1", "A1"), "query"] == "electronics computers accessories cables"


# ----------------------------------------------------------------------------- KuaiSAR
def test_kuaisar_rec_and_search_files(spark, tmp_path):
    items = write_lines(tmp_path / "item_features.csv", [
        "item_id,caption,author_id,first_level_category_name_en,second_level_category_name_en",
        '1,"[1, 213, 24]",10,Funny,Funny joke',
        '2,"[5, 6]",11,Food,empty',
        '3,"[7]",12,Sports,Football',
        '3,"[8]",12,Sports,Football',                      # 5 duplicate item
    ])
    rec = write_lines(tmp_path / "rec_inter.csv", [
        "user_id,item_id,time,timestamp,click",
        "100,1,2023-05-22 15:53:20,1684742000000.0,1",
        "100,2,2023-05-22 15:54:20,1684742060000.0,1",
        "100,3,2023-05-22 15:55:20,1684742120000.0,0",     # 4 impression without click
        "101,4,2023-05-22 15:56:20,1684742180000.0,1",     # 5 unknown item
        "101,1,2023-05-22 15:57:20,,1",                    # 6 timestamp empty -> falls back to `time`
    ])
    src = write_lines(tmp_path / "src_inter.csv", [
        "user_id,search_session_id,search_session_time,search_session_timestamp,keyword,search_source,item_id,click_cnt,item_type",
        '100,7,2023-05-22 21:58:52,1684763932919,"[20, 34, 3]",USER_INPUT,3,1,VIDEO',
        '100,7,2023-05-22 21:58:52,1684763932919,"[20, 34, 3]",USER_INPUT,2,0,VIDEO',  # 3 not clicked
        '101,8,2023-05-22 22:00:00,,"[]",USER_INPUT,2,1,VIDEO',                        # 4 empty query
        '101,9,not a date,,"[9]",USER_INPUT,2,1,VIDEO',                                # 5 bad ts
    ])
    cfg = config(tmp_path, {"kind": "kuaisar", "rec_inter": str(rec), "src_inter": str(src), "items": str(items)})
    manifest = ingest(spark, cfg)
    assert manifest["tables"]["events"] == {
        "raw": 9, "curated": 4, "rejected": 5,
        "rejected_by_reason": {"bad_timestamp": 1, "missing_field": 1, "not_clicked": 2, "unknown_item": 1}}
    assert rejected_by_row(cfg.warehouse, "items") == {5: "duplicate_item"}
    events = read(cfg.warehouse / "curated" / "events")
    search = events[events["behavior"] == "search"].iloc[0]
    assert (search["item_id"], search["query"], search["session_id"], search["ts"]) == ("3", "w20 w34 w3", "7", 1684763932)
    assert events.loc[(events["user_id"] == "101") & (events["item_id"] == "1"), "ts"].iloc[0] == 1684771040
    items_t = read(cfg.warehouse / "curated" / "items").set_index("item_id")
    assert items_t.loc["2", "categories"].tolist() == ["Food"]


# ----------------------------------------------------------------------------- generic
def _generic_frames():
    items = pd.DataFrame({"sku": ["a", "b", "c", None], "name": ["Alpha", "Beta", "Gamma", "Nameless"],
                          "cats": ["x|y", "y", "", "z"]})
    events = pd.DataFrame({
        "uid": ["u1", "u1", "u2", "u2", "u2", "u3"],
        "sku": ["a", "b", "c", "a", "b", "zz"],
        "when": ["2024-01-01T10:00:00", "1704103200", "1704103300000", "2024-01-02", "31/12/2023", "1704103200"],
        "kind": ["rec", "search", "rec", "browse", "rec", "rec"],
        "q": [None, "beta things", None, None, None, None],
    })
    return items, events


def _generic_source(fmt, items_path, events_path):
    return {"kind": "generic", "format": fmt, "items": str(items_path), "events": str(events_path),
            "item_columns": {"item": "sku", "title": "name", "categories": "cats"},
            "event_columns": {"user": "uid", "item": "sku", "ts": "when", "behavior": "kind", "query": "q"}}


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_generic_layout(spark, tmp_path, fmt):
    items, events = _generic_frames()
    if fmt == "csv":
        items.to_csv(tmp_path / "items.csv", index=False)
        events.to_csv(tmp_path / "events.csv", index=False)
        ip, ep = tmp_path / "items.csv", tmp_path / "events.csv"
    else:
        (tmp_path / "events").mkdir()
        items.to_parquet(tmp_path / "items.parquet", index=False)
        events.iloc[:3].to_parquet(tmp_path / "events" / "part-a.parquet", index=False)
        events.iloc[3:].to_parquet(tmp_path / "events" / "part-b.parquet", index=False)
        ip, ep = tmp_path / "items.parquet", tmp_path / "events"
    cfg = config(tmp_path, _generic_source(fmt, ip, ep), data={"search": {"enabled": False}})
    manifest = ingest(spark, cfg)
    ev = manifest["tables"]["events"]
    assert (ev["raw"], ev["curated"]) == (6, 3)
    assert ev["rejected_by_reason"] == {"bad_timestamp": 1, "unknown_item": 1, "wrong_type": 1}
    assert manifest["tables"]["items"]["rejected_by_reason"] == {"missing_field": 1}
    rejected = read(cfg.warehouse / "curated" / "rejected")
    first_row = 2 if fmt == "csv" else 1  # CSV rows count the header line
    ev_rows = dict(zip(rejected.loc[rejected.table == "events", "row"], rejected.loc[rejected.table == "events", "reason"]))
    if fmt == "csv":
        assert ev_rows == {first_row + 3: "wrong_type", first_row + 4: "bad_timestamp", first_row + 5: "unknown_item"}
    else:  # rows number within each file
        assert ev_rows == {1: "wrong_type", 2: "bad_timestamp", 3: "unknown_item"}
    curated = read(cfg.warehouse / "curated" / "events").sort_values("ts")
    assert curated["ts"].tolist() == [1704103200, 1704103200, 1704103300]
    assert curated["behavior"].tolist().count("search") == 1
    it = read(cfg.warehouse / "curated" / "items").set_index("item_id")
    assert it.loc["a", "categories"].tolist() == ["x", "y"] and it.loc["c", "categories"].tolist() == []


def test_unreadable_inputs_name_the_file(spark, tmp_path):
    items, events = _generic_frames()
    items.to_csv(tmp_path / "items.csv", index=False)
    (tmp_path / "events.parquet").write_text("this is not parquet")
    cfg = config(tmp_path, _generic_source("parquet", tmp_path / "items.csv", tmp_path / "events.parquet"))
    with pytest.raises(IngestError, match="items.csv"):  # the items file is CSV, not Parquet
        ingest(spark, cfg)
    items.to_parquet(tmp_path / "items.parquet", index=False)
    cfg = config(tmp_path, _generic_source("parquet", tmp_path / "items.parquet", tmp_path / "events.parquet"))
    with pytest.raises(IngestError, match="events.parquet"):
        ingest(spark, cfg)
    cfg = config(tmp_path, _generic_source("csv", tmp_path / "nope.csv", tmp_path / "events.csv"))
    with pytest.raises(IngestError, match="nope.csv.*does not exist"):
        ingest(spark, cfg)
    events.drop(columns=["kind"]).to_csv(tmp_path / "events.csv", index=False)
    cfg = config(tmp_path, _generic_source("csv", tmp_path / "items.csv", tmp_path / "events.csv"))
    with pytest.raises(IngestError, match=r"events.csv lacks the column\(s\) \['kind'\]"):
        ingest(spark, cfg)
