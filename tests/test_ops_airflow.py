"""Operations as a user does them (issue #11): Airflow started with infra/start_airflow.sh, the
nightly DAG triggered over the REST API with params, its outputs and MLflow runs checked, then
the Airflow UI and MLflow's run comparison looked at in a real headless Chromium.

Everything lives under one temporary folder (AIRFLOW_HOME, GENSAR_HOME, warehouses, data) and
every service is stopped with its whole process group when the module ends."""
from __future__ import annotations

import json
import os
import re
import time
import urllib.parse
from pathlib import Path

import pytest
import requests
from helpers import movielens_files
from ops_helpers import (
    Airflow,
    artifacts_dir,
    browser_page,
    free_port,
    process_group,
    require_browser,
    wait_http,
)
from test_dags import TINY

pytestmark = pytest.mark.slow

DAG = "gensar_nightly"
RUN_TIMEOUT = 20 * 60  # one tiny night takes about 3.5 minutes on two busy cores
# a value no default has, so finding it in the trained model proves the trigger's overrides arrived
D_MODEL = 48


@pytest.fixture(scope="module")
def ops_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ops")


@pytest.fixture(scope="module")
def airflow(ops_home):
    port = free_port()
    env = {**os.environ, "GENSAR_HOME": str(ops_home / "gensar"), "AIRFLOW_HOME": str(ops_home / "airflow"),
           "AIRFLOW_PORT": str(port),
           # unpausing a catchup=False DAG would start the last interval's scheduled run, on the
           # full embedded default: this test wants only the runs it triggers
           "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False"}
    log = ops_home / "airflow.log"
    with process_group(["bash", "infra/start_airflow.sh"], log, env) as proc:
        client = Airflow(f"http://127.0.0.1:{port}", ops_home / "airflow", log)
        wait_http(f"{client.base}/api/v2/version", proc, log)
        deadline = time.monotonic() + 300
        while requests.get(f"{client.base}/api/v2/dags/{DAG}", timeout=30,  # the DAG processor's first parse
                           headers={"Authorization": f"Bearer {client.token()}"}).status_code != 200:
            assert proc.poll() is None and time.monotonic() < deadline, f"{DAG} never appeared:\n{log.read_text()[-4000:]}"
            time.sleep(3)
        yield client


def trigger_night(airflow: Airflow, ops_home: Path, day: str, epochs: int) -> dict:
    """Triggers one night as the UI's Trigger button does (a manual run with params) and waits for it."""
    data = movielens_files(ops_home / "ml")
    wh = ops_home / f"wh-{day}"
    tiny = [o for o in TINY if not o.startswith("model.timeline.d_model=")]
    conf = {"epochs": epochs, "tasks": ["rec", "search"], "overrides": [
        f"warehouse={wh}", f"data.source.path={data}", "spark.shuffle_partitions=2", *tiny,
        f"model.timeline.d_model={D_MODEL}"]}
    run_id = f"ops_night_{day}"
    t0 = time.monotonic()
    created = airflow.call("POST", f"/dags/{DAG}/dagRuns",
                           json={"dag_run_id": run_id, "logical_date": f"{day}T00:00:00Z", "conf": conf})
    assert created["conf"] == conf and created["run_type"] == "manual"
    run = airflow.wait_run(DAG, run_id, RUN_TIMEOUT)
    print(f"{run_id}: success in {time.monotonic() - t0:.0f} s")
    return {"run_id": run_id, "run": run, "warehouse": wh, "conf": conf, "epochs": epochs, "ds": day}


@pytest.fixture(scope="module")
def night1(airflow, ops_home):
    dag = airflow.call("PATCH", f"/dags/{DAG}", json={"is_paused": False})
    assert dag["is_paused"] is False
    return trigger_night(airflow, ops_home, "2026-11-27", epochs=2)


@pytest.fixture(scope="module")
def night2(airflow, ops_home, night1):
    """A second night with another budget, so MLflow has two trainings to compare."""
    return trigger_night(airflow, ops_home, "2026-11-28", epochs=1)


def mlflow_client(ops_home: Path):
    import mlflow

    # the store the DAG's tasks wrote to: tracking.uri unset, so $GENSAR_HOME/mlflow/mlflow.db
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{ops_home / 'gensar' / 'mlflow' / 'mlflow.db'}")


def trained_model(wh: Path) -> tuple[dict, dict]:
    """The metrics and the HF config of the one model the night trained."""
    metrics = sorted((wh / "models").glob("*.metrics.json"))
    assert len(metrics) == 1, metrics
    model_dir = Path(json.loads(metrics[0].read_text())["model_dir"])
    return json.loads(metrics[0].read_text()), json.loads((model_dir / "config.json").read_text())


