"""The LC-Rec / LETTER / P5 JSON layout (`data.source.kind: inter_json`) through real Spark: small
files written here in that layout (the real Office data is never read by tests)."""
from __future__ import annotations

import json

import pytest
from helpers import config, read

from gensar_core.config import ConfigError, InterJsonSource, load_config
from gensar_core.data.ingest import ingest
from gensar_core.data.readers import ORDER_EPOCH, IngestError, read_inter_json

ITEMS = {
    "0": {"title": "Cordless Phone", "description": "A phone.", "brand": "VTech",
          "categories": "Office Electronics, Telephones & Accessories, Cordless Telephones"},
    "1": {"title": "Stapler", "description": "", "brand": "Swingline", "categories": "Office & School Supplies, Staplers"},
    "2": {"title": "", "description": "Blue ink.", "brand": "Bic", "categories": "Office & School Supplies, Pens"},
    "3": {"title": "Paper", "description": "", "brand": "", "categories": "Paper, , Copy Paper "},
    "x7": {"title": "Key is not a number", "description": "", "brand": "", "categories": "Pens"},  # row 5
    "5": "not an object",                                                                        # 6
    "6": None,                                                                                   # 7
    "7": {"title": "", "description": "", "brand": "", "categories": "Pens"},                    # 8: no text
    "03": {"title": "Paper again", "description": "", "brand": "", "categories": "Paper"},       # 9: item 3 again
}
INTER = {
    "10": [0, 1, 2],                    # rows 1-3
    "11": [3, "1", 0, 2],               # 4-7 (an id may be a JSON string)
    "12": "not a list",                 # 8
    "13": [1, 4.5, None, [2], 99, 0],   # 9-14: 10 not an integer, 11 null, 12 a list, 13 no such item
    "14": [],                           # 15
    "15": None,                         # 16
    "16": [7, 2, 1],                    # 17-19: item 7 is rejected, so 17 has no item
    "17": [5, 0],                       # 20-21: item 5 is rejected
}
# the Amazon product-search protocol: category words, lower-cased, no stop words or repeats
QUERIES = {"0": "office electronics telephones accessories cordless", "1": "office school supplies staplers",
           "2": "office school supplies pens", "3": "paper copy"}


def _write(path, obj):
    path.write_text(json.dumps(obj, indent=4))  # pretty-printed, as the upstream files are
    return path


def _source(tmp_path, inter=INTER, items=ITEMS) -> dict:
    return {"kind": "inter_json", "inter": str(_write(tmp_path / "Toy.inter.json", inter)),
            "items": str(_write(tmp_path / "Toy.item.json", items))}


def test_reader_numbers_rows_orders_by_position_and_keeps_the_raw_place(spark, tmp_path):
    events, items, queries = read_inter_json(spark, InterJsonSource(**_source(tmp_path)))
    assert queries is None
    ev = events.toPandas().set_index("row")
    assert ev.index.tolist() == list(range(1, 22))
    assert set(ev["source"]) == {str(tmp_path / "Toy.inter.json")}
    u11 = ev[ev["user_id"] == "11"]
    assert u11["item_id"].tolist() == ["3", "1", "0", "2"]
    assert u11["ts_raw"].tolist() == [str(ORDER_EPOCH + p) for p in (1, 2, 3, 4)]
    assert u11["error"].isna().all() and (u11["behavior"] == "rec").all()
    assert json.loads(ev.loc[13, "raw"]) == {"user": "13", "position": 5, "item": "99"}
    assert json.loads(ev.loc[8, "raw"]) == {"user": "12", "value": "not a list"}
    assert {r: (ev.loc[r, "error"], ev.loc[r, "error_detail"]) for r in (8, 10, 11, 12, 15, 16)} == {
        8: ("wrong_type", 'user "12": the value is not a list of item ids'),
        10: ("wrong_type", 'user "13" position 2: "4.5" is not an integer item id'),
        11: ("missing_field", 'user "13" position 3: the item id is null'),
        12: ("wrong_type", 'user "13" position 4: "[2]" is not an integer item id'),
        15: ("missing_field", 'user "14": an empty list of item ids'),
        16: ("missing_field", 'user "15": null, not a list of item ids'),
    }

    it = items.toPandas().set_index("row")
    assert it.index.tolist() == list(range(1, 10))
    assert it.loc[1, "text"] == "Cordless Phone. VTech. A phone."
    assert it.loc[1, "categories"].tolist() == ["Office Electronics", "Telephones & Accessories", "Cordless Telephones"]
    assert it.loc[4, "categories"].tolist() == ["Paper", "Copy Paper"]  # trimmed, the empty level dropped
    assert it.loc[3, "title"] is None and it.loc[3, "text"] == "Bic. Blue ink."
    assert it.loc[9, "item_id"] == "3"  # '03' is item 3
    assert json.loads(it.loc[6, "raw"]) == {"item": "5", "entry": "not an object"}
    assert {r: (it.loc[r, "error"], it.loc[r, "error_detail"]) for r in (5, 6, 7)} == {
        5: ("wrong_type", 'item key "x7" is not an integer'),
        6: ("wrong_type", 'item "5": the entry is not an object'),
        7: ("missing_field", 'item "6": null, not an object'),
    }


