"""The nightly DAG past one machine's defaults, every server real and on 127.0.0.1:

- PostgreSQL (infra/start_postgres.sh) holds Airflow's metadata database and MLflow's backend store;
- `mlflow server` (infra/start_mlflow.sh) on it is the pipeline's tracking server and registry;
- Airflow (infra/start_airflow.sh: API server, scheduler with the LocalExecutor, DAG processor)
  runs one DAG run triggered through its REST API, tiny model settings;
- its `ingest` task runs on a Spark standalone cluster (infra/start_spark_cluster.sh), through the
  Spark connection named by GENSAR_SPARK_CONN_ID;
- `batch_score` is mapped over scoring.partitions=4 partitions, which the executor runs at once.

Marked `cluster` (`make test-cluster`); one DAG run is shared by the tests of this module.
"""
from __future__ import annotations

import json
import shutil
import time
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest
from cluster_services import (
    base_env,
    comparable,
    free_port,
    get_json,
    http_ok,
    postgres,
    running,
    spark_cluster,
    sql,
)
from helpers import movielens_files
from test_dags import TINY

from gensar_core import pipeline

pytestmark = pytest.mark.cluster
DAG = "gensar_nightly"
DS = "2026-11-27"
PARTITIONS = 4


def _data(folder: Path) -> Path:
    """The toy MovieLens files with 12 users (so each of the 4 partitions has some) and bad rows."""
    extra = [f"{u}\t{(u + k) % 6 + 1}\t{k % 5 + 1}\t{880000000 + 1000 * u + 10 * k}"
             for u in range(4, 13) for k in range(5)]
    extra += ["1\t1\t3\tbad", "2\t999\t3\t880000600", "3\t2\tfive\t880000500"]
    return movielens_files(folder, extra_events=extra)


def _airflow_ready(port: int, token_of) -> bool:
    health = get_json(f"http://127.0.0.1:{port}/api/v2/monitor/health")
    if health["scheduler"]["status"] != "healthy":
        return False
    get_json(f"http://127.0.0.1:{port}/api/v2/dags/{DAG}", token_of())  # parsed by the DAG processor
    return True


def _failed_task_logs(airflow_home: Path, tis: list[dict]) -> str:
    out = []
    for ti in tis:
        if ti["state"] in ("failed", "up_for_retry", "upstream_failed"):
            for log in sorted((airflow_home / "logs").rglob(f"task_id={ti['task_id']}/**/*.log")):
                out.append(f"--- {log}\n{log.read_text(errors='replace')[-3000:]}")
    return "\n".join(out)[-12000:]


