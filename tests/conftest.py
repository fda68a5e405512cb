"""Shared fixtures: one real local Spark session for the whole run, and a fresh warehouse per test."""
from __future__ import annotations

import logging
import os
import sys

import pytest

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
sys.path.insert(0, os.path.dirname(__file__))
# py4j logs while the interpreter shuts down, after pytest has closed the captured streams
logging.getLogger("py4j").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def spark():
    from gensar_core.config import SparkConfig
    from gensar_core.data.spark import spark_session

    session = spark_session(SparkConfig(master="local[2]", shuffle_partitions=2, driver_memory="2g"))
    yield session
    session.stop()


@pytest.fixture
def gensar_home(tmp_path, monkeypatch):
    home = tmp_path / "gensar_home"
    monkeypatch.setenv("GENSAR_HOME", str(home))
    return home
