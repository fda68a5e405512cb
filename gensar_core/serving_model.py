"""The MLflow pyfunc model of GenSAR, logged as code (MLflow "models from code": no pickle).

`predict` takes rows of (task, optional history, optional query, optional k) and returns each
row's top-K item ids with their log-probabilities:

    task     'rec' (next recommended item) or 'search' (item for `query`)
    history  the user's recent events, oldest first: a list (or JSON text) of
             {"behavior": "rec"|"search", "item_id": ..., "query": ...}; null or "" for none
    query    the search text: search rows need one that is not blank (ignored on rec rows)
    k        how many items, an integer from 1 to min(1000, catalogue size) (default 10)

Answer columns: `task`, `items`, `scores` and `skipped_history`, the history items this model has
no identifier for (items new since it was trained: new items arrive every night), which are left
out of the prompt instead of failing the row.

History rule, the evaluation's (full-catalogue protocol) for both tasks: the items of a row's
history are never returned, for search as for recommendation, so a list holds k items whenever
k items are allowed.

A request that breaks these rules raises `RequestError`: MLflow's scoring server answers HTTP 400
with the reason in `message` (after its own "Failed to predict data ..." prefix) and alone in
`reason`, with `row` and `field`, and no stack trace. An unexpected failure while ranking is
logged here with its traceback and answered 500 with a generic message, so server paths never
reach the client.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import NamedTuple, Optional

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from gensar_core.model.generative_ranker import DecodeSettings, GenerativeRanker
from gensar_core.registry import logged_members

log = logging.getLogger(__name__)

TASKS = ("rec", "search")
COLUMNS = ("task", "history", "query", "k")
DEFAULT_K = 10
MAX_K = 1000  # the beam is at least k wide: this bounds one row's cost
MAX_ROWS = 256  # bounds one request's time well inside the server's 60 s request timeout
MAX_TEXT = 2000  # characters of a query; longer ones are not search queries


class RequestError(MlflowException):
    """A request the model cannot answer as sent (HTTP 400): the reason, the row and field."""

    def __init__(self, reason: str, row: Optional[int] = None, field: Optional[str] = None):
        where = f"row {row}: " if row is not None else ""
        super().__init__(where + reason, error_code=INVALID_PARAMETER_VALUE,
                         reason=where + reason, row=row, field=field)


class Case(NamedTuple):
    task: str
    history: list  # events of known items only
    skipped: list  # unknown history item ids, first occurrence order
    exclude: np.ndarray  # item_idx of the history items
    query: Optional[str]
    k: int


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _show(value, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width] + f"... ({len(text)} characters)"


def _text(value, row: int, field: str) -> str:
    """A query string: text, encodable as UTF-8 (no lone surrogates), at most MAX_TEXT long."""
    if not isinstance(value, str):
        raise RequestError(f"{field} must be a string, got {_show(value)}", row, field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{field} is not valid UTF-8 text", row, field) from None
    if len(value) > MAX_TEXT:
        raise RequestError(f"{field} is {len(value)} characters long, at most {MAX_TEXT} are allowed", row, field)
    return value


def parse_history(value, row: int) -> list[dict]:
    """A row's history -> events {behavior, item_id (str), query}; RequestError when malformed."""
    if _missing(value):
        return []
    if isinstance(value, str):
        if not value.strip():
            return []
        try:
            value = json.loads(value)
        except ValueError as e:
            raise RequestError(f"history is not JSON ({getattr(e, 'msg', e)} at character "
                               f"{getattr(e, 'pos', '?')})", row, "history") from None
        except RecursionError:
            raise RequestError("history is nested too deeply", row, "history") from None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, list):
        raise RequestError(f"history must be a JSON list of events, got {_show(value)}", row, "history")
    events = []
    for j, event in enumerate(value):
        field = f"history[{j}]"
        if not isinstance(event, dict) or "item_id" not in event:
            raise RequestError(f"{field} must be an object with an item_id, got {_show(event)}", row, field)
        item = event["item_id"]
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise RequestError(f"{field}.item_id must be a string or an integer, got {_show(item)}", row, field)
        behavior = event.get("behavior")
        if behavior not in TASKS:
            raise RequestError(f"{field}.behavior must be 'rec' or 'search', got {_show(behavior)}", row, field)
        query = event.get("query")
        if behavior == "search" and query is not None:
            query = _text(query, row, f"{field}.query")
        events.append({"behavior": behavior, "item_id": str(item),
                       "query": query if behavior == "search" else None})
    return events


