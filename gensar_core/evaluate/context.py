"""Everything an evaluation reads, loaded once and shared by the protocols and the rankers.

`EvalContext(cfg)` holds the catalogue, the splits, train popularity, the BM25 index, the
semantic item vectors, the SASRec checkpoint and the evaluation cases, each loaded on first use.

Cases (`ctx.cases(split, task)`): the split's rows of that behaviour ('rec' or 'search'; search
rows without a query are dropped), ordered by (user_id, ts, position), with these columns:

    user_id, item_id, ts, position, query      from the split
    history     the split's capped history (recent 5 rec + 5 search: behavior, item_id, query, ts)
    target      item_idx of the clicked item
    history_idx item_idx of `history`'s items, oldest first
    seq         the user's full item_idx sequence before the case, oldest first: every event of the
                earlier splits (train; train + valid when evaluating test), then earlier events
                of the same split (chronological splits hold several per user), ordered by
                (ts, position), both behaviours interleaved. SASRec's input.
    exclude     unique item_idx of `seq` (the user's every event before the case): removed from
                full-catalogue rankings (a target that is itself in there counts as a miss, as
                in RecBole)
    timeline    the same events as `seq`, as dicts (behavior, item_id, query): the whole
                interleaved history a timeline model reads (`history` is capped at 5 + 5)
"""
from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd

from gensar_core.config import PipelineConfig
from gensar_core.embed.collaborative import running_histories, user_sequences
from gensar_core.embed.sasrec import load_sasrec, load_tuned, tuned_seeds
from gensar_core.embed.semantic import encode_texts, item_text
from gensar_core.embed.vectors import read_vectors
from gensar_core.evaluate.text_index import BM25Index
from gensar_core.storage import Warehouse

log = logging.getLogger(__name__)

TASKS = ("rec", "search")
EARLIER_SPLITS = {"train": (), "valid": ("train",), "test": ("train", "valid")}
SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}
TASK_CODES = {"rec": 0, "search": 1}
QueryEncoder = Callable[[list[str]], np.ndarray]


def _sequences(events: pd.DataFrame, item_index: dict[str, int]) -> dict[str, list[int]]:
    if events.empty:
        return {}
    return user_sequences(events, item_index)


def _text(value) -> Optional[str]:
    return None if value is None or value != value else str(value)


def user_events(events: pd.DataFrame) -> dict[str, list[dict]]:
    """user_id -> the user's events as dicts (behavior, item_id, query), ordered as `_sequences`."""
    ev = events.sort_values(["user_id", "ts", "position"], kind="stable")
    out: dict[str, list[dict]] = {}
    for user, item, behavior, query in zip(ev["user_id"].astype(str), ev["item_id"].astype(str),
                                           ev["behavior"], ev["query"]):
        out.setdefault(user, []).append({"behavior": behavior, "item_id": item, "query": _text(query)})
    return out


