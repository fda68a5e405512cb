"""The `learn_identifiers` pipeline step.

Reads `features/semantic`, `features/collaborative` and `curated/items` (for item_id), trains the
dual quantiser, assigns unique IDs and writes, in one atomic swap of the `identifiers` folder:

    identifiers/items/               item_idx, item_id, shared_codes, semantic_codes,
                                     collaborative_codes, semantic_id, collaborative_id
    identifiers/quantiser/           model.safetensors, config.json, training.json
    identifiers/metrics.json         the dict this step returns
    identifiers/codebook_usage.png   codebook usage and perplexity per level

Items with a semantic embedding but no collaborative one (never clicked in the training split)
are not trained on; they get cold-start IDs from the trained quantiser (see assign.py).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from gensar_core.config import PipelineConfig
from gensar_core.identifiers.assign import (assign_cold_start, assign_identifiers, identifier_table, level_names,
                                            to_arrow)
from gensar_core.identifiers.checkpoint import save_quantiser
from gensar_core.identifiers.naming import token_letters
from gensar_core.identifiers.quantiser import DualQuantiser, QuantiserSpec, train_quantiser
from gensar_core.identifiers.sizing import with_size
from gensar_core.storage import Warehouse, atomic_dir, write_json_atomic, write_table

log = logging.getLogger(__name__)


def _vectors(df: pd.DataFrame, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Sorted item_idx and the [N, D] float32 matrix of a feature table, validated."""
    if df["item_idx"].duplicated().any():
        raise ValueError(f"features/{name}: duplicate item_idx")
    df = df.sort_values("item_idx")
    if len(df) == 0:
        raise ValueError(f"features/{name} is empty")
    lengths = df["vector"].map(len)
    if lengths.nunique() != 1:
        raise ValueError(f"features/{name}: vectors of different lengths {sorted(lengths.unique())[:5]}")
    x = np.stack([np.asarray(v, dtype=np.float32) for v in df["vector"]])
    if not np.isfinite(x).all():
        raise ValueError(f"features/{name}: non-finite values")
    return df["item_idx"].to_numpy(np.int64), x


def plot_codebook_usage(metrics: dict, names: list[str], codebook_size: int, path: Path) -> None:
    # Figure without pyplot: no global backend state, safe in worker processes

    usage = [metrics[f"usage/{n}"] for n in names]
    perplexity = [metrics[f"perplexity/{n}"] / codebook_size for n in names]
    fig = Figure(figsize=(1.2 * len(names) + 3, 3.5))
    ax = fig.add_subplot()
    x = np.arange(len(names))
    ax.bar(x - 0.2, usage, 0.4, label="codes used / codebook size")
    ax.bar(x + 0.2, perplexity, 0.4, label="perplexity / codebook size")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Codebook usage per level (codebook size {codebook_size})")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def run_learn_identifiers(cfg: PipelineConfig) -> dict:
    token_letters(cfg.identifiers.shared_levels, cfg.identifiers.specific_levels)  # fail fast on unnamable levels
    wh = Warehouse(cfg.warehouse)
    sem_idx, sem = _vectors(wh.read("features/semantic", ["item_idx", "vector"]), "semantic")
    col_idx, col = _vectors(wh.read("features/collaborative", ["item_idx", "vector"]), "collaborative")
    items = wh.read("curated/items", ["item_id", "item_idx"])
    icfg = with_size(cfg.identifiers, len(items))  # retraining sizes IDs for today's catalogue
    item_id = dict(zip(items["item_idx"].astype(np.int64), items["item_id"].astype(str)))

    missing_sem = np.setdiff1d(col_idx, sem_idx)
    if len(missing_sem):
        raise ValueError(f"{len(missing_sem)} items have a collaborative but no semantic embedding "
                         f"(e.g. item_idx {missing_sem[:5].tolist()})")
    unknown = [i for i in sem_idx if i not in item_id]
    if unknown:
        raise ValueError(f"{len(unknown)} feature rows have no item in curated/items (e.g. {unknown[:5]})")
    warm = np.isin(sem_idx, col_idx)
    warm_idx = sem_idx[warm]  # equals col_idx: both sorted
    cold_idx = sem_idx[~warm]

    spec = QuantiserSpec.from_config(icfg, sem.shape[1], col.shape[1])
    model = DualQuantiser(spec, seed=cfg.seed)
    t0 = time.perf_counter()
    result = train_quantiser(model, torch.from_numpy(sem[warm]), torch.from_numpy(col),
                             icfg, seed=cfg.seed, desc="learn_identifiers")
    assignment = assign_identifiers(model, sem[warm], col, icfg)
    table = identifier_table(assignment, warm_idx, [item_id[i] for i in warm_idx])
    if len(cold_idx):
        cold = assign_cold_start(model, pd.DataFrame({
            "item_idx": cold_idx, "item_id": [item_id[i] for i in cold_idx], "vector": list(sem[~warm])}),
            table)
        table = pd.concat([table, cold[table.columns]], ignore_index=True).sort_values("item_idx", ignore_index=True)

    last = result.history[-1]
    metrics = {
        **assignment.metrics,
        "n_items": len(table),
        "n_trained_items": len(warm_idx),
        "n_cold_start_items": len(cold_idx),
        "train/epochs": icfg.epochs,
        "train/final_loss": last["loss"],
        "train/final_recon_loss": last["recon_loss"],
        "train/selected_epoch": result.selected_epoch,
        "train/seconds": result.seconds,
        "train/init_seconds": result.init_seconds,
        "train/items_per_s": result.items_per_s,
        "total_seconds": time.perf_counter() - t0,
    }
    # only the cold items can break these; check the whole table once more anyway
    for b in ("semantic", "collaborative"):
        if table[f"{b}_id"].duplicated().any():
            raise AssertionError(f"duplicate {b}_id in the identifier table: this is a bug")

    with atomic_dir(wh.identifiers) as stage:
        write_table(to_arrow(table), stage / "items")
        ckpt = save_quantiser(model, stage / "quantiser", extra={
            "identifier_config": icfg.model_dump(mode="json"),
            "seed": cfg.seed,
            "config_fingerprint": cfg.fingerprint(),
        })
        (ckpt / "training.json").write_text(json.dumps({
            "history": result.history, "selected_epoch": result.selected_epoch}, indent=1))
        write_json_atomic(stage / "metrics.json", metrics)
        plot_codebook_usage(metrics, level_names(icfg.shared_levels, icfg.specific_levels),
                            icfg.codebook_size, stage / "codebook_usage.png")
    log.info("identifiers: %d items, collisions before rule sem %.4f col %.4f",
             len(table), metrics["collision_rate_before_rule/semantic"], metrics["collision_rate_before_rule/collaborative"])
    return metrics
