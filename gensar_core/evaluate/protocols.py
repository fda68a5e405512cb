"""The two evaluation protocols (docs/architecture.md "Evaluation protocol") and `evaluate_ranker`.

`full` (the headline): every item of the catalogue is a candidate; the items of the user's
    earlier splits (train, plus valid when evaluating test) are excluded from the ranking. A
    target that is itself among them counts as a miss (RecBole's rule; MovieLens has none).
`sampled` (the paper's, reported beside it and labelled): each case ranks its target among
    `num_candidates` (100) items: for recommendation cases 99 negatives drawn without replacement
    with probability proportional to train popularity, never the target or a history item
    (items never clicked in train only fill up when too few clicked ones remain); for search
    cases the 99 items BM25 scores highest for the query, the target left out (hard negatives;
    ties broken by the context's seeded order). Candidates are shuffled, seeded per split and
    task, so the same seed gives the same candidates.

Cases: recommendation = the split's rows with behavior 'rec'; search = rows with behavior
'search' (with their query). See `gensar_core.evaluate.context` for the columns rankers get.
"""
from __future__ import annotations

import logging
import time
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from gensar_core.config import PipelineConfig
from gensar_core.evaluate.context import SPLIT_CODES, TASK_CODES, TASKS, EvalContext
from gensar_core.evaluate.metrics import ndcg_per_case, summarize
from gensar_core.evaluate.ranking import Ranker, ScoreRanker, allowed_mask, top_k

__all__ = [
    "PROTOCOLS", "TASKS", "Ranker", "ScoreRanker", "popularity_negatives", "bm25_hard_negatives",
    "sampled_candidates", "clean_ranked_lists", "evaluate_ranker",
]

log = logging.getLogger(__name__)

PROTOCOLS = ("full", "sampled")
PROTOCOL_LABELS = {
    "full": "Full-catalogue ranking (user's history items excluded)",
    "sampled": "Paper protocol: target among 100 candidates",
}


# ---------------------------------------------------------------- the paper's candidates
def popularity_negatives(target: int, exclude: np.ndarray, popularity: np.ndarray, n: int,
                         rng: np.random.Generator) -> np.ndarray:
    """`n` distinct items, drawn proportional to `popularity`, never `target` or `exclude`.

    When fewer than `n` items with positive popularity remain, all of them are taken and the rest
    are drawn uniformly from the never-clicked ones; a catalogue too small gives fewer than `n`.
    """
    pool_mask = np.ones(len(popularity), dtype=bool)
    pool_mask[np.asarray(exclude, dtype=np.int64)] = False
    pool_mask[int(target)] = False
    pool = np.flatnonzero(pool_mask)
    weights = popularity[pool]
    clicked, unclicked = pool[weights > 0], pool[weights <= 0]
    if len(clicked) >= n:
        p = weights[weights > 0]
        return rng.choice(clicked, size=n, replace=False, p=p / p.sum()).astype(np.int64)
    fill = rng.choice(unclicked, size=min(n - len(clicked), len(unclicked)), replace=False)
    return np.concatenate([clicked, fill]).astype(np.int64)


def bm25_hard_negatives(scores: np.ndarray, target: int, n: int, tiebreak: Optional[np.ndarray] = None) -> np.ndarray:
    """The `n` items with the highest BM25 score for the case's query, the target left out."""
    row = np.array(scores, dtype=np.float64, copy=True)
    row[int(target)] = -np.inf
    return top_k(row[None, :], n, tiebreak)[0]


