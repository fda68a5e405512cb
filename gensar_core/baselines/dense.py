"""Dense retrieval with the packaged MiniLM encoder (all-MiniLM-L6-v2).

Items: `features/semantic` (the same encoder over title, text and categories). Search: the query
encoded with the same model, cosine similarity. Recommendation: the normalised mean of the
vectors of the items in the user's capped recent history (the split's `history`, up to 5 rec +
5 search clicks); an empty history scores every item 0 (the seeded tie order decides).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from gensar_core.evaluate.ranking import ScoreRanker


class DenseRanker(ScoreRanker):
    name = "dense"
    description = ("MiniLM (all-MiniLM-L6-v2) cosine: search: encoded query vs features/semantic; "
                   "rec: mean vector of the recent history's items")

    def user_vectors(self, cases: pd.DataFrame, task: str) -> np.ndarray:
        items = self.ctx.semantic_vectors
        if task == "search":
            return self.ctx.encode_queries(cases["query"].fillna("").astype(str).tolist())
        out = np.zeros((len(cases), items.shape[1]), dtype=np.float32)
        for i, hist in enumerate(cases["history_idx"]):
            if len(hist):
                v = items[np.asarray(hist, dtype=np.int64)].mean(axis=0)
                out[i] = v / max(float(np.linalg.norm(v)), 1e-12)
        return out

    def score(self, cases: pd.DataFrame, task: str) -> np.ndarray:
        return self.user_vectors(cases, task) @ self.ctx.semantic_vectors.T
