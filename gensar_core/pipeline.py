"""The pipeline's steps and their order, shared by the `gensar` CLI and the Airflow DAGs.

Each step takes the one PipelineConfig, reads and writes warehouse tables (docs/architecture.md "Steps and their data contracts"), and
returns a small dict of what it did (counts, metrics) for the caller to print or log.

Each step imports its module inside the step, deliberately: the DAG file imports this module
whenever Airflow parses it, and the steps' modules pull in pyspark, torch, transformers and
sentence-transformers, which a parse must not pay for.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from gensar_core import tracking
from gensar_core.config import TRAINING_TASKS, PipelineConfig, load_config, with_overrides

log = logging.getLogger(__name__)


def step_ingest(cfg: PipelineConfig, spark=None) -> dict:
    """Raw logs -> curated/{items,events,rejected} with Spark (a local session unless given one)."""
    from gensar_core.data.ingest import ingest
    from gensar_core.data.spark import configure_session, spark_session

    manifest = ingest(configure_session(spark, cfg.spark) if spark else spark_session(cfg.spark), cfg)
    tracking.log_step(cfg, "ingest", manifest)
    return manifest


def step_split(cfg: PipelineConfig) -> dict:
    """curated/events -> splits/{train,valid,test} with interleaved histories."""
    from gensar_core.data.split import run_split

    manifest = run_split(cfg)
    tracking.log_step(cfg, "split", manifest)
    return manifest


def step_embed_semantic(cfg: PipelineConfig) -> dict:
    """curated/items -> features/semantic (sentence-transformers, cached by text hash)."""
    from gensar_core.embed.semantic import run_embed_semantic

    result = run_embed_semantic(cfg)
    tracking.log_step(cfg, "embed_semantic", result)
    return result


def step_embed_collaborative(cfg: PipelineConfig) -> dict:
    """splits/train -> features/collaborative and the SASRec checkpoint."""
    from gensar_core.embed.collaborative import run_embed_collaborative

    result = run_embed_collaborative(cfg)
    tracking.log_step(cfg, "embed_collaborative", result)
    return result


def step_learn_identifiers(cfg: PipelineConfig) -> dict:
    """Both feature tables -> identifiers/items, the quantiser checkpoint and its report."""
    from gensar_core.identifiers.incremental import has_identifiers, run_extend_identifiers
    from gensar_core.identifiers.step import run_learn_identifiers

    if cfg.identifiers.mode == "incremental" and has_identifiers(cfg):
        metrics = run_extend_identifiers(cfg)
        tracking.log_step(cfg, "learn_identifiers", metrics)
        return metrics
    metrics = run_learn_identifiers(cfg)
    folder = Path(cfg.warehouse) / "identifiers"
    tracking.log_step(cfg, "learn_identifiers", metrics,
                      artifacts=(folder / "codebook_usage.png", folder / "quantiser" / "config.json"))
    return metrics


def reads_corpus(cfg: PipelineConfig) -> bool:
    """Whether `cfg`'s training reads the `build_corpus` prompts: the prompted recipe does; the
    timeline formulation writes its own token sequences from the splits."""
    return cfg.model.formulation == "prompted"


def step_build_corpus(cfg: PipelineConfig) -> dict:
    """splits + identifiers -> corpus/{task}: the prompts of every enabled training task (the
    prompted recipe's input; skipped for a formulation that does not read them)."""
    from gensar_core.model.corpus import run_build_corpus

    if not reads_corpus(cfg):
        log.info("build_corpus skipped: model.formulation=%s does not read the corpus", cfg.model.formulation)
        return {"skipped": f"model.formulation={cfg.model.formulation} does not read the corpus"}
    return run_build_corpus(cfg)


def step_train(cfg: PipelineConfig) -> dict:
    """corpus (prompted) or splits (timeline) -> models/<run>/ (safetensors + tokenizer), one MLflow
    run a model; with `train.ensemble_seeds` the ensemble's other members first (models/<run>__seed<S>/)."""
    from gensar_core.model.ensemble import run_train_ensemble

    return run_train_ensemble(cfg, train_one_model)


def train_one_model(cfg: PipelineConfig) -> dict:
    """The model of `cfg` at its train seed."""
    from gensar_core.model.prompted_train import run_train
    from gensar_core.model.timeline_train import run_train_timeline

    if cfg.model.formulation == "timeline":
        # trained from scratch each night: the word-level vocabulary follows the day's queries
        return run_train_timeline(cfg)
    if cfg.model.prompted.init_from_champion:
        from gensar_core import registry
        from gensar_core.model.runs import trained_model_dir

        champion = registry.champion_model_dir(cfg)
        if champion is not None:
            # fine-tune: the champion's weights and tokenizer are the starting point; the run keeps
            # this config's name, so evaluate and register find it where they always do
            log.info("fine-tuning from the champion model %s", champion)
            cfg = cfg.model_copy(update={
                "model": cfg.model.model_copy(update={"prompted": cfg.model.prompted.model_copy(
                    update={"backbone": "local", "path": champion})}),
                "train": cfg.train.model_copy(update={"run_name": trained_model_dir(cfg).name})})
    return run_train(cfg)


def generative_rankers(cfg: PipelineConfig) -> dict:
    """This config's trained generative model, those of `evaluate.variants`, and each one's
    `evaluate.seeds` replicas ('<name>@seed<S>'), as Rankers (the ones `train` has written)."""
    from gensar_core.evaluate.report import seed_row
    from gensar_core.model.ensemble import generative_ranker
    from gensar_core.model.runs import train_seed

    configs = {"gensar": cfg, **{name: with_overrides(cfg, overrides)
                                 for name, overrides in cfg.evaluate.variants.items()}}
    hints = {name: f"--variant {name}" for name in cfg.evaluate.variants}
    for name, seeds in cfg.evaluate.seeds.items():
        for seed in (s for s in dict.fromkeys(seeds) if s != train_seed(configs[name])):
            configs[seed_row(name, seed)] = with_overrides(configs[name], [f"train.seed={seed}"])
            hints[seed_row(name, seed)] = f"{hints.get(name, '')} --set train.seed={seed}".strip()
    return {name: generative_ranker(model_cfg, name, hints.get(name)) for name, model_cfg in configs.items()}


def step_tune_baselines(cfg: PipelineConfig) -> dict:
    """Sweep SASRec and the query-aware SASRec on valid -> models/baselines/ (not in the nightly DAG)."""
    from gensar_core.baselines.tuning import run_tune_baselines

    result = run_tune_baselines(cfg, progress=cfg.train.progress)
    tracking.log_step(cfg, "tune_baselines", result)
    return result


def step_evaluate(cfg: PipelineConfig) -> dict:
    """Every method on the test split, both tasks, both protocols -> reports/ (Markdown + plot)."""
    from gensar_core.evaluate.run import run_evaluate

    return run_evaluate(cfg, extra_rankers=generative_rankers(cfg))


def step_register(cfg: PipelineConfig) -> dict:
    """Register this config's trained model in MLflow; champion only if better than the champion on
    both tasks and not worse than a baseline beyond chance. The decision goes to reports/gate.json
    and the top of the evaluation report (evaluate runs first)."""
    from gensar_core import registry
    from gensar_core.model.ensemble import generative_ranker
    from gensar_core.model.runs import trained_model_dir

    ranker = generative_ranker(cfg)  # a model that has not been trained is an error naming the step
    return registry.register_with_gate(cfg, trained_model_dir(cfg), ranker)


def step_batch_score(cfg: PipelineConfig, partition: int | None = None) -> dict:
    """The champion's top-K for active users and the day's queries -> scores/ds=<ds>/ (one or all partitions)."""
    from gensar_core.scoring import run_batch_score

    result = run_batch_score(cfg, partition=partition)
    tracking.log_step(cfg, "batch_score" + (f" part {partition}" if partition is not None else ""), result)
    return result


STEPS: dict[str, Callable[[PipelineConfig], dict]] = {
    "ingest": step_ingest,
    "split": step_split,
    "embed_semantic": step_embed_semantic,
    "embed_collaborative": step_embed_collaborative,
    "learn_identifiers": step_learn_identifiers,
    "build_corpus": step_build_corpus,
    "train": step_train,
    "tune_baselines": step_tune_baselines,
    "evaluate": step_evaluate,
    "register": step_register,
    "batch_score": step_batch_score,
}


# steps that run only when named: a baseline sweep is the results script's work, not the night's
ON_REQUEST = ("tune_baselines",)


def run_steps(cfg: PipelineConfig, names: list[str] | None = None) -> dict[str, dict]:
    """Run the named steps (default: all but ON_REQUEST) in pipeline order."""
    names = names or [n for n in STEPS if n not in ON_REQUEST]
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
    """The config of one scheduled or triggered run, from the DAG's params.

    `config`: a YAML path, or `dataset`: the name of a file under configs/ (empty for both: the
    embedded default). `formulation`, `backbone` (prompted only), `tasks` (training tasks to
    keep), `epochs` and `max_steps` are shortcuts for the model and training budget; `overrides` (`key.path=value` strings) can
    set anything. The run date `ds` becomes the config's cut-off date.
    """
    params = params or {}
    path = params.get("config") or None
    if not path and params.get("dataset"):
        path = Path(__file__).resolve().parents[1] / "configs" / f"{params['dataset']}.yaml"
    overrides = []
    if params.get("formulation"):
        overrides.append(f"model.formulation={params['formulation']}")
    if params.get("backbone"):  # a backbone is a choice of the prompted recipe
        overrides += [f"model.prompted.backbone={params['backbone']}", "model.formulation=prompted"]
    if params.get("tasks"):
        wanted = set(params["tasks"])
        unknown = wanted - set(TRAINING_TASKS)
        if unknown:
            raise ValueError(f"unknown training task(s) {sorted(unknown)}; tasks are {list(TRAINING_TASKS)}")
        overrides += [f"corpus.tasks.{t}.enabled={t in wanted}" for t in TRAINING_TASKS]
    for key, target in (("epochs", "train.epochs"), ("max_steps", "train.max_steps")):
        if params.get(key):
            overrides.append(f"{target}={params[key]}")
    overrides += list(params.get("overrides") or [])
    if ds:
        overrides.append(f"ds={ds}")
    return load_config(path, overrides)

