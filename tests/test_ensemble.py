"""An ensemble (`train.ensemble_seeds`): members trained as seed replicas, decoded as one model by
evaluation, and registered with the model so that batch scoring and serving decode the same."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from gensar_core.config import PipelineConfig
    from gensar_core.pipeline import step_train
    from toy_warehouse import write_toy_warehouse

    home = tmp_path_factory.mktemp("ens")
    root = home / "warehouse"
    write_toy_warehouse(root, n_users=16, n_items=24, events_per_user=10, seed=3)
    cfg = PipelineConfig.model_validate({
        "warehouse": str(root), "identifiers": {"codebook_size": 8},
        "tracking": {"uri": f"sqlite:///{home / 'mlflow.db'}", "log_model": False},
        "model": {"formulation": "timeline", "timeline": {"init_ids_from_codes": False, "max_len": 64, "d_model": 32,
                                                          "d_ff": 64, "num_heads": 2, "num_layers": 1,
                                                          "tokens_per_batch": 512}},
        "train": {"epochs": 2, "lr": 3e-3, "warmup_steps": 1, "eval_every": 2, "patience": 0, "progress": False,
                  "ensemble_seeds": [7, 2025, 7]},  # the model's own seed and repeats count once
        "evaluate": {"beam_size": 8},
        # the gate's baselines need features/sasrec and features/semantic, which this warehouse
        # lacks; tests/test_registry_scoring.py covers the baseline rule
        "registry": {"compare_baselines": False}})
    return cfg, step_train(cfg)


def test_members_are_the_seed_replicas_and_the_ensemble_is_validated(trained):
    from gensar_core.model.ensemble import member_dirs
    from gensar_core.model.runs import trained_model_dir

    cfg, result = trained
    folder = Path(result["model_dir"])
    replica = folder.parent / f"{folder.name}__seed7"
    assert folder == trained_model_dir(cfg) and member_dirs(cfg) == [replica]
    assert result["ensemble_members"] == [str(folder), str(replica)] and (replica / "model.safetensors").exists()
    summary = json.loads((folder.parent / f"{folder.name}.metrics.json").read_text())
    # the ensemble's valid numbers are those of the two members decoded as one, on the cases
    # training selected checkpoints on
    from gensar_core.model.ensemble import generative_ranker
    from gensar_core.model.timeline_train import valid_cases, validate

    again = validate(generative_ranker(cfg), valid_cases(cfg, cfg.train.max_valid_examples))
    for task in ("rec", "search"):
        key = f"valid/{task}_ndcg@10"
        assert summary[f"ensemble/{key}"] == result[f"ensemble/{key}"] == pytest.approx(again[key], abs=1e-9)


def test_evaluation_decodes_the_members_together_and_the_registry_keeps_them(trained):
    import mlflow
    import pandas as pd

    from gensar_core import registry, tracking
    from gensar_core.config import with_overrides
    from gensar_core.evaluate.context import EvalContext
    from gensar_core.model.ensemble import generative_ranker
    from gensar_core.pipeline import step_register

    cfg, result = trained
    both, alone = generative_ranker(cfg), generative_ranker(with_overrides(cfg, ["train.ensemble_seeds=[]"]))
    assert len(both.models) == 2 and len(alone.models) == 1 and "ensemble of 2 models" in both.description
    cases = EvalContext(cfg).cases("test", "rec")
    lists, single = both.rank(cases, "rec", 5), alone.rank(cases, "rec", 5)
    for items, banned in zip(lists, cases["exclude"]):
        assert len(items) == min(5, 24 - len(set(banned))) and not set(items.tolist()) & set(banned.tolist())
    assert any(a.tolist() != b.tolist() for a, b in zip(lists, single))  # the member changes the ranking
    # registered with its member: the champion (batch scoring, serving) ranks exactly as evaluation
    assert step_register(cfg)["promoted"]
    champion = registry.champion_ranker(cfg)
    assert len(champion.models) == 2
    assert [x.tolist() for x in champion.rank(cases, "rec", 5)] == [x.tolist() for x in lists]
    # the served model (the registry's pyfunc) loads the member too
    tracking.configure(cfg)
    served = mlflow.pyfunc.load_model(registry.champion_uri(cfg)).unwrap_python_model()
    assert len(served.ranker.models) == 2
    history = json.dumps(list(cases["timeline"][0]))  # what a client sends: the user's events
    got = served.predict(None, pd.DataFrame({"task": ["rec"], "history": [history], "k": [5]}))
    assert got["items"][0] == [str(served.item_id_of[i]) for i in lists[0]]


def test_a_member_that_is_missing_or_speaks_another_vocabulary_is_named(trained, tmp_path):
    from gensar_core.model.generative_ranker import GenerativeRanker, ranker_settings
    from gensar_core.storage import Warehouse

    cfg, result = trained
    ids = Warehouse(cfg.warehouse).read("identifiers/items")
    other = tmp_path / "other-seed"
    shutil.copytree(Path(result["model_dir"]).parent / (Path(result["model_dir"]).name + "__seed7"), other)
    spec = json.loads((other / "tokenizer.json").read_text())
    spec["model"]["vocab"]["zzz-not-in-the-ensemble"] = max(spec["model"]["vocab"].values()) + 1
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="other-seed"):
        GenerativeRanker(result["model_dir"], ids, ranker_settings(cfg), members=[other])
    # the same vocabulary, but prompts written another way (no other-ID codes in the history)
    shutil.copytree(Path(result["model_dir"]).parent / (Path(result["model_dir"]).name + "__seed7"), other,
                    dirs_exist_ok=True)
    meta = json.loads((other / "gensar_model.json").read_text())
    meta["history_ids"] = not meta["history_ids"]
    (other / "gensar_model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="other-seed.*history_ids"):
        GenerativeRanker(result["model_dir"], ids, ranker_settings(cfg), members=[other])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        GenerativeRanker(result["model_dir"], ids, ranker_settings(cfg), members=[tmp_path / "nowhere"])
