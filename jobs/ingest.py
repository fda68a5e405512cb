"""Spark ingest job.

    spark-submit --master local[2] jobs/ingest.py --config configs/default.yaml --set ds=2026-11-27

also callable in-process: `main(argv, spark=session)`.
"""
from __future__ import annotations

import argparse
import sys

from gensar_core.config import load_config
from gensar_core.data.ingest import format_counts
from gensar_core.pipeline import step_ingest


def main(argv: list[str] | None = None, spark=None) -> dict:
    p = argparse.ArgumentParser(description="GenSAR ingest: raw logs -> curated tables")
    p.add_argument("--config")
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args(argv)
    manifest = step_ingest(load_config(args.config, args.set), spark=spark)
    print(format_counts(manifest))
    return manifest


if __name__ == "__main__":
    main(sys.argv[1:])
