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
from airflow.sdk.exceptions import AirflowSkipException

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
        "dataset": Param("default", enum=["default", "amazon", "amazon-office", "kuaisar", "generic"],
                         description="a config under configs/ (ignored when `config` is set)"),
        "config": Param("", type="string", description="pipeline YAML path; empty: use `dataset`"),
        "formulation": Param("", enum=["", "timeline", "prompted"],
                             description="timeline (decoder-only over whole histories) or prompted (the "
                                         "paper's T5 prompts); empty: the config's"),
        "backbone": Param("", enum=["", "t5-scratch", "smollm2", "local"],
                          description="backbone of the prompted formulation (sets it); empty: the config's"),
        "tasks": Param(list(pipeline.TRAINING_TASKS), type="array",
                       description="training tasks to keep (rec-only / search-only variants and ablations)"),
        "epochs": Param(0, type="integer", minimum=0, description="training epochs; 0: the config's"),
        "max_steps": Param(0, type="integer", minimum=0, description="optimizer steps cap; 0: none beyond the config's"),
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

    @task
    def build_corpus(params=None, ds=None) -> dict:
        cfg = pipeline.config_for_run(params, ds)
        if not pipeline.reads_corpus(cfg):
            raise AirflowSkipException(f"model.formulation={cfg.model.formulation} does not read the corpus")
        return pipeline.step_build_corpus(cfg)

    @task(trigger_rule="none_failed")  # runs after a skipped build_corpus too
    def train(params=None, ds=None) -> dict:
        return pipeline.step_train(pipeline.config_for_run(params, ds))

    @task
    def evaluate(params=None, ds=None) -> dict:
        return pipeline.step_evaluate(pipeline.config_for_run(params, ds))

    @task
    def register(params=None, ds=None) -> dict:
        return pipeline.step_register(pipeline.config_for_run(params, ds))

    @task
    def score_partitions(params=None, ds=None) -> list[int]:
        return list(range(pipeline.config_for_run(params, ds).scoring.partitions))

    @task
    def batch_score(partition: int, params=None, ds=None) -> dict:
        return pipeline.step_batch_score(pipeline.config_for_run(params, ds), partition=partition)

    curated, splits = ingest(), split()
    semantic, collaborative = embed_semantic(), embed_collaborative()
    identifiers = learn_identifiers()
    curated >> [splits, semantic]
    splits >> collaborative
    registered = register()
    [semantic, collaborative] >> identifiers >> build_corpus() >> train() >> evaluate() >> registered
    registered >> batch_score.expand(partition=score_partitions())


gensar_nightly()