def test_ingest_quarantines_bad_entries_and_counts_reconcile(spark, tmp_path):
    cfg = config(tmp_path, _source(tmp_path), data={"search": {"enabled": False}})
    manifest = ingest(spark, cfg)
    assert manifest["tables"]["events"] == {"raw": 21, "curated": 12, "rejected": 9, "rejected_by_reason": {
        "missing_field": 3, "unknown_item": 3, "wrong_type": 3}}
    assert manifest["tables"]["items"] == {"raw": 9, "curated": 4, "rejected": 5, "rejected_by_reason": {
        "duplicate_item": 1, "missing_field": 2, "wrong_type": 2}}

    rejected = read(cfg.warehouse / "curated" / "rejected")
    ev = rejected[rejected["table"] == "events"].set_index("row")
    assert ev.index.tolist() == [8, 10, 11, 12, 13, 15, 16, 17, 20]
    assert ev.loc[10, "detail"] == 'user "13" position 2: "4.5" is not an integer item id'
    # unknown items are found by the shared validation, whose detail names the field; the row and
    # raw text name the user and position
    assert ev.loc[[13, 17, 20], ["reason", "detail"]].values.tolist() == [["unknown_item", "item_id"]] * 3
    assert [json.loads(r) for r in ev.loc[[13, 17, 20], "raw"]] == [
        {"user": "13", "position": 5, "item": "99"}, {"user": "16", "position": 1, "item": "7"},
        {"user": "17", "position": 1, "item": "5"}]
    it = rejected[rejected["table"] == "items"].set_index("row")
    assert it["reason"].to_dict() == {5: "wrong_type", 6: "wrong_type", 7: "missing_field",
                                      8: "missing_field", 9: "duplicate_item"}
    assert it.loc[9, "detail"] == "item_id"

    events = read(cfg.warehouse / "curated" / "events").sort_values(["user_id", "ts"])
    assert events.groupby("user_id")["item_id"].agg(list).to_dict() == {
        "10": ["0", "1", "2"], "11": ["3", "1", "0", "2"], "13": ["1", "0"], "16": ["2", "1"], "17": ["0"]}
    assert events[events["user_id"] == "13"]["ts"].tolist() == [ORDER_EPOCH + 1, ORDER_EPOCH + 6]
    items = read(cfg.warehouse / "curated" / "items").set_index("item_id")
    assert items.loc["2", "title"] == "Bic. Blue ink."  # an empty title: the text stands in, as elsewhere


def test_ingest_turns_a_share_into_searches_with_category_path_queries(spark, tmp_path):
    inter = {str(u): [(u + k) % 4 for k in range(6)] for u in range(8)}
    items = {k: v for k, v in ITEMS.items() if k in QUERIES}
    cfg = config(tmp_path, _source(tmp_path, inter, items))  # data.search.enabled: None, share 0.3
    manifest = ingest(spark, cfg)
    assert manifest["tables"]["events"]["curated"] == 48
    searches = manifest["events_by_behavior"]["search"]
    assert 5 <= searches <= 25 and manifest["events_by_behavior"]["rec"] == 48 - searches
    events = read(cfg.warehouse / "curated" / "events")
    found = events[events["behavior"] == "search"]
    assert (found["query"] == found["item_id"].map(QUERIES)).all()
    assert (found["session_id"] == found["user_id"] + "-" + found["ts"].astype(str)).all()
    assert events.loc[events["behavior"] == "rec", "query"].isna().all()


@pytest.mark.parametrize("text, reason", [
    ('{\n    "1": [1, 2]\n', r"Expecting ',' delimiter: line 3 column 1"),
    ('[[1, 2], [3]]', "an array, not an object"),
    ('{"1": [1]}\n{"2": [2]}', "Extra data: line 2 column 1"),
    ('{"1": [1]} trailing', "Extra data: line 1 column 12"),
    ('{"1": [1], "1": [2]}', "duplicate key '1' in an object"),
    ('', "the file is empty"),
    (b'{"1": [1],\n "\xff": [2]}', "invalid UTF-8 byte 0xFF at byte offset 13"),
])
def test_a_file_that_is_not_one_json_object_names_the_file_and_why(spark, tmp_path, text, reason):
    src = _source(tmp_path)
    bad = tmp_path / "Bad.inter.json"
    bad.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(IngestError, match=rf"{bad} is not one JSON object: {reason}"):
        read_inter_json(spark, InterJsonSource(**{**src, "inter": str(bad)}))


def test_an_item_file_that_is_not_one_object_and_a_folder_of_files_are_errors(spark, tmp_path):
    src = _source(tmp_path)
    bad = tmp_path / "Bad.item.json"
    bad.write_text('"just a string"')
    with pytest.raises(IngestError, match=rf"items input {bad} is not one JSON object: a string, not an object"):
        read_inter_json(spark, InterJsonSource(**{**src, "items": str(bad)}))
    folder = tmp_path / "parts"
    folder.mkdir()
    _write(folder / "a.json", {"1": [0]})
    _write(folder / "b.json", {"2": [0]})
    with pytest.raises(IngestError, match="must be one JSON file, found 2 files"):
        read_inter_json(spark, InterJsonSource(**{**src, "inter": str(folder)}))


def test_a_chronological_split_of_inter_json_is_a_config_error(tmp_path):
    source = ["data.source.kind=inter_json", f"data.source.inter={tmp_path}/a.json",
              f"data.source.items={tmp_path}/b.json"]
    with pytest.raises(ConfigError, match=r"split\.strategy=chronological needs real timestamps.*inter_json"):
        load_config(None, source + ["split.strategy=chronological"])
    assert load_config(None, source).split.strategy == "leave_one_out"
