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
        "identifiers.batch_size=8", "model.prompted.scratch.d_model=32", "model.prompted.scratch.d_ff=64", "model.prompted.scratch.d_kv=8",
        "model.prompted.scratch.num_heads=2", "model.prompted.scratch.tokenizer_vocab_size=300", "model.prompted.batch_size=16",
        "model.timeline.d_model=32", "model.timeline.d_ff=64", "model.timeline.num_heads=2",
        "model.timeline.max_len=64", "model.timeline.tokens_per_batch=512",
        "train.eval_every=0", "train.warmup_steps=2", "evaluate.beam_size=5", "evaluate.num_candidates=5",
        # 3 users: no valid search case to tune the two-stage depth and blend on
        "evaluate.retrieve_top_n=100", "evaluate.blend_alpha=0.5"]


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


def _run(dag, day: int, conf: dict):
    import pendulum

    run = dag.test(logical_date=pendulum.datetime(2026, 11, day, tz="UTC"), run_conf=conf)
    assert run.state == "success", [(ti.task_id, ti.state) for ti in run.get_task_instances()]
    return run


def _tables(wh: Path) -> dict[str, pd.DataFrame]:
    out = {}
    for name in ("curated/items", "curated/events", "splits/train", "splits/test", "identifiers/items"):
        df = read(wh / name).map(lambda v: str(list(v)) if hasattr(v, "__len__") and not isinstance(v, str) else v)
        out[name] = df.sort_values(list(df.columns)).reset_index(drop=True)
    return out


def test_nightly_dag_end_to_end_rerun_and_next_day(airflow_home, gensar_home, tmp_path):
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(REPO / "dags")).dags["gensar_nightly"]
    base = movielens_files(tmp_path / "ml", extra_events=["1\t1\t3\tbad"])
    wh = tmp_path / "wh"
    conf = {"epochs": 1, "tasks": ["rec", "search", "align"], "overrides": [
        f"warehouse={wh}", f"data.source.path={base}", "spark.shuffle_partitions=2",
        "identifiers.mode=incremental", "model.prompted.init_from_champion=true", *TINY]}

    # night 1: every step, trained from scratch; the timeline formulation reads no prompted corpus
    run = _run(dag, 27, conf)
    assert {ti.task_id: ti.state for ti in run.get_task_instances() if ti.state != "success"} == {
        "build_corpus": "skipped"}
    assert not (wh / "corpus").exists()
    assert len(read(wh / "curated" / "events")) == 15
    assert len(read(wh / "splits" / "test")) == 3
    ids = read(wh / "identifiers" / "items")
    assert len(ids) == 6 and ids["semantic_id"].is_unique and ids["collaborative_id"].is_unique
    # configs/default.yaml trains the timeline formulation
    assert (wh / "models" / "timeline-llama__rec+search+align" / "model.safetensors").exists()
    report = (wh / "reports" / "eval-test-2026-11-27" / "report.md").read_text()
    assert "gensar" in report and "sasrec" in report
    scores = wh / "scores" / "ds=2026-11-27"
    assert sorted(p.name for p in (scores / "rec").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert len(pd.concat([pd.read_parquet(p) for p in (scores / "rec").iterdir()])) > 0

    # a retry of the same night gives the same data and identifiers
    before = _tables(wh)
    _run(dag, 27, conf)
    for name, df in _tables(wh).items():
        pd.testing.assert_frame_equal(df, before[name], obj=name)

    # night 2: a new item and new events; the existing IDs stay, the new item gets cold-start IDs
    with open(base / "ml-100k.item", "a") as fh:
        fh.write("7\tBrand New Film\t2026\tComedy Drama\n")
    with open(base / "ml-100k.inter", "a") as fh:
        for u in (1, 2, 3):
            fh.write(f"{u}\t7\t4\t{881000000 + u}\n")
    _run(dag, 28, conf)
    after = read(wh / "identifiers" / "items").set_index("item_id")
    old = ids.set_index("item_id")
    assert (after.loc[old.index, ["semantic_id", "collaborative_id"]] == old[["semantic_id", "collaborative_id"]]).all().all()
    assert "7" in after.index and after["semantic_id"].is_unique and after["collaborative_id"].is_unique
    assert after.loc["7", "semantic_id"][:10] == after.loc["7", "collaborative_id"][:10]  # shared prefix
    assert (wh / "scores" / "ds=2026-11-28" / "rec").exists()
