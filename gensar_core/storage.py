"""Warehouse layout and atomic, idempotent writes.

Every step writes its output into a staging folder beside the target and then swaps it into
place with renames, so a step that dies midway leaves the last good output untouched and a
retry simply writes again. A crash between the two renames of a swap leaves the previous output
under `<name>.old-*`; `resolve` puts it back before anything reads the table.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

STAGING = ".tmp-"
BACKUP = ".old-"


def _siblings(target: Path, marker: str) -> list[Path]:
    if not target.parent.exists():
        return []
    return sorted(p for p in target.parent.iterdir() if p.name.startswith(target.name + marker))


def resolve(target: str | Path) -> Path:
    """The path of a committed output, repairing an interrupted swap and sweeping stale staging."""
    target = Path(target)
    backups = _siblings(target, BACKUP)
    if not target.exists() and backups:
        # died after moving the old output aside and before moving the new one in
        os.rename(backups[-1], target)
        backups = backups[:-1]
        log.warning("restored %s from an interrupted commit", target)
    for stale in backups:
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    return target


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a fresh staging folder; on success swap it into `target`, on error discard it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    resolve(target)
    for stale in _siblings(target, STAGING):  # left by an earlier crashed attempt
        shutil.rmtree(stale, ignore_errors=True)
    stage = target.parent / f"{target.name}{STAGING}{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    commit(stage, target)


def commit(stage: Path, target: Path) -> None:
    """Swap a finished staging folder into place."""
    backup = None
    if target.exists():
        backup = target.parent / f"{target.name}{BACKUP}{uuid.uuid4().hex[:8]}"
        os.rename(target, backup)
    os.rename(stage, target)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a staging file and a rename: a reader sees the old file or
    the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{STAGING}{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str))


def write_table(df: pd.DataFrame | pa.Table, folder: Path, name: str = "part-0.parquet") -> Path:
    """Write one Parquet file into a (staging) folder."""
    table = df if isinstance(df, pa.Table) else pa.Table.from_pandas(df, preserve_index=False)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / name
    pq.write_table(table, out)
    return out


def read_table(path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a committed Parquet table (a file or a folder of part files, Spark's or ours)."""
    path = resolve(path)
    if not path.exists():
        raise FileNotFoundError(f"table {path} does not exist: run the step that writes it first")
    return pq.read_table(path, columns=columns).to_pandas()


class Warehouse:
    """Paths of the tables of docs/architecture.md "Steps and their data contracts" under one root."""

    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @property
    def curated(self) -> Path:
        return self.path("curated")

    @property
    def splits(self) -> Path:
        return self.path("splits")

    @property
    def identifiers(self) -> Path:
        return self.path("identifiers")

    def read(self, name: str, columns: list[str] | None = None) -> pd.DataFrame:
        top = name.split("/")[0]
        resolve(self.root / top)
        return read_table(self.root / name, columns)
