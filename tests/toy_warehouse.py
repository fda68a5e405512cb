"""A tiny, seeded toy warehouse with the tables the model steps read (tests and benchmarks).

Writes `curated/items`, `splits/{train,valid,test}` (histories capped at the last 5 rec + 5
search events, leave-one-out by time) and `identifiers/items` with unique semantic and
collaborative IDs. Users favour one genre and mostly click the next item of that genre, so the
next-item tasks have something to learn.
"""
from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from gensar_core.data.split import SAMPLE_SCHEMA
from gensar_core.identifiers.naming import format_id, token_letters
from gensar_core.storage import Warehouse, atomic_dir, write_table

GENRES = ["action", "comedy", "drama", "horror", "romance", "thriller", "western", "musical"]
WORDS = ["river", "night", "star", "city", "ghost", "king", "storm", "garden", "island", "mirror", "train",
         "winter", "summer", "shadow", "dream", "fire", "ocean", "road", "moon", "heart", "secret", "last"]


def _digits(n: int, base: int, width: int) -> list[int]:
    out = []
    for _ in range(width):
        out.append(n % base)
        n //= base
    return out[::-1]


def toy_tables(n_users: int = 24, n_items: int = 30, events_per_user: int = 10, search_share: float = 0.3,
               codebook_size: int = 8, shared_levels: int = 2, specific_levels: int = 2,
               n_genres: int = 4, seed: int = 0) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    genres = GENRES[:n_genres]
    item_ids = [f"i{k:03d}" for k in range(n_items)]
    genre_of = [k % n_genres for k in range(n_items)]
    titles = [f"{WORDS[rng.integers(len(WORDS))]} {WORDS[rng.integers(len(WORDS))]} {k}" for k in range(n_items)]
    items = pd.DataFrame({
        "item_id": item_ids, "item_idx": np.arange(n_items, dtype=np.int64),
        "title": [t.title() for t in titles],
        "text": [f"{t.title()} (1995). Genres: {genres[g].title()}" for t, g in zip(titles, genre_of)],
        "categories": [[genres[g].title()] for g in genre_of],
    })

    # identifiers: the first shared code is the genre; the rest spell the item's rank in base codebook_size
    letters = token_letters(shared_levels, specific_levels)
    levels = shared_levels + specific_levels
    if n_genres > codebook_size or n_items > codebook_size ** min(levels - 1, specific_levels):
        raise ValueError("codebook too small for the toy catalogue")
    perm = rng.permutation(n_items)
    rows = []
    for k in range(n_items):
        sem = [genre_of[k]] + _digits(k, codebook_size, levels - 1)
        # same shared codes; collaborative-specific codes from a shuffled rank
        col = sem[:shared_levels] + _digits(int(perm[k]), codebook_size, specific_levels)
        rows.append({"item_idx": k, "item_id": item_ids[k], "shared_codes": sem[:shared_levels],
                     "semantic_codes": sem, "collaborative_codes": col,
                     "semantic_id": format_id(sem, letters.semantic_id),
                     "collaborative_id": format_id(col, letters.collaborative_id)})
    identifiers = pd.DataFrame(rows)
    if identifiers["semantic_id"].duplicated().any() or identifiers["collaborative_id"].duplicated().any():
        raise AssertionError("toy identifiers are not unique")

    # events: a favourite genre, mostly the next item of it
    by_genre = {g: [k for k in range(n_items) if genre_of[k] == g] for g in range(n_genres)}
    events = []
    for u in range(n_users):
        fav = u % n_genres
        pool = by_genre[fav]
        pos = int(rng.integers(len(pool)))
        for e in range(events_per_user):
            if rng.random() < 0.8:
                pos = (pos + 1) % len(pool)
                k = pool[pos]
            else:
                k = int(rng.integers(n_items))
            search = rng.random() < search_share
            query = f"{genres[genre_of[k]]} {titles[k].split()[0]}" if search else None
            events.append({"user_id": f"u{u:03d}", "item_id": item_ids[k], "ts": 1_000_000 + 100 * u + 10 * e,
                           "behavior": "search" if search else "rec", "query": query,
                           "session_id": f"u{u:03d}-{e}" if search else None})
    ev = pd.DataFrame(events)

    samples = {"train": [], "valid": [], "test": []}
    for user, group in ev.groupby("user_id", sort=True):
        group = group.sort_values(["ts", "item_id"]).reset_index(drop=True)
        rec, src = deque(maxlen=5), deque(maxlen=5)
        n = len(group)
        for i, row in enumerate(group.itertuples(index=False)):
            hist = sorted(list(rec) + list(src), key=lambda h: h["ts"])
            split = "test" if i == n - 1 else "valid" if i == n - 2 else "train"
            samples[split].append({**row._asdict(), "position": i, "history": hist})
            entry = {"behavior": row.behavior, "item_id": row.item_id, "query": row.query, "ts": int(row.ts)}
            (rec if row.behavior == "rec" else src).append(entry)
    out = {"curated/items": items, "identifiers/items": identifiers}
    for split, rows in samples.items():
        out[f"splits/{split}"] = pd.DataFrame(rows, columns=SAMPLE_SCHEMA.names)
    return out


def write_toy_warehouse(root: str | Path, **kwargs) -> dict[str, int]:
    """Write the toy tables under `root`; row counts per table."""
    tables = toy_tables(**kwargs)
    wh = Warehouse(root)
    with atomic_dir(wh.path("curated")) as stage:
        write_table(tables["curated/items"], stage / "items")
    with atomic_dir(wh.path("splits")) as stage:
        for split in ("train", "valid", "test"):
            write_table(pa.Table.from_pandas(tables[f"splits/{split}"], schema=SAMPLE_SCHEMA, preserve_index=False),
                        stage / split)
    with atomic_dir(wh.path("identifiers")) as stage:
        write_table(tables["identifiers/items"], stage / "items")
    return {name: len(df) for name, df in tables.items()}