def sampled_candidates(ctx: EvalContext, split: str, task: str, num_candidates: Optional[int] = None) -> list[np.ndarray]:
    """Each case's candidates (target + negatives, shuffled), memoised in the context."""
    n_neg = (num_candidates or ctx.cfg.evaluate.num_candidates) - 1
    key = ("sampled_candidates", split, task, n_neg)
    if key in ctx.cache:
        return ctx.cache[key]
    cases = ctx.cases(split, task)
    rng = np.random.default_rng([ctx.seed, SPLIT_CODES[split], TASK_CODES[task], 11])
    out: list[np.ndarray] = []
    if task == "rec":
        for target, exclude in zip(cases["target"], cases["exclude"]):
            neg = popularity_negatives(int(target), exclude, ctx.popularity, n_neg, rng)
            out.append(rng.permutation(np.concatenate([[int(target)], neg]).astype(np.int64)))
    else:
        batch = ctx.cfg.evaluate.batch_size
        queries, targets = cases["query"].astype(str).tolist(), cases["target"].to_numpy()
        for start in range(0, len(cases), batch):
            scores = ctx.bm25.scores(queries[start:start + batch])
            for row, target in zip(scores, targets[start:start + batch]):
                neg = bm25_hard_negatives(row, int(target), n_neg, ctx.tiebreak)
                out.append(rng.permutation(np.concatenate([[int(target)], neg]).astype(np.int64)))
    short = sum(1 for c in out if len(c) < n_neg + 1)
    if short:
        log.warning("%s/%s: %d cases have fewer than %d candidates (catalogue too small)", split, task, short, n_neg + 1)
    ctx.cache[key] = out
    return out


# ---------------------------------------------------------------- running a ranker
def clean_ranked_lists(lists: Sequence[np.ndarray], cases: pd.DataFrame, n_items: int, k: int,
                       candidates: Optional[Sequence[np.ndarray]] = None) -> tuple[list[np.ndarray], dict]:
    """Enforce the protocol on a ranker's answer: known items only, no repeats, in the allowed
    set (candidates, or not excluded), first k. Returns the lists and what was dropped."""
    if len(lists) != len(cases):
        raise ValueError(f"ranker returned {len(lists)} lists for {len(cases)} cases")
    mask = allowed_mask(cases, n_items, candidates)
    dropped = {"unknown": 0, "repeated": 0, "not_allowed": 0}
    out = []
    for i, ranked in enumerate(lists):
        ranked = np.asarray(ranked, dtype=np.int64).reshape(-1)
        known = (ranked >= 0) & (ranked < n_items)
        dropped["unknown"] += int((~known).sum())
        ranked = ranked[known]
        _, first = np.unique(ranked, return_index=True)
        dropped["repeated"] += len(ranked) - len(first)
        ranked = ranked[np.sort(first)]
        ok = mask[i, ranked]
        dropped["not_allowed"] += int((~ok).sum())
        out.append(ranked[ok][:k])
    return out, dropped


def evaluate_ranker(ranker: Ranker, cfg: PipelineConfig, split: str = "test", *,
                    ctx: Optional[EvalContext] = None, tasks: Sequence[str] = TASKS,
                    protocols: Optional[Sequence[str]] = None, per_case: Optional[dict] = None) -> dict:
    """Metrics of one ranker per protocol and task: {protocol: {task: metrics or None}}.

    metrics: HR@k / NDCG@k for `evaluate.ks`, `n` (cases), `seconds`, and `dropped` when the
    ranker returned items the protocol does not allow. None: the ranker does not handle the task.
    Pass `ctx` to share loaded data (and the sampled candidates) between rankers, and a dict as
    `per_case` to get each case's NDCG@k (the largest k) in it, by (protocol, task).
    """
    ctx = ctx or EvalContext(cfg)
    protocols = list(protocols or cfg.evaluate.protocols)
    ks = sorted(set(cfg.evaluate.ks))
    k = max(ks)
    out: dict = {}
    for protocol in protocols:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        out[protocol] = {}
        for task in tasks:
            cases = ctx.cases(split, task)
            candidates = sampled_candidates(ctx, split, task) if protocol == "sampled" else None
            started = time.perf_counter()
            try:
                lists = ranker.rank(cases, task, k, candidates) if len(cases) else []
            except NotImplementedError:
                out[protocol][task] = None
                continue
            lists, dropped = clean_ranked_lists(lists, cases, ctx.n_items, k, candidates)
            metrics = summarize(lists, cases["target"].to_numpy(), ks)
            if per_case is not None:
                per_case[(protocol, task)] = ndcg_per_case(lists, cases["target"].to_numpy(), k)
            metrics["seconds"] = round(time.perf_counter() - started, 3)
            if any(dropped.values()):
                metrics["dropped"] = dropped
                log.warning("%s/%s: ranker %s returned items the protocol drops: %s",
                            protocol, task, getattr(ranker, "name", type(ranker).__name__), dropped)
            out[protocol][task] = metrics
    return out
