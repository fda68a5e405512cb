"""Small raw inputs in each supported format, written by the tests themselves."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from gensar_core.config import PipelineConfig


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        for line in lines:
            fh.write((line if isinstance(line, bytes) else line.encode("utf-8")) + b"\n")
    return path


def read(path: Path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()


def config(tmp_path: Path, source: dict, **sections) -> PipelineConfig:
    """A pipeline config on a warehouse under tmp_path; `sections` are top-level keys."""
    tree = {"warehouse": str(tmp_path / "warehouse"), "spark": {"shuffle_partitions": 2, "driver_memory": "2g"},
            "data": {"source": source}}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            tree[key] = {**tree[key], **value}
        else:
            tree[key] = value
    return PipelineConfig.model_validate(tree)


def rejected_by_row(wh: Path, table: str) -> dict[int, str]:
    rej = read(wh / "curated" / "rejected")
    rej = rej[rej["table"] == table]
    return dict(zip(rej["row"].astype(int), rej["reason"]))


def movielens_files(base: Path, extra_events: list[str | bytes] = (), extra_items: list[str | bytes] = ()) -> Path:
    """ML-100K atomic files: 6 items, 3 users x 5 events, plus the given extra lines."""
    items = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    genres = ["Animation Comedy", "Action Thriller", "Drama", "Comedy Romance", "Sci-Fi War", "Horror"]
    titles = ["Toy Story", "GoldenEye", "Four Rooms", "Get Shorty", "Star Wars", "Scream"]
    items += [f"{i + 1}\t{titles[i]}\t1995\t{genres[i]}" for i in range(6)]
    items += list(extra_items)
    events = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for u in range(1, 4):
        for k in range(5):
            events.append(f"{u}\t{(u + k) % 6 + 1}\t{(k % 5) + 1}\t{880000000 + 1000 * u + 10 * k}")
    events += list(extra_events)
    write_lines(base / "ml-100k.item", items)
    write_lines(base / "ml-100k.inter", events)
    return base


def json_lines(path: Path, rows: list[dict | str]) -> Path:
    return write_lines(path, [r if isinstance(r, str) else json.dumps(r) for r in rows])


def clustered(n=400, clusters=16, sem_dim=32, col_dim=16, seed=0):
    """Semantic and collaborative embeddings (float32) of n items drawn around shared clusters."""
    import numpy as np

    rng = np.random.default_rng(seed)
    c = rng.integers(clusters, size=n)
    sem = rng.normal(size=(clusters, sem_dim))[c] + 0.3 * rng.normal(size=(n, sem_dim))
    col = 3 * rng.normal(size=(clusters, col_dim))[c] + 0.5 * rng.normal(size=(n, col_dim))
    return sem.astype(np.float32), col.astype(np.float32)
