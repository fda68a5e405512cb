"""tracking.py against real MLflow stores (sqlite in tmp; a real tracking server in the slow test)."""
from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gensar_core import tracking
from gensar_core.config import PipelineConfig, load_config
from gensar_core.serving import free_port


@pytest.fixture
def cfg(gensar_home, tmp_path):
    return load_config(None, [f"warehouse={tmp_path / 'wh'}", "tracking.experiment=unit"])


def test_default_store_is_sqlite_under_gensar_home(cfg, gensar_home):
    assert tracking.tracking_uri(cfg) == f"sqlite:///{gensar_home / 'mlflow' / 'mlflow.db'}"
    assert tracking.artifact_root(cfg) == gensar_home / "mlflow" / "artifacts"
    with tracking.start_run(cfg, "first", tags={"kind": "unit"}) as run:
        run_id = run.info.run_id
        assert tracking.active_run_id() == run_id
    assert tracking.active_run_id() is None
    assert (gensar_home / "mlflow" / "mlflow.db").exists()
    got = tracking.get_run(cfg, run_id)
    assert got.info.run_name == "first" and got.info.status == "FINISHED"
    assert got.data.tags["kind"] == "unit" and got.data.tags["gensar.config_fingerprint"] == cfg.fingerprint()
    assert Path(got.info.artifact_uri.replace("file://", "")).is_relative_to(gensar_home / "mlflow" / "artifacts")


def test_flatten_config():
    flat = tracking.flatten_config(PipelineConfig(warehouse="/w"))
    assert flat["train.lr"] == "0.001" and flat["model.prompted.backbone"] == "t5-scratch"
    assert flat["corpus.tasks.rec.weight"] == "1.0" and flat["data.source.kind"] == "movielens"
    assert flat["identifiers.hidden_dims"] == "[512, 256, 128, 64]" and flat["spark.conf"] == "{}"
    assert flat["warehouse"] == "/w" and flat["ds"] == "None"
    assert all(isinstance(v, str) for v in flat.values())


def test_params_metrics_artifacts(cfg, tmp_path):
    f = tmp_path / "report.txt"
    f.write_text("hello")
    d = tmp_path / "model"
    (d / "sub").mkdir(parents=True)
    (d / "weights.bin").write_bytes(b"\0" * 10)
    (d / "sub" / "x.json").write_text("{}")
    with tracking.start_run(cfg, "full") as run:
        logged = tracking.log_params_from_config(cfg)
        assert len(logged) > 100  # more than one MLflow batch
        tracking.log_params({"extra.long": "x" * 10_000})
        for step in range(3):
            kept = tracking.log_metrics({"train/loss": 1.0 / (step + 1), "valid/ndcg@5": np.float32(0.5),
                                         "t": torch.tensor(2.0), "nan": math.nan, "name": "text", "flag": True},
                                        step=step)
        assert set(kept) == {"train/loss", "valid/ndcg_5", "t", "flag"}
        tracking.log_artifact(f)
        tracking.log_artifact(d, "model")
        tracking.log_dict({"a": 1}, "meta/a.json")
        tracking.set_tags({"stage": 3})
        with pytest.raises(FileNotFoundError):
            tracking.log_artifact(tmp_path / "missing")
    run_id = run.info.run_id
    got = tracking.get_run(cfg, run_id)
    assert got.data.params["train.lr"] == "0.001" and len(got.data.params["extra.long"]) == 6000
    assert len(got.data.params) == len(logged) + 1
    assert got.data.tags["stage"] == "3"
    assert tracking.metric_history(cfg, run_id, "train/loss") == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    assert [v for _, v in tracking.metric_history(cfg, run_id, "valid/ndcg@5")] == [0.5] * 3
    assert tracking.list_artifacts(cfg, run_id) == ["meta/a.json", "model/sub/x.json", "model/weights.bin", "report.txt"]


