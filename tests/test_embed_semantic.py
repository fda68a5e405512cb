"""Semantic item embeddings on a tiny catalogue with the packaged MiniLM encoder (offline)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gensar_core.config import PipelineConfig
from gensar_core.embed import read_vectors
from gensar_core.embed import semantic
from gensar_core.embed.semantic import item_text, run_embed_semantic
from gensar_core.storage import atomic_dir, write_table

ITEMS = [
    ("m1", "Star Wars", "Star Wars (1977) space opera", ["Action", "Sci-Fi"]),
    ("m2", "Alien", "Alien (1979) horror in space", ["Horror", "Sci-Fi"]),
    ("m3", "Toy Story", "Toy Story (1995)", ["Animation", "Children's", "Comedy"]),
    ("m4", "Sleepless in Seattle", "Romantic comedy about a widower", ["Comedy", "Romance"]),
    ("m5", "Heat", "", []),
]


def write_items(root, items=ITEMS):
    df = pd.DataFrame(items, columns=["item_id", "title", "text", "categories"])
    df.insert(1, "item_idx", np.arange(len(df), dtype=np.int64))
    with atomic_dir(root / "curated" / "items") as stage:
        write_table(df, stage)


@pytest.fixture
def cfg(tmp_path):
    write_items(tmp_path)
    return PipelineConfig(warehouse=tmp_path, embed={"semantic": {"batch_size": 2, "device": "cpu"}})


def test_item_text_does_not_repeat_title_and_lists_categories():
    assert item_text("Alien", "Alien (1979) horror", ["Horror", "Sci-Fi"]) == \
        "Alien (1979) horror. Categories: Horror, Sci-Fi"
    assert item_text("Heat", "A heist film", None) == "Heat. A heist film"
    assert item_text("Heat", None, []) == "Heat"
    assert item_text(None, None, np.array(["Drama"])) == "Categories: Drama"


def test_vectors_normalised_and_cache_avoids_reencoding(cfg):
    first = run_embed_semantic(cfg, progress=False)
    assert first["encoded"] == len(ITEMS) and first["cached"] == 0
    assert first["items"] == len(ITEMS) and first["dim"] == 384

    table = pq.read_table(cfg.warehouse / "features" / "semantic")
    vtype = table.schema.field("vector").type
    assert pa.types.is_list(vtype) and vtype.value_type == pa.float32()
    assert table.schema.field("item_idx").type == pa.int64()
    assert table.column("item_idx").to_pylist() == list(range(len(ITEMS)))
    vectors = read_vectors(cfg.warehouse / "features" / "semantic")
    assert vectors.shape == (len(ITEMS), 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    sims = vectors @ vectors.T
    assert sims[0, 1] > sims[0, 3]  # two space films are closer than space film vs romance

    # unchanged catalogue: nothing encoded, same vectors
    second = run_embed_semantic(cfg, progress=False)
    assert second["encoded"] == 0 and second["cached"] == len(ITEMS)
    np.testing.assert_array_equal(read_vectors(cfg.warehouse / "features" / "semantic"), vectors)

    # one text changed: exactly that item is encoded again
    changed = list(ITEMS)
    changed[4] = ("m5", "Heat", "Heat (1995) crime thriller", ["Crime"])
    write_items(cfg.warehouse, changed)
    third = run_embed_semantic(cfg, progress=False)
    assert third["encoded"] == 1 and third["cached"] == len(ITEMS) - 1
    after = read_vectors(cfg.warehouse / "features" / "semantic")
    np.testing.assert_array_equal(after[:4], vectors[:4])
    assert not np.allclose(after[4], vectors[4])


def test_failed_step_keeps_previous_output(cfg, monkeypatch):
    run_embed_semantic(cfg, progress=False)
    target = cfg.warehouse / "features" / "semantic"
    before = read_vectors(target)

    def write_then_die(table, folder, name="part-0.parquet"):
        write_table(table.slice(0, 1), folder, name)
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(semantic, "write_table", write_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        run_embed_semantic(cfg, progress=False)
    np.testing.assert_array_equal(read_vectors(target), before)
    assert [p.name for p in target.parent.iterdir()] == ["semantic"]  # no staging left behind


def test_missing_model_folder_fails_without_download(tmp_path):
    write_items(tmp_path)
    cfg = PipelineConfig(warehouse=tmp_path, embed={"semantic": {"model_path": str(tmp_path / "nope")}})
    with pytest.raises(FileNotFoundError, match="nope"):
        run_embed_semantic(cfg, progress=False)
