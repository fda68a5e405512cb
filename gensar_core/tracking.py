"""The one place that talks to MLflow.

Default store: a sqlite database at `$GENSAR_HOME/mlflow/mlflow.db` with artifacts under
`$GENSAR_HOME/mlflow/artifacts` (browse with
`mlflow ui --backend-store-uri sqlite:///$GENSAR_HOME/mlflow/mlflow.db`). `tracking.uri` points
it elsewhere: another `sqlite:///path.db` (artifacts then go to `artifacts/` beside it), or
`http://127.0.0.1:5000` for a tracking server (which then decides where artifacts go). Everything else in the code base calls the helpers below, never `mlflow` itself.

    with start_run(cfg, "t5-scratch|rec+search", tags={"step": "train"}) as run:
        log_params_from_config(cfg)
        log_metrics({"train/loss": 2.1}, step=10)
        log_artifact(model_dir, "model")
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from gensar_core.config import PipelineConfig, gensar_home

# mlflow is imported inside the helpers, deliberately: the DAG file imports this module (through
# gensar_core.pipeline) at every Airflow parse, and mlflow takes seconds to import

log = logging.getLogger(__name__)

# MLflow caps a param value at 6000 characters
_MAX_PARAM = 6000


def default_root() -> Path:
    return gensar_home() / "mlflow"


def tracking_uri(cfg: PipelineConfig) -> str:
    """`tracking.uri`, else the sqlite store under $GENSAR_HOME/mlflow."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    return f"sqlite:///{default_root() / 'mlflow.db'}"


def artifact_root(cfg: PipelineConfig) -> Optional[Path]:
    """Where new experiments keep artifacts: beside a sqlite store; None for a server (it decides)."""
    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent / "artifacts"
    return None


def configure(cfg: PipelineConfig) -> str:
    """Point MLflow at the configured store and make sure the experiment exists; its id."""
    import mlflow

    root = artifact_root(cfg)
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        return exp.experiment_id
    location = (root / cfg.tracking.experiment).as_uri() if root is not None else None
    try:
        return client.create_experiment(cfg.tracking.experiment, artifact_location=location)
    except Exception:  # created meanwhile by another process
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            raise
        return exp.experiment_id


@contextlib.contextmanager
def start_run(cfg: PipelineConfig, run_name: str, tags: Optional[Mapping[str, str]] = None,
              run_id: Optional[str] = None) -> Iterator[Any]:
    """An active MLflow run (a new one, or `run_id` reopened); ended FAILED if the body raises."""
    import mlflow

    experiment_id = configure(cfg)
    all_tags = {"gensar.config_fingerprint": cfg.fingerprint(), **(tags or {})}
    if mlflow.active_run() is not None:  # never nest by accident
        mlflow.end_run()
    if run_id is not None:
        run = mlflow.start_run(run_id=run_id)
        mlflow.set_tags(all_tags)
    else:
        run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=all_tags)
    try:
        yield run
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run(status="FINISHED")


def active_run_id() -> Optional[str]:
    import mlflow

    run = mlflow.active_run()
    return run.info.run_id if run is not None else None


def flatten_config(cfg: PipelineConfig | Mapping, prefix: str = "") -> dict[str, str]:
    """{'train.lr': '0.001', 'corpus.tasks.rec.enabled': 'True', ...}; lists as JSON-ish text."""
    tree = cfg.model_dump(mode="json") if isinstance(cfg, PipelineConfig) else dict(cfg)
    out: dict[str, str] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, Mapping) and node:
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else str(k))
        else:
            out[path] = str(node)[:_MAX_PARAM]

    walk(tree, prefix)
    return out


def log_params(params: Mapping[str, Any]) -> None:
    import mlflow

    items = {k: str(v)[:_MAX_PARAM] for k, v in params.items()}
    keys = list(items)
    for i in range(0, len(keys), 100):  # MLflow takes at most 100 params per batch
        mlflow.log_params({k: items[k] for k in keys[i: i + 100]})


def log_params_from_config(cfg: PipelineConfig) -> dict[str, str]:
    """The whole config, flattened, as run params; returns what was logged."""
    params = flatten_config(cfg)
    log_params(params)
    return params


def log_metrics(metrics: Mapping[str, Any], step: Optional[int] = None) -> dict[str, float]:
    """Finite numbers (numpy / 0-d torch scalars too; bools as 0/1); other values are skipped.

    Characters MLflow refuses in names (e.g. '@' in 'ndcg@5') become '_'.
    """
    import mlflow

    clean = {}
    for k, v in metrics.items():
        if isinstance(v, str):
            continue
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(v):
            clean[_metric_name(k)] = v
    if clean:
        mlflow.log_metrics(clean, step=step)
    return clean


def _metric_name(name: str) -> str:
    # MLflow allows alphanumerics, '_', '-', '.', ' ', ':' and '/' in names
    return "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in str(name))


def set_tags(tags: Mapping[str, Any]) -> None:
    import mlflow

    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def log_artifact(path: str | Path, artifact_path: Optional[str] = None) -> None:
    """A file or a whole folder, under `artifact_path` in the run's artifacts."""
    import mlflow

    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path=artifact_path)
    elif path.exists():
        mlflow.log_artifact(str(path), artifact_path=artifact_path)
    else:
        raise FileNotFoundError(f"artifact {path} does not exist")


def log_dict(payload: Mapping, artifact_file: str) -> None:
    import mlflow

    mlflow.log_dict(dict(payload), artifact_file)


# ---------------------------------------------------------------- reading back (tests, reports)
def client(cfg: PipelineConfig):
    import mlflow

    configure(cfg)
    return mlflow.MlflowClient(tracking_uri=tracking_uri(cfg))


def get_run(cfg: PipelineConfig, run_id: str):
    return client(cfg).get_run(run_id)


def metric_history(cfg: PipelineConfig, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client(cfg).get_metric_history(run_id, _metric_name(key))]


def list_artifacts(cfg: PipelineConfig, run_id: str, path: Optional[str] = None) -> list[str]:
    """Every artifact file path of a run (recursively)."""
    c = client(cfg)
    out, todo = [], [path]
    while todo:
        for info in c.list_artifacts(run_id, todo.pop()):
            (todo.append(info.path) if info.is_dir else out.append(info.path))
    return sorted(out)


def find_runs(cfg: PipelineConfig, filter_string: str = "") -> list:
    c = client(cfg)
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    return list(c.search_runs([exp.experiment_id], filter_string=filter_string)) if exp else []


def silence_mlflow_warnings() -> None:
    """Quieter logs: MLflow is chatty about git and environment detection."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _flat_numbers(payload: Mapping, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in payload.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat_numbers(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def log_step(cfg: PipelineConfig, step: str, result: Mapping, artifacts: tuple = ()) -> Optional[str]:
    """One MLflow run per pipeline step: config as params, the step's numbers as metrics, its
    report files as artifacts. Returns the run id (None when tracking is off)."""
    if not cfg.tracking.enabled:
        return None
    with start_run(cfg, f"{step}" + (f" {cfg.ds}" if cfg.ds else ""), tags={"gensar.step": step,
                                                                          "gensar.ds": cfg.ds or ""}) as run:
        log_params_from_config(cfg)
        log_metrics(_flat_numbers(result))
        log_dict(dict(result), f"{step}.json")
        for path in artifacts:
            if Path(path).exists():
                log_artifact(path)
        return run.info.run_id
