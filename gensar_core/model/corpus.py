"""The `build_corpus` step: training and validation prompts for every task.

Reads `splits/{train,valid}`, `identifiers/items` and `curated/items`, writes one table per
enabled task, `corpus/{task}`, with the columns

    input_text, target_text, task, template_id, split ('train'|'valid'), variant, user_id, item_id

and `corpus/_manifest.json` (counts, seed, a content hash). The whole `corpus` folder is swapped
in atomically, so a disabled task's old table disappears with the same commit.

Tasks (docs/method.md "The generative model and its tasks"; `corpus.tasks.<name>.enabled` switches each off):

    rec     next recommended item: every train 'rec' event; history -> `<rec_item>` + collaborative ID
    search  next searched item: every train 'search' event; history + query -> `<src_item>` + semantic ID
    query   next search query: every train 'search' event; history -> `<src_query>` + query
    adhoc   ad-hoc search: pseudo-query, no history -> `<src_item>` + semantic ID
    align   identifier-language alignment, four variants per item: text -> semantic ID,
            text -> collaborative ID, semantic ID -> title, collaborative ID -> title

Pseudo-queries for `adhoc`. The paper generates them with a doc2query model fine-tuned on the
search log; no such model is available offline, so an item's pseudo-queries are (1) up to
`corpus.max_pseudo_queries` distinct queries observed for it in the *train* split (a seeded pick
when there are more), and (2) one query derived from the catalogue: its categories (lower-cased)
followed by its title words, e.g. `animation children's comedy toy story`. Only train queries are
used, so nothing of the valid/test events leaks in.

Validation rows come from `splits/valid` for `rec`, `search` and `query`, written with template 0.
Training rows get `templates_per_example` distinct templates each, drawn with a generator seeded
by (corpus seed, task), so a task's rows do not change when another task is switched off, and a
rerun writes identical tables.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from typing import Iterable, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa

from gensar_core.config import TRAINING_TASKS, CorpusConfig, PipelineConfig
from gensar_core.model.prompts import (
    ItemIds, fill, query_target, rec_target, render_history, search_target, templates)
from gensar_core.storage import Warehouse, atomic_dir, resolve, write_json_atomic, write_table

log = logging.getLogger(__name__)

TASKS = TRAINING_TASKS
TASK_SEED = {name: i for i, name in enumerate(TASKS)}  # fixed: a task's stream never depends on others
ALIGN_VARIANTS = ("text2sem", "text2col", "sem2title", "col2title")
VALID_TASKS = ("rec", "search", "query")

CORPUS_SCHEMA = pa.schema([
    ("input_text", pa.string()), ("target_text", pa.string()), ("task", pa.string()),
    ("template_id", pa.int32()), ("split", pa.string()), ("variant", pa.string()),
    ("user_id", pa.string()), ("item_id", pa.string()),
])


def enabled_tasks(ccfg: CorpusConfig) -> list[str]:
    return [t for t in TASKS if getattr(ccfg.tasks, t).enabled]


# ---------------------------------------------------------------- inputs
def apply_id_scheme(identifiers: pd.DataFrame, scheme: str) -> pd.DataFrame:
    """The identifier table as a model of `scheme` sees it: 'semantic' (TIGER-style) writes every
    item with its semantic ID, so recommendation targets and history clicks use it too."""
    if scheme == "dual":
        return identifiers
    out = identifiers.copy()
    out["collaborative_id"] = out["semantic_id"]
    if "semantic_codes" in out:
        out["collaborative_codes"] = out["semantic_codes"]
    return out


def item_identifier_map(identifiers: pd.DataFrame) -> dict[str, ItemIds]:
    if identifiers["item_id"].duplicated().any():
        raise ValueError("identifiers/items: duplicate item_id")
    return {str(i): ItemIds(s, c) for i, s, c in zip(
        identifiers["item_id"], identifiers["semantic_id"], identifiers["collaborative_id"])}


def _ordered(samples: pd.DataFrame) -> pd.DataFrame:
    """Rows in a stable order that does not depend on how the split was partitioned on disk."""
    return samples.sort_values(["user_id", "ts", "position", "item_id"], kind="mergesort").reset_index(drop=True)


def _check_items(samples: pd.DataFrame, item_ids: Mapping[str, ItemIds], name: str) -> None:
    missing = ~samples["item_id"].astype(str).isin(item_ids.keys())
    if missing.any():
        raise ValueError(f"splits/{name}: {int(missing.sum())} samples name items without an identifier "
                         f"(e.g. {samples.loc[missing, 'item_id'].iloc[:5].tolist()}); rerun learn_identifiers")


def _template_picks(rng: np.random.Generator, n_rows: int, n_templates: int, k: int) -> np.ndarray:
    """(n_rows, k) distinct template ids per row."""
    k = min(k, n_templates)
    if k == 1:
        return rng.integers(n_templates, size=(n_rows, 1))
    return np.argsort(rng.random((n_rows, n_templates)), axis=1)[:, :k]


def _frame(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=CORPUS_SCHEMA.names)


_WORD = re.compile(r"[a-z0-9][a-z0-9'&-]*")


def derived_query(title: str, categories: Iterable[str] | None) -> str:
    """Categories (lower-cased) then title words: `animation children's comedy toy story`."""
    words: list[str] = []
    for part in list(categories if categories is not None else []) + [title or ""]:
        for w in _WORD.findall(str(part).lower()):
            if w not in words:
                words.append(w)
    return " ".join(words)


def clip_words(text: str, n: int) -> str:
    words = str(text or "").split()
    return " ".join(words[:n])


# ---------------------------------------------------------------- tasks
def history_examples(task: str, samples: pd.DataFrame, item_ids: Mapping[str, ItemIds], ccfg: CorpusConfig,
                     split: str, rng: np.random.Generator | None) -> pd.DataFrame:
    """rec / search / query rows from split samples; `rng` None: template 0 (validation)."""
    behaviour = "rec" if task == "rec" else "search"
    rows_in = samples[samples["behavior"] == behaviour]
    if behaviour == "search":
        rows_in = rows_in[rows_in["query"].notna() & (rows_in["query"].astype(str).str.strip() != "")]
    tpl = templates(task)
    k = getattr(ccfg.tasks, task).templates_per_example
    picks = (np.zeros((len(rows_in), 1), dtype=np.int64) if rng is None
             else _template_picks(rng, len(rows_in), len(tpl), k))
    out = []
    for (user, item, query, history), choice in zip(
            rows_in[["user_id", "item_id", "query", "history"]].itertuples(index=False, name=None), picks):
        hist = render_history(history, item_ids, ccfg.max_rec_history, ccfg.max_search_history)
        ids = item_ids[str(item)]
        if task == "rec":
            target = rec_target(ids)
        elif task == "search":
            target = search_target(ids)
        else:
            target = query_target(query)
        q = str(query).strip() if query is not None else ""
        for t in choice:
            out.append((fill(tpl[t], history=hist, query=q), target, task, int(t), split, "", str(user), str(item)))
    return _frame(out)


def pseudo_queries(items: pd.DataFrame, train: pd.DataFrame, max_observed: int,
                   rng: np.random.Generator) -> dict[str, list[str]]:
    """item_id -> pseudo-queries: observed train queries (seeded pick) + one derived query."""
    searches = train[(train["behavior"] == "search") & train["query"].notna()]
    observed: dict[str, list[str]] = {}
    for item, group in searches.groupby(searches["item_id"].astype(str), sort=True):
        qs = sorted({str(q).strip() for q in group["query"] if str(q).strip()})
        if len(qs) > max_observed:
            qs = [qs[i] for i in sorted(rng.choice(len(qs), size=max_observed, replace=False))]
        observed[item] = qs
    out = {}
    for item, title, cats in items[["item_id", "title", "categories"]].itertuples(index=False, name=None):
        qs = list(observed.get(str(item), [])) if max_observed else []
        derived = derived_query(title, cats)
        if derived and derived not in qs:
            qs.append(derived)
        out[str(item)] = qs
    return out


def adhoc_examples(items: pd.DataFrame, train: pd.DataFrame, item_ids: Mapping[str, ItemIds],
                   ccfg: CorpusConfig, rng: np.random.Generator) -> pd.DataFrame:
    queries = pseudo_queries(items, train, ccfg.max_pseudo_queries, rng)
    pairs = [(item, q) for item in items["item_id"].astype(str) for q in queries[item]]
    tpl = templates("adhoc")
    picks = _template_picks(rng, len(pairs), len(tpl), ccfg.tasks.adhoc.templates_per_example)
    out = []
    for (item, q), choice in zip(pairs, picks):
        target = search_target(item_ids[item])
        for t in choice:
            out.append((fill(tpl[t], query=q), target, "adhoc", int(t), "train", "", None, item))
    return _frame(out)


def align_examples(items: pd.DataFrame, item_ids: Mapping[str, ItemIds], ccfg: CorpusConfig,
                   rng: np.random.Generator) -> pd.DataFrame:
    k = ccfg.tasks.align.templates_per_example
    out = []
    rows = list(items[["item_id", "title", "text"]].itertuples(index=False, name=None))
    for variant in ALIGN_VARIANTS:
        tpl = templates("align", variant)
        picks = _template_picks(rng, len(rows), len(tpl), k)
        for (item, title, text), choice in zip(rows, picks):
            ids = item_ids[str(item)]
            title = str(title or text or "").strip()
            body = clip_words(text or title, ccfg.max_text_words)
            if variant == "text2sem":
                values, target = {"text": body}, ids.semantic_id
            elif variant == "text2col":
                values, target = {"text": body}, ids.collaborative_id
            elif variant == "sem2title":
                values, target = {"id": ids.semantic_id}, title
            else:
                values, target = {"id": ids.collaborative_id}, title
            for t in choice:
                out.append((fill(tpl[t], **values), target, "align", int(t), "train", variant, None, str(item)))
    return _frame(out)


# ---------------------------------------------------------------- the step
def build_corpus(train: pd.DataFrame, valid: pd.DataFrame | None, identifiers: pd.DataFrame,
                 items: pd.DataFrame, ccfg: CorpusConfig, seed: int) -> dict[str, pd.DataFrame]:
    """task -> examples (train rows, then valid rows), for the enabled tasks. Pure and seeded."""
    item_ids = item_identifier_map(identifiers)
    train = _ordered(train)
    _check_items(train, item_ids, "train")
    if valid is not None:
        valid = _ordered(valid)
        _check_items(valid, item_ids, "valid")
    items = items[items["item_id"].astype(str).isin(item_ids.keys())].sort_values("item_id", kind="mergesort")
    out = {}
    for task in enabled_tasks(ccfg):
        rng = np.random.default_rng([seed, TASK_SEED[task]])
        if task in ("rec", "search", "query"):
            frames = [history_examples(task, train, item_ids, ccfg, "train", rng)]
            if valid is not None and task in VALID_TASKS:
                frames.append(history_examples(task, valid, item_ids, ccfg, "valid", None))
            df = pd.concat(frames, ignore_index=True)
        elif task == "adhoc":
            df = adhoc_examples(items, train, item_ids, ccfg, rng)
        else:
            df = align_examples(items, item_ids, ccfg, rng)
        out[task] = df
    return out


def content_hash(tables: Mapping[str, pd.DataFrame]) -> str:
    h = hashlib.sha256()
    for task in sorted(tables):
        df = tables[task]
        h.update(task.encode())
        for col in ("input_text", "target_text", "split"):
            h.update("\x1f".join(df[col].astype(str)).encode())
    return h.hexdigest()[:16]


def run_build_corpus(cfg: PipelineConfig) -> dict:
    """splits + identifiers -> corpus/{task} tables and corpus/_manifest.json."""
    t0 = time.perf_counter()
    ccfg = cfg.corpus
    tasks = enabled_tasks(ccfg)
    if not tasks:
        raise ValueError("every corpus task is switched off (corpus.tasks.<name>.enabled)")
    wh = Warehouse(cfg.warehouse)
    seed = cfg.seed if ccfg.seed is None else ccfg.seed
    # no valid split would mean no validation and no checkpoint selection: fail instead
    train, valid = wh.read("splits/train"), wh.read("splits/valid")
    identifiers = apply_id_scheme(wh.read("identifiers/items", ["item_id", "semantic_id", "collaborative_id"]),
                                  ccfg.id_scheme)
    items = wh.read("curated/items", ["item_id", "title", "text", "categories"])
    tables = build_corpus(train, valid, identifiers, items, ccfg, seed)

    counts = {task: {"train": int((df["split"] == "train").sum()), "valid": int((df["split"] == "valid").sum())}
              for task, df in tables.items()}
    manifest = {
        "tasks": tasks,
        "disabled": [t for t in TASKS if t not in tasks],
        "counts": counts,
        "seed": seed,
        "content_hash": content_hash(tables),
        "config": ccfg.model_dump(mode="json"),
        "config_fingerprint": cfg.fingerprint(),
    }
    with atomic_dir(wh.path("corpus")) as stage:
        for task, df in tables.items():
            write_table(pa.Table.from_pandas(df, schema=CORPUS_SCHEMA, preserve_index=False), stage / task)
        write_json_atomic(stage / "_manifest.json", manifest)
    result = {"tasks": tasks, "examples": {t: c["train"] + c["valid"] for t, c in counts.items()},
              "train_examples": sum(c["train"] for c in counts.values()),
              "valid_examples": sum(c["valid"] for c in counts.values()),
              "content_hash": manifest["content_hash"], "seconds": round(time.perf_counter() - t0, 2)}
    log.info("build_corpus: %s", result)
    return result


def read_corpus(cfg: PipelineConfig, tasks: list[str] | None = None) -> tuple[pd.DataFrame, dict]:
    """The corpus tables of `tasks` (default: the enabled ones) in one frame, and the manifest."""
    wh = Warehouse(cfg.warehouse)
    tasks = tasks or enabled_tasks(cfg.corpus)
    resolve(wh.path("corpus"))  # repairs an interrupted swap
    manifest_path = wh.path("corpus", "_manifest.json")
    if not manifest_path.exists():
        raise FileNotFoundError(f"{wh.path('corpus')} has no corpus: run build_corpus first")
    manifest = json.loads(manifest_path.read_text())
    missing = [t for t in tasks if t not in manifest["tasks"]]
    if missing:
        raise ValueError(f"tasks {missing} are enabled but not in the corpus (built with {manifest['tasks']}): "
                         f"rerun build_corpus")
    frames = [wh.read(f"corpus/{t}") for t in tasks]
    return pd.concat(frames, ignore_index=True), manifest
