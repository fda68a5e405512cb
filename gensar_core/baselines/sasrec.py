"""SASRec: the embed_collaborative checkpoint (features/sasrec) scores the next item.

Input: the user's full interleaved item sequence before the case (`seq`: train events, plus valid
events when evaluating test, both behaviours, by (ts, position)); only its last `max_len` items
reach the model. For search cases the query is ignored: SASRec is a recommender, reported on
search to show what personalisation alone achieves.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from gensar_core.evaluate.ranking import ScoreRanker


class SASRecRanker(ScoreRanker):
    name = "sasrec"
    description = ("SASRec (features/sasrec) over the user's full interleaved item sequence; "
                   "on search the query is ignored")

    def __init__(self, ctx, model=None):
        super().__init__(ctx)
        self.model = model if model is not None else ctx.sasrec

    def score(self, cases: pd.DataFrame, task: str) -> np.ndarray:
        with torch.inference_mode():
            return self.model.score([list(s) for s in cases["seq"]])
