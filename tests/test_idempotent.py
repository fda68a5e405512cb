"""Reruns give the same content; a step that dies midway leaves the last good output."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from helpers import config, movielens_files, read

from gensar_core import storage
from gensar_core.data.ingest import ingest
from gensar_core.data.split import run_split


def _content(folder) -> dict[str, pd.DataFrame]:
    out = {}
    for name in ("items", "events", "rejected"):
        df = read(folder / name)
        df = df.map(lambda v: tuple(v) if hasattr(v, "__len__") and not isinstance(v, str) else v)
        out[name] = df.sort_values(list(df.columns)).reset_index(drop=True)
    return out


def _cfg(tmp_path):
    extra = [f"{10 + k // 40}\t{k % 6 + 1}\t4\t{881000000 + k}" for k in range(400)] + ["1\t1\t3\tbad"]
    return config(tmp_path, {"kind": "movielens", "path": str(movielens_files(tmp_path / "ml", extra))},
                  ds="2026-11-27")


def test_rerun_for_same_ds_gives_same_rows_and_values(spark, tmp_path):
    cfg = _cfg(tmp_path)
    first = ingest(spark, cfg)
    before = _content(cfg.warehouse / "curated")
    second = ingest(spark, cfg)
    after = _content(cfg.warehouse / "curated")
    for name in before:
        pd.testing.assert_frame_equal(before[name], after[name])
    first.pop("seconds"), second.pop("seconds")
    assert first == second
    run_split(cfg)
    splits_before = {n: read(cfg.warehouse / "splits" / n) for n in ("train", "valid", "test")}
    run_split(cfg)
    for n, df in splits_before.items():
        pd.testing.assert_frame_equal(df, read(cfg.warehouse / "splits" / n))


def test_crash_midway_keeps_last_good_output(spark, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    ingest(spark, cfg)
    good = _content(cfg.warehouse / "curated")

    # the next run dies after its tables are written but before they are committed
    def die(stage, target):
        assert (stage / "events").exists()
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(storage, "commit", die)
    bigger = cfg.model_copy(update={"ds": None})
    with pytest.raises(KeyboardInterrupt):
        ingest(spark, bigger)
    monkeypatch.undo()
    for name, df in _content(cfg.warehouse / "curated").items():
        pd.testing.assert_frame_equal(df, good[name])

    # a retry succeeds and sweeps what the killed run left behind
    ingest(spark, cfg)
    assert sorted(p.name for p in cfg.warehouse.iterdir()) == ["curated"]
    for name, df in _content(cfg.warehouse / "curated").items():
        pd.testing.assert_frame_equal(df, good[name])


def test_crash_between_the_swap_renames_is_repaired(tmp_path):
    target = tmp_path / "curated"
    with storage.atomic_dir(target) as stage:
        (stage / "marker").write_text("good")
    # simulate dying after `target` was moved aside but before the new one was moved in
    os.rename(target, tmp_path / "curated.old-deadbeef")
    (tmp_path / "curated.tmp-cafecafe").mkdir()
    assert storage.resolve(target) == target
    assert (target / "marker").read_text() == "good"
    with storage.atomic_dir(target) as stage:
        (stage / "marker").write_text("newer")
    assert (target / "marker").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curated"]


def test_failed_write_discards_staging(tmp_path):
    target = tmp_path / "t"
    with pytest.raises(RuntimeError):
        with storage.atomic_dir(target) as stage:
            (stage / "x").write_text("half")
            raise RuntimeError("boom")
    assert not tmp_path.joinpath("t").exists() and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- real SIGKILLs
# A step run as its own process and killed with SIGKILL (a lost node, the OOM killer): no
# exception handler or `finally` runs, whatever it had half-written stays on disk.
REPO = Path(__file__).resolve().parents[1]


def _env(home: Path) -> dict:
    # one torch/BLAS thread: a tiny model trains fastest so, and the same thread count in every
    # process keeps CPU kernels' reduction order, hence the weights, the same
    return {**os.environ, "GENSAR_HOME": str(home), "SPARK_LOCAL_IP": "127.0.0.1",
            "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _write_config(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=True))
    return path


def _group_alive(pgid: int) -> bool:
    """Whether any live (not zombie) process is left in process group `pgid`."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


@contextlib.contextmanager
def _step_process(args: list[str], home: Path, log: Path):
    """Start a step in its own process group (the Python driver and, for Spark, its JVM and
    Python workers); on leaving, SIGKILL whatever of the group is left and wait until it is gone,
    so nothing can still be writing when the test looks at the warehouse."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, cwd=REPO, env=_env(home), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 60
        while _group_alive(proc.pid):
            assert time.monotonic() < deadline, f"process group {proc.pid} survived SIGKILL"
            time.sleep(0.05)


def _kill_when(proc, log: Path, ready, what: str, timeout: float = 540) -> None:
    """SIGKILL the process group as soon as `ready()` holds; fail if the step ends first."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the step ended (rc {proc.returncode}) before {what}:\n" + log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {what} after {timeout}s:\n" + log.read_text()[-3000:]
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def _run_to_end(args: list[str], home: Path, log: Path, timeout: float = 540) -> None:
    with _step_process(args, home, log) as proc:
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{args} still running after {timeout}s:\n" + log.read_text()[-3000:])
        assert rc == 0, log.read_text()[-3000:]


