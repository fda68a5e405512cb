"""Identifier sizes from the catalogue (`identifiers.codebook_size: auto`)."""
from __future__ import annotations

import pandas as pd
import pytest

from gensar_core.config import PipelineConfig, load_config
from gensar_core.identifiers.sizing import auto_codebook_size, resolved_identifiers, with_size
from gensar_core.storage import Warehouse


@pytest.mark.parametrize("items,size", [(1, 8), (250, 8), (1682, 32), (4096, 64), (60_000, 128),
                                        (65_536, 256), (10_000_000, 256)])
def test_rule(items, size):
    assert auto_codebook_size(items) == size
    assert size ** 2 <= max(items, 64) and size ** 4 >= items


def test_auto_is_the_default_and_explicit_sizes_win():
    assert PipelineConfig().identifiers.codebook_size == "auto"
    assert with_size(PipelineConfig().identifiers, 1682).codebook_size == 32
    assert with_size(load_config(None, ["identifiers.codebook_size=256"]).identifiers, 1682).codebook_size == 256
    with pytest.raises(ValueError):
        auto_codebook_size(0)


def test_a_warehouse_keeps_the_size_of_its_trained_identifiers(tmp_path):
    cfg = PipelineConfig(warehouse=tmp_path)
    wh = Warehouse(tmp_path)
    import pyarrow as pa

    from gensar_core.storage import write_table

    write_table(pa.Table.from_pandas(pd.DataFrame({"item_idx": range(1682)})), wh.path("curated", "items"))
    assert resolved_identifiers(cfg).codebook_size == 32
    saved = wh.path("identifiers", "quantiser")
    saved.mkdir(parents=True)
    (saved / "config.json").write_text('{"spec": {"codebook_size": 16}}')
    assert resolved_identifiers(cfg).codebook_size == 16
