"""The Airflow DAGs import cleanly and run end to end under Airflow (dag.test) on tiny data."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers import movielens_files, read

REPO = Path(__file__).resolve().parents[1]
# model sizes for a run on a handful of items: every step runs for real, just small
TINY = ["embed.collaborative.epochs=1", "embed.collaborative.dim=16", "identifiers.epochs=2",
        "identifiers.codebook_size=4", "identifiers.hidden_dims=[32]", "identifiers.latent_dim=4",
        "identifiers.batch_size=8", "model.scratch.d_model=32", "model.scratch.d_ff=64", "model.scratch.d_kv=8",
        "model.scratch.num_heads=2", "model.scratch.tokenizer_vocab_size=300", "train.batch_size=16",
        "train.eval_every=0", "train.warmup_steps=2", "evaluate.beam_size=5", "evaluate.num_candidates=5"]


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow")
    os.environ["AIRFLOW_HOME"] = str(home)
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
    out = subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"],
                         env=os.environ, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return home


def test_dagbag_imports_without_errors(airflow_home):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    assert "gensar_nightly" in bag.dags


def test_nightly_dag_runs_end_to_end(airflow_home, gensar_home, tmp_path):
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(REPO / "dags")).dags["gensar_nightly"]
    base = movielens_files(tmp_path / "ml", extra_events=["1\t1\t3\tbad"])
    conf = {"epochs": 1, "tasks": ["rec", "search", "align"], "overrides": [f"warehouse={tmp_path / 'wh'}", f"data.source.path={base}", "spark.shuffle_partitions=2",
                          *TINY]}
    import pendulum

    run = dag.test(logical_date=pendulum.datetime(2026, 11, 27, tz="UTC"), run_conf=conf)
    assert run.state == "success", [(ti.task_id, ti.state) for ti in run.get_task_instances()]
    assert len(read(tmp_path / "wh" / "curated" / "events")) == 15
    assert len(read(tmp_path / "wh" / "splits" / "test")) == 3
    ids = read(tmp_path / "wh" / "identifiers" / "items")
    assert len(ids) == 6 and ids["semantic_id"].is_unique and ids["collaborative_id"].is_unique
    assert (tmp_path / "wh" / "models" / "t5-scratch__rec+search+align" / "model.safetensors").exists()
    report = (tmp_path / "wh" / "reports" / "eval-test-2026-11-27" / "report.md").read_text()
    assert "gensar" in report and "sasrec" in report
    scores = tmp_path / "wh" / "scores" / "ds=2026-11-27"
    assert sorted(p.name for p in (scores / "rec").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert len(pd.concat([pd.read_parquet(p) for p in (scores / "rec").iterdir()])) > 0
