"""Identifier sizes chosen from the catalogue (`identifiers.codebook_size: auto`, the default).

Rule: codes per level = the largest power of two not above sqrt(N) for N items, clamped to
[8, 256]; the paper's 2 shared + 2 specific levels stay. Then the two shared tokens have
K^2 <= N prefixes (a shared prefix is a small cluster of similar items, so every shared code
is seen by many training examples) and the four tokens of an ID address K^4 >= N^2 / 16
items, room to spare for the uniqueness rule and for cold-start items. ML-100K's 1,682 items
get 32 (docs/experiments.md: 1.7x / 1.9x NDCG@10 over the paper's 256 on this catalogue), a
250-item catalogue 8 (16 would leave every shared prefix nearly empty), 60,000 items 128 and
65,536 or more items the paper's 256.

A warehouse that already has identifiers keeps their size (`resolved_identifiers` reads it
from the quantiser checkpoint): a nightly run in incremental mode never changes the size of IDs
that are already out there, even when the catalogue crosses a power of two.
"""
from __future__ import annotations

import json
import math

from gensar_core.config import IdentifierConfig, PipelineConfig
from gensar_core.storage import Warehouse, resolve

MIN_CODES, MAX_CODES = 8, 256


def auto_codebook_size(n_items: int) -> int:
    if n_items < 1:
        raise ValueError(f"need at least one item to size identifiers, got {n_items}")
    size = 2 ** int(math.floor(math.log2(max(1.0, math.sqrt(n_items)))))
    return int(min(MAX_CODES, max(MIN_CODES, size)))


def with_size(icfg: IdentifierConfig, n_items: int) -> IdentifierConfig:
    """`icfg` with an integer codebook size (auto: from `n_items`)."""
    if icfg.codebook_size != "auto":
        return icfg
    return icfg.model_copy(update={"codebook_size": auto_codebook_size(n_items)})


def resolved_identifiers(cfg: PipelineConfig) -> IdentifierConfig:
    """The identifier config with its codebook size as an integer: the configured one, else the
    size of the warehouse's trained quantiser, else the rule above for curated/items."""
    icfg = cfg.identifiers
    if icfg.codebook_size != "auto":
        return icfg
    wh = Warehouse(cfg.warehouse)
    saved = resolve(wh.path("identifiers")) / "quantiser" / "config.json"
    if saved.exists():
        size = json.loads(saved.read_text())["spec"]["codebook_size"]
        return icfg.model_copy(update={"codebook_size": int(size)})
    return with_size(icfg, len(wh.read("curated/items", ["item_idx"])))
