"""SASRec: the next item from the user's whole interleaved item sequence.

Input: the user's full interleaved item sequence before the case (`seq`: train events, plus valid
events when evaluating test, both behaviours, by (ts, position)); only its last `max_len` items
reach the model.

    sasrec         one model: the tuned one at the config's seed when `tune_baselines` has run
                   (models/baselines/sasrec), else the embed_collaborative checkpoint
                   (features/sasrec). On search the query is ignored: it shows what
                   personalisation alone achieves.
    sasrec-x3      the tuned models at every train seed, their scores averaged
    query-sasrec   the tuned query-aware SASRec (baselines/tuning.py): the sequence plus the
                   query's MiniLM vector at the step being predicted
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from gensar_core.baselines.tuning import case_next_queries, parameter_count
from gensar_core.evaluate.ranking import ScoreRanker


class SASRecRanker(ScoreRanker):
    name = "sasrec"

    def __init__(self, ctx, models=None, name: str = "sasrec", query_aware: bool = False):
        super().__init__(ctx)
        self.models = models if models is not None else [ctx.sasrec]
        self.name, self.query_aware = name, query_aware
        tuned = "tuned on valid (models/baselines)" if ctx.sasrec_tuned or models is not None else \
            "embed_collaborative's, untuned (features/sasrec)"
        self.description = (f"SASRec, {tuned}, {len(self.models)} model(s) averaged, over the user's full "
                            f"interleaved item sequence; " +
                            ("the query's MiniLM vector added at the predicted step" if query_aware
                             else "on search the query is ignored"))

    def score(self, cases: pd.DataFrame, task: str) -> np.ndarray:
        seqs = [list(s) for s in cases["seq"]]
        queries = case_next_queries(self.ctx, cases, task) if self.query_aware else None
        with torch.inference_mode():
            return np.mean([m.score(seqs, next_queries=queries) for m in self.models], axis=0)

    def info(self) -> dict:
        return {"models": len(self.models), "parameters": sum(parameter_count(m) for m in self.models)}