def _run_dag(api: str, token: str, conf: dict, airflow_home: Path, timeout: float = 3600) -> tuple[dict, list]:
    """Trigger one run through the REST API and wait for it; fail at the first failed try (the
    DAG retries each task twice, two minutes apart: no need to wait for those)."""
    get_json(f"{api}/dags/{DAG}", token, {"is_paused": False}, method="PATCH")
    run_id = f"cluster-test-{DS}"
    get_json(f"{api}/dags/{DAG}/dagRuns", token,
             {"dag_run_id": run_id, "logical_date": f"{DS}T00:00:00+00:00", "conf": conf})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = get_json(f"{api}/dags/{DAG}/dagRuns/{run_id}", token)
        tis = get_json(f"{api}/dags/{DAG}/dagRuns/{run_id}/taskInstances?limit=100", token)["task_instances"]
        if any(ti["state"] in ("failed", "up_for_retry") for ti in tis) or run["state"] == "failed":
            states = sorted((ti["task_id"], ti["map_index"], ti["state"]) for ti in tis)
            pytest.fail(f"DAG run failed: {states}\n{_failed_task_logs(airflow_home, tis)}")
        if run["state"] == "success":
            return run, tis
        time.sleep(5)
    pytest.fail(f"DAG run not done after {timeout:.0f} s")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster-stack")
    home, airflow_home, wh = root / "gensar_home", root / "airflow", root / "wh"
    with ExitStack() as servers:
        pg = servers.enter_context(postgres())

        ml_port = free_port()
        mlflow = servers.enter_context(running(
            "start_mlflow.sh", [str(ml_port)],
            base_env(GENSAR_HOME=str(home), MLFLOW_BACKEND_URI=pg["url"]("mlflow", "+psycopg2")), root / "mlflow.log"))
        tracking_uri = f"http://127.0.0.1:{ml_port}"
        mlflow.wait_until(lambda: http_ok(f"{tracking_uri}/health"), 300, "mlflow server")

        spark = servers.enter_context(spark_cluster(root / "spark", workers=2))

        af_port = free_port()
        spark_conn = {"conn_type": "spark", "host": spark["host"], "port": spark["port"],
                      "extra": {"spark.executor.memory": "1g"}}
        env = base_env(
            GENSAR_HOME=str(home), AIRFLOW_HOME=str(airflow_home), AIRFLOW_PORT=str(af_port),
            AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=pg["url"]("airflow", "+psycopg2"),
            AIRFLOW__CORE__PARALLELISM="8",  # LocalExecutor processes: >= the 4 mapped partitions
            AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE="False",  # only the run this test triggers
            AIRFLOW_USERS="admin:admin",
            GENSAR_SPARK_CONN_ID="spark_cluster", AIRFLOW_CONN_SPARK_CLUSTER=json.dumps(spark_conn))
        airflow = servers.enter_context(running("start_airflow.sh", [], env, root / "airflow.log"))
        api = f"http://127.0.0.1:{af_port}/api/v2"

        def token() -> str:
            password = json.loads((airflow_home / "simple_auth_manager_passwords.json.generated").read_text())["admin"]
            return get_json(f"http://127.0.0.1:{af_port}/auth/token", None,
                            {"username": "admin", "password": password})["access_token"]

        airflow.wait_until(lambda: _airflow_ready(af_port, token), 900, "airflow")
        base = _data(root / "ml")
        params = {"epochs": 1, "tasks": ["rec", "search", "align"], "overrides": [
            f"data.source.path={base}", "spark.shuffle_partitions=2", f"scoring.partitions={PARTITIONS}",
            "identifiers.mode=incremental", "model.prompted.init_from_champion=true", *TINY]}
        conf = {**params, "overrides": [f"warehouse={wh}", f"tracking.uri={tracking_uri}", *params["overrides"]]}
        started = time.monotonic()
        run, tis = _run_dag(api, token(), conf, airflow_home)
        yield {"pg": pg, "spark": spark, "tracking_uri": tracking_uri, "api": api, "token": token,
               "run": run, "tis": tis, "wh": wh, "home": home, "airflow_home": airflow_home,
               "params": params, "root": root, "seconds": time.monotonic() - started}


def test_dag_run_succeeds_with_metadata_in_postgres(stack):
    run, tis = stack["run"], stack["tis"]
    assert run["state"] == "success"
    assert {ti["task_id"]: ti["state"] for ti in tis if ti["state"] != "success"} == {"build_corpus": "skipped"}
    tasks = {ti["task_id"] for ti in tis}
    assert {"ingest", "split", "train", "evaluate", "register", "batch_score"} <= tasks
    # the scheduler's records are in PostgreSQL (and no sqlite database was made beside them)
    rows = sql(stack["pg"], "airflow", "SELECT task_id, map_index, state FROM task_instance "
               "WHERE dag_id = %s AND run_id = %s", (DAG, run["dag_run_id"]))
    assert sorted(rows) == sorted((ti["task_id"], ti["map_index"], ti["state"]) for ti in tis)
    assert not (stack["airflow_home"] / "airflow.db").exists()
    print(f"DAG run took {stack['seconds']:.0f} s")


