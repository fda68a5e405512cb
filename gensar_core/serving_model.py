"""The MLflow pyfunc model of GenSAR, logged as code (MLflow "models from code": no pickle).

`predict` takes rows of (task, history, optional query, optional k) and returns each row's top-K
item ids with their log-probabilities:

    task     'rec' (next recommended item) or 'search' (item for `query`)
    history  the user's recent events, oldest first: a list (or JSON text) of
             {"behavior": "rec"|"search", "item_id": ..., "query": ...}
    query    the search text (search rows)
    k        how many items (default 10)

Items in a rec row's history are not recommended again.
"""
from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel


def _history(value) -> list[dict]:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    if isinstance(value, str):
        value = json.loads(value) if value.strip() else []
    return [dict(e) for e in value]


class GenSARModel(PythonModel):
    def load_context(self, context):
        from gensar_core.model.generative_ranker import GenerativeRanker

        settings = json.loads(open(context.artifacts["settings"]).read())
        identifiers = pd.read_parquet(context.artifacts["identifiers"])
        self.ranker = GenerativeRanker(context.artifacts["model"], identifiers, **settings)
        self.item_index = dict(zip(identifiers["item_id"].astype(str), identifiers["item_idx"]))
        self.item_id_of = identifiers.sort_values("item_idx")["item_id"].astype(str).to_numpy()

    def predict(self, context, model_input, params=None):
        df = pd.DataFrame(model_input).reset_index(drop=True)
        if "task" not in df or "history" not in df:
            raise ValueError("input needs the columns 'task' and 'history' (and 'query' for search rows)")
        bad = sorted(set(df["task"]) - {"rec", "search"})
        if bad:
            raise ValueError(f"task must be 'rec' or 'search', got {bad}")
        cases = pd.DataFrame({
            "history": [_history(h) for h in df["history"]],
            "query": df["query"] if "query" in df else None,
        })
        missing = [str(e["item_id"]) for h in cases["history"] for e in h if str(e["item_id"]) not in self.item_index]
        if missing:
            raise ValueError(f"history items unknown to this model: {sorted(set(missing))[:10]}")
        cases["exclude"] = [np.asarray([self.item_index[str(e["item_id"])] for e in h], dtype=np.int64)
                            for h in cases["history"]]
        ks = df["k"].fillna(10).astype(int) if "k" in df else pd.Series(10, index=df.index)
        out_items, out_scores = [None] * len(df), [None] * len(df)
        for task in ("rec", "search"):
            rows = np.flatnonzero((df["task"] == task).to_numpy())
            if not len(rows):
                continue
            if task == "search" and cases.loc[rows, "query"].isna().any():
                raise ValueError("search rows need a 'query'")
            sub = cases.iloc[rows].reset_index(drop=True)
            # searches may return items the user saw before; recommendations may not
            exclude = sub["exclude"] if task == "rec" else [()] * len(sub)
            ranked = self.ranker.top_k_unseen(self.ranker.prompts(sub, task), task,
                                              int(ks.iloc[rows].max()), exclude)
            for r, (items, scores) in zip(rows, ranked):
                k = int(ks.iloc[r])
                out_items[r] = [str(self.item_id_of[i]) for i in items[:k]]
                out_scores[r] = [float(s) for s in scores[:k]]
        return pd.DataFrame({"task": df["task"], "items": out_items, "scores": out_scores})


mlflow.models.set_model(GenSARModel())