def parse_k(value, row: int, max_k: int) -> int:
    if _missing(value):
        return min(DEFAULT_K, max_k)
    ok = not isinstance(value, (bool, np.bool_)) and (
        isinstance(value, (int, np.integer))
        or (isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer()))
    if not ok or not 1 <= int(value) <= max_k:
        raise RequestError(f"k must be an integer from 1 to {max_k}, got {_show(value)}", row, "k")
    return int(value)


def _frame(model_input) -> pd.DataFrame:
    try:
        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    except Exception as e:  # noqa: BLE001 - whatever the server parsed that is not a table
        raise RequestError(f"the input must be rows with the columns {list(COLUMNS)}: {e}") from None
    if df.columns.duplicated().any():
        raise RequestError(f"repeated columns: {sorted({str(c) for c in df.columns[df.columns.duplicated()]})}")
    unknown = [str(c) for c in df.columns if c not in COLUMNS]
    if unknown:
        raise RequestError(f"unknown columns {unknown[:10]}: the columns are {list(COLUMNS)}")
    if "task" not in df:
        raise RequestError(f"the input needs a 'task' column (the columns are {list(COLUMNS)})")
    if len(df) > MAX_ROWS:
        raise RequestError(f"{len(df)} rows in one request, at most {MAX_ROWS} are allowed")
    return df.reset_index(drop=True)


def parse_request(model_input, item_index: dict, n_items: int) -> list[Case]:
    """Validate every row up front (nothing is ranked for a bad request) -> one Case per row."""
    df = _frame(model_input)
    max_k = min(MAX_K, n_items)
    column = {c: (df[c].tolist() if c in df else [None] * len(df)) for c in COLUMNS}
    cases = []
    for row in range(len(df)):
        task = column["task"][row]
        if not isinstance(task, str) or task not in TASKS:
            raise RequestError(f"task must be 'rec' or 'search', got {_show(task)}", row, "task")
        query = None
        if task == "search":
            query = column["query"][row]
            if _missing(query):
                raise RequestError("a search row needs a query", row, "query")
            query = _text(query, row, "query")
            if not query.strip():
                raise RequestError("a search row needs a query that is not blank", row, "query")
        events = parse_history(column["history"][row], row)
        known = [e for e in events if e["item_id"] in item_index]
        skipped = list(dict.fromkeys(e["item_id"] for e in events if e["item_id"] not in item_index))
        exclude = np.unique(np.asarray([item_index[e["item_id"]] for e in known], dtype=np.int64))
        cases.append(Case(task, known, skipped, exclude, query, parse_k(column["k"][row], row, max_k)))
    return cases


class GenSARModel(PythonModel):
    def load_context(self, context):
        settings = DecodeSettings.from_json(json.loads(Path(context.artifacts["settings"]).read_text()))
        identifiers = pd.read_parquet(context.artifacts["identifiers"])
        self.ranker = GenerativeRanker(context.artifacts["model"], identifiers, settings,
                                       members=logged_members(context.artifacts))
        self.item_index = dict(zip(identifiers["item_id"].astype(str), identifiers["item_idx"]))
        self.item_id_of = identifiers.sort_values("item_idx")["item_id"].astype(str).to_numpy()

    def predict(self, context, model_input, params=None):
        cases = parse_request(model_input, self.item_index, len(self.item_id_of))
        try:
            items, scores = self._rank(cases)
        except Exception:
            # a bug, not a bad request: the traceback stays in the server log
            log.exception("ranking a request of %d rows failed", len(cases))
            raise MlflowException("internal error while ranking the request (details in the server log)",
                                  error_code=INTERNAL_ERROR) from None
        return pd.DataFrame({"task": [c.task for c in cases], "items": items, "scores": scores,
                             "skipped_history": [c.skipped for c in cases]},
                            columns=["task", "items", "scores", "skipped_history"])

    def _rank(self, cases: list[Case]) -> tuple[list, list]:
        items, scores = [[]] * len(cases), [[]] * len(cases)
        for task in TASKS:
            rows = [r for r, c in enumerate(cases) if c.task == task]
            if not rows:
                continue
            sub = pd.DataFrame({"history": [cases[r].history for r in rows],
                                "query": [cases[r].query for r in rows],
                                "exclude": [cases[r].exclude for r in rows]})
            ranked = self.ranker.top_k_unseen(sub, task, max(cases[r].k for r in rows))
            for r, (found, score) in zip(rows, ranked):
                items[r] = [str(self.item_id_of[i]) for i in found[:cases[r].k]]
                scores[r] = [float(s) for s in score[:cases[r].k]]
        return items, scores


mlflow.models.set_model(GenSARModel())
