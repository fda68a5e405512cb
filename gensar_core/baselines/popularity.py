"""Popularity: every case gets the items ranked by train clicks (both behaviours); ignores the query."""
from __future__ import annotations

import numpy as np
import pandas as pd

from gensar_core.evaluate.ranking import ScoreRanker


class PopularityRanker(ScoreRanker):
    name = "popularity"
    description = "train clicks per item (both behaviours); same list for every case, the query is ignored"

    def score(self, cases: pd.DataFrame, task: str) -> np.ndarray:
        pop = self.ctx.popularity.astype(np.float32)
        return np.broadcast_to(pop, (len(cases), len(pop)))
