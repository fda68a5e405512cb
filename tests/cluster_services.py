"""Real servers for the `cluster` tests, each started with its infra/ script on 127.0.0.1.

Every server runs in its own process group and is stopped by the fixture that started it: a TERM
to the script (which stops its children, as Ctrl-C would), then a KILL to whatever of the group
is left after a grace period.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from helpers import read

from gensar_core.serving import free_port

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def base_env(**extra: str) -> dict:
    return {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable,
            "PYSPARK_DRIVER_PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            **extra}


class Server:
    """One infra/ script running in the background, its output in `log`."""

    def __init__(self, script: str, args: list[str], env: dict, log: Path):
        self.log = log
        with open(log, "wb") as fh:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen([str(REPO / "infra" / script), *args], env=env, cwd=REPO,
                                         stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{what}: the script exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                if ready():
                    return
            except (OSError, urllib.error.URLError, ValueError):
                pass
            time.sleep(1)
        raise TimeoutError(f"{what}: not ready after {timeout:.0f} s:\n{self.tail()}")

    def _group_alive(self) -> bool:
        self.proc.poll()  # reap the script once it has exited: a zombie still counts in its group
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except ProcessLookupError:
            return False

    def stop(self, grace: float = 60) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self._group_alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        if self._group_alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@contextmanager
def running(script: str, args: list[str], env: dict, log: Path) -> Iterator[Server]:
    server = Server(script, args, env, log)
    try:
        yield server
    finally:
        server.stop()


def get_json(url: str, token: str | None = None, data: dict | None = None, method: str | None = None):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers=headers, method=method)
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read() or b"null")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status == 200


@contextmanager
def spark_cluster(folder: Path, workers: int = 2) -> Iterator[dict]:
    """infra/start_spark_cluster.sh: a master and `workers` workers (1 core, 1g each)."""
    port, ui = free_port(), free_port()
    env = base_env(SPARK_MASTER_PORT=str(port), SPARK_MASTER_WEBUI_PORT=str(ui),
                   SPARK_WORKER_INSTANCES=str(workers), SPARK_CLUSTER_DIR=str(folder))
    folder.mkdir(parents=True, exist_ok=True)
    with running("start_spark_cluster.sh", [], env, folder / "cluster.log") as server:
        def state() -> dict:
            return get_json(f"http://127.0.0.1:{ui}/json/")

        server.wait_until(lambda: state()["status"] == "ALIVE" and state()["aliveworkers"] == workers,
                          180, "spark master with its workers")
        yield {"master": f"spark://127.0.0.1:{port}", "host": "spark://127.0.0.1", "port": port,
               "state": state, "server": server}


@contextmanager
def postgres() -> Iterator[dict]:
    """infra/start_postgres.sh in a fresh folder; the folder must be reachable by the `postgres`
    user when we are root (pytest's own tmp folders are root-only), so it is made under /tmp."""
    folder = Path(tempfile.mkdtemp(prefix="gensar-pg-"))
    folder.chmod(0o755)
    port = free_port()
    try:
        with running("start_postgres.sh", [], base_env(PG_DIR=str(folder), PG_PORT=str(port)),
                     folder / "server.log") as server:
            server.wait_until(lambda: "postgres ready" in server.tail(), 120, "postgres")
            password = (folder / "password").read_text().strip()
            yield {"port": port, "password": password, "folder": folder, "server": server,
                   "url": lambda db, driver="": f"postgresql{driver}://gensar:{password}@127.0.0.1:{port}/{db}"}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def sql(pg: dict, db: str, query: str, args: tuple = ()) -> list[tuple]:
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=pg["port"], user="gensar", password=pg["password"], dbname=db)
    try:
        with conn.cursor() as cur:
            cur.execute(query, args)
            return cur.fetchall()
    finally:
        conn.close()


def comparable(wh: Path) -> dict:
    """The ingest's outputs in a form that compares across runs: tables sorted by every column,
    the manifest without what names the run (config fingerprint: master, paths; seconds)."""
    out = {}
    for name in ("items", "events", "rejected"):
        df = read(wh / "curated" / name)
        df = df.map(lambda v: str(list(v)) if hasattr(v, "__len__") and not isinstance(v, str) else v)
        out[name] = df.sort_values(list(df.columns)).reset_index(drop=True)
    manifest = json.loads((wh / "curated" / "_manifest.json").read_text())
    out["manifest"] = {k: v for k, v in manifest.items() if k not in ("config", "seconds")}
    return out
