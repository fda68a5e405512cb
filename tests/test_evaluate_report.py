"""run_evaluate end to end on tiny data: the report files, the table, plugged-in rankers, MLflow."""
import json

import numpy as np
import pytest
import torch

from gensar_core import tracking
from gensar_core.baselines import BASELINES, TUNED_ONLY
from gensar_core.config import PipelineConfig
from gensar_core.evaluate.run import run_evaluate
from gensar_core.evaluate.context import EvalContext
from gensar_core.evaluate.report import markdown_table
from eval_warehouse import hash_encoder, write_synthetic_warehouse

DIM = 32



@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_report")
    write_synthetic_warehouse(root, n_items=120, n_users=24, semantic_dim=DIM, sasrec=True, sasrec_epochs=1)
    return root


def config(root, **evaluate):
    return PipelineConfig(warehouse=root, evaluate={"log_mlflow": False, "retrieve_top_n": 100, "blend_alpha": 0.5,
                                                                  **evaluate})


class Oracle:
    description = "returns the target (a stand-in for a plugged-in model)"

    def rank(self, cases, task, k, candidates=None):
        return [np.array([t]) for t in cases["target"]]


class RecOnly:
    def rank(self, cases, task, k, candidates=None):
        if task == "search":
            raise NotImplementedError
        return [np.arange(k)] * len(cases)


def test_report_files_table_and_plugged_in_rankers(root):
    cfg = config(root)
    ctx = EvalContext(cfg, query_encoder=hash_encoder(DIM))
    out = run_evaluate(cfg, {"gensar": Oracle(), "rec-only": RecOnly()}, ctx=ctx)
    folder = root / "reports" / "eval-test"
    assert out["report"]["dir"] == str(folder)
    for name in ("report.md", "metrics.json", "tradeoff.png"):
        assert (folder / name).is_file() and out["report"][name] == str(folder / name)
    assert (folder / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    md = (folder / "report.md").read_text()
    methods = [b for b in BASELINES if b not in TUNED_ONLY] + ["gensar", "rec-only"]
    for protocol_title in ("Full-catalogue ranking", "target among 100 candidates"):
        assert protocol_title in md
    assert "excluded" in md  # the history exclusion is stated
    header = next(line for line in md.splitlines() if line.startswith("| Method"))
    for task in ("Rec", "Search"):
        for metric in ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10"):
            assert f"{task} {metric}" in header
    # the paired tables' rows name their reference ("vs ..."); their headers start with "| Method"
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| Method")
            and " vs " not in line]
    assert len(rows) == 2 * len(methods)  # one table per protocol
    for m in methods:
        assert sum(1 for r in rows if r.startswith(f"| {m} |")) == 2
    oracle_row = next(r for r in rows if r.startswith("| gensar |"))
    assert oracle_row.count("1.0000") == 10
    assert "n/a" in next(r for r in rows if r.startswith("| rec-only |"))

    # the plugged-in rankers paired with the best baseline of each task, case by case
    paired = {line.split(" | ")[0][2:]: line for line in md.splitlines() if line.startswith("| ") and " vs " in line}
    assert set(paired) == {"gensar", "rec-only"} and "| n/a |" in paired["rec-only"]
    saved = json.loads((folder / "metrics.json").read_text())
    for task in ("rec", "search"):
        p = saved["paired"]["gensar"][task]
        best = max((b for b in BASELINES if b not in TUNED_ONLY), key=lambda b: saved["methods"][b]["full"][task]["NDCG@10"])
        assert p["against"] == best and p["n"] == out["cases"][task]
        assert p["diff"] == pytest.approx(1.0 - saved["methods"][best]["full"][task]["NDCG@10"])
        assert p["low"] <= p["diff"] <= p["high"]
    assert "search" not in saved["paired"]["rec-only"]
    # and every other plugged-in model with the headline model (`gensar`, here the oracle)
    assert "minus gensar" in md and set(saved["paired_headline"]) == {"rec-only"}
    p = saved["paired_headline"]["rec-only"]["rec"]
    rec_only = saved["methods"]["rec-only"]["full"]["rec"]["NDCG@10"]
    assert p["against"] == "gensar" and p["diff"] == pytest.approx(rec_only - 1.0)
    assert "search" not in saved["paired_headline"]["rec-only"]

    assert set(saved["methods"]) == set(methods)
    assert saved["methods"]["gensar"]["sampled"]["search"]["HR@1"] == 1.0
    assert saved["meta"]["cases"] == out["cases"] and out["cases"]["rec"] > 0 and out["cases"]["search"] > 0
    assert saved["info"]["bm25+sasrec"]["alpha"] == 0.5

    # a rerun swaps the folder whole, leaving no staging or backup folders behind
    run_evaluate(config(root, baselines=["popularity"]), ctx=EvalContext(config(root, baselines=["popularity"])))
    assert sorted(p.name for p in (root / "reports").iterdir()) == ["eval-test"]
    assert set(json.loads((folder / "metrics.json").read_text())["methods"]) == {"popularity"}


