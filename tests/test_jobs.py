"""The real Spark distribution, the spark-submit job, and the CLI on the embedded default."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import movielens_files, read

REPO = Path(__file__).resolve().parents[1]


def _env(home: Path) -> dict:
    return {**os.environ, "GENSAR_HOME": str(home), "SPARK_LOCAL_IP": "127.0.0.1",
            "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}


def test_full_pyspark_not_the_connect_client(spark):
    """The Spark provider asks for pyspark-client, whose `pyspark` module would shadow this one."""
    import pyspark

    assert pyspark.__version__.startswith("4.3.")
    jars = Path(pyspark.__file__).parent / "jars"
    assert any(j.name.startswith("spark-core") for j in jars.iterdir())
    assert spark.range(5).count() == 5  # a classic local session, not Spark Connect


def test_spark_submit_ingest_job(tmp_path):
    import pyspark

    base = movielens_files(tmp_path / "ml", extra_events=["1\t2\t3\tlater"])
    spark_submit = Path(pyspark.__file__).parent / "bin" / "spark-submit"
    out = subprocess.run(
        [str(spark_submit), "--master", "local[1]", "--conf", "spark.ui.enabled=false",
         str(REPO / "jobs" / "ingest.py"), "--set", "data.source.path=" + str(base),
         "--set", f"warehouse={tmp_path / 'wh'}"],
        env=_env(tmp_path), capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "events: raw 16 = curated 15 + rejected 1 (bad_timestamp=1)" in out.stdout
    assert len(read(tmp_path / "wh" / "curated" / "events")) == 15


def test_cli_on_the_embedded_default(tmp_path):
    """`gensar ingest` and `gensar split` on ML-100K as the recbole package ships it."""
    env = _env(tmp_path)
    out = subprocess.run([sys.executable, "-m", "gensar_core.cli", "ingest"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "items: raw 1682 = curated 1682 + rejected 0" in out.stdout
    assert "events: raw 100000 = curated 100000 + rejected 0" in out.stdout
    events = read(tmp_path / "warehouse" / "curated" / "events")
    assert list(events.columns) == ["user_id", "item_id", "ts", "behavior", "query", "session_id"]
    share = (events["behavior"] == "search").mean()
    assert 0.28 < share < 0.32  # the documented 30% synthetic search share

    out = subprocess.run([sys.executable, "-m", "gensar_core.cli", "split"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "test: 943 samples" in out.stdout and "valid: 2829 samples" in out.stdout  # 3 valid events a user


def test_cli_reports_bad_config_clearly(tmp_path):
    out = subprocess.run([sys.executable, "-m", "gensar_core.cli", "--set", "split.kcroe=1", "split"],
                         env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "split.kcroe: unknown key" in out.stderr
