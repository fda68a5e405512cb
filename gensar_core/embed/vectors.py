"""The item-vector table shared by `features/semantic` and `features/collaborative`.

Schema: `item_idx` int64, `vector` list<float32>, one row per item, sorted by item_idx.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gensar_core.storage import resolve


def list_array(vectors: np.ndarray) -> pa.ListArray:
    """An (n, dim) matrix as a list<float32> column."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    # built from flat values + offsets: no per-row Python objects for large catalogues
    offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1), type=pa.float32()))


def list_array_to_matrix(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A list<float32> column of equal-length lists back to an (n, dim) matrix."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if len(column) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    dim = len(column[0])
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)


def vectors_table(item_idx: np.ndarray, vectors: np.ndarray) -> pa.Table:
    """Build the table from an (N,) index array and an (N, dim) matrix, row i for item_idx[i]."""
    if len(item_idx) != len(vectors):
        raise ValueError(f"{len(item_idx)} item ids for {len(vectors)} vectors")
    return pa.table({"item_idx": pa.array(np.asarray(item_idx, dtype=np.int64)),
                     "vector": list_array(vectors)})


def read_vectors(path: str | Path) -> np.ndarray:
    """Read a vector table back as an (N, dim) float32 matrix whose row i is item_idx i."""
    table = pq.read_table(resolve(path)).sort_by("item_idx")
    idx = table.column("item_idx").to_numpy()
    if not np.array_equal(idx, np.arange(len(idx))):
        raise ValueError(f"{path}: item_idx is not dense 0..{len(idx) - 1}")
    return list_array_to_matrix(table.column("vector"))
