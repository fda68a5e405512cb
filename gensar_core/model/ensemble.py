"""A model trained at several seeds, decoded as one (`train.ensemble_seeds`).

Each member is an ordinary model folder: the one at `train.seed` is `models/<run>/`, as always,
and the one at each other seed S is `models/<run>__seed<S>/`, trained exactly as an
`evaluate.seeds` replica at that seed would be (so the report can show the members one by one
beside the ensemble, and no folder is trained twice). The constrained decoder runs every member
and ranks by the mean of their next-token distributions at each step (model/decode.py). The
registry logs the members with the model, so batch scoring and serving decode the same ensemble.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Optional

from gensar_core import tracking
from gensar_core.config import PipelineConfig, with_overrides
from gensar_core.model.corpus import apply_id_scheme, enabled_tasks
from gensar_core.model.generative_ranker import GenerativeRanker, ranker_settings
from gensar_core.model.runs import train_seed, trained_model_dir
from gensar_core.model.timeline_train import valid_cases, validate
from gensar_core.storage import Warehouse, write_json_atomic

log = logging.getLogger(__name__)


def member_seeds(cfg: PipelineConfig) -> list[int]:
    """The seeds of the members other than the model at `train.seed` (each once)."""
    return [s for s in dict.fromkeys(cfg.train.ensemble_seeds) if s != train_seed(cfg)]


def member_config(cfg: PipelineConfig, seed: int) -> PipelineConfig:
    """The config of one member: the same model at another train seed, not an ensemble itself."""
    return with_overrides(cfg, [f"train.seed={seed}", "train.ensemble_seeds=[]"])


def member_dirs(cfg: PipelineConfig) -> list[Path]:
    """The folders of the members other than the config's own model (none for one model)."""
    return [trained_model_dir(member_config(cfg, seed)) for seed in member_seeds(cfg)]


def generative_ranker(cfg: PipelineConfig, name: str = "gensar", train_args: Optional[str] = None) -> GenerativeRanker:
    """The trained generative model of `cfg`, with its ensemble members, as a Ranker; a model that
    has not been trained is an error, so a report never silently lacks the method it was asked
    for. `train_args`: what to add to `gensar -c CONFIG` to train it (None: it is the config's own
    model)."""
    model_dir = trained_model_dir(cfg)
    if not (model_dir / "config.json").exists():
        how = ("run the train step" if train_args is None else
               f"train it with `gensar -c CONFIG {train_args} run --steps build_corpus,train`, "
               f"or remove it from evaluate.variants / evaluate.seeds")
        raise FileNotFoundError(f"{name}: no trained model at {model_dir}: {how}")
    tasks = [t for t in ("rec", "search") if t in enabled_tasks(cfg.corpus)]
    identifiers = apply_id_scheme(Warehouse(cfg.warehouse).read("identifiers/items"), cfg.corpus.id_scheme)
    return GenerativeRanker(model_dir, identifiers, ranker_settings(cfg), tasks=tasks, name=name,
                            members=member_dirs(cfg))


def run_train_ensemble(cfg: PipelineConfig, train_one: Callable[[PipelineConfig], dict]) -> dict:
    """Train the member at each other seed, then the model at `train.seed`. `train_one(cfg) ->
    result` trains one model (its result names `model_dir`)."""
    seeds = member_seeds(cfg)
    members = []
    for n, seed in enumerate(seeds, 1):
        log.info("ensemble: training the member at train seed %d (%d of %d)", seed, n, len(seeds) + 1)
        members.append(train_one(member_config(cfg, seed))["model_dir"])
    result = train_one(cfg)
    if members:
        result["ensemble_members"] = [result["model_dir"], *members]
        result.update(validate_ensemble(cfg, Path(result["model_dir"])))
    return result


def validate_ensemble(cfg: PipelineConfig, model_dir: Path) -> dict:
    """The ensemble's valid NDCG@10 (the numbers each member selected its checkpoint on), beside
    the model (`<run>.metrics.json`) and in MLflow."""
    wh = Warehouse(cfg.warehouse)
    ranker = generative_ranker(cfg)  # the model and its members, as evaluation decodes them
    metrics = {f"ensemble/{k}": v for k, v in validate(ranker, valid_cases(cfg, cfg.train.max_valid_examples)).items()}
    log.info("ensemble of %d models, valid: %s", len(ranker.models), {k: round(v, 4) for k, v in metrics.items()})
    summary = wh.path("models", f"{model_dir.name}.metrics.json")
    if summary.exists():
        write_json_atomic(summary, {**json.loads(summary.read_text()), **metrics})
    tracking.log_step(cfg, "train_ensemble", {"members": len(ranker.models), **metrics})
    return metrics
