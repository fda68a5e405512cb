"""The ranker interface every method implements, and the score-matrix base most baselines share.

A ranker answers one batch of cases of one task:

    rank(cases, task, k, candidates) -> list of np.ndarray of item_idx, best first, at most k

`cases` is a DataFrame from `EvalContext.cases` (query, capped history, full sequence `seq`,
`exclude`); `task` is 'rec' or 'search'. `candidates` None means the full catalogue, and then the
ranker must leave out each case's `exclude` items (the protocol also drops any that slip
through, so they can only cost the ranker places). Otherwise `candidates[i]` holds the only
items case i may return (the paper's protocol: the target and 99 negatives), and a generative
model builds its prefix trie from them. A ranker that does not handle a task raises
`NotImplementedError`; the report then shows n/a.
"""
from __future__ import annotations

from typing import Optional, Protocol, Sequence, runtime_checkable

import numpy as np
import pandas as pd

__all__ = ["Ranker", "ScoreRanker", "allowed_mask", "top_k"]


@runtime_checkable
class Ranker(Protocol):
    def rank(self, cases: pd.DataFrame, task: str, k: int,
             candidates: Optional[Sequence[np.ndarray]] = None) -> list[np.ndarray]:
        ...


def allowed_mask(cases: pd.DataFrame, n_items: int, candidates: Optional[Sequence[np.ndarray]] = None) -> np.ndarray:
    """(B, N) bool: the items each case may return (its candidates, or all but its `exclude`)."""
    b = len(cases)
    if candidates is not None:
        if len(candidates) != b:
            raise ValueError(f"{len(candidates)} candidate lists for {b} cases")
        mask = np.zeros((b, n_items), dtype=bool)
        for i, cand in enumerate(candidates):
            mask[i, np.asarray(cand, dtype=np.int64)] = True
        return mask
    mask = np.ones((b, n_items), dtype=bool)
    if "exclude" in cases:
        for i, ex in enumerate(cases["exclude"]):
            if len(ex):
                mask[i, np.asarray(ex, dtype=np.int64)] = False
    return mask


def top_k(scores: np.ndarray, k: int, tiebreak: Optional[np.ndarray] = None) -> list[np.ndarray]:
    """Per row the k best items by score (ties: lower `tiebreak` value first, else lower index).

    Items scoring -inf (or NaN) are never returned, so a row can come back shorter than k.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = scores.shape[1] if scores.ndim == 2 else 0
    tiebreak = np.arange(n) if tiebreak is None else np.asarray(tiebreak)
    out = []
    for row in scores:
        allowed = np.flatnonzero(np.isfinite(row) | (row == np.inf))
        vals = row[allowed]
        if len(allowed) > k:
            kth = np.partition(vals, len(vals) - k)[len(vals) - k]
            keep = vals >= kth  # every item tied at the boundary, so the tie-break decides
            allowed, vals = allowed[keep], vals[keep]
        order = np.lexsort((tiebreak[allowed], -vals))[:k]
        out.append(allowed[order].astype(np.int64))
    return out


class ScoreRanker:
    """A ranker that scores every item: subclasses implement `score(cases, task) -> (B, N)`.

    `rank` masks the scores to the allowed items (candidates or all but `exclude`) and takes the
    top k, in batches of `evaluate.batch_size` cases.
    """

    name = "score"
    description = ""

    def __init__(self, ctx):
        self.ctx = ctx

    def score(self, cases: pd.DataFrame, task: str) -> np.ndarray:
        raise NotImplementedError

    def masked_scores(self, cases: pd.DataFrame, task: str, mask: np.ndarray) -> np.ndarray:
        scores = np.array(self.score(cases, task), dtype=np.float32, copy=True)
        scores[~mask] = -np.inf
        return scores

    def rank(self, cases: pd.DataFrame, task: str, k: int,
             candidates: Optional[Sequence[np.ndarray]] = None) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        batch = self.ctx.cfg.evaluate.batch_size
        for start in range(0, len(cases), batch):
            chunk = cases.iloc[start:start + batch]
            cand = None if candidates is None else candidates[start:start + batch]
            mask = allowed_mask(chunk, self.ctx.n_items, cand)
            out += top_k(self.masked_scores(chunk, task, mask), k, self.ctx.tiebreak)
        return out

    def info(self) -> dict:
        """Settings worth printing in the report (e.g. a tuned blend weight)."""
        return {}
