"""MovieLens (RecBole atomic files) through real Spark: good rows curated, bad rows quarantined."""
from __future__ import annotations

import pytest
from helpers import config, movielens_files, read, rejected_by_row

from gensar_core.data.ingest import format_counts, ingest


def test_good_and_bad_rows_reconcile(spark, tmp_path):
    base = movielens_files(
        tmp_path / "ml",
        extra_events=[
            "1\t2\t3",                                # line 17: a field is missing
            "1\t2\tfive\t880000500",                  # 18: rating is not a number
            "1\t2\t3\tyesterday",                     # 19: bad timestamp
            "1\t999\t3\t880000600",                   # 20: item not in the catalogue
            "1\t2\t3\t880001000",                     # 21: duplicate of line 2 (user 1, item 3? no: see below)
            b"1\t\xff\xfe\t3\t880000700",             # 22: not UTF-8
            "1\t3\t3\t880000700\textra",              # 23: one field too many
            "\t3\t3\t880000800",                      # 24: empty user
            "",                                       # 25: an empty line
        ],
        extra_items=["1\tToy Story again\t1995\tAnimation",   # line 8: duplicate item id
                     "7\t\t1999\t"],                          # line 9: no title, no text
    )
    cfg = config(tmp_path, {"kind": "movielens", "path": str(base)}, data={"search": {"enabled": False}})
    manifest = ingest(spark, cfg)
    wh = cfg.warehouse

    events = manifest["tables"]["events"]
    assert events["raw"] == 15 + 9
    assert events["raw"] == events["curated"] + events["rejected"]
    rows = rejected_by_row(wh, "events")
    assert rows[17] == "missing_field"
    assert rows[18] == "wrong_type"
    assert rows[19] == "bad_timestamp"
    assert rows[20] == "unknown_item"
    assert rows[22] == "undecodable_text"
    assert rows[23] == "malformed_row"
    assert rows[24] == "missing_field"
    assert rows[25] == "empty_line"
    # line 21 repeats user 1's first event (item 3, ts 880001000): the later copy is rejected
    assert rows[21] == "duplicate_event"
    assert 2 not in rows

    items = manifest["tables"]["items"]
    assert (items["raw"], items["curated"], items["rejected"]) == (8, 6, 2)
    assert rejected_by_row(wh, "items") == {8: "duplicate_item", 9: "missing_field"}

    curated = read(wh / "curated" / "events")
    assert list(curated.columns) == ["user_id", "item_id", "ts", "behavior", "query", "session_id"]
    assert len(curated) == 15 and set(curated["behavior"]) == {"rec"}
    item_table = read(wh / "curated" / "items")
    assert sorted(item_table["item_idx"]) == list(range(6))
    assert item_table.set_index("item_id").loc["5", "categories"].tolist() == ["Sci-Fi", "War"]
    rejected = read(wh / "curated" / "rejected")
    assert rejected["source"].str.endswith("ml-100k.inter").any()
    assert "yesterday" in rejected.loc[rejected["row"] == 19, "raw"].iloc[0]
    assert "raw 24 = curated 15 + rejected 9" in format_counts(manifest)
    ev_rej = rejected[rejected["table"] == "events"]
    detail = dict(zip(ev_rej["row"], ev_rej["detail"]))
    assert detail[17] == "3 fields, the header has 4"
    assert detail[22] == "invalid UTF-8 byte 0xFF at byte offset 2 of the line"
    assert detail[23] == "more fields than the header's 4"
    assert detail[24] == "user_id" and detail[25] == "the line is empty"


def test_line_numbers_survive_many_partitions(spark, tmp_path):
    """Row numbers stay exact when Spark splits one file over several partitions."""
    bad_lines = {}
    extra = []
    for k in range(3000):
        line_no = 17 + k
        if k % 997 == 5:
            extra.append(f"1\t2\t3\tnot-a-time-{k}")
            bad_lines[line_no] = "bad_timestamp"
        else:
            extra.append(f"{100 + k}\t{k % 6 + 1}\t4\t{881000000 + k}")
    base = movielens_files(tmp_path / "ml", extra_events=extra)
    spark.conf.set("spark.sql.files.maxPartitionBytes", "8192")
    try:
        cfg = config(tmp_path, {"kind": "movielens", "path": str(base)})
        ingest(spark, cfg)
    finally:
        spark.conf.unset("spark.sql.files.maxPartitionBytes")
    rows = rejected_by_row(cfg.warehouse, "events")
    assert rows == bad_lines
    rejected = read(cfg.warehouse / "curated" / "rejected")
    for row, raw in zip(rejected["row"], rejected["raw"]):
        assert raw == extra[row - 17]


def test_events_after_run_date_are_rejected(spark, tmp_path):
    base = movielens_files(tmp_path / "ml", extra_events=["1\t1\t3\t1900000000"])  # 2030
    cfg = config(tmp_path, {"kind": "movielens", "path": str(base)}, ds="2026-11-27")
    manifest = ingest(spark, cfg)
    assert manifest["tables"]["events"]["rejected_by_reason"] == {"after_run_date": 1}


def test_synthetic_search_share_and_queries(spark, tmp_path):
    extra = [f"{10 + k // 50}\t{k % 6 + 1}\t4\t{881000000 + k}" for k in range(2000)]
    base = movielens_files(tmp_path / "ml", extra_events=extra)
    cfg = config(tmp_path, {"kind": "movielens", "path": str(base)},
                 data={"search": {"share": 0.3, "seed": 7, "title_terms": 1}})
    ingest(spark, cfg)
    events = read(cfg.warehouse / "curated" / "events")
    search = events[events["behavior"] == "search"]
    assert 0.25 < len(search) / len(events) < 0.35
    items = read(cfg.warehouse / "curated" / "items").set_index("item_id")
    for _, row in search.head(50).iterrows():
        genres = " ".join(items.loc[row["item_id"], "categories"]).lower().replace("-", " ")
        assert row["query"].startswith(genres), (row["query"], genres)
        assert row["session_id"] == f"{row['user_id']}-{row['ts']}"
    assert events.loc[events["behavior"] == "rec", "query"].isna().all()


@pytest.mark.parametrize("missing", ["ml-100k.inter", "ml-100k.item"])
def test_missing_file_names_the_file(spark, tmp_path, missing):
    from gensar_core.data.readers import IngestError

    base = movielens_files(tmp_path / "ml")
    (base / missing).unlink()
    cfg = config(tmp_path, {"kind": "movielens", "path": str(base)})
    with pytest.raises(IngestError, match=missing.replace(".", r"\.")):
        ingest(spark, cfg)


def test_item_index_is_stable_across_runs(spark, tmp_path):
    """A later run keeps every item's index, appends new items and keeps dropped ones."""
    base = movielens_files(tmp_path / "ml")
    cfg = config(tmp_path, {"kind": "movielens", "path": str(base)})
    ingest(spark, cfg)
    first = read(cfg.warehouse / "curated" / "items").set_index("item_id")["item_idx"].to_dict()
    # the next night's catalogue: item 6 is gone, item 0 (first in item_id order) is new
    lines = (base / "ml-100k.item").read_text().splitlines()
    lines = [ln for ln in lines if not ln.startswith("6\t")] + ["0\tNew Movie\t2026\tDrama"]
    (base / "ml-100k.item").write_text("\n".join(lines) + "\n")
    ingest(spark, cfg)
    second = read(cfg.warehouse / "curated" / "items").set_index("item_id")["item_idx"].to_dict()
    assert {k: second[k] for k in first} == first
    assert second["0"] == 6 and sorted(second.values()) == list(range(7))
