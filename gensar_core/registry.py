"""The MLflow model registry: register a trained model as a pyfunc, promote it past a gate.

A new version becomes the champion (alias `champion`) only if its validation metric
(`registry.metric`, full-catalogue protocol, `registry.split`) beats the current champion's on
both recommendation and search; otherwise it gets the alias `challenger`. The numbers the gate
used are kept as version tags, so the decision can be read back in the MLflow UI.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
import yaml
from mlflow.exceptions import MlflowException

from gensar_core import tracking
from gensar_core.config import PipelineConfig
from gensar_core.evaluate.protocols import evaluate_ranker
from gensar_core.model.corpus import apply_id_scheme
from gensar_core.model.ensemble import member_dirs
from gensar_core.model.generative_ranker import DecodeSettings, GenerativeRanker, ranker_settings
from gensar_core.storage import Warehouse, read_table

log = logging.getLogger(__name__)
CHAMPION, CHALLENGER = "champion", "challenger"
TASKS = ("rec", "search")
SERVING_CODE = Path(__file__).with_name("serving_model.py")
MEMBER = "member"  # artifact names of an ensemble's other members: member1, member2, ...


def gate_metrics(cfg: PipelineConfig, ranker) -> dict[str, float]:
    """The gate's numbers for a ranker: `registry.metric` per task, full ranking on `registry.split`."""
    full_only = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(
        update={"protocols": ["full"], "max_cases": cfg.registry.max_cases})})
    result = evaluate_ranker(ranker, full_only, cfg.registry.split)["full"]
    return {task: float((result.get(task) or {}).get(cfg.registry.metric, 0.0)) for task in TASKS}


def beats(new: dict[str, float], champion: dict[str, float] | None) -> bool:
    """Promote only a model better on both tasks (the first model always wins)."""
    return champion is None or all(new[t] > champion[t] for t in TASKS)


def _champion(client, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def register(cfg: PipelineConfig, model_dir: str | Path, metrics: dict[str, float]) -> dict:
    """Log `model_dir` as a pyfunc model version and apply the champion gate."""
    name = cfg.registry.model_name
    with tracking.start_run(cfg, f"register {Path(model_dir).name}", tags={"gensar.step": "register"}) as run:
        tracking.log_metrics({f"gate/{t}/{cfg.registry.metric}": v for t, v in metrics.items()})
        with tempfile.TemporaryDirectory() as tmp:
            settings = Path(tmp) / "settings.json"
            settings.write_text(json.dumps(ranker_settings(cfg).to_json()))
            identifiers = Path(cfg.warehouse) / "identifiers" / "items"
            if cfg.corpus.id_scheme != "dual":  # the table as this model speaks it
                identifiers = Path(tmp) / "items.parquet"
                apply_id_scheme(read_table(Path(cfg.warehouse) / "identifiers" / "items"),
                                cfg.corpus.id_scheme).to_parquet(identifiers, index=False)
            members = {f"{MEMBER}{n}": str(folder) for n, folder in enumerate(member_dirs(cfg), 1)}
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(SERVING_CODE),
                artifacts={"model": str(model_dir),
                           "identifiers": str(identifiers),
                           "settings": str(settings), **members},
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
    """The champion model as a ranker over today's identifier table when it extends the one the
    champion was trained with (incremental IDs: new items are recommendable from day one), else
    over the champion's own table."""

    local = champion_download(cfg)
    if local is None:
        raise RuntimeError(f"no champion model in the registry ({champion_uri(cfg)}): run train and register first")
    artifacts = _artifact_paths(local)
    theirs = pd.read_parquet(artifacts["identifiers"])
    ours_path = Warehouse(cfg.warehouse).identifiers / "items"
    ids = theirs
    if ours_path.exists():
        ours = Warehouse(cfg.warehouse).read("identifiers/items")
        cols = ["item_id", "semantic_id", "collaborative_id"]
        kept = theirs[cols].merge(ours[cols], on=cols, how="inner")
        if len(kept) == len(theirs):
            ids = ours
    settings = DecodeSettings.from_json(json.loads(Path(artifacts["settings"]).read_text()))
    return GenerativeRanker(artifacts["model"], ids, settings, members=logged_members(artifacts))


def logged_members(artifacts: dict) -> list:
    """The ensemble members logged beside a registered model ('member1', 'member2', ...), in order."""
    names = sorted((k for k in artifacts if k.startswith(MEMBER)), key=lambda k: int(k[len(MEMBER):]))
    return [artifacts[k] for k in names]


def _artifact_paths(local: Path) -> dict[str, Path]:
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    return {k: local / v["path"] for k, v in mlmodel["flavors"]["python_function"]["artifacts"].items()}


def champion_download(cfg: PipelineConfig) -> Path | None:
    """A local copy of the champion's registered model, or None without a champion.

    One folder per version, filled once and renamed into place: the mapped batch_score tasks
    download at the same moment, and a version's files never change, so no process may delete
    a copy that another one is reading (a shared folder emptied first made them fail)."""
    tracking.configure(cfg)
    current = _champion(tracking.client(cfg), cfg.registry.model_name)
    if current is None:
        return None
    root = Path(cfg.warehouse) / "champion"
    dst = root / f"v{current.version}"
    if (dst / "MLmodel").exists():
        return dst
    root.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{cfg.registry.model_name}/{current.version}", dst_path=str(stage))
        try:
            os.rename(local, dst)
        except OSError:  # another process put the same version there first
            if not (dst / "MLmodel").exists():
                raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return dst


def champion_model_dir(cfg: PipelineConfig) -> Path | None:
    """A local copy of the champion's model folder (weights + tokenizer), or None without one."""
    local = champion_download(cfg)
    return _artifact_paths(local)["model"] if local is not None else None
