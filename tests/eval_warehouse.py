"""A tiny synthetic warehouse for evaluation tests (and for trying rankers without real data).

Items carry a genre and title words; users walk a cycle through the catalogue (so the next item
is learnable), about a third of the clicks are searches whose query is the item's genre plus a
title word (the semi-synthetic protocol of the README). Splits are made with the real split code
(leave-one-out, capped histories). Optionally writes features/semantic (a hashed bag-of-words
encoder standing in for MiniLM, see `hash_encoder`) and a small trained SASRec in features/sasrec.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from gensar_core.config import CollaborativeEmbedConfig, SplitConfig
from gensar_core.storage import atomic_dir, write_table

GENRES = ["action", "comedy", "drama", "horror", "romance", "thriller", "western", "musical"]
WORDS = ["river", "castle", "storm", "garden", "mirror", "harbor", "lantern", "forest", "desert", "engine",
         "violin", "shadow", "comet", "meadow", "glacier", "canyon", "island", "temple", "falcon", "ember"]


def hash_encoder(dim: int = 64):
    """A deterministic text -> L2-normalised vector function (hashed bag of words)."""

    def encode(texts):
        out = np.zeros((len(texts), dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in re.findall(r"\w\w+", str(text).lower()):
                h = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
                out[i, h % dim] += 1.0 if (h >> 32) & 1 else -1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)

    return encode


def synthetic_items(n_items: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_items):
        genre = GENRES[i % len(GENRES)]
        title = " ".join(rng.choice(WORDS, size=2, replace=False)).title() + f" {i}"
        rows.append({"item_id": f"i{i:04d}", "item_idx": i, "title": title,
                     "text": f"{title}. A {genre} film.", "categories": [genre.title()]})
    return pd.DataFrame(rows)


def synthetic_events(items: pd.DataFrame, n_users: int, seed: int = 0, min_len: int = 8,
                     max_len: int = 14, search_share: float = 0.35) -> pd.DataFrame:
    rng = np.random.default_rng(seed + 1)
    n = len(items)
    rows = []
    for u in range(n_users):
        start, step, length = int(rng.integers(n)), int(rng.integers(1, 3)), int(rng.integers(min_len, max_len + 1))
        for p in range(length):
            item = items.iloc[(start + step * p) % n]
            search = rng.random() < search_share
            query = None
            if search:
                word = rng.choice([w for w in re.findall(r"[a-z]{3,}", item["title"].lower())])
                query = f"{item['categories'][0].lower()} {word}"
            rows.append({"user_id": f"u{u:03d}", "item_id": item["item_id"], "ts": 1_000_000 + 3600 * p + u,
                         "behavior": "search" if search else "rec", "query": query,
                         "session_id": f"u{u:03d}-{p}" if search else None})
    return pd.DataFrame(rows)


def write_synthetic_warehouse(root: str | Path, n_items: int = 160, n_users: int = 40, seed: int = 0,
                              semantic_dim: int | None = 64, sasrec: bool = True, sasrec_epochs: int = 3,
                              valid_events: int = 1) -> dict:
    """curated/items + splits (+ features/semantic, features/sasrec) under `root`; returns the frames."""
    from gensar_core.data.split import SAMPLE_SCHEMA, SPLITS, make_samples

    root = Path(root)
    items = synthetic_items(n_items, seed)
    with atomic_dir(root / "curated" / "items") as stage:
        write_table(items, stage)
    samples = make_samples(synthetic_events(items, n_users, seed), SplitConfig(valid_events=valid_events))
    splits = {}
    for name in SPLITS:
        part = samples[samples["split"] == name]
        with atomic_dir(root / "splits" / name) as stage:
            write_table(pa.Table.from_pandas(part[SAMPLE_SCHEMA.names], schema=SAMPLE_SCHEMA, preserve_index=False),
                        stage)
        splits[name] = part.reset_index(drop=True)

    if semantic_dim:
        from gensar_core.embed.semantic import item_text
        from gensar_core.embed.vectors import vectors_table

        texts = [item_text(r.title, r.text, r.categories) for r in items.itertuples(index=False)]
        with atomic_dir(root / "features" / "semantic") as stage:
            write_table(vectors_table(items["item_idx"].to_numpy(), hash_encoder(semantic_dim)(texts)), stage)
    if sasrec:
        from gensar_core.embed.collaborative import save_sasrec, train_sasrec, user_sequences

        index = dict(zip(items["item_id"], items["item_idx"]))
        seqs = user_sequences(splits["train"], index)
        small = CollaborativeEmbedConfig(dim=16, layers=1, heads=2, max_len=16, dropout=0.1, epochs=sasrec_epochs,
                                         batch_size=32, lr=5e-3, device="cpu")
        model, _ = train_sasrec([seqs[u] for u in sorted(seqs)], n_items, small, seed=seed, progress=False)
        with atomic_dir(root / "features" / "sasrec") as stage:
            save_sasrec(model, stage)
    return {"items": items, **splits}