def test_failed_body_marks_the_run_and_a_run_can_be_reopened(cfg):
    with pytest.raises(ValueError):
        with tracking.start_run(cfg, "crashy") as run:
            tracking.log_metrics({"x": 1.0}, step=1)
            raise ValueError("boom")
    run_id = run.info.run_id
    assert tracking.get_run(cfg, run_id).info.status == "FAILED"
    assert [r.info.run_id for r in tracking.find_runs(cfg, "attributes.status = 'FAILED'")] == [run_id]
    with tracking.start_run(cfg, "ignored", run_id=run_id) as again:
        assert again.info.run_id == run_id
        tracking.log_metrics({"x": 2.0}, step=2)
    got = tracking.get_run(cfg, run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "crashy"
    assert [v for _, v in tracking.metric_history(cfg, run_id, "x")] == [1.0, 2.0]


def test_explicit_sqlite_uri_keeps_artifacts_beside_it(tmp_path, gensar_home):
    db = tmp_path / "elsewhere" / "runs.db"
    cfg = load_config(None, [f"tracking.uri=sqlite:///{db}", "tracking.experiment=other"])
    assert tracking.artifact_root(cfg) == db.parent / "artifacts"
    with tracking.start_run(cfg, "r") as run:
        tracking.log_dict({"k": "v"}, "k.json")
    assert db.exists() and not (gensar_home / "mlflow").exists()
    assert (db.parent / "artifacts" / "other" / run.info.run_id / "artifacts" / "k.json").exists()


@pytest.mark.slow
def test_tracking_server_uri(tmp_path, gensar_home):
    """A real `mlflow server` on loopback: runs, metrics and artifacts go through HTTP."""
    port = free_port()
    store = tmp_path / "server"
    store.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{store / 'db.sqlite'}", "--artifacts-destination", str(store / "art")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("mlflow server did not start")
        time.sleep(2)
        cfg = load_config(None, [f"tracking.uri=http://127.0.0.1:{port}"])
        assert tracking.artifact_root(cfg) is None
        with tracking.start_run(cfg, "remote") as run:
            tracking.log_params({"a": 1})
            tracking.log_metrics({"m": 0.5}, step=1)
            tracking.log_dict({"k": 1}, "k.json")
        got = tracking.get_run(cfg, run.info.run_id)
        assert got.data.params == {"a": "1"} and got.data.metrics == {"m": 0.5}
        assert tracking.list_artifacts(cfg, run.info.run_id) == ["k.json"]
        assert list((store / "art").rglob("k.json"))
        assert not (gensar_home / "mlflow").exists()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_pipeline_steps_are_mlflow_runs(tmp_path, monkeypatch):
    """split and learn_identifiers record a run with params, metrics and the codebook plot."""
    monkeypatch.setenv("GENSAR_HOME", str(tmp_path))
    import numpy as np
    import pandas as pd

    from gensar_core import tracking
    from gensar_core.config import PipelineConfig
    from gensar_core.embed.vectors import vectors_table
    from gensar_core.pipeline import step_learn_identifiers, step_split
    from gensar_core.storage import atomic_dir, write_table

    cfg = PipelineConfig.model_validate({
        "warehouse": str(tmp_path / "wh"),
        "identifiers": {"epochs": 2, "codebook_size": 4, "hidden_dims": [16], "latent_dim": 4, "batch_size": 16}})
    rng = np.random.default_rng(0)
    n = 12
    events = pd.DataFrame({"user_id": [f"u{i % 3}" for i in range(30)], "item_id": [f"i{i % n}" for i in range(30)],
                           "ts": np.arange(30), "behavior": "rec", "query": None, "session_id": None})
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(n)], "item_idx": np.arange(n), "title": "t",
                          "text": "t", "categories": [["c"]] * n})
    with atomic_dir(cfg.warehouse / "curated") as stage:
        write_table(events, stage / "events")
        write_table(items, stage / "items")
    with atomic_dir(cfg.warehouse / "features") as stage:
        for name, dim in (("semantic", 8), ("collaborative", 6)):
            write_table(vectors_table(np.arange(n), rng.normal(size=(n, dim)).astype("float32")), stage / name)
    step_split(cfg)
    step_learn_identifiers(cfg)
    runs = {r.data.tags["gensar.step"]: r for r in tracking.find_runs(cfg)}
    assert runs["split"].data.metrics["splits/test/samples"] == 3
    assert runs["split"].data.params["split.strategy"] == "leave_one_out"
    ids = runs["learn_identifiers"]
    assert ids.data.metrics["prefix_shared_share"] == 1.0
    assert "codebook_usage.png" in tracking.list_artifacts(cfg, ids.info.run_id)
