"""The tuned baselines: a sweep on valid with early stopping, the winner trained at every seed,
and the evaluation's rankers built from what the sweep wrote."""
import json

import numpy as np
import pytest
import torch

from gensar_core.baselines import BASELINES, build_baselines
from gensar_core.baselines.tuning import (SASRecSettings, ValidCases, draw, length_batches, sweep_settings,
                                         tune_one)
from gensar_core.config import PipelineConfig, SASRecSweepConfig
from gensar_core.embed.collaborative import training_windows
from gensar_core.embed.sasrec import SASRec, SASRecConfig, baseline_dir
from gensar_core.evaluate.context import EvalContext
from gensar_core.evaluate.run import run_evaluate
from gensar_core.results import goals, write_results
from eval_warehouse import hash_encoder, write_synthetic_warehouse

DIM = 32
SWEEP = {"settings": 3, "max_epochs": 4, "patience": 1, "patience_steps": 0,
         "grid": {"lr": [3e-3, 1e-2], "dim": [16, 32], "max_len": [8, 16]}}


def config(root, **evaluate):
    return PipelineConfig(warehouse=root, seed=3, train={"ensemble_seeds": [4, 5], "progress": False},
                          tracking={"enabled": False}, evaluate={"log_mlflow": False, **evaluate},
                          baselines={"sasrec": SWEEP, "query_sasrec": {**SWEEP, "settings": 2}})


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("tuned_baselines")
    write_synthetic_warehouse(root, n_items=60, n_users=30, semantic_dim=DIM, sasrec=False, valid_events=2)
    cfg = config(root)
    ctx = EvalContext(cfg, query_encoder=hash_encoder(DIM))
    result = {name: tune_one(ctx, name, progress=False) for name in cfg.baselines.tune}
    return root, cfg, result


def test_sweep_tries_the_reference_then_distinct_grid_points():
    sweep = SASRecSweepConfig(**SWEEP)
    points = sweep_settings(sweep, seed=1)
    assert points[0] == SASRecSettings(lr=3e-3, dim=16, max_len=8)
    assert len(points) == 3 and len(set(points)) == 3
    assert sweep_settings(sweep, seed=1) == points  # seeded


def test_sweep_keeps_the_best_valid_setting_and_every_seed(tuned):
    root, cfg, result = tuned
    summary = result["sasrec"]
    rows = summary["sweep"]
    assert len(rows) == 3 and all(1 <= r["epochs"] <= 4 and r["best_epoch"] <= r["epochs"] for r in rows)
    best = max(rows, key=lambda r: r["valid_rec_ndcg10"])
    assert summary["chosen"] == best["settings"] and summary["selected_on"].startswith("valid rec")
    assert all(0 <= r["valid_search_ndcg10"] <= 1 and r["parameters"] > 0 for r in rows)
    folder = baseline_dir(root, "sasrec")
    assert json.loads((folder / "sweep.json").read_text())["chosen"] == best["settings"]
    assert sorted(p.name for p in folder.glob("seed-*")) == ["seed-3", "seed-4", "seed-5"]
    # the model kept is the best epoch's: its valid score is the best of its curve
    seed3 = summary["seeds"][3]
    assert (seed3["best_epoch"], seed3["epochs"]) == (best["best_epoch"], best["epochs"])  # the sweep's own fit
    assert seed3["valid_ndcg10"] == max(seed3["curve"]) and seed3["best_epoch"] == 1 + seed3["curve"].index(max(seed3["curve"]))
    # the query-aware model starts from SASRec's chosen architecture and is chosen on search
    q = result["query-sasrec"]
    assert q["selected_on"].startswith("valid search")
    assert {k: q["chosen"][k] for k in ("dim", "max_len")} == {k: best["settings"][k] for k in ("dim", "max_len")}


def test_tuned_models_become_the_evaluation_baselines(tuned):
    root, _, _ = tuned
    ctx = EvalContext(config(root), query_encoder=hash_encoder(DIM))
    rankers = build_baselines(ctx, BASELINES)
    assert ctx.sasrec_tuned and rankers["sasrec"].models[0] is ctx.tuned("sasrec")[0]
    assert len(rankers["sasrec-x3"].models) == 3 and "tuned on valid" in rankers["sasrec"].description
    # the ensemble's members alone give SASRec's seed spread
    assert [rankers[f"sasrec@seed{s}"].models for s in (4, 5)] == [[m] for m in ctx.tuned("sasrec")[1:]]
    cases = ctx.cases("test", "search")
    x3 = rankers["sasrec-x3"].score(cases, "search")
    one = [m.score([list(s) for s in cases["seq"]]) for m in ctx.tuned("sasrec")]
    np.testing.assert_allclose(x3, np.mean(one, axis=0), rtol=1e-5)
    # the query-aware model's search scores depend on the query
    other = cases.assign(query=cases["query"].iloc[::-1].to_numpy())
    q = rankers["query-sasrec"]
    assert not np.allclose(q.score(cases, "search"), q.score(other, "search"))
    for name, ranker in rankers.items():
        for task in ("rec", "search"):
            cases = ctx.cases("test", task)
            for ranked, exclude in zip(ranker.rank(cases, task, 5), cases["exclude"]):
                assert len(ranked) == 5 and not set(ranked.tolist()) & set(exclude.tolist()), name