def test_rest_trigger_runs_the_night_with_its_params(airflow, night1, ops_home):
    # authentication is on: no token or a wrong password gets nothing
    assert requests.get(f"{airflow.base}/api/v2/dags", timeout=30).status_code in (401, 403)
    bad = requests.post(f"{airflow.base}/auth/token", json={"username": "admin", "password": "wrong"}, timeout=30)
    assert bad.status_code == 401

    run = airflow.call("GET", f"/dags/{DAG}/dagRuns/{night1['run_id']}")
    assert run["state"] == "success" and run["conf"] == night1["conf"] and run["triggering_user_name"] == "admin"
    tis = airflow.call("GET", f"/dags/{DAG}/dagRuns/{night1['run_id']}/taskInstances")["task_instances"]
    states = {(ti["task_id"], ti["map_index"]): ti["state"] for ti in tis}
    # the timeline formulation reads no prompted corpus: its step is skipped, the rest succeed
    assert {k: v for k, v in states.items() if v != "success"} == {("build_corpus", -1): "skipped"}, states
    assert {t for t, _ in states} == {"ingest", "split", "embed_semantic", "embed_collaborative", "learn_identifiers",
                                      "build_corpus", "train", "evaluate", "register", "score_partitions",
                                      "batch_score"}

    # the params reached the pipeline's config: the warehouse, the epochs, the tasks, an override
    wh = night1["warehouse"]
    metrics, hf_config = trained_model(wh)
    assert metrics["epochs_done"] == 2 and metrics["tasks"] == ["rec", "search"]
    assert hf_config["hidden_size"] == D_MODEL
    assert (wh / "reports" / "eval-test-2026-11-27" / "report.md").exists()
    assert len(list((wh / "scores" / "ds=2026-11-27" / "rec").glob("part-*.parquet"))) == 2

    train_run = mlflow_client(ops_home).get_run(metrics["mlflow_run_id"])
    params = train_run.data.params
    assert train_run.info.status == "FINISHED" and train_run.data.tags["gensar.step"] == "train"
    assert params["train.epochs"] == "2" and params["model.timeline.d_model"] == str(D_MODEL)
    assert params["ds"] == "2026-11-27" and params["warehouse"] == str(wh)
    assert params["corpus.tasks.query.enabled"] == "False" and params["corpus.tasks.rec.enabled"] == "True"


@pytest.fixture(scope="module")
def mlflow_ui(ops_home):
    port = free_port()
    log = ops_home / "mlflow.log"
    env = {**os.environ, "GENSAR_HOME": str(ops_home / "gensar")}
    with process_group(["bash", "infra/start_mlflow.sh", str(port)], log, env) as proc:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/health", proc, log)
        yield base


def test_browser_shows_the_runs_in_airflow_and_mlflow(airflow, night1, night2, mlflow_ui, ops_home):
    require_browser()  # before anything else: a missing browser says `make browser`, not a timeout
    shots = artifacts_dir() / "ops"
    shots.mkdir(parents=True, exist_ok=True)
    runs = [night1["run_id"], night2["run_id"]]
    train_ids = [trained_model(n["warehouse"])[0]["mlflow_run_id"] for n in (night1, night2)]
    with browser_page() as page:
        # Airflow: the login page first, as a user meets it
        page.goto(f"{airflow.base}/dags/{DAG}/runs")
        page.wait_for_url("**/auth/login**")
        page.get_by_label("Username").fill("admin")
        page.get_by_label("Password").fill(airflow.password)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(f"**/dags/{DAG}/runs")
        for run_id in runs:
            page.get_by_text(run_id).first.wait_for(timeout=60_000)
        page.screenshot(path=str(shots / "airflow_runs.png"))
        text = page.inner_text("body")
        assert DAG in text and all(r in text for r in runs), text[-3000:]
        assert text.count("Success") >= 2 and "Failed" not in text, text[-3000:]
        # the grid beside the runs lists every task
        assert all(t in text for t in ("ingest", "embed_semantic", "learn_identifiers", "train", "batch_score"))

        page.goto(f"{airflow.base}/dags/{DAG}/runs/{night1['run_id']}")
        page.get_by_text("Task Instances").first.wait_for(timeout=60_000)
        page.get_by_text("learn_identifiers").nth(1).wait_for(timeout=60_000)  # grid and task list
        page.screenshot(path=str(shots / "airflow_run.png"))
        text = page.inner_text("body")
        assert night1["run_id"] in text and "2026-11-27" in text and "Manual" in text, text[:3000]

        # MLflow: the two nights' trainings side by side
        experiment = mlflow_client(ops_home).get_run(train_ids[0]).info.experiment_id
        page.goto(f"{mlflow_ui}/#/compare-runs?runs={urllib.parse.quote(json.dumps(train_ids))}"
                  f"&experiments={urllib.parse.quote(json.dumps([experiment]))}")
        page.get_by_text("Comparing 2 Runs").wait_for(timeout=90_000)
        page.get_by_text(train_ids[1]).first.wait_for(timeout=60_000)
        page.get_by_text("Show diff only").first.click()
        page.get_by_text("train.epochs").first.scroll_into_view_if_needed()
        page.screenshot(path=str(shots / "mlflow_compare.png"))
        text = page.inner_text("body")
    assert all(run_id in text for run_id in train_ids) and "timeline-llama|rec+search" in text, text[:3000]
    # the rows that differ, in the runs' order: the nights' budgets and dates
    assert re.search(r"train\.epochs\s+2\s+1\s", text), text[-4000:]
    assert re.search(r"\bds\s+2026-11-27\s+2026-11-28\s", text), text[-4000:]
    # with the diff filter on, a parameter both runs share is not listed
    assert "model.timeline.d_model" not in text, text[-4000:]
