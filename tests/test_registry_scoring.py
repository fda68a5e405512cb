"""MLflow registry with the champion gate, batch scoring by partition, and a real serving endpoint."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from gensar_core import registry, tracking
from gensar_core.baselines import BM25Ranker
from gensar_core.config import PipelineConfig
from gensar_core.evaluate.context import EvalContext
from gensar_core.evaluate.ranking import ScoreRanker
from gensar_core.evaluate.run import run_evaluate
from gensar_core.model.runs import trained_model_dir
from gensar_core.pipeline import step_batch_score, step_register
from gensar_core.scoring import partition_of
from gensar_core.serving import free_port
from gensar_core.storage import Warehouse


def test_gate_rule():
    assert registry.beats({"rec": 0.1, "search": 0.1}, None)
    assert registry.beats({"rec": 0.2, "search": 0.3}, {"rec": 0.1, "search": 0.2})
    assert not registry.beats({"rec": 0.2, "search": 0.1}, {"rec": 0.1, "search": 0.2})
    assert not registry.beats({"rec": 0.1, "search": 0.2}, {"rec": 0.1, "search": 0.2})  # ties stay


@pytest.fixture(scope="module")
def registered(toy_model):
    return step_register(toy_model)


def test_champion_gate_both_ways(toy_model, registered):
    cfg, model_dir = toy_model, trained_model_dir(toy_model)
    assert registered["promoted"] and registered["version"] == registered["champion_version"]
    base = registered["metrics"]
    client = tracking.client(cfg)
    name = cfg.registry.model_name

    worse = registry.register(cfg, model_dir, {"rec": base["rec"] - 0.01, "search": base["search"] + 0.5})
    assert not worse["promoted"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == registered["version"]
    assert str(client.get_model_version_by_alias(name, "challenger").version) == worse["version"]

    better = registry.register(cfg, model_dir, {"rec": base["rec"] + 0.5, "search": base["search"] + 0.5})
    assert better["promoted"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == better["version"]
    assert client.get_model_version(name, better["version"]).tags["gate.decision"] == "champion"


class BrokenModel(ScoreRanker):
    """A deliberately bad model: it answers with item indices the catalogue does not have (as a
    model decoding another identifier table would), which the real protocol drops, so every case
    scores 0. (Reverse popularity does not do: on the toy data popularity itself is weak.)"""

    def rank(self, cases, task, k, candidates=None):
        return [np.arange(self.ctx.n_items, self.ctx.n_items + k) for _ in range(len(cases))]


@pytest.fixture
def gate_cfg(toy_model, tmp_path):
    """The toy model's warehouse copied, with a fresh MLflow store (no champion yet), two baselines
    and an evaluation report of its own, as the DAG's evaluate step leaves it before register."""
    shutil.copytree(toy_model.warehouse, tmp_path / "wh", ignore=shutil.ignore_patterns("reports", "champion"))
    cfg = PipelineConfig.model_validate({
        **toy_model.model_dump(), "warehouse": str(tmp_path / "wh"), "ds": "2026-12-01",
        "tracking": {**toy_model.tracking.model_dump(), "uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "evaluate": {**toy_model.evaluate.model_dump(), "baselines": ["popularity", "bm25"]}})
    run_evaluate(cfg)
    return cfg


def first_lines(result: dict, n: int = 3) -> str:
    return "\n".join(Path(result["report"]).read_text().splitlines()[:n])


def test_a_model_that_loses_to_a_baseline_is_registered_but_not_promoted(gate_cfg):
    cfg, name = gate_cfg, gate_cfg.registry.model_name
    bad = BrokenModel(EvalContext(cfg))
    result = registry.register_with_gate(cfg, trained_model_dir(cfg), bad)
    # the first model passes the champion rule; the baseline rule alone stops it
    assert not result["promoted"] and result["champion_version"] is None
    rec = result["baselines"]["rec"]
    assert rec["against"] == max(rec["baselines"], key=rec["baselines"].get)  # the best of the two
    assert set(rec["baselines"]) == {"popularity", "bm25"} and rec["high"] < 0
    assert rec["diff"] == pytest.approx(-rec["baselines"][rec["against"]])  # it scores 0 on every case
    gate_ctx = EvalContext(registry.gate_config(cfg))  # the gate's cases: valid, registry.max_cases
    assert rec["n"] == len(gate_ctx.cases(cfg.registry.split, "rec"))
    expected = (f"Not promoted: loses to {rec['against']} on rec by {rec['diff']:+.4f} NDCG@10 "
                f"[{rec['low']:+.4f}, {rec['high']:+.4f}]")
    assert result["reason"].startswith(expected)

    client = tracking.client(cfg)
    assert str(client.get_model_version_by_alias(name, "challenger").version) == result["version"]
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias(name, "champion")
    tags = client.get_model_version(name, result["version"]).tags
    assert tags["gate.decision"] == "challenger" and tags["gate.reason"] == result["reason"]
    assert tags["gate.baseline.rec"].endswith(f"vs {rec['against']}")

    gate = json.loads(Path(result["gate_file"]).read_text())
    assert gate["promoted"] is False and gate["reason"] == result["reason"] and gate["baselines"]["rec"]["high"] < 0
    assert expected in first_lines(result)
    # a retried register replaces the note instead of stacking a second one
    registry.publish_gate(cfg, result)
    text = Path(result["report"]).read_text()
    assert text.count("Registry gate") == 1 and "# Evaluation report" in text

    # the baseline comparison switched off: the champion rule alone, the first model wins
    off = cfg.model_copy(update={"registry": cfg.registry.model_copy(update={"compare_baselines": False})})
    again = registry.register_with_gate(off, trained_model_dir(cfg), bad)
    assert again["promoted"] and again["baselines"] is None
    assert "Promoted: the first model" in first_lines(again)


def test_a_model_no_worse_than_the_baselines_is_promoted_as_before(gate_cfg):
    cfg = gate_cfg
    # the best baseline of both tasks on the toy data (BM25) as the model: a difference of 0 on
    # every case, no loss
    result = registry.register_with_gate(cfg, trained_model_dir(cfg), BM25Ranker(EvalContext(cfg)))
    assert result["promoted"] and result["version"] == result["champion_version"]
    assert {p["against"] for p in result["baselines"].values()} == {"bm25"}
    assert result["baselines"]["rec"]["high"] >= 0 and result["baselines"]["search"]["high"] >= 0
    assert result["reason"] == "Promoted: the first model; no baseline beats it beyond chance"
    assert first_lines(result, 1).startswith(f"**Registry gate** ({cfg.registry.model_name} version "
                                             f"{result['version']}, alias champion): Promoted")
    # the champion rule stays on top: the same numbers again do not beat the champion
    same = registry.register_with_gate(cfg, trained_model_dir(cfg), BM25Ranker(EvalContext(cfg)))
    assert not same["promoted"] and same["champion_version"] == result["version"]
    assert same["reason"].startswith(f"Not promoted: not better than champion version {result['version']}")
    assert "loses to" not in same["reason"]


def test_batch_score_partitions(toy_model, registered):
    cfg = toy_model.model_copy(update={"ds": "2026-11-27"})
    wh = Warehouse(cfg.warehouse)
    parts = [step_batch_score(cfg, partition=p) for p in range(cfg.scoring.partitions)]
    folder = Path(parts[0]["folder"])
    rec = pd.concat([pd.read_parquet(f) for f in sorted((folder / "rec").glob("part-*.parquet"))])
    users = set(wh.read("curated/events")["user_id"])
    assert set(rec["user_id"]) == users  # every active user, each in exactly one partition
    assert rec.groupby("user_id")["rank"].max().max() <= cfg.scoring.top_k
    for p in range(cfg.scoring.partitions):
        part = pd.read_parquet(folder / "rec" / f"part-{p:05d}.parquet")
        assert (partition_of(part["user_id"], cfg.scoring.partitions) == p).all()
    items = set(wh.read("curated/items")["item_id"])
    assert set(rec["item_id"]) <= items
    events = wh.read("curated/events")
    seen = events.groupby("user_id")["item_id"].agg(set)
    assert not any(i in seen[u] for u, i in zip(rec["user_id"], rec["item_id"]))
    search = pd.concat([pd.read_parquet(f) for f in (folder / "search").glob("part-*.parquet")])
    assert len(search) and search["query"].notna().all()
    # a search leaves out what the user saw before it, as the evaluation does
    ordered = events.sort_values("ts", kind="stable")
    for (user, ts), answer in search.groupby(["user_id", "ts"]):
        before = set(ordered[(ordered["user_id"] == user) & (ordered["ts"] < ts)]["item_id"])
        assert not before & set(answer["item_id"]), (user, ts)
    assert sum(p["rec_users"] for p in parts) == len(users)
    for p in parts:  # the throughput it reports is its own count over its own time
        assert p["users_per_second"] == pytest.approx(p["rec_users"] / p["seconds"], rel=0.05, abs=0.05)
        assert p["cases_per_second"] == pytest.approx((p["rec_users"] + p["search_queries"]) / p["seconds"],
                                                      rel=0.05, abs=0.05)
    # a retry of one partition rewrites the same rows
    before = pd.read_parquet(folder / "rec" / "part-00000.parquet")
    step_batch_score(cfg, partition=0)
    pd.testing.assert_frame_equal(before, pd.read_parquet(folder / "rec" / "part-00000.parquet"))


def test_mlflow_models_serve_answers(toy_model, registered):
    cfg = toy_model
    port = free_port()
    # the server runs `uvicorn` from PATH: the venv's bin, as infra/serve_model.sh sets it
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(cfg),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    proc = subprocess.Popen([mlflow_bin, "models", "serve", "-m", registry.champion_uri(cfg), "--env-manager",
                             "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError("server did not start:\n" + proc.stdout.read()[-3000:])
                time.sleep(1)
        train = Warehouse(cfg.warehouse).read("splits/test")
        row = train.iloc[0]
        history = [{k: e[k] for k in ("behavior", "item_id", "query")} for e in row["history"]]
        body = {"dataframe_split": {"columns": ["task", "history", "query", "k"], "data": [
            ["rec", json.dumps(history), None, 3], ["search", json.dumps(history), "comedy night", 4]]}}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=60).read())["predictions"]
        items = set(Warehouse(cfg.warehouse).read("identifiers/items")["item_id"])
        assert len(answer) == 2
        assert len(answer[0]["items"]) == 3 and set(answer[0]["items"]) <= items
        assert not set(answer[0]["items"]) & {e["item_id"] for e in history}
        assert len(answer[1]["items"]) == 4 and set(answer[1]["items"]) <= items
    finally:
        proc.terminate()
        proc.wait(timeout=30)
