"""The pipeline's steps and their order, shared by the `gensar` CLI and the Airflow DAGs.

Each step takes the one PipelineConfig, reads and writes warehouse tables (DESIGN.md), and
returns a small dict of what it did (counts, metrics) for the caller to print or log.
"""
from __future__ import annotations

import logging
from typing import Callable

from gensar_core.config import PipelineConfig

log = logging.getLogger(__name__)


def step_ingest(cfg: PipelineConfig, spark=None) -> dict:
    """Raw logs -> curated/{items,events,rejected} with Spark (a local session unless given one)."""
    from gensar_core.data.ingest import ingest
    from gensar_core.data.spark import configure_session, spark_session

    return ingest(configure_session(spark, cfg.spark) if spark else spark_session(cfg.spark), cfg)


def step_split(cfg: PipelineConfig) -> dict:
    from gensar_core.data.split import run_split

    return run_split(cfg)


def step_embed_semantic(cfg: PipelineConfig) -> dict:
    """curated/items -> features/semantic (sentence-transformers, cached by text hash)."""
    from gensar_core.embed.semantic import run_embed_semantic

    return run_embed_semantic(cfg)


def step_embed_collaborative(cfg: PipelineConfig) -> dict:
    """splits/train -> features/collaborative and the SASRec checkpoint."""
    from gensar_core.embed.collaborative import run_embed_collaborative

    return run_embed_collaborative(cfg)


def step_learn_identifiers(cfg: PipelineConfig) -> dict:
    """Both feature tables -> identifiers/items, the quantiser checkpoint and its report."""
    from gensar_core.identifiers.step import run_learn_identifiers

    return run_learn_identifiers(cfg)


def step_evaluate(cfg: PipelineConfig) -> dict:
    """Every method on the test split, both tasks, both protocols -> reports/ (Markdown + plot)."""
    from gensar_core.evaluate.run import run_evaluate

    return run_evaluate(cfg)


STEPS: dict[str, Callable[[PipelineConfig], dict]] = {
    "ingest": step_ingest,
    "split": step_split,
    "embed_semantic": step_embed_semantic,
    "embed_collaborative": step_embed_collaborative,
    "learn_identifiers": step_learn_identifiers,
    "evaluate": step_evaluate,
}


def run_steps(cfg: PipelineConfig, names: list[str] | None = None) -> dict[str, dict]:
    """Run the named steps (default: all) in pipeline order."""
    names = names or list(STEPS)
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        raise ValueError(f"unknown step(s) {unknown}; steps are {list(STEPS)}")
    results = {}
    for name in STEPS:
        if name in names:
            log.info("step %s ...", name)
            results[name] = STEPS[name](cfg)
    return results


def config_for_run(params: dict | None, ds: str | None = None) -> PipelineConfig:
    """The config of one scheduled or triggered run: a YAML file + overrides from the run's params.

    `params` are the DAG's: `config` (a YAML path, empty for the embedded default) and `overrides`
    (a list of `key.path=value`). The run date `ds` becomes the config's cut-off date.
    """
    from gensar_core.config import load_config

    params = params or {}
    overrides = list(params.get("overrides") or [])
    if ds:
        overrides.append(f"ds={ds}")
    return load_config(params.get("config") or None, overrides)