def test_tuned_only_baselines_name_the_step_when_missing(tmp_path):
    write_synthetic_warehouse(tmp_path, n_items=40, n_users=12, semantic_dim=DIM, sasrec=True, sasrec_epochs=1)
    ctx = EvalContext(config(tmp_path), query_encoder=hash_encoder(DIM))
    assert not ctx.sasrec_tuned and "untuned" in build_baselines(ctx, ["sasrec"])["sasrec"].description
    with pytest.raises(FileNotFoundError, match="tune_baselines"):
        build_baselines(ctx, ["sasrec-x3"])


def test_results_publish_the_report_with_costs_sweeps_and_goals(tuned, tmp_path):
    root, _, _ = tuned
    cfg = config(root, baselines=list(BASELINES), compare=[["sasrec", "sasrec-x3"]], protocols=["full"])
    run_evaluate(cfg, ctx=EvalContext(cfg, query_encoder=hash_encoder(DIM)))
    results = write_results({"toy": root}, tmp_path)
    toy = results["toy"]
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))
    one, three = toy["methods"]["sasrec"], toy["methods"]["sasrec-x3"]
    assert (one["members"], three["members"]) == (1, 3) and one["kind"] == "baseline"
    assert three["parameters"] == 3 * one["parameters"] > 0
    assert three["train_seconds"] > one["train_seconds"] > 0 and one["rank_ms_per_case"] > 0
    assert 0 <= one["rec_ndcg10"] <= 1 and 0 <= one["search_hr10"] <= 1
    assert len(toy["sweeps"]["sasrec"]) == 3 and len(toy["sweeps"]["query-sasrec"]) == 2
    assert {"top_n", "alpha"} == set(toy["sweeps"]["bm25+sasrec"][0]["settings"])
    assert set(toy["paired"]["sasrec vs sasrec-x3"]) == {"rec", "search"}
    assert toy["seed_spread"]["sasrec"]["full"]["rec"]["NDCG@10"]["n"] == 3
    assert not any("@seed" in name for name in toy["methods"])
    # without a generative model no goal can be reached, and the report says so
    assert [g["reached"] for g in toy["goals"]] == [False, False, False]
    md = (tmp_path / "results.md").read_text()
    assert "## toy" in md and "| sasrec-x3 | baseline | 3 |" in md and "| no |" in md


def test_goals_are_ratios_of_the_test_numbers():
    methods = {"gensar": {"rec_ndcg10": 0.11, "search_ndcg10": 0.66}, "sasrec": {"rec_ndcg10": 0.10},
               "gensar-x3": {"rec_ndcg10": 0.12}, "sasrec-x3": {"rec_ndcg10": 0.12},
               "bm25+sasrec": {"search_ndcg10": 0.5}, "query-sasrec": {"search_ndcg10": 0.62}}
    rec_one, rec_three, search = goals(methods)
    assert (rec_one["ratio"], rec_one["reached"]) == (1.1, True)
    assert (rec_three["ratio"], rec_three["reached"]) == (1.0, False)
    assert "query-sasrec" in search["goal"] and search["ratio"] == round(0.66 / 0.62, 3) and not search["reached"]


def test_length_batches_cut_padding_without_changing_what_the_model_computes():
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(0, 30, size=n)) for n in rng.integers(2, 40, size=50)]
    windows = training_windows(seqs, 16, rng)
    batches = length_batches(windows, 8, rng)
    assert sum(len(b) for b in batches) == len(windows)
    assert sorted(map(tuple, np.concatenate([np.pad(b.numpy(), ((0, 0), (17 - b.shape[1], 0))) for b in batches]))) \
        == sorted(map(tuple, windows))
    assert all((b[:, 0] != 0).any() for b in batches)  # each cut to its longest window
    model = SASRec(SASRecConfig(num_items=30, dim=16, max_len=16, dropout=0.0)).eval()
    short = next(b for b in batches if b.shape[1] < 17)[:, :-1]
    full = torch.nn.functional.pad(short, (16 - short.shape[1], 0))
    with torch.no_grad():
        torch.testing.assert_close(model(short)[:, -1], model(full)[:, -1], rtol=1e-4, atol=1e-5)


def test_early_stopping_reads_a_seeded_draw_of_the_valid_cases():
    valid = ValidCases([[i] for i in range(10)], None, np.arange(10) + 100, [np.array([i]) for i in range(10)])
    some = draw(valid, 4, seed=1)
    assert len(some.targets) == 4 and some.targets.tolist() == [h[0] + 100 for h in some.histories]
    assert draw(valid, 4, seed=1).targets.tolist() == some.targets.tolist()
    assert draw(valid, None, seed=1) is valid and draw(valid, 10, seed=1) is valid
