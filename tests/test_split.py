"""k-core, leave-one-out and chronological splits, and the interleaved histories (plain pandas)."""
from __future__ import annotations

import pandas as pd
from helpers import read

from gensar_core.config import PipelineConfig, SplitConfig
from gensar_core.data.split import chronological, histories, kcore_filter, make_samples, order_events, run_split
from gensar_core.storage import atomic_dir, write_table


def _events(rows):
    return pd.DataFrame(rows, columns=["user_id", "item_id", "ts", "behavior", "query", "session_id"])


def test_kcore_repeats_until_stable():
    # u4 has one event; dropping it leaves item c with one, then u3 with one: all three go
    rows = [(u, i, t, "rec", None, None) for t, (u, i) in enumerate(
        [("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "b"), ("u3", "c"), ("u3", "a"), ("u4", "c")])]
    out = kcore_filter(_events(rows), 2)
    assert sorted(set(out["user_id"])) == ["u1", "u2"]
    assert sorted(set(out["item_id"])) == ["a", "b"]
    assert kcore_filter(_events(rows), 0).shape[0] == 7


def test_leave_one_out_and_histories():
    rows = [
        ("u1", "i1", 10, "rec", None, None),
        ("u1", "i2", 20, "search", "red shoes", "s1"),
        ("u1", "i3", 30, "rec", None, None),
        ("u1", "i4", 40, "search", "blue hat", "s2"),
        ("u1", "i5", 50, "rec", None, None),
        ("u2", "i1", 5, "rec", None, None),
        ("u2", "i2", 6, "rec", None, None),
    ]
    s = make_samples(_events(rows), SplitConfig(kcore=0, valid_events=1, max_rec_history=1, max_search_history=1))
    u1 = s[s.user_id == "u1"].set_index("item_id")
    assert u1["split"].to_dict() == {"i1": "train", "i2": "train", "i3": "train", "i4": "valid", "i5": "test"}
    assert (s[s.user_id == "u2"]["split"] == "train").all()  # fewer than 3 events
    # test sample: last rec (i3) and last search (i4, with its query), in time order
    hist = u1.loc["i5", "history"]
    assert [(h["behavior"], h["item_id"], h["query"]) for h in hist] == [("rec", "i3", None), ("search", "i4", "blue hat")]
    assert u1.loc["i1", "history"] == []
    assert [h["item_id"] for h in u1.loc["i4", "history"]] == ["i2", "i3"]


def test_leave_one_out_with_several_valid_events_keeps_a_train_event():
    rows = [(u, f"i{k}", k, "rec", None, None) for u, n in (("long", 6), ("short", 3)) for k in range(n)]
    s = make_samples(_events(rows), SplitConfig(valid_events=3))
    splits = {u: s[s.user_id == u].sort_values("ts")["split"].tolist() for u in ("long", "short")}
    assert splits["long"] == ["train", "train", "valid", "valid", "valid", "test"]
    assert splits["short"] == ["train", "valid", "test"]  # at least one train event stays


def test_history_limits_keep_the_most_recent():
    rows = [("u", f"i{k}", k, "search" if k % 3 == 0 else "rec", f"q{k}" if k % 3 == 0 else None, None)
            for k in range(30)]
    ev = order_events(_events(rows))
    hist = histories(ev, max_rec=5, max_search=2)[-1]
    # the last 5 recs (22, 23, 25, 26, 28) and the last 2 searches (24, 27), in time order
    assert [h["item_id"] for h in hist] == ["i22", "i23", "i24", "i25", "i26", "i27", "i28"]
    assert [h["ts"] for h in hist] == sorted(h["ts"] for h in hist)


def test_ties_break_by_item_so_runs_agree():
    rows = [("u", "b", 1, "rec", None, None), ("u", "a", 1, "rec", None, None), ("u", "c", 2, "rec", None, None)]
    first = make_samples(_events(rows), SplitConfig())
    again = make_samples(_events(rows[::-1]), SplitConfig())
    assert first["item_id"].tolist() == again["item_id"].tolist() == ["a", "b", "c"]


def test_chronological_split_by_global_time():
    rows = [(f"u{k % 3}", f"i{k}", k, "rec", None, None) for k in range(100)]
    split = chronological(order_events(_events(rows)), 0.8, 0.1)
    ev = order_events(_events(rows))
    assert ev.loc[split == "train", "ts"].max() < ev.loc[split == "valid", "ts"].min()
    assert ev.loc[split == "valid", "ts"].max() < ev.loc[split == "test", "ts"].min()
    assert (split == "train").sum() == 80


def test_run_split_writes_the_three_tables(tmp_path):
    cfg = PipelineConfig(warehouse=tmp_path / "wh", split=SplitConfig(kcore=2))
    rows = [(f"u{u}", f"i{(u + k) % 4}", 100 * u + k, "rec", None, None) for u in range(5) for k in range(4)]
    rows.append(("lonely", "i9", 1, "rec", None, None))  # dropped by the 2-core filter
    with atomic_dir(cfg.warehouse / "curated") as stage:
        write_table(_events(rows), stage / "events")
    manifest = run_split(cfg)
    assert manifest["events_in"] == 21 and manifest["events_after_kcore"] == 20
    # 4 events a user: one train event stays, then 2 of the 3 default valid events
    assert {k: v["samples"] for k, v in manifest["splits"].items()} == {"train": 5, "valid": 10, "test": 5}
    test = read(cfg.warehouse / "splits" / "test")
    assert list(test.columns) == ["user_id", "item_id", "ts", "behavior", "query", "session_id", "position", "history"]
    assert (test["position"] == 3).all() and test["history"].map(len).eq(3).all()
