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
    from gensar_core.data.spark import spark_session

    return ingest(spark or spark_session(cfg.spark), cfg)


def step_split(cfg: PipelineConfig) -> dict:
    from gensar_core.data.split import run_split

    return run_split(cfg)


STEPS: dict[str, Callable[[PipelineConfig], dict]] = {
    "ingest": step_ingest,
    "split": step_split,
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