def test_champion_read_back_from_the_mlflow_server(stack):
    from mlflow import MlflowClient

    from gensar_core.config import load_config

    name = load_config(None, []).registry.model_name
    client = MlflowClient(tracking_uri=stack["tracking_uri"])
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == "1" and champion.tags["gate.decision"] == "champion"
    assert float(champion.tags["gate.rec"]) >= 0 and float(champion.tags["gate.search"]) >= 0
    # the server's store is the PostgreSQL database, not a file beside it
    assert sql(stack["pg"], "mlflow", "SELECT m.version, a.alias FROM model_versions m JOIN registered_model_aliases a "
               "ON a.name = m.name AND a.version = m.version WHERE m.name = %s", (name,)) == [(1, "champion")]
    assert not (stack["home"] / "mlflow" / "mlflow.db").exists()
    steps = {r.data.tags.get("gensar.step") for r in client.search_runs(
        [e.experiment_id for e in client.search_experiments()])}
    assert {"ingest", "register"} <= steps


def test_ingest_task_ran_on_the_spark_cluster_and_equals_local_mode(stack, spark, tmp_path):
    apps = [a for a in stack["spark"]["state"]()["completedapps"] if a["name"] == f"{DAG}-ingest"]
    assert len(apps) == 1 and apps[0]["state"] == "FINISHED" and apps[0]["cores"] == 2
    # the same step in local mode on the same input
    params = {**stack["params"], "overrides": [f"warehouse={tmp_path / 'wh'}",
                                               f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                                               *stack["params"]["overrides"]]}
    pipeline.step_ingest(pipeline.config_for_run(params, DS), spark=spark)
    a, b = comparable(stack["wh"]), comparable(tmp_path / "wh")
    for name in ("items", "events", "rejected"):
        pd.testing.assert_frame_equal(a[name], b[name], obj=name)
    assert a["manifest"] == b["manifest"]
    assert a["manifest"]["tables"]["events"]["rejected_by_reason"] == {
        "bad_timestamp": 1, "unknown_item": 1, "wrong_type": 1}


def _interval(ti: dict) -> tuple[datetime, datetime]:
    return datetime.fromisoformat(ti["start_date"]), datetime.fromisoformat(ti["end_date"])


def test_batch_score_partitions_ran_concurrently(stack):
    parts = sorted((ti for ti in stack["tis"] if ti["task_id"] == "batch_score"), key=lambda ti: ti["map_index"])
    assert [ti["map_index"] for ti in parts] == list(range(PARTITIONS))
    assert len({ti["pid"] for ti in parts}) == PARTITIONS  # one worker process each
    intervals = [_interval(ti) for ti in parts]
    # every partition had started before any of them finished: all four ran at the same time
    latest_start, earliest_end = max(s for s, _ in intervals), min(e for _, e in intervals)
    assert latest_start < earliest_end, intervals
    print("batch_score intervals (s from the first start):",
          [(round((s - intervals[0][0]).total_seconds(), 1), round((e - intervals[0][0]).total_seconds(), 1))
           for s, e in intervals])


def _scores(wh: Path, task: str) -> tuple[pd.DataFrame, int]:
    parts = sorted((wh / "scores" / f"ds={DS}" / task).glob("part-*.parquet"))
    df = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    keys = ["user_id", "rank"] if task == "rec" else ["user_id", "ts", "query", "rank"]
    return df.sort_values(keys).reset_index(drop=True), len(parts)


def test_partition_union_equals_single_partition(stack, tmp_path):
    mapped = {task: _scores(stack["wh"], task) for task in ("rec", "search")}
    assert all(n == PARTITIONS for _, n in mapped.values())
    # the same champion scores a copy of the warehouse in one partition
    single_wh = tmp_path / "wh"
    shutil.copytree(stack["wh"], single_wh, ignore=shutil.ignore_patterns("scores"), symlinks=True)
    params = {**stack["params"], "overrides": [f"warehouse={single_wh}", f"tracking.uri={stack['tracking_uri']}",
                                               *stack["params"]["overrides"], "scoring.partitions=1"]}
    pipeline.step_batch_score(pipeline.config_for_run(params, DS))
    for task, (df, _) in mapped.items():
        single, n = _scores(single_wh, task)
        assert n == 1 and len(single) > 0
        pd.testing.assert_frame_equal(df, single, obj=task, check_exact=False, rtol=1e-5)
    assert mapped["rec"][0]["user_id"].nunique() == 12  # every user was active and scored once
