"""Reruns give the same content; a step that dies midway leaves the last good output."""
from __future__ import annotations

import os

import pandas as pd
import pytest
from helpers import config, movielens_files, read

from gensar_core import storage
from gensar_core.data.ingest import ingest
from gensar_core.data.split import run_split


def _content(folder) -> dict[str, pd.DataFrame]:
    out = {}
    for name in ("items", "events", "rejected"):
        df = read(folder / name)
        df = df.map(lambda v: tuple(v) if hasattr(v, "__len__") and not isinstance(v, str) else v)
        out[name] = df.sort_values(list(df.columns)).reset_index(drop=True)
    return out


def _cfg(tmp_path):
    extra = [f"{10 + k // 40}\t{k % 6 + 1}\t4\t{881000000 + k}" for k in range(400)] + ["1\t1\t3\tbad"]
    return config(tmp_path, {"kind": "movielens", "path": str(movielens_files(tmp_path / "ml", extra))},
                  ds="2026-11-27")


def test_rerun_for_same_ds_gives_same_rows_and_values(spark, tmp_path):
    cfg = _cfg(tmp_path)
    first = ingest(spark, cfg)
    before = _content(cfg.warehouse / "curated")
    second = ingest(spark, cfg)
    after = _content(cfg.warehouse / "curated")
    for name in before:
        pd.testing.assert_frame_equal(before[name], after[name])
    first.pop("seconds"), second.pop("seconds")
    assert first == second
    run_split(cfg)
    splits_before = {n: read(cfg.warehouse / "splits" / n) for n in ("train", "valid", "test")}
    run_split(cfg)
    for n, df in splits_before.items():
        pd.testing.assert_frame_equal(df, read(cfg.warehouse / "splits" / n))


def test_crash_midway_keeps_last_good_output(spark, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    ingest(spark, cfg)
    good = _content(cfg.warehouse / "curated")

    # the next run dies after its tables are written but before they are committed
    def die(stage, target):
        assert (stage / "events").exists()
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(storage, "commit", die)
    bigger = cfg.model_copy(update={"ds": None})
    with pytest.raises(KeyboardInterrupt):
        ingest(spark, bigger)
    monkeypatch.undo()
    for name, df in _content(cfg.warehouse / "curated").items():
        pd.testing.assert_frame_equal(df, good[name])

    # a retry succeeds and sweeps what the killed run left behind
    ingest(spark, cfg)
    assert sorted(p.name for p in cfg.warehouse.iterdir()) == ["curated"]
    for name, df in _content(cfg.warehouse / "curated").items():
        pd.testing.assert_frame_equal(df, good[name])


def test_crash_between_the_swap_renames_is_repaired(tmp_path):
    target = tmp_path / "curated"
    with storage.atomic_dir(target) as stage:
        (stage / "marker").write_text("good")
    # simulate dying after `target` was moved aside but before the new one was moved in
    os.rename(target, tmp_path / "curated.old-deadbeef")
    (tmp_path / "curated.tmp-cafecafe").mkdir()
    assert storage.resolve(target) == target
    assert (target / "marker").read_text() == "good"
    with storage.atomic_dir(target) as stage:
        (stage / "marker").write_text("newer")
    assert (target / "marker").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curated"]


def test_failed_write_discards_staging(tmp_path):
    target = tmp_path / "t"
    with pytest.raises(RuntimeError):
        with storage.atomic_dir(target) as stage:
            (stage / "x").write_text("half")
            raise RuntimeError("boom")
    assert not tmp_path.joinpath("t").exists() and list(tmp_path.iterdir()) == []
