"""Ranking metrics over ranked lists, one relevant item per case (leave-one-out evaluation).

Signatures follow the usual style (`microsoft/recommenders`, RecBole): a batch of ranked lists
of item indexes (best first) and one target per list. With a single relevant item the ideal DCG
is 1, so NDCG@k is `1 / log2(rank + 2)` when the target sits at 0-based `rank < k`, else 0; HR@k
is the share of lists holding the target in their first k. A list shorter than k (a ranker that
returned fewer items) simply has fewer chances; a duplicate item counts at its first position.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

__all__ = ["target_ranks", "hit_rate_at_k", "ndcg_at_k", "ndcg_per_case", "mrr_at_k", "summarize", "metric_names",
           "paired_bootstrap"]


def target_ranks(ranked_lists: Sequence[Iterable[int]], targets: Sequence[int]) -> np.ndarray:
    """0-based position of each target in its ranked list (first occurrence); -1 when absent."""
    if len(ranked_lists) != len(targets):
        raise ValueError(f"{len(ranked_lists)} ranked lists for {len(targets)} targets")
    out = np.full(len(targets), -1, dtype=np.int64)
    for i, (ranked, target) in enumerate(zip(ranked_lists, targets)):
        hits = np.flatnonzero(np.asarray(ranked, dtype=np.int64).reshape(-1) == int(target))
        if len(hits):
            out[i] = hits[0]
    return out


def hit_rate_at_k(ranked_lists: Sequence[Iterable[int]], targets: Sequence[int], k: int = 10) -> float:
    """Share of cases whose target is among the first k items of its list (0.0 for no cases)."""
    ranks = target_ranks(ranked_lists, targets)
    if not len(ranks):
        return 0.0
    return float(((ranks >= 0) & (ranks < k)).mean())


def ndcg_per_case(ranked_lists: Sequence[Iterable[int]], targets: Sequence[int], k: int = 10) -> np.ndarray:
    """NDCG@k of each case with one relevant item: 1/log2(rank+2) for a hit at rank < k, else 0."""
    ranks = target_ranks(ranked_lists, targets)
    hit = (ranks >= 0) & (ranks < k)
    return np.where(hit, 1.0 / np.log2(np.maximum(ranks, 0) + 2.0), 0.0)


def ndcg_at_k(ranked_lists: Sequence[Iterable[int]], targets: Sequence[int], k: int = 10) -> float:
    """Mean NDCG@k with one relevant item per case (0.0 for no cases)."""
    per_case = ndcg_per_case(ranked_lists, targets, k)
    return float(per_case.mean()) if len(per_case) else 0.0


def mrr_at_k(ranked_lists: Sequence[Iterable[int]], targets: Sequence[int], k: int = 10) -> float:
    """Mean reciprocal rank, 0 for a target outside the first k."""
    ranks = target_ranks(ranked_lists, targets)
    if not len(ranks):
        return 0.0
    hit = (ranks >= 0) & (ranks < k)
    return float(np.where(hit, 1.0 / (np.maximum(ranks, 0) + 1.0), 0.0).mean())


def metric_names(ks: Sequence[int] = (1, 5, 10)) -> list[str]:
    """`HR@k` for every k, then `NDCG@k` for every k > 1 (NDCG@1 equals HR@1)."""
    ks = sorted(set(int(k) for k in ks))
    return [f"HR@{k}" for k in ks] + [f"NDCG@{k}" for k in ks if k > 1]


def summarize(ranked_lists: Sequence[Iterable[int]], targets: Sequence[int],
              ks: Sequence[int] = (1, 5, 10)) -> dict:
    """{HR@1, HR@5, HR@10, NDCG@5, NDCG@10} for the default ks, plus `n` (the number of cases)."""
    ks = sorted(set(int(k) for k in ks))
    out: dict = {f"HR@{k}": hit_rate_at_k(ranked_lists, targets, k) for k in ks}
    out.update({f"NDCG@{k}": ndcg_at_k(ranked_lists, targets, k) for k in ks if k > 1})
    out["n"] = len(targets)
    return out


def paired_bootstrap(a: Sequence[float], b: Sequence[float], draws: int = 2000, level: float = 0.95,
                     seed: int = 0) -> dict:
    """The mean of a - b over the same cases and its percentile interval at `level`, from `draws`
    resamples of the cases: {'diff', 'low', 'high', 'n'}. An interval that excludes 0 says the two
    methods differ by more than which cases were drawn can explain."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores need the same cases: shapes {a.shape} and {b.shape}")
    if not len(a):
        return {"diff": 0.0, "low": 0.0, "high": 0.0, "n": 0}
    diff = a - b
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(draws, len(diff)))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return {"diff": float(diff.mean()), "low": float(low), "high": float(high), "n": int(len(diff))}
