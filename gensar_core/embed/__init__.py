"""Item embeddings: semantic (text encoder) and collaborative (SASRec over click sequences).

Both steps write the same table shape, `item_idx` int64 + `vector` list<float32>, one row per
item of `curated/items`; `read_vectors` reads either back as an (N, dim) matrix.
"""
from gensar_core.embed.vectors import read_vectors, vectors_table

__all__ = ["read_vectors", "vectors_table"]
