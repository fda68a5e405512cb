"""Two-stage personalised search, the system a practitioner would build from the parts at hand.

Stage 1 retrieves the `top_n` items that best match the query (BM25, or the dense MiniLM
retriever), among the items the protocol allows. Stage 2 re-ranks them by a blend of the
min-max-normalised retrieval score and the min-max-normalised SASRec score of the user's sequence:

    alpha * retrieval + (1 - alpha) * sasrec        (alpha 0: SASRec alone orders the retrieved set)

`top_n` and `alpha` are `evaluate.retrieve_top_n` and `evaluate.blend_alpha`; each one that is None
is tuned together with the other on the search cases of the split before the scored one (valid
when scoring test, train when scoring valid: never the cases being scored; full-catalogue
protocol, NDCG@10; ties: the smaller depth, then the smaller alpha), as one would tune it before
shipping: a query such as "drama" names hundreds of items, so the depth matters as much as the
blend. Recommendation traffic in such a system is served by the
recommender itself, so on the rec task this ranker is SASRec.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import pandas as pd

from gensar_core.evaluate.metrics import ndcg_at_k
from gensar_core.evaluate.ranking import ScoreRanker, allowed_mask, top_k

log = logging.getLogger(__name__)

ALPHAS = tuple(round(i / 10, 1) for i in range(11))
DEPTHS = (20, 50, 100, 200, 500, 1000)
# at most this many tuning cases (a seeded draw): tuning on train (the registry gate scores valid)
# would otherwise blend every train search, 66 grid points each
TUNE_CASES = 3000
# the split alpha is tuned on, by the split being scored
TUNING_SPLIT = {"test": "valid", "valid": "train"}


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def first_stage(retrieval: np.ndarray, allowed: np.ndarray, top_n: int,
                tiebreak: Optional[np.ndarray] = None) -> list[np.ndarray]:
    """Each row's top-`top_n` allowed items by retrieval score."""
    return top_k(np.where(allowed, retrieval, -np.inf), top_n, tiebreak)


def blend_scores(retrieval: np.ndarray, personal: np.ndarray, allowed: np.ndarray, top_n: int, alpha: float,
                 tiebreak: Optional[np.ndarray] = None, first: Optional[list[np.ndarray]] = None) -> np.ndarray:
    """(B, N) scores: the blend on each row's top-`top_n` allowed items by retrieval, -inf elsewhere
    (`first`: that first stage, when already computed for these rows and `top_n`)."""
    if first is None:
        first = first_stage(retrieval, allowed, top_n, tiebreak)
    out = np.full(retrieval.shape, -np.inf, dtype=np.float32)
    for i, sel in enumerate(first):
        if len(sel):
            out[i, sel] = alpha * _minmax(retrieval[i, sel].astype(np.float64)) + \
                (1 - alpha) * _minmax(personal[i, sel].astype(np.float64))
    return out


class TwoStageRanker(ScoreRanker):
    description = "retrieve top-N for the query, re-rank by a blend with SASRec; rec: SASRec"

    def __init__(self, ctx, retriever: ScoreRanker, reranker: ScoreRanker, top_n: Optional[int] = None,
                 alpha: Optional[float] = None, name: Optional[str] = None):
        super().__init__(ctx)
        self.retriever, self.reranker = retriever, reranker
        self.name = name or f"{retriever.name}+{reranker.name}"
        self._top_n = top_n if top_n is not None else ctx.cfg.evaluate.retrieve_top_n
        self._alpha = alpha if alpha is not None else ctx.cfg.evaluate.blend_alpha
        self.tuning: dict[tuple[int, float], float] = {}
        self.description = (f"{retriever.name} retrieves the top N for the query, re-ranked by "
                            f"alpha*{retriever.name} + (1-alpha)*{reranker.name} (min-max per case); "
                            f"rec: {reranker.name}")

    @property
    def top_n(self) -> int:
        if self._top_n is None:
            self._top_n, self._alpha = self.tune()
        return self._top_n

    @property
    def alpha(self) -> float:
        if self._alpha is None:
            self._top_n, self._alpha = self.tune()
        return self._alpha

    def _parts(self, cases: pd.DataFrame, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.retriever.score(cases, "search"), self.reranker.score(cases, "search")

    @property
    def tuning_split(self) -> str:
        return TUNING_SPLIT[self.ctx.cfg.evaluate.split]

    def tune(self, k: int = 10) -> tuple[int, float]:
        """(top_n, alpha) with the best NDCG@k on the tuning split's search cases (full catalogue),
        each over its grid when not set in the config."""
        split = self.tuning_split
        cases = self.ctx.cases(split, "search")
        if not len(cases):
            raise ValueError(f"{self.name}: splits/{split} has no search cases to tune the depth and blend on "
                             f"(evaluating {self.ctx.cfg.evaluate.split}); set evaluate.retrieve_top_n and "
                             f"evaluate.blend_alpha")
        if len(cases) > TUNE_CASES:
            rng = np.random.default_rng([self.ctx.seed, 23])
            cases = cases.iloc[np.sort(rng.choice(len(cases), TUNE_CASES, replace=False))]
        depths = [self._top_n] if self._top_n is not None else [d for d in DEPTHS if d < self.ctx.n_items] or [self.ctx.n_items]
        alphas = [self._alpha] if self._alpha is not None else list(ALPHAS)
        grid = [(d, a) for d in depths for a in alphas]
        batch = self.ctx.cfg.evaluate.batch_size
        lists: dict[tuple[int, float], list] = {g: [] for g in grid}
        for start in range(0, len(cases), batch):
            chunk = cases.iloc[start:start + batch]
            mask = allowed_mask(chunk, self.ctx.n_items)
            retrieval, personal = self._parts(chunk, mask)
            firsts = {d: first_stage(retrieval, mask, d, self.ctx.tiebreak) for d in depths}  # once a depth
            for d, a in grid:
                lists[(d, a)] += top_k(blend_scores(retrieval, personal, mask, d, a, self.ctx.tiebreak, firsts[d]),
                                       k, self.ctx.tiebreak)
        targets = cases["target"].to_numpy()
        self.tuning = {g: round(ndcg_at_k(lists[g], targets, k), 5) for g in grid}
        best = max(grid, key=lambda g: (self.tuning[g], -g[0], -g[1]))
        log.info("%s: top_n %d, alpha %.1f (%s NDCG@%d %.4f, best of %d settings)", self.name, best[0], best[1], split, k,
                 self.tuning[best], len(grid))
        return int(best[0]), float(best[1])

    def masked_scores(self, cases: pd.DataFrame, task: str, mask: np.ndarray) -> np.ndarray:
        if task == "rec":
            return self.reranker.masked_scores(cases, task, mask)
        top_n, alpha = self.top_n, self.alpha
        retrieval, personal = self._parts(cases, mask)
        return blend_scores(retrieval, personal, mask, top_n, alpha, self.ctx.tiebreak)

    def info(self) -> dict:
        out = {"top_n": self._top_n, "alpha": self._alpha}
        if self.tuning:
            out["tuned_on"] = f"{self.tuning_split} search cases, NDCG@10, full catalogue"
            out["sweep"] = [{"settings": {"top_n": d, "alpha": a}, f"{self.tuning_split}_search_ndcg10": v}
                            for (d, a), v in self.tuning.items()]
        else:
            out["tuned_on"] = "set by evaluate.retrieve_top_n and evaluate.blend_alpha"
        return out
