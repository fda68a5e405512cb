"""`gensar`: the pipeline's steps from the command line, without Airflow."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from gensar_core.config import ConfigError, config_sources, load_config, with_overrides
from gensar_core.data.ingest import format_counts
from gensar_core.data.readers import IngestError
from gensar_core.data.split import format_split
from gensar_core.pipeline import STEPS, run_steps


def _print_result(step: str, result: dict) -> None:
    if step == "ingest":
        print(format_counts(result))
    elif step == "split":
        print(format_split(result))
    elif step == "evaluate" and result.get("report"):
        print(Path(result["report"]["report.md"]).read_text())
    else:
        print(json.dumps(result, indent=2, default=str))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gensar", description=__doc__)
    p.add_argument("--config", "-c", help="pipeline config YAML (default: the embedded default)")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set split.kcore=10 (repeatable)")
    p.add_argument("--variant", metavar="NAME",
                   help="apply the overrides of `evaluate.variants[NAME]` (e.g. train a variant the report compares)")
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="command", required=True)
    for name in STEPS:
        sub.add_parser(name, help=(STEPS[name].__doc__ or "").strip().splitlines()[0] if STEPS[name].__doc__ else None)
    run = sub.add_parser("run", help="run all steps in order (or --steps a,b)")
    run.add_argument("--steps", help="comma-separated subset of steps")
    show = sub.add_parser("config", help="print every config value and where it came from (default, file, --set, variant)")
    show.add_argument("--json", action="store_true", help="the resolved configuration as JSON instead")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        cfg = load_config(args.config, args.set)
        cfg_variants = cfg.evaluate.variants
        if args.variant:
            if args.variant not in cfg.evaluate.variants:
                raise ConfigError(f"--variant {args.variant}: not in evaluate.variants "
                                  f"({sorted(cfg.evaluate.variants) or 'none'})")
            cfg = with_overrides(cfg, cfg.evaluate.variants[args.variant])
        if args.command == "config" and args.json:
            print(json.dumps(cfg.model_dump(mode="json"), indent=2))
            return 0
        if args.command == "config":
            layers = {f"variant {args.variant}": cfg_variants[args.variant]} if args.variant else None
            for key, value, source in config_sources(cfg, args.config, args.set, layers):
                print(f"{key} = {json.dumps(value)}    # {source}")
            return 0
        names = [args.command] if args.command != "run" else (args.steps.split(",") if args.steps else None)
        for step, result in run_steps(cfg, names).items():
            print(f"== {step}")
            _print_result(step, result)
        return 0
    except (ConfigError, IngestError, FileNotFoundError, ValueError) as e:
        print(f"gensar: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
