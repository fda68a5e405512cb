"""The nightly GenSAR pipeline. Wiring only: every task calls one step of gensar_core.pipeline.

Trigger with params from the Airflow UI: `config` (a pipeline YAML, empty = embedded default) and
`overrides` (`key.path=value` strings). Spark steps take their master from the Airflow connection
named by the environment variable GENSAR_SPARK_CONN_ID (its host is the master URL, its extras
Spark settings); without it they run on local[*].
"""
from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, task

from gensar_core import pipeline

SPARK_CONF = {  # loopback only, no UI: the driver runs inside the Airflow worker
    "spark.ui.enabled": "false",
    "spark.driver.bindAddress": "127.0.0.1",
    "spark.driver.host": "127.0.0.1",
    "spark.sql.session.timeZone": "UTC",
}
SPARK_CONN_ID = os.environ.get("GENSAR_SPARK_CONN_ID") or None


@dag(
    dag_id="gensar_nightly",
    schedule="0 2 * * *",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=2)},
    params={
        "config": Param("", type="string", description="pipeline YAML path; empty: the embedded default"),
        "overrides": Param([], type="array", description="config overrides, key.path=value"),
    },
    tags=["gensar"],
    doc_md=__doc__,
)
def gensar_nightly():
    @task.pyspark(conn_id=SPARK_CONN_ID, config_kwargs=SPARK_CONF)
    def ingest(spark=None, params=None, ds=None) -> dict:
        return pipeline.step_ingest(pipeline.config_for_run(params, ds), spark=spark)

    @task
    def split(params=None, ds=None) -> dict:
        return pipeline.step_split(pipeline.config_for_run(params, ds))

    @task
    def embed_semantic(params=None, ds=None) -> dict:
        return pipeline.step_embed_semantic(pipeline.config_for_run(params, ds))

    @task
    def embed_collaborative(params=None, ds=None) -> dict:
        return pipeline.step_embed_collaborative(pipeline.config_for_run(params, ds))

    @task
    def learn_identifiers(params=None, ds=None) -> dict:
        return pipeline.step_learn_identifiers(pipeline.config_for_run(params, ds))

    curated, splits = ingest(), split()
    semantic, collaborative = embed_semantic(), embed_collaborative()
    identifiers = learn_identifiers()
    curated >> [splits, semantic]
    splits >> collaborative
    [semantic, collaborative] >> identifiers


gensar_nightly()