class EvalContext:
    def __init__(self, cfg: PipelineConfig, query_encoder: Optional[QueryEncoder] = None):
        self.cfg = cfg
        self.wh = Warehouse(cfg.warehouse)
        self.seed = cfg.evaluate.seed if cfg.evaluate.seed is not None else cfg.seed
        items = self.wh.read("curated/items", columns=["item_id", "item_idx", "title", "text", "categories"])
        items = items.sort_values("item_idx").reset_index(drop=True)
        if not np.array_equal(items["item_idx"].to_numpy(), np.arange(len(items))):
            raise ValueError("curated/items: item_idx must be dense 0..N-1")
        items["item_id"] = items["item_id"].astype(str)
        self.items = items
        self.n_items = len(items)
        self.item_index: dict[str, int] = dict(zip(items["item_id"], range(self.n_items)))
        # the order among tied scores: a fixed seeded permutation (lower wins), unbiased and
        # reproducible, instead of favouring low item_idx
        self.tiebreak = np.random.default_rng([self.seed, 17]).permutation(self.n_items)
        self._query_encoder = query_encoder
        self._splits: dict[str, pd.DataFrame] = {}
        self._cases: dict[tuple[str, str], pd.DataFrame] = {}
        self.cache: dict = {}  # per-run memo for protocols and rankers (e.g. sampled candidates)
        self.dropped: dict[str, int] = {}

    # ------------------------------------------------------------ tables
    def split(self, name: str) -> pd.DataFrame:
        if name not in self._splits:
            df = self.wh.read(f"splits/{name}")
            df["item_id"] = df["item_id"].astype(str)
            df["user_id"] = df["user_id"].astype(str)
            unknown = ~df["item_id"].isin(self.item_index.keys())
            if unknown.any():
                raise ValueError(f"splits/{name}: {int(unknown.sum())} rows name items missing from curated/items")
            self._splits[name] = df
        return self._splits[name]

    @cached_property
    def popularity(self) -> np.ndarray:
        """Train clicks per item (both behaviours), float64 (N,)."""
        idx = self.split("train")["item_id"].map(self.item_index).to_numpy(dtype=np.int64)
        return np.bincount(idx, minlength=self.n_items).astype(np.float64)

    @cached_property
    def item_texts(self) -> list[str]:
        return [item_text(r.title, r.text, r.categories) for r in self.items.itertuples(index=False)]

    @cached_property
    def bm25(self):
        return BM25Index(self.item_texts)

    @cached_property
    def semantic_vectors(self) -> np.ndarray:
        """features/semantic as an (N, d) L2-normalised matrix."""
        path = self.wh.path("features", "semantic")
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: run the embed_semantic step first")
        vectors = read_vectors(path)
        if len(vectors) != self.n_items:
            raise ValueError(f"features/semantic has {len(vectors)} rows for {self.n_items} items")
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)

    def tuned(self, name: str) -> list:
        """The models `tune_baselines` wrote for `name` at the config's train seeds ([] if none)."""
        key = ("tuned", name)
        if key not in self.cache:
            models = load_tuned(self.cfg.warehouse, name, tuned_seeds(self.cfg.seed, self.cfg.train.ensemble_seeds))
            for model in models:
                if model.config.num_items != self.n_items:
                    raise ValueError(f"models/baselines/{name} scores {model.config.num_items} items, "
                                     f"the catalogue has {self.n_items}: run tune_baselines again")
            self.cache[key] = models
        return self.cache[key]

    @property
    def sasrec_tuned(self) -> bool:
        return bool(self.tuned("sasrec"))

    @cached_property
    def sasrec(self):
        """One SASRec, on CPU, eval mode: the tuned one at the config's seed when tune_baselines
        has run, else the checkpoint of embed_collaborative (features/sasrec)."""
        if self.sasrec_tuned:
            return self.tuned("sasrec")[0]
        path = self.wh.path("features", "sasrec")
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} does not exist: run the embed_collaborative step first")
        model = load_sasrec(path)
        if model.config.num_items != self.n_items:
            raise ValueError(f"features/sasrec scores {model.config.num_items} items, the catalogue has {self.n_items}")
        return model

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        """(n, d) L2-normalised query vectors from the semantic encoder (cached by text)."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.semantic_vectors.shape[1]), dtype=np.float32)
        memo: dict = self.cache.setdefault("query_vectors", {})  # rankers share the query texts
        todo = sorted({t for t in texts if t not in memo})
        if todo:
            if self._query_encoder is not None:
                vectors = np.asarray(self._query_encoder(todo), dtype=np.float32)
            else:
                vectors, _ = encode_texts(todo, self.cfg.embed.semantic,
                                          cache_dir=self.wh.path("cache", "semantic_queries"), progress=False)
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            memo.update(zip(todo, (vectors / np.maximum(norms, 1e-12)).astype(np.float32)))
        return np.stack([memo[t] for t in texts])

    # ------------------------------------------------------------ cases
    def cases(self, split: str, task: str) -> pd.DataFrame:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if split not in EARLIER_SPLITS:
            raise ValueError(f"split must be one of {tuple(EARLIER_SPLITS)}, got {split!r}")
        key = (split, task)
        if key not in self._cases:
            self._cases[key] = self._build_cases(split, task)
        return self._cases[key]

    def _build_cases(self, split: str, task: str) -> pd.DataFrame:
        cols = ["user_id", "item_id", "ts", "position", "behavior", "query"]
        earlier = [self.split(s)[cols] for s in EARLIER_SPLITS[split]]
        before = _sequences(pd.concat(earlier, ignore_index=True), self.item_index) if earlier else {}

        df = self.split(split).sort_values(["user_id", "ts", "position"], kind="stable").reset_index(drop=True)
        targets = df["item_id"].map(self.item_index).to_numpy(dtype=np.int64)
        users = df["user_id"].tolist()
        events_before = user_events(pd.concat(earlier, ignore_index=True)) if earlier else {}
        own = [{"behavior": b, "item_id": i, "query": _text(q)}
               for b, i, q in zip(df["behavior"], df["item_id"], df["query"])]
        # each case sees every event before it: the earlier splits, then this split's earlier events
        seqs = [np.asarray(seq, dtype=np.int64) for seq in running_histories(users, targets.tolist(), before)]
        df["target"] = targets
        df["seq"] = seqs
        df["timeline"] = running_histories(users, own, events_before)
        df["exclude"] = [np.unique(seq) for seq in seqs]

        df = df[df["behavior"] == task]
        if task == "search":
            has_query = df["query"].notna() & (df["query"].astype(str).str.strip() != "")
            if (~has_query).any():
                self.dropped[f"{split}/search_without_query"] = int((~has_query).sum())
                log.warning("%s: %d search rows without a query are not evaluated", split, int((~has_query).sum()))
            df = df[has_query]
        max_cases = self.cfg.evaluate.max_cases
        if max_cases is not None and len(df) > max_cases:
            rng = np.random.default_rng([self.seed, SPLIT_CODES[split], TASK_CODES[task], 3])
            df = df.iloc[np.sort(rng.choice(len(df), max_cases, replace=False))]
        df = df.reset_index(drop=True)
        df["history_idx"] = [
            np.asarray([self.item_index[str(h["item_id"])] for h in (hist if hist is not None else [])], dtype=np.int64)
            for hist in df["history"]
        ]
        keep = ["user_id", "item_id", "ts", "position", "query", "history", "target", "history_idx", "seq", "exclude",
                "timeline"]
        return df[keep]

    def describe(self) -> dict:
        return {"items": self.n_items, "warehouse": str(Path(self.wh.root)), "seed": self.seed,
                "dropped": dict(self.dropped)}
