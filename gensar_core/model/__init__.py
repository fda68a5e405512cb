"""The generative model: vocabulary and prompts, the training corpus, backbones, the training loop.

Steps: `run_build_corpus(cfg)` (corpus.py) and `run_train(cfg)` (prompted_train.py, the paper's recipe) or
`run_train_timeline(cfg)` (timeline_train.py, the default); `load_trained(folder)`
(backbone.py) loads a trained model back. Names are imported lazily, so importing one submodule
(e.g. the decoder) does not pull in the others.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Backbone": "backbone", "load_backbone": "backbone", "load_trained": "backbone", "save_trained": "backbone",
    "TASKS": "corpus", "build_corpus": "corpus", "enabled_tasks": "corpus", "read_corpus": "corpus",
    "run_build_corpus": "corpus",
    "encode_examples": "data", "encode_prompts": "data", "encode_targets": "data",
    "render_history": "prompts",
    "ValidationContext": "prompted_train", "TrainState": "prompted_train", "run_train": "prompted_train",
    "BEHAVIOUR_TOKENS": "vocab", "REC_ITEM": "vocab", "SRC_ITEM": "vocab", "SRC_QUERY": "vocab",
    "add_vocabulary": "vocab", "added_tokens": "vocab",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"gensar_core.model.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'gensar_core.model' has no attribute {name!r}")
