"""Evaluation: metrics, the two protocols (full catalogue with history excluded; the paper's
100 candidates), the ranker interface, the report, and `run_evaluate` (all baselines + plugged-in
rankers on the test split)."""
from __future__ import annotations

from gensar_core.evaluate.context import EvalContext
from gensar_core.evaluate.metrics import hit_rate_at_k, ndcg_at_k, summarize
from gensar_core.evaluate.ranking import Ranker, ScoreRanker

# `evaluate_ranker` (protocols.py) and `run_evaluate` (run.py) are imported from their modules:
# they build the baselines, which import this package, so re-exporting them here would be a cycle
__all__ = ["EvalContext", "Ranker", "ScoreRanker", "hit_rate_at_k", "ndcg_at_k", "summarize"]
