"""The one place that builds a SparkSession."""
from __future__ import annotations

import os
import sys

from pyspark.sql import SparkSession

from gensar_core.config import SparkConfig

# SQL settings the steps rely on; applied to any session, also one Airflow's provider made
SESSION_SQL_CONF = {
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.sources.partitionOverwriteMode": "dynamic",
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
}


def configure_session(spark, cfg: SparkConfig):
    """Apply the runtime SQL settings the pipeline needs to an existing session."""
    for key, value in {**SESSION_SQL_CONF, "spark.sql.shuffle.partitions": str(cfg.shuffle_partitions)}.items():
        spark.conf.set(key, value)
    return spark


def spark_session(cfg: SparkConfig):
    """A SparkSession for `cfg.master` (local[2] by default), UTC, UI off, bound to loopback."""
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    # Python workers must be this interpreter, not whatever `python3` is on PATH
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder
    # under spark-submit the launcher has set the master already; the config must not override it
    if "PYSPARK_GATEWAY_PORT" not in os.environ:
        builder = builder.master(cfg.master)
    builder = (
        builder.appName(cfg.app_name)
        .config("spark.driver.memory", cfg.driver_memory)
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.ui.enabled", "false")
    )
    for key, value in cfg.conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return configure_session(spark, cfg)
