"""Running the model server: `mlflow models serve` on loopback, a champion to serve, requests to it.

Used by `bench/serve.py` and the serving tests; the request format is `gensar_core.serving_model`'s.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from gensar_core import registry
from gensar_core.config import PipelineConfig
from gensar_core.model.runs import trained_model_dir
from gensar_core.storage import Warehouse

JSON = "application/json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, body: Optional[bytes] = None, content_type: str = JSON,
         timeout: float = 120) -> tuple[int, bytes]:
    """(status, body) of a GET (no body) or POST; HTTP errors are answers, not exceptions."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type} if body is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def invocation(rows: list[dict]) -> bytes:
    """The /invocations body for rows of task, history (list of events), query, k."""
    data = [[r["task"], json.dumps(r.get("history") or []), r.get("query"), r.get("k")] for r in rows]
    return json.dumps({"dataframe_split": {"columns": ["task", "history", "query", "k"], "data": data}}).encode()


@contextlib.contextmanager
def model_server(model_uri: str, tracking_uri: str, port: Optional[int] = None,
                 startup_s: float = 300) -> Iterator[str]:
    """`mlflow models serve` of `model_uri` on 127.0.0.1 (one worker, this environment), stopped on
    exit; yields its base URL. The server's output goes to a file (a pipe nobody reads would
    fill up and block it) that is shown if it fails to start."""
    port = port or free_port()
    bin_dir = Path(sys.executable).parent
    # the server runs `uvicorn` from PATH: the venv's bin, as infra/serve_model.sh sets it
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "HF_HUB_OFFLINE": "1",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen([str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager",
                                 "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + startup_s
            while True:
                try:
                    if http(f"{url}/ping", timeout=2)[0] == 200:
                        break
                except OSError:
                    pass
                if proc.poll() is not None or time.time() > deadline:
                    out.seek(0)
                    raise RuntimeError(f"mlflow models serve did not start on {url}:\n{out.read()[-3000:]}")
                time.sleep(1)
            yield url
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and the uvicorn process it starts (its own process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def register_champion(cfg: PipelineConfig, tracking_uri: str) -> str:
    """Register `cfg`'s trained model as the champion of a fresh store at `tracking_uri` (the first
    version always passes the gate; no evaluation is run); its model URI."""
    own = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": tracking_uri})})
    registry.register(own, trained_model_dir(cfg), {"rec": 0.0, "search": 0.0})
    return registry.champion_uri(own)


def sample_rows(warehouse: str | Path, n: int, seed: int = 0, k: int = 10) -> list[dict]:
    """`n` request rows drawn from the test split: its rec and search cases with their histories
    and queries, in the split's mix of the two."""
    test = Warehouse(warehouse).read("splits/test")
    picks = np.random.default_rng(seed).integers(len(test), size=n)
    rows = []
    for i in picks:
        case = test.iloc[int(i)]
        history = [{"behavior": e["behavior"], "item_id": str(e["item_id"]), "query": e["query"]}
                   for e in case["history"]]
        rows.append({"task": case["behavior"], "history": history,
                     "query": case["query"] if case["behavior"] == "search" else None, "k": k})
    return rows


def load_test(url: str, bodies: list[Optional[bytes]], concurrency: int, timeout: float = 120) -> dict:
    """Send `bodies` (None: a GET) to `url`, `concurrency` at a time; latency percentiles (ms),
    throughput (requests/s) and the non-200 answers."""
    def one(body):
        start = time.perf_counter()
        try:
            status = http(url, body, timeout=timeout)[0]
        except OSError:
            status = -1  # no answer at all (refused, reset, timed out)
        return status, time.perf_counter() - start

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, bodies))
    wall = time.perf_counter() - started
    ms = np.array([s for _, s in results]) * 1000
    errors = [status for status, _ in results if status != 200]
    return {"requests": len(results), "errors": len(errors), "error_statuses": sorted(set(errors)),
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "per_second": len(results) / wall, "wall_s": wall}
