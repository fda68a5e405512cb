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


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The tests' models are tiny: one thread is fastest, and far faster on a busy 2-core machine."""
    import torch

    torch.set_num_threads(1)


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


@pytest.fixture(scope="session")
def toy_model(tmp_path_factory):
    """A tiny GenSAR model really trained on the toy warehouse (curated, splits, identifiers), with
    its own MLflow store; the config points at it."""
    import pandas as pd
    import torch

    from gensar_core.config import PipelineConfig
    from toy_warehouse import write_toy_warehouse
    from gensar_core.pipeline import step_build_corpus, step_train
    from gensar_core.storage import Warehouse, atomic_dir, write_table

    root = tmp_path_factory.mktemp("toy")
    write_toy_warehouse(root / "wh")
    wh = Warehouse(root / "wh")
    # the toy warehouse has splits; its curated events are their union
    events = pd.concat([wh.read(f"splits/{s}") for s in ("train", "valid", "test")])
    items = wh.read("curated/items")
    with atomic_dir(wh.path("curated")) as stage:
        write_table(items, stage / "items")
        write_table(events[["user_id", "item_id", "ts", "behavior", "query", "session_id"]], stage / "events")
    cfg = PipelineConfig.model_validate({
        "warehouse": str(root / "wh"), "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}"},
        "identifiers": {"shared_levels": 2, "specific_levels": 2, "codebook_size": 8},
        "model": {"formulation": "prompted", "prompted": {
            "scratch": {"d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 2, "tokenizer_vocab_size": 300},
            "batch_size": 16}},
        "train": {"epochs": 2, "eval_every": 0, "warmup_steps": 5, "progress": False,
                  "ensemble_seeds": []},  # one model; tests/test_ensemble.py trains an ensemble
        "evaluate": {"beam_size": 10, "baselines": ["popularity"], "log_mlflow": False},
        "scoring": {"partitions": 2, "active_days": 100000, "top_k": 5},
    })
    step_build_corpus(cfg)
    step_train(cfg)
    return cfg
