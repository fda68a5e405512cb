"""BM25 over item text (title, text, categories) with bm25s.

Search: the case's query. Recommendation: a pseudo-query made of the user's capped recent history
(the split's `history`: up to 5 rec + 5 search events), i.e. the queries of the recent searches
and the titles of the recently clicked items, concatenated. That is the only text a lexical
retriever has for recommendation; it is reported so that the trade-off plot has the point, and
is expected to be weak.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from gensar_core.evaluate.ranking import ScoreRanker


def history_text(ctx, history) -> str:
    """Recent queries and clicked titles of one capped history, oldest first."""
    parts = []
    for h in history if history is not None else []:
        if h.get("query"):
            parts.append(str(h["query"]))
        idx = ctx.item_index.get(str(h["item_id"]))
        if idx is not None:
            parts.append(str(ctx.items["title"].iat[idx] or ""))
    return " ".join(p for p in parts if p)


def case_queries(ctx, cases: pd.DataFrame, task: str) -> list[str]:
    """The text a lexical or dense retriever uses for each case (see the module docstring)."""
    if task == "search":
        return cases["query"].fillna("").astype(str).tolist()
    return [history_text(ctx, h) for h in cases["history"]]


class BM25Ranker(ScoreRanker):
    name = "bm25"
    description = ("BM25 (bm25s, k1 1.5, b 0.75) over item title/text/categories; search: the query; "
                   "rec: the recent history's queries and item titles as the query")

    def score(self, cases: pd.DataFrame, task: str) -> np.ndarray:
        return self.ctx.bm25.scores(case_queries(self.ctx, cases, task))
