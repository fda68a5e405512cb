"""GPU only (skipped without CUDA): mixed precision, fused AdamW, CUDA RNG state in checkpoints."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gensar_core.model.prompted_train import run_slug, run_train
from test_model_train import LossRecorder, copy_of, falls, make_cfg, toy_root  # noqa: F401 (toy_root: fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
MLFLOW = importlib.util.find_spec("mlflow") is not None


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("GENSAR_HOME", str(tmp_path / "home"))


def gpu_cfg(wh, **train):
    return make_cfg(wh, train=train, tracking={"enabled": MLFLOW})


@pytest.mark.parametrize("precision", ["auto", "fp16", "no"])
def test_scratch_t5_trains_on_the_gpu(toy_root, tmp_path, precision):
    wh = copy_of(toy_root, tmp_path / "wh")
    rec = LossRecorder()
    result = run_train(gpu_cfg(wh, mixed_precision=precision), callbacks=[rec])
    assert result["device"].startswith("cuda")
    ok, (head, tail) = falls(rec.losses)
    assert ok and np.isfinite(rec.losses).all(), (precision, head, tail)
    print(f"{precision}: loss {head:.3f} -> {tail:.3f}, {result['train/tokens_per_s']:.0f} tokens/s")


def test_resume_on_the_gpu(toy_root, tmp_path):
    train = {"epochs": 2, "eval_every": 4, "save_every": 4}
    straight = run_train(gpu_cfg(copy_of(toy_root, tmp_path / "a"), **train))
    wh = copy_of(toy_root, tmp_path / "b")

    def crash(event, state):
        if event == "step" and state.step == 10:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        run_train(gpu_cfg(wh, **train), callbacks=[crash])
    resumed = run_train(gpu_cfg(wh, **train))
    assert resumed["resumed_from_step"] == 8 and resumed["steps"] == straight["steps"]
    slug = run_slug(straight["run_name"])
    a = load_file(tmp_path / "a" / "models" / slug / "model.safetensors")
    b = load_file(wh / "models" / slug / "model.safetensors")
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    print(f"resume on GPU: max weight difference {diff:.2e}, losses {straight['train/final_loss']:.6f} "
          f"vs {resumed['train/final_loss']:.6f}")
    assert diff < 1e-3
    assert resumed["train/final_loss"] == pytest.approx(straight["train/final_loss"], rel=1e-3)
