"""Data-parallel timeline training under torchrun (gloo on CPU): two processes with the same seed
and global batch train the same model as one process, and only rank 0 writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

# float32 sums over the global batch split in two: equal to rounding, which a few steps of Adam
# amplify a little; anything wrong (a shard counted twice, a missing gradient) is off by far more
LOSS_RTOL, WEIGHT_ATOL = 1e-4, 1e-4


def run(tmp_path: Path, cfg, procs: int) -> dict:
    out = tmp_path / f"result-{procs}.json"
    script = tmp_path / f"train-{procs}.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, torch
        torch.set_num_threads(1)
        from gensar_core.config import PipelineConfig
        from gensar_core.model.timeline_train import run_train_timeline
        cfg = PipelineConfig.model_validate(json.loads({json.dumps(cfg.model_dump_json())}))
        result = run_train_timeline(cfg)
        if int(os.environ.get("RANK", "0")) == 0:
            open({str(out)!r}, "w").write(json.dumps(result, default=str))
    """))
    env = {**os.environ, "GENSAR_HOME": str(tmp_path / f"home-{procs}"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(script)] if procs == 1 else [
        str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", str(procs), str(script)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


# equal weights take Hugging Face's own mean (the default weighs search 2 and query 0.5, so they are spelled out)
@pytest.mark.parametrize("loss_weights", [{"search": 1.0, "query": 1.0}, {"search": 2.0, "query": 0.25}], ids=["mean", "weighted"])
def test_two_processes_train_the_same_model_as_one(tmp_path, loss_weights):
    """Also with per-kind loss weights, where each process divides by the global weight sum."""
    import mlflow
    from safetensors.torch import load_file

    from gensar_core.config import PipelineConfig
    from toy_warehouse import write_toy_warehouse

    results, weights = {}, {}
    for procs in (1, 2):
        root = tmp_path / f"wh-{procs}"
        write_toy_warehouse(root, n_users=24, n_items=30, events_per_user=12, seed=1)
        cfg = PipelineConfig.model_validate({
            "warehouse": str(root), "identifiers": {"codebook_size": 8},
            "tracking": {"uri": f"sqlite:///{tmp_path / f'mlflow-{procs}.db'}", "log_model": False},
            "model": {"timeline": {"init_ids_from_codes": False, "max_len": 64, "d_model": 32, "d_ff": 64, "num_heads": 2, "num_layers": 1,
                                   "tokens_per_batch": 1024, "loss_weights": loss_weights}},
            "train": {"epochs": 2, "lr": 3e-3, "warmup_steps": 2, "eval_every": 4, "patience": 0,
                      "progress": False, "mixed_precision": "no"},
            "evaluate": {"beam_size": 8}})
        results[procs] = run(tmp_path, cfg, procs)
        weights[procs] = load_file(str(Path(results[procs]["model_dir"]) / "model.safetensors"))
        # rank 0 alone writes: one model folder, one MLflow run
        assert [p.name for p in (root / "models").iterdir() if p.is_dir()] == [Path(results[procs]["model_dir"]).name]
        mlflow.set_tracking_uri(cfg.tracking.uri)
        assert len(mlflow.search_runs(experiment_names=[cfg.tracking.experiment])) == 1

    one, two = results[1], results[2]
    assert two["world_size"] == 2 and one["steps"] == two["steps"] > 4
    history = {p: json.loads((Path(results[p]["model_dir"]) / "train_history.json").read_text()) for p in (1, 2)}
    np.testing.assert_allclose(history[2]["losses"], history[1]["losses"], rtol=LOSS_RTOL)
    assert one["best_step"] == two["best_step"]
    for name, tensor in weights[1].items():
        np.testing.assert_allclose(weights[2][name].numpy(), tensor.numpy(), atol=WEIGHT_ATOL, err_msg=name)
    print(f"supervised tokens/s: 1 process {one['train/supervised_tokens_per_s']:.0f}, "
          f"2 processes {two['train/supervised_tokens_per_s']:.0f} "
          f"({two['train/supervised_tokens_per_s'] / one['train/supervised_tokens_per_s']:.2f}x)")
