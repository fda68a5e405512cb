"""jobs/ingest.py on a real Spark standalone cluster (infra/start_spark_cluster.sh: a master and two
workers on 127.0.0.1) gives the same curated, rejected and manifest tables as in local mode.

Marked `cluster` (`make test-cluster`): each case runs spark-submit twice, minutes on two cores.
The Airflow side (the DAG's ingest task on this kind of cluster) is in test_cluster_airflow.py.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pandas as pd
import pytest
from cluster_services import REPO, VENV_BIN, base_env, comparable, spark_cluster
from helpers import movielens_files

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with spark_cluster(tmp_path_factory.mktemp("spark-cluster"), workers=2) as c:
        yield c


def submit(master: str, root: Path, app: str, sets: list[str], conf: list[str]) -> str:
    """spark-submit jobs/ingest.py against `master`; the warehouse and MLflow store under `root`."""
    cmd = [str(VENV_BIN / "spark-submit"), "--master", master, "--conf", "spark.ui.enabled=false"]
    for c in conf:
        cmd += ["--conf", c]
    cmd += [str(REPO / "jobs" / "ingest.py"), "--set", f"warehouse={root / 'wh'}",
            "--set", f"spark.app_name={app}"]
    for s in sets:
        cmd += ["--set", s]
    out = subprocess.run(cmd, check=False, env=base_env(GENSAR_HOME=str(root / "home")), capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stderr[-4000:]}"
    return out.stdout


def counts(stdout: str) -> list[str]:
    """The job's reconciled-count lines (its stdout also has MLflow's log lines)."""
    return [line for line in stdout.splitlines() if line.startswith(("items:", "events:", "curated events"))]


def cluster_vs_local(cluster, tmp_path: Path, app: str, sets: list[str], conf: list[str] = ()) -> dict:
    on_cluster = submit(cluster["master"], tmp_path / "cluster", app, sets, list(conf))
    local = submit("local[2]", tmp_path / "local", app + "-local", sets, list(conf))
    assert counts(on_cluster) == counts(local) != []  # the same reconciled counts printed
    # the run was the cluster's: the master lists it, finished, with a core from each worker
    apps = {a["name"]: a for a in cluster["state"]()["completedapps"]}
    assert app in apps, sorted(apps)
    assert apps[app]["state"] == "FINISHED" and apps[app]["cores"] == 2
    a, b = comparable(tmp_path / "cluster" / "wh"), comparable(tmp_path / "local" / "wh")
    for name in ("items", "events", "rejected"):
        pd.testing.assert_frame_equal(a[name], b[name], obj=name)
    assert a["manifest"] == b["manifest"]
    return a


def test_embedded_default_on_the_cluster_equals_local_mode(cluster, tmp_path):
    out = cluster_vs_local(cluster, tmp_path, "ingest-embedded-default", [])
    assert out["manifest"]["tables"]["events"] == {"raw": 100000, "curated": 100000, "rejected": 0,
                                                   "rejected_by_reason": {}}
    assert out["manifest"]["events_by_behavior"] == {"rec": 70038, "search": 29962}
    assert len(out["items"]) == 1682 and len(out["events"]) == 100000


# one of every check that MovieLens rows can fail, spread through a file that Spark splits into
# many partitions (8 KB each), so both executors read bad rows and line numbers must stay exact
PLANTED = {
    "1\t2\t3": "missing_field",
    "1\t2\tfive\t880000500": "wrong_type",
    "1\t2\t3\tyesterday": "bad_timestamp",
    "1\t999\t3\t880000600": "unknown_item",
    "1\t2\t3\t880001000": "duplicate_event",     # repeats user 1's first event (item 2, ts 880001000)
    "1\t3\t3\t880000700\textra": "malformed_row",
    "\t3\t3\t880000800": "missing_field",
    "2\t4\t3\t1800000000": "after_run_date",     # 2027-01-15, after ds 2026-11-27
}


def test_planted_bad_rows_on_the_cluster_equal_local_mode(cluster, tmp_path):
    extra, expected = [], {}
    bad = list(PLANTED.items()) + [(b"1\t\xff\xfe\t3\t880000700", "undecodable_text")]
    for k in range(4000):
        line_no = 17 + len(extra)
        if k % 400 == 7 and bad:
            line, reason = bad.pop()
            expected[line_no] = reason
            extra.append(line)
        extra.append(f"{100 + k % 500}\t{k % 6 + 1}\t4\t{881000000 + k}")
    assert not bad
    base = movielens_files(tmp_path / "ml", extra_events=extra)
    out = cluster_vs_local(cluster, tmp_path, "ingest-planted-bad-rows",
                           [f"data.source.path={base}", "ds=2026-11-27"],
                           ["spark.sql.files.maxPartitionBytes=8192"])
    rejected = out["rejected"]
    events = rejected[rejected["table"] == "events"]
    assert dict(zip(events["row"].astype(int), events["reason"])) == expected
    counts = out["manifest"]["tables"]["events"]
    assert (counts["raw"], counts["curated"], counts["rejected"]) == (15 + 4009, 15 + 4000, 9)
