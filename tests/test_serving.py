"""Serving as an API: request validation (HTTP 400 with the reason, no stack trace), unknown history
items skipped and reported, the history rule for both tasks, exact k, and a fuzz run; against one
real `mlflow models serve` of the toy model per module, plus the validation rules on their own."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from gensar_core import serving
from gensar_core.serving_model import MAX_ROWS, MAX_TEXT, RequestError, parse_request
from gensar_core.storage import Warehouse

LEAKS = ("Traceback", "/work/", "site-packages", 'File "')


# ---------------------------------------------------------------- the rules, without a server
ITEMS = {f"i{k}": k for k in range(5)}


def _reason(rows) -> RequestError:
    with pytest.raises(RequestError) as err:
        parse_request(rows, ITEMS, len(ITEMS))
    return err.value


def test_parse_request_rules():
    cases = parse_request([
        {"task": "rec", "history": json.dumps([{"behavior": "rec", "item_id": "i1"},
                                               {"behavior": "search", "item_id": "new", "query": "q"},
                                               {"behavior": "rec", "item_id": "new"}]), "k": 3.0},
        {"task": "search", "history": None, "query": " x "},
    ], ITEMS, len(ITEMS))
    assert [c.k for c in cases] == [3, 5]  # the default 10 is capped at the catalogue
    assert cases[0].skipped == ["new"] and [e["item_id"] for e in cases[0].history] == ["i1"]
    assert cases[0].exclude.tolist() == [1] and cases[1].exclude.tolist() == []
    for rows, field, words in [
        ([{"task": "browse"}], "task", "task must be 'rec' or 'search'"),
        ([{"task": "rec", "k": -3}], "k", "k must be an integer from 1 to 5"),
        ([{"task": "rec", "k": 6}], "k", "from 1 to 5"),
        ([{"task": "rec", "k": 2.5}], "k", "k must be an integer"),
        ([{"task": "rec", "k": True}], "k", "k must be an integer"),
        ([{"task": "rec", "history": "[{"}], "history", "history is not JSON"),
        ([{"task": "rec", "history": "[" * 100_000}], "history", "history"),
        ([{"task": "rec", "history": '{"item_id": "i1"}'}], "history", "must be a JSON list"),
        ([{"task": "rec", "history": '[{"behavior": "rec"}]'}], "history[0]", "with an item_id"),
        ([{"task": "rec", "history": '[{"item_id": "i1"}]'}], "history[0]", "behavior must be"),
        ([{"task": "rec", "history": '[{"behavior": "rec", "item_id": [1]}]'}], "history[0]", "string or an integer"),
        ([{"task": "search", "query": "   "}], "query", "not blank"),
        ([{"task": "search"}], "query", "needs a query"),
        ([{"task": "search", "query": "x" * (MAX_TEXT + 1)}], "query", "characters long"),
        ([{"task": "search", "query": "bad \ud800"}], "query", "not valid UTF-8"),
    ]:
        err = _reason(rows)
        assert err.json_kwargs["field"] == field and words in err.json_kwargs["reason"], (rows, err.message)
        assert err.json_kwargs["row"] == 0 and err.get_http_status_code() == 400
    assert "unknown columns ['kk']" in _reason([{"task": "rec", "kk": 3}]).message
    assert "row 1: task" in _reason([{"task": "rec"}, {"task": None}]).message
    assert f"at most {MAX_ROWS}" in _reason([{"task": "rec"}] * (MAX_ROWS + 1)).message


# ---------------------------------------------------------------- one real server for the module
@pytest.fixture(scope="module")
def served(toy_model, tmp_path_factory):
    """The toy model as the champion of its own MLflow store (the shared toy store's aliases are
    other tests' business), served by `mlflow models serve` on a free loopback port."""
    store = tmp_path_factory.mktemp("serving-store")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    model_uri = serving.register_champion(toy_model, uri)
    with serving.model_server(model_uri, uri) as url:
        yield url


@pytest.fixture(scope="module")
def catalogue(toy_model):
    return Warehouse(toy_model.warehouse).read("identifiers/items")["item_id"].astype(str).tolist()


@pytest.fixture(scope="module")
def test_rows(toy_model):
    return serving.sample_rows(toy_model.warehouse, 12, seed=3)


def _invoke(url, rows):
    status, body = serving.http(f"{url}/invocations", serving.invocation(rows))
    return status, json.loads(body)


def _assert_clean(body: bytes | str):
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    assert not any(leak in text for leak in LEAKS), text[:2000]


HISTORY = [{"behavior": "rec", "item_id": "i001"}, {"behavior": "search", "item_id": "i002", "query": "comedy x"}]


@pytest.mark.parametrize("row, field, words", [
    ({"task": "browse", "history": HISTORY}, "task", "task must be 'rec' or 'search', got 'browse'"),
    ({"task": "rec", "history": HISTORY, "k": -3}, "k", "k must be an integer from 1 to 30, got -3"),
    ({"task": "rec", "history": HISTORY, "k": 31}, "k", "from 1 to 30"),
    ({"task": "search", "history": HISTORY, "query": ""}, "query", "not blank"),
    ({"task": "search", "history": HISTORY, "query": " \t "}, "query", "not blank"),
    ({"task": "search", "history": HISTORY}, "query", "needs a query"),
    ({"task": "rec", "history": "{not json"}, "history", "history is not JSON"),
    ({"task": "rec", "history": [{"item_id": "i001"}]}, "history[0]", "behavior must be 'rec' or 'search'"),
], ids=["task", "k-negative", "k-too-big", "query-empty", "query-blank", "query-missing", "history-not-json",
        "history-event"])
def test_bad_requests_answer_400_with_the_reason(served, row, field, words):
    rows = [{"task": "rec", "history": HISTORY, "k": 2}, row]  # the bad row is row 1
    data = [[r["task"], h if isinstance(h := r.get("history"), str) else json.dumps(h), r.get("query"), r.get("k")]
            for r in rows]
    body = json.dumps({"dataframe_split": {"columns": ["task", "history", "query", "k"], "data": data}}).encode()
    status, raw = serving.http(f"{served}/invocations", body)
    assert status == 400, raw[:500]
    _assert_clean(raw)
    answer = json.loads(raw)
    assert answer["error_code"] == "INVALID_PARAMETER_VALUE"
    assert answer["reason"].startswith("row 1: ") and words in answer["reason"]
    assert answer["row"] == 1 and answer["field"] == field
    assert words in answer["message"] and "unexpected error" not in answer["message"]


def test_unknown_history_items_are_skipped_and_reported(served, test_rows):
    for row in test_rows[:4]:
        new = [{"behavior": "rec", "item_id": "brand-new-1"},
               {"behavior": "search", "item_id": "brand-new-2", "query": "tonight"},
               {"behavior": "rec", "item_id": "brand-new-1"}]
        with_new = {**row, "history": new[:1] + row["history"] + new[1:]}
        status, answer = _invoke(served, [row, with_new])
        assert status == 200, answer
        plain, skipped = answer["predictions"]
        assert plain["skipped_history"] == [] and skipped["skipped_history"] == ["brand-new-1", "brand-new-2"]
        # the unknown items are left out of the prompt: the same answer as without them
        assert skipped["items"] == plain["items"] and np.allclose(skipped["scores"], plain["scores"], atol=1e-5)


def test_answers_exclude_the_history_and_honour_k(served, test_rows, catalogue):
    for task in ("rec", "search"):
        for row in test_rows:
            row = {**row, "task": task, "query": row["query"] or "comedy"}
            seen = {e["item_id"] for e in row["history"]}
            allowed = len(catalogue) - len(seen)
            ks = [1, 3, allowed]
            status, answer = _invoke(served, [{**row, "k": k} for k in ks])
            assert status == 200, answer
            for k, out in zip(ks, answer["predictions"]):
                assert out["task"] == task and len(out["items"]) == k == len(out["scores"])
                assert len(set(out["items"])) == k and set(out["items"]) <= set(catalogue)
                assert not set(out["items"]) & seen, (task, seen, out["items"])
                assert out["scores"] == sorted(out["scores"], reverse=True)
            # asked for everything allowed: exactly the catalogue without the history
            assert set(answer["predictions"][-1]["items"]) == set(catalogue) - seen


def test_a_history_of_the_whole_catalogue_leaves_nothing_to_return(served, catalogue):
    history = [{"behavior": "rec", "item_id": i} for i in catalogue]
    status, answer = _invoke(served, [{"task": "rec", "history": history, "k": 5},
                                      {"task": "search", "history": history, "query": "comedy", "k": 5}])
    assert status == 200, answer
    assert [(r["items"], r["scores"]) for r in answer["predictions"]] == [([], []), ([], [])]


# ---------------------------------------------------------------- fuzz
def _junk_text(rng: random.Random, n: int) -> str:
    return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0xD7FF), rng.randrange(0, 32)]))
                   for _ in range(n))


