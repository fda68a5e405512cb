"""Run the nightly DAG once, executed by Airflow (`dag.test`), and say where the outputs are.

    python infra/run_nightly.py [--ds 2026-11-27] [--config configs/default.yaml] [--set key=value ...]

This is what `make run` does. Airflow's metadata database lives under $GENSAR_HOME/airflow.
For scheduled runs use `infra/start_airflow.sh` and the Airflow UI instead.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ds", default=dt.date.today().isoformat(), help="run date (default: today)")
    p.add_argument("--config", default=str(REPO / "configs" / "default.yaml"),
                   help="pipeline YAML (default: configs/default.yaml, the embedded default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()

    home = Path(os.environ.setdefault("GENSAR_HOME", str(REPO / ".gensar"))).absolute()
    os.environ.setdefault("AIRFLOW_HOME", str(home / "airflow"))
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    for key in ("SPARK_LOCAL_IP",):
        os.environ.setdefault(key, "127.0.0.1")
    airflow = Path(sys.executable).parent / "airflow"
    subprocess.run([str(airflow), "db", "migrate"], check=True, capture_output=True)

    import pendulum
    from airflow.dag_processing.dagbag import DagBag

    from gensar_core.pipeline import config_for_run

    bag = DagBag(dag_folder=str(REPO / "dags"))
    if bag.import_errors:
        print(f"DAG import errors: {bag.import_errors}", file=sys.stderr)
        return 1
    dag = bag.dags["gensar_nightly"]
    conf = {"config": args.config, "overrides": args.set}
    day = dt.date.fromisoformat(args.ds)
    run = dag.test(logical_date=pendulum.datetime(day.year, day.month, day.day, tz="UTC"), run_conf=conf)

    print(f"\ngensar_nightly run for ds={args.ds}: {run.state}")
    for ti in sorted(run.get_task_instances(), key=lambda t: t.start_date or pendulum.now()):
        print(f"  {ti.task_id:24s} {ti.state}")
    cfg = config_for_run(conf, args.ds)
    wh = Path(cfg.warehouse)
    from gensar_core import tracking

    print(f"\nwarehouse:   {wh}")
    for name, rel in [("curated", "curated/_manifest.json"), ("splits", "splits/_manifest.json"),
                      ("identifiers", "identifiers/metrics.json"), ("codebook plot", "identifiers/codebook_usage.png"),
                      ("report", f"reports/eval-test-{args.ds}/report.md"),
                      ("trade-off", f"reports/eval-test-{args.ds}/tradeoff.png"),
                      ("scores", f"scores/ds={args.ds}")]:
        path = wh / rel
        print(f"{name + ':':13s}{path}{'' if path.exists() else '  (missing)'}")
    runs = tracking.find_runs(cfg, f"tags.`gensar.ds` = '{args.ds}'") if cfg.tracking.enabled else []
    print(f"mlflow:      {tracking.tracking_uri(cfg)} ({len(runs)} runs for ds={args.ds}); browse with")
    print(f"             .venv/bin/mlflow ui --backend-store-uri {tracking.tracking_uri(cfg)} --host 127.0.0.1")
    print(f"airflow:     AIRFLOW_HOME={os.environ['AIRFLOW_HOME']}")
    return 0 if run.state == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
