"""Names and folders of training runs, shared by both training formulations."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from gensar_core import tracking
from gensar_core.config import PipelineConfig
from gensar_core.model.backbone import backbone_label
from gensar_core.model.corpus import enabled_tasks
from gensar_core.storage import Warehouse, resolve


def train_seed(cfg: PipelineConfig) -> int:
    """The seed a training runs with: `train.seed`, or the pipeline seed when it is None."""
    return cfg.seed if cfg.train.seed is None else cfg.train.seed


def run_name(cfg: PipelineConfig, tasks: Sequence[str], label: str) -> str:
    scheme = "" if cfg.corpus.id_scheme == "dual" else f"|{cfg.corpus.id_scheme}-ids"
    tag = f"|{cfg.train.run_tag}" if cfg.train.run_tag else ""
    # a train seed other than the pipeline's is another model, in its own folder
    seed = "" if train_seed(cfg) == cfg.seed else f"|seed{cfg.train.seed}"
    return cfg.train.run_name or f"{label}|{'+'.join(tasks)}{scheme}{tag}{seed}"


def run_slug(name: str) -> str:
    """A folder name for a run name: `t5-scratch|rec+search` -> `t5-scratch__rec+search`."""
    slug = re.sub(r"[^A-Za-z0-9._+=-]+", "__", name).strip("_.")
    return slug or "run"


def trained_model_dir(cfg: PipelineConfig) -> Path:
    """Where `run_train` writes (and later steps find) the model of this config."""
    name = run_name(cfg, enabled_tasks(cfg.corpus), backbone_label(cfg.model))
    return Path(cfg.warehouse) / "models" / run_slug(name)


def log_model_artifacts(cfg: PipelineConfig, wh: Warehouse, out_dir: Path) -> None:
    """Log a trained model folder, its tokenizer files, the identifier table and the corpus
    manifest to the active MLflow run (weights only when `tracking.log_model`)."""
    if cfg.tracking.log_model:
        tracking.log_artifact(out_dir, "model")
    else:
        for f in out_dir.iterdir():
            if f.is_file() and not f.name.endswith((".safetensors", ".bin")):
                tracking.log_artifact(f, "model")
    tok_files = [f for f in out_dir.iterdir() if f.is_file() and ("token" in f.name or f.name.endswith(".model")
                                                                  or f.name == "chat_template.jinja")]
    for f in tok_files:
        tracking.log_artifact(f, "tokenizer")
    ident = resolve(wh.path("identifiers", "items"))
    if ident.exists():
        tracking.log_artifact(ident, "identifiers/items")
    manifest = wh.path("corpus", "_manifest.json")
    if manifest.exists():
        tracking.log_artifact(manifest, "corpus")