@pytest.mark.slow
def test_ingest_killed_mid_write_then_rerun_gives_the_uninterrupted_output(spark, tmp_path):
    extra = [f"{10 + k // 40}\t{k % 6 + 1}\t{k % 5 + 1}\t{881000000 + k}" for k in range(20000)]
    cfg = config(tmp_path, {"kind": "movielens", "path": str(movielens_files(tmp_path / "ml", extra + ["1\t1\t3\tbad"]))},
                 ds="2026-11-27", tracking={"enabled": False}, spark={"master": "local[2]", "shuffle_partitions": 2,
                                                                     "driver_memory": "1g"})
    wh = cfg.warehouse
    reference = ingest(spark, cfg)  # the uninterrupted run
    good = _content(wh / "curated")
    manifest_path = wh / "curated" / "_manifest.json"
    good_manifest = manifest_path.read_text()

    job = [sys.executable, str(REPO / "jobs" / "ingest.py"), "--config", str(_write_config(cfg, tmp_path / "cfg.yaml"))]

    def staged() -> list[Path]:  # staging folders the job has started to write into
        return [s for s in wh.glob("curated" + storage.STAGING + "*") if any(s.iterdir())]

    with _step_process(job, tmp_path, tmp_path / "killed.log") as proc:
        _kill_when(proc, tmp_path / "killed.log", staged, "staging output")
    # killed mid-write: the staging folder is left half-written, the last good output is untouched
    (stage,) = staged()
    assert not (stage / "_manifest.json").exists()
    for name, df in _content(wh / "curated").items():
        pd.testing.assert_frame_equal(df, good[name], obj=name)
    assert manifest_path.read_text() == good_manifest

    _run_to_end(job, tmp_path, tmp_path / "rerun.log")
    for name, df in _content(wh / "curated").items():
        pd.testing.assert_frame_equal(df, good[name], obj=name)
    rerun = json.loads(manifest_path.read_text())
    reference.pop("seconds"), rerun.pop("seconds")
    assert rerun == json.loads(json.dumps(reference))
    assert rerun["tables"]["events"]["rejected_by_reason"] == {"bad_timestamp": 1}
    # the rerun swept what the killed run left: no staging or backup folder beside the table
    assert sorted(p.name for p in wh.iterdir()) == ["curated"]
    assert not [p for p in wh.rglob("*") if storage.STAGING in p.name or storage.BACKUP in p.name]


def _trained(model_dir: Path) -> dict:
    """What a training run decided: the weights, the per-step losses and the validation
    history, and the metrics it reports (less wall-clock times and where it ran)."""
    from safetensors.torch import load_file

    meta = json.loads((model_dir / "gensar_model.json").read_text())
    history = json.loads((model_dir / "train_history.json").read_text())
    timing = ("seconds", "loop_seconds", "train/supervised_tokens_per_s", "train/tokens_per_s", "mlflow_run_id")
    return {"weights": load_file(str(model_dir / "model.safetensors")),
            "losses": history["losses"],
            "evals": [{k: v for k, v in e.items() if k != "seconds"} for e in history["evals"]],
            "metrics": {k: v for k, v in meta["metrics"].items() if k not in timing},
            "fingerprint": meta["config_fingerprint"]}


@pytest.mark.slow
def test_train_killed_mid_epoch_then_rerun_gives_the_uninterrupted_model(tmp_path, monkeypatch):
    from toy_warehouse import write_toy_warehouse

    from gensar_core.config import PipelineConfig
    from gensar_core.model.timeline_train import run_train_timeline

    monkeypatch.setenv("GENSAR_HOME", str(tmp_path))
    wh = tmp_path / "warehouse"
    write_toy_warehouse(wh, n_users=24, n_items=30, events_per_user=12, seed=1)
    cfg = PipelineConfig.model_validate({
        "warehouse": str(wh), "identifiers": {"codebook_size": 8}, "tracking": {"enabled": False},
        # the toy warehouse has no quantiser to start the ID embeddings from
        "model": {"formulation": "timeline", "timeline": {"init_ids_from_codes": False, "max_len": 64, "d_model": 32,
                                                          "d_ff": 64, "num_heads": 2, "num_layers": 1,
                                                          "tokens_per_batch": 512}},
        # 4 steps an epoch; 8 epochs leave about a second of training after the first logged step
        "train": {"epochs": 8, "lr": 3e-3, "warmup_steps": 2, "eval_every": 2, "patience": 0, "progress": False,
                  "num_threads": 1, "device": "cpu"},
        "evaluate": {"beam_size": 8}})

    # the uninterrupted run, in this process; then the warehouse goes back to before training
    result = run_train_timeline(cfg)
    model_dir = Path(result["model_dir"])
    reference = _trained(model_dir)
    assert result["steps"] == result["total_steps"] > 2 * 2
    for folder in ("models", "checkpoints"):
        shutil.rmtree(wh / folder)

    train = [sys.executable, "-m", "gensar_core.cli", "-c", str(_write_config(cfg, tmp_path / "cfg.yaml")), "train"]
    log = tmp_path / "killed.log"
    evals = re.compile(r"step (\d+) \(epoch (\d+)\)")  # logged after each validation
    with _step_process(train, tmp_path, log) as proc:
        _kill_when(proc, log, lambda: evals.search(log.read_text()), "a logged training step")
    logged = [tuple(map(int, m)) for m in evals.findall(log.read_text())]
    assert logged and all(epoch == 0 for _, epoch in logged), logged  # killed in the first epoch
    assert not model_dir.exists()  # died before it saved a model

    _run_to_end(train, tmp_path, tmp_path / "rerun.log")
    rerun = _trained(model_dir)
    assert rerun["weights"].keys() == reference["weights"].keys()
    for name, tensor in reference["weights"].items():
        # same seed, same data, one thread: bit-identical (see _env)
        assert torch.equal(rerun["weights"][name], tensor), name
    for key in ("losses", "evals", "metrics", "fingerprint"):
        assert rerun[key] == reference[key], key
    assert json.loads((wh / "models" / f"{model_dir.name}.metrics.json").read_text())["steps"] == result["steps"]
