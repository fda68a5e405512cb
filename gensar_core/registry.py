"""The MLflow model registry: register a trained model as a pyfunc, promote it past a gate.

A new version becomes the champion (alias `champion`) only if its validation metric
(`registry.metric`, full-catalogue protocol, `registry.split`) beats the current champion's on
both recommendation and search; otherwise it gets the alias `challenger`. The numbers the gate
used are kept as version tags, so the decision can be read back in the MLflow UI.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from gensar_core import tracking
from gensar_core.config import PipelineConfig

log = logging.getLogger(__name__)
CHAMPION, CHALLENGER = "champion", "challenger"
TASKS = ("rec", "search")
SERVING_CODE = Path(__file__).with_name("serving_model.py")


def ranker_settings(cfg: PipelineConfig) -> dict:
    return {"beam_size": cfg.evaluate.beam_size, "max_rec_history": cfg.corpus.max_rec_history,
            "max_search_history": cfg.corpus.max_search_history,
            "max_input_length": cfg.model.max_input_length}


def gate_metrics(cfg: PipelineConfig, ranker) -> dict[str, float]:
    """The gate's numbers for a ranker: `registry.metric` per task, full ranking on `registry.split`."""
    from gensar_core.evaluate.protocols import evaluate_ranker

    full_only = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"protocols": ["full"]})})
    result = evaluate_ranker(ranker, full_only, cfg.registry.split)["full"]
    return {task: float((result.get(task) or {}).get(cfg.registry.metric, 0.0)) for task in TASKS}


def beats(new: dict[str, float], champion: dict[str, float] | None) -> bool:
    """Promote only a model better on both tasks (the first model always wins)."""
    return champion is None or all(new[t] > champion[t] for t in TASKS)


def _champion(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def register(cfg: PipelineConfig, model_dir: str | Path, metrics: dict[str, float]) -> dict:
    """Log `model_dir` as a pyfunc model version and apply the champion gate."""
    import mlflow

    name = cfg.registry.model_name
    with tracking.start_run(cfg, f"register {Path(model_dir).name}", tags={"gensar.step": "register"}) as run:
        tracking.log_metrics({f"gate/{t}/{cfg.registry.metric}": v for t, v in metrics.items()})
        with tempfile.TemporaryDirectory() as tmp:
            settings = Path(tmp) / "settings.json"
            settings.write_text(json.dumps(ranker_settings(cfg)))
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(SERVING_CODE),
                artifacts={"model": str(model_dir),
                           "identifiers": str(Path(cfg.warehouse) / "identifiers" / "items"),
                           "settings": str(settings)},
                code_paths=[str(Path(__file__).parent)],
                pip_requirements=_requirements(), registered_model_name=name)
        run_id = run.info.run_id
    client = tracking.client(cfg)
    version = str(info.registered_model_version)
    for task, value in metrics.items():
        client.set_model_version_tag(name, version, f"gate.{task}", f"{value:.6f}")
    current = _champion(client, name)
    champion_metrics = ({t: float(current.tags.get(f"gate.{t}", 0.0)) for t in TASKS}
                        if current is not None else None)
    promoted = beats(metrics, champion_metrics)
    client.set_registered_model_alias(name, CHAMPION if promoted else CHALLENGER, version)
    client.set_model_version_tag(name, version, "gate.decision", "champion" if promoted else "challenger")
    log.info("registered %s version %s: %s (new %s vs champion %s)", name, version,
             "promoted to champion" if promoted else "kept as challenger", metrics, champion_metrics)
    return {"model_name": name, "version": version, "promoted": promoted, "metrics": metrics,
            "champion_metrics": champion_metrics, "run_id": run_id,
            "champion_version": version if promoted else (str(current.version) if current else None)}


def _requirements() -> list[str]:
    import importlib.metadata as md

    pins = []
    for dist in ("torch", "transformers", "tokenizers", "safetensors", "pandas", "pyarrow", "pydantic", "mlflow"):
        try:
            pins.append(f"{dist}=={md.version(dist).split('+')[0]}")
        except md.PackageNotFoundError:
            pass
    return pins


def champion_uri(cfg: PipelineConfig) -> str:
    return f"models:/{cfg.registry.model_name}@{CHAMPION}"


def champion_ranker(cfg: PipelineConfig):
    """The champion's ranker, loaded from the registry (what batch scoring and serving use)."""
    import mlflow

    tracking.configure(cfg)
    try:
        model = mlflow.pyfunc.load_model(champion_uri(cfg))
    except Exception as e:  # MlflowException and friends: no such model or alias yet
        raise RuntimeError(f"no champion model in the registry ({champion_uri(cfg)}): run train and "
                           f"register first ({e})") from e
    return model.unwrap_python_model().ranker
