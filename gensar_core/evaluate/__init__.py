"""Evaluation: metrics, the two protocols (full catalogue with history excluded; the paper's
100 candidates), the ranker interface, the report, and `run_evaluate` (all baselines + plugged-in
rankers on the test split)."""
from __future__ import annotations

from gensar_core.evaluate.context import EvalContext
from gensar_core.evaluate.metrics import hit_rate_at_k, ndcg_at_k, summarize
from gensar_core.evaluate.ranking import Ranker, ScoreRanker

__all__ = ["EvalContext", "Ranker", "ScoreRanker", "evaluate_ranker", "hit_rate_at_k", "ndcg_at_k",
           "run_evaluate", "summarize"]


def evaluate_ranker(ranker, cfg, split: str = "test", **kwargs) -> dict:
    from gensar_core.evaluate.protocols import evaluate_ranker as _evaluate_ranker

    return _evaluate_ranker(ranker, cfg, split, **kwargs)


def run_evaluate(cfg, extra_rankers=None, **kwargs) -> dict:
    """See gensar_core.evaluate.run.run_evaluate."""
    from gensar_core.evaluate.run import run_evaluate as _run_evaluate

    return _run_evaluate(cfg, extra_rankers, **kwargs)
