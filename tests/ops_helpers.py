"""Starting and stopping the real services of the operations tests (Airflow, MLflow) and the
headless browser that looks at them, as a user would run them."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from gensar_core.serving import free_port  # noqa: F401 (the ops tests import it from here)

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
# flags that let Debian's Chromium run headless as root in a container without reaching out
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def tail(path: Path, chars: int = 4000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError:
        return f"(no log at {path})"


@contextlib.contextmanager
def process_group(cmd: list[str], log: Path, env: dict | None = None) -> Iterator[subprocess.Popen]:
    """`cmd` in its own process group, output to `log`; the whole group is stopped on exit
    (TERM, then KILL), so the services the script started go with it."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield proc
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen, grace: float = 20) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    # children that ignored the TERM, or outlived their parent, are still in the group
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Until `url` answers below 500; fails at once, with the log, if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args} exited with {proc.returncode} before {url} answered:\n{tail(log)}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=5).status_code < 500:
                return
        time.sleep(2)
    pytest.fail(f"{url} did not answer within {timeout:.0f} s:\n{tail(log)}")


class Airflow:
    """The REST API of a running Airflow 3, logged in as the UI does (POST /auth/token)."""

    def __init__(self, base: str, home: Path, log: Path, user: str = "admin"):
        self.base, self.home, self.log, self.user = base, home, log, user
        self._token: str | None = None

    @property
    def password(self) -> str:
        # the simple auth manager writes the generated passwords here when the API server starts
        return json.loads((self.home / "simple_auth_manager_passwords.json.generated").read_text())[self.user]

    def token(self) -> str:
        if self._token is None:
            r = requests.post(f"{self.base}/auth/token", json={"username": self.user, "password": self.password},
                              timeout=30)
            assert r.status_code == 201, f"login failed: {r.status_code} {r.text}"
            self._token = r.json()["access_token"]
        return self._token

    def call(self, method: str, path: str, expect: int = 200, **kwargs) -> dict:
        r = requests.request(method, f"{self.base}/api/v2{path}", timeout=60,
                             headers={"Authorization": f"Bearer {self.token()}"}, **kwargs)
        assert r.status_code == expect, f"{method} {path}: {r.status_code} {r.text[:2000]}"
        return r.json() if r.content else {}

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int, map_index: int = -1) -> str:
        """One try's log as text (the API streams it as JSON lines, one event each)."""
        r = requests.get(f"{self.base}/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/"
                         f"{try_number}", params={"map_index": map_index, "full_content": True}, timeout=60,
                         headers={"Authorization": f"Bearer {self.token()}", "Accept": "application/x-ndjson"})
        lines = []
        for raw in r.text.splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(raw)
                lines.append(" ".join(str(event.get(k, "")) for k in ("timestamp", "level", "event")))
                if event.get("error_detail"):
                    lines.append(json.dumps(event["error_detail"])[:4000])
        return "\n".join(lines) or r.text

    def wait_run(self, dag_id: str, run_id: str, timeout: float) -> dict:
        """Polls the run until it ends; on failure or timeout, fails with the failed tasks' logs."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}")
            if run["state"] == "success":
                return run
            if run["state"] == "failed" or time.monotonic() > deadline:
                pytest.fail(f"dag run {run_id} is {run['state']}:\n{self.failure_report(dag_id, run_id)}")
            time.sleep(10)

    def failure_report(self, dag_id: str, run_id: str) -> str:
        tis = self.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
        lines = [f"  {ti['task_id']}[{ti['map_index']}]: {ti['state']} (try {ti['try_number']})" for ti in tis]
        for ti in tis:
            if ti["state"] in ("failed", "up_for_retry", "upstream_failed") and ti["try_number"]:
                log = self.task_log(dag_id, run_id, ti["task_id"], ti["try_number"], ti["map_index"])
                lines.append(f"--- log of {ti['task_id']} try {ti['try_number']} ---\n{log[-6000:]}")
        lines.append(f"--- Airflow services ---\n{tail(self.log)}")
        return "\n".join(lines)


def require_browser() -> None:
    """The browser tests need Debian's Chromium and the playwright driver: fail (never skip) if
    either is missing, saying how to install them."""
    missing = []
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"Chromium ({CHROMIUM})")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright python package")
    if missing:
        pytest.fail(f"{' and '.join(missing)} not installed: run `make browser`", pytrace=False)


@contextlib.contextmanager
def browser_page(width: int = 1400, height: int = 900):
    """A page of a fresh headless Chromium (its own empty profile), closed on exit."""
    require_browser()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="gensar-chromium-") as profile, sync_playwright() as pw:
        # never `playwright install`: Debian's Chromium, driven over CDP
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": width, "height": height})
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def artifacts_dir() -> Path:
    """Where the tests leave screenshots: $GENSAR_TEST_ARTIFACTS, else .gensar/test-artifacts (git-ignored)."""
    path = Path(os.environ.get("GENSAR_TEST_ARTIFACTS") or REPO / ".gensar" / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path