def _fuzz_value(rng: random.Random, catalogue, depth=0):
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, -1, 0, 3, 10 ** 20, 2.5, float("1e300")])
    if kind == 2:
        return _junk_text(rng, rng.randrange(0, 40))
    if kind == 3:
        return rng.choice(catalogue + ["rec", "search", "", "\ud800 lone", "NaN"])
    if kind == 4:
        return {"behavior": rng.choice(["rec", "search", "x"]), "item_id": rng.choice(catalogue + ["unknown-9"]),
                "query": _junk_text(rng, 8)}
    if kind == 5:
        return [_fuzz_value(rng, catalogue, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 6:
        return {_junk_text(rng, 5): _fuzz_value(rng, catalogue, depth + 1) for _ in range(rng.randrange(3))}
    return json.dumps(_fuzz_value(rng, catalogue, depth + 1))


def _fuzz_history(rng: random.Random, catalogue):
    """Mostly well formed (unknown items included, sometimes 10k events), sometimes not."""
    kind = rng.randrange(10)
    if kind == 0:  # a long-time user: 10k events, some of unknown items
        return json.dumps([{"behavior": "rec", "item_id": rng.choice(catalogue + ["new-x"])} for _ in range(10_000)])
    if kind == 1:
        return _fuzz_value(rng, catalogue)
    events = [{"behavior": rng.choice(["rec", "search"]),
               "item_id": rng.choice(catalogue + [f"new-{i}" for i in range(5)] + [7]),
               "query": rng.choice([_junk_text(rng, rng.randrange(1, 20)), None])} for _ in range(rng.randrange(12))]
    if kind == 2:
        return json.dumps(events)[:rng.randrange(1, 60)]  # cut short: not JSON
    return json.dumps(events) if kind < 7 else events


def _fuzz_row(rng: random.Random, catalogue) -> list:
    """task, history, query, k: each field well formed six times in seven."""
    task = rng.choice(["rec", "search"]) if rng.random() < 6 / 7 else _fuzz_value(rng, catalogue)
    query = (_junk_text(rng, rng.randrange(1, 30)) if rng.random() < 6 / 7
             else rng.choice(["", "  ", None, "x" * 1_000_000, "drama \ud800", _fuzz_value(rng, catalogue)]))
    k = (rng.choice([None, rng.randrange(1, 11)]) if rng.random() < 6 / 7
         else rng.choice([rng.randrange(-5, 1), rng.randrange(31, 100), "3", 2.5, True, 10 ** 20]))
    return [task, _fuzz_history(rng, catalogue), query, k]


def _fuzz_body(rng: random.Random, catalogue) -> bytes:
    kind = rng.randrange(10)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 3000)))
    if kind == 1:
        return b""
    if kind == 2:
        return json.dumps(_fuzz_value(rng, catalogue)).encode()
    rows = [_fuzz_row(rng, catalogue) for _ in range(rng.randrange(1, 3))]
    body = json.dumps({"dataframe_split": {"columns": ["task", "history", "query", "k"], "data": rows}}).encode()
    if kind == 3:  # a request with bytes that are not UTF-8 in it
        cut = rng.randrange(len(body))
        body = body[:cut] + b"\xff\xc3(" + body[cut:]
    if kind == 4:  # records orientation, same rows
        body = json.dumps({"dataframe_records": [dict(zip(["task", "history", "query", "k"], r)) for r in rows]}).encode()
    return body


def test_fuzz_never_5xx_and_the_server_survives(served, catalogue):
    rng = random.Random(2025)
    statuses = []
    for i in range(60):
        body = _fuzz_body(rng, catalogue)
        status, raw = serving.http(f"{served}/invocations", body)
        statuses.append(status)
        assert status < 500, (i, status, raw[:1000])
        if status == 200:
            answer = json.loads(raw)["predictions"]
            assert all(set(r["items"]) <= set(catalogue) for r in answer)
            assert all(len(r["items"]) == len(r["scores"]) for r in answer)
        else:
            assert 400 <= status < 500 and raw.strip(), (i, status, raw[:1000])
            _assert_clean(raw)
    # the generator reaches both kinds of answer, not only errors
    assert statuses.count(200) >= 5 and sum(400 <= s < 500 for s in statuses) >= 20, statuses
    assert serving.http(f"{served}/ping")[0] == 200