def test_extra_ranker_checks(root):
    cfg = config(root, baselines=["popularity"], report_name="checks")
    with pytest.raises(ValueError, match="baseline"):
        run_evaluate(cfg, {"popularity": Oracle()})
    with pytest.raises(TypeError, match="rank"):
        run_evaluate(cfg, {"broken": object()})


def test_markdown_table_marks_missing_tasks():
    results = {"methods": {"a": {"full": {"rec": {"HR@1": 0.5, "HR@5": 1, "HR@10": 1, "NDCG@5": 0.7,
                                                  "NDCG@10": 0.7}, "search": None}}}}
    table = markdown_table(results, "full")
    assert table.splitlines()[2] == "| a | 0.5000 | 1.0000 | 1.0000 | 0.7000 | 0.7000 | n/a | n/a | n/a | n/a | n/a |"


def test_logs_to_mlflow(root, tmp_path, monkeypatch):
    monkeypatch.setenv("GENSAR_HOME", str(tmp_path / "home"))
    cfg = PipelineConfig(warehouse=root, tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
                         evaluate={"baselines": ["popularity"], "protocols": ["full"], "report_name": "mlflow",
                                   "log_mlflow": True})
    out = run_evaluate(cfg, {"oracle": Oracle()})
    assert out["mlflow_run_id"]
    run = tracking.get_run(cfg, out["mlflow_run_id"])
    assert run.data.metrics["eval/oracle/full/rec/HR_1"] == 1.0
    assert "report/report.md" in tracking.list_artifacts(cfg, out["mlflow_run_id"])


def test_a_broken_tracking_store_fails_the_evaluation(root, tmp_path, monkeypatch):
    """A store that cannot be written must fail the step, not leave it green and unrecorded."""
    monkeypatch.setenv("GENSAR_HOME", str(tmp_path / "home"))
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the store's folder should be")
    cfg = PipelineConfig(warehouse=root, tracking={"uri": f"sqlite:///{blocker / 'mlflow.db'}"},
                         evaluate={"baselines": ["popularity"], "protocols": ["full"], "report_name": "broken",
                                   "log_mlflow": True})
    with pytest.raises(NotADirectoryError, match="not-a-dir"):
        run_evaluate(cfg, {"oracle": Oracle()})
    assert (root / "reports" / "broken" / "report.md").is_file()  # the report itself is kept


class EveryOther:
    """The target at the top for even cases, else not at all: HR@k 0.5 on both tasks."""

    def rank(self, cases, task, k, candidates=None):
        return [np.array([t]) if i % 2 == 0 else np.array([], dtype=np.int64)
                for i, t in enumerate(cases["target"])]


def test_models_trained_at_several_seeds_get_mean_and_sd(root):
    """`evaluate.seeds`: the rows '<model>@seed<S>' and the model's own are summarised as mean ±
    sample sd, in the report, metrics.json, MLflow's flat metrics and as one point of the plot."""
    from gensar_core.evaluate.report import flat_metrics, tradeoff_points

    cfg = config(root, baselines=["popularity"], protocols=["full"], report_name="seeds",
                 variants={"rec-only": []}, seeds={"gensar": [7, 8], "rec-only": [7]})
    rankers = {"gensar": Oracle(), "gensar@seed7": EveryOther(), "gensar@seed8": Oracle(),
               "rec-only": RecOnly()}  # rec-only@seed7 was not evaluated: no group
    run_evaluate(cfg, rankers)
    saved = json.loads((root / "reports" / "seeds" / "metrics.json").read_text())
    assert saved["seed_groups"] == {"gensar": ["gensar", "gensar@seed7", "gensar@seed8"]}
    hr = {m: saved["methods"][m]["full"]["rec"]["HR@10"] for m in saved["seed_groups"]["gensar"]}
    stats = saved["seed_summary"]["gensar"]["full"]["rec"]["HR@10"]
    assert stats["n"] == 3
    assert stats["mean"] == pytest.approx(np.mean(list(hr.values())))
    assert stats["sd"] == pytest.approx(np.std(list(hr.values()), ddof=1)) and stats["sd"] > 0
    md = (root / "reports" / "seeds" / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| gensar | 3 |"))
    assert f"{stats['mean']:.4f} ± {stats['sd']:.4f}" in row
    points = tradeoff_points(saved)
    assert "gensar (3 seeds)" in points and "gensar@seed7" not in points and "gensar" not in points
    assert points["gensar (3 seeds)"][2] == pytest.approx(
        saved["seed_summary"]["gensar"]["full"]["rec"]["NDCG@10"]["sd"])
    assert flat_metrics(saved)["eval/gensar@mean/full/rec/HR@10"] == pytest.approx(stats["mean"])
