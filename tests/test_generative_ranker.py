"""A trained generative model ranks real cases through the evaluation protocols."""
from __future__ import annotations

import numpy as np
import pytest

from gensar_core.evaluate.context import EvalContext
from gensar_core.evaluate.protocols import evaluate_ranker
from gensar_core.pipeline import generative_rankers
from gensar_core.storage import Warehouse


@pytest.fixture(scope="module")
def trained(toy_model):
    return toy_model


def test_ranker_returns_valid_unseen_items(trained):
    ranker = generative_rankers(trained)["gensar"]
    ctx = EvalContext(trained)
    n_items = len(Warehouse(trained.warehouse).read("identifiers/items"))
    for task in ("rec", "search"):
        cases = ctx.cases("test", task)
        ranked = ranker.rank(cases, task, k=5)
        assert len(ranked) == len(cases)
        for items, ex in zip(ranked, cases["exclude"]):
            # history is banned inside the beam: a list is short only when fewer items are allowed
            assert len(items) == min(5, n_items - len(set(np.asarray(ex).tolist())))
            assert len(set(items.tolist())) == len(items)
            assert ((items >= 0) & (items < n_items)).all()
            assert not set(items.tolist()) & set(np.asarray(ex).tolist())


def test_ranker_under_both_protocols(trained):
    ranker = generative_rankers(trained)["gensar"]
    result = evaluate_ranker(ranker, trained, "test")
    for protocol in ("full", "sampled"):
        for task in ("rec", "search"):
            m = result[protocol][task]
            assert m is not None and 0.0 <= m["NDCG@10"] <= 1.0 and m["HR@10"] >= m["HR@1"]


def test_tiger_style_variant_in_the_same_report(toy_model, tmp_path):
    """A single-ID (semantic IDs everywhere) model trained beside GenSAR is evaluated as a variant."""
    import shutil

    from gensar_core.config import with_overrides
    from gensar_core.evaluate.run import run_evaluate
    from gensar_core.pipeline import step_build_corpus, step_train

    shutil.copytree(toy_model.warehouse, tmp_path / "wh")
    cfg = with_overrides(toy_model, [f"warehouse={tmp_path / 'wh'}", "tracking.enabled=false",
                                     'evaluate.variants={"tiger-style": ["corpus.id_scheme=semantic"]}',
                                     "evaluate.protocols=[full]"])
    tiger = with_overrides(cfg, ["corpus.id_scheme=semantic"])
    step_build_corpus(tiger)
    rec = Warehouse(tiger.warehouse).read("corpus/rec")
    assert rec["target_text"].str.contains(r"<rec_item><a_\d+><b_\d+><s_\d+><t_\d+>", regex=True).all()
    step_train(tiger)
    rankers = generative_rankers(cfg)
    assert set(rankers) == {"gensar", "tiger-style"}
    # the single-ID model decodes semantic IDs for recommendation too; GenSAR collaborative ones
    tiger, gensar = rankers["tiger-style"].sequences, rankers["gensar"].sequences
    assert (tiger["rec"] == tiger["search"]).all() and not (gensar["rec"] == gensar["search"]).all()
    result = run_evaluate(cfg, extra_rankers=rankers)
    assert {"gensar", "tiger-style"} <= set(result["methods"])


def test_scoring_setting_reaches_the_decoder(trained):
    """`evaluate.scoring` picks the decoder's softmax: the prefix-renormalised log-probs are never
    below the full-vocabulary ones of the same items (they divide by less mass)."""
    from gensar_core.config import with_overrides

    ctx = EvalContext(trained)
    cases = ctx.cases("test", "rec").head(4)
    scores = {}
    for scoring in ("prefix", "vocab"):
        ranker = generative_rankers(with_overrides(trained, [f"evaluate.scoring={scoring}"]))["gensar"]
        assert ranker.scoring == scoring
        items, sc = ranker.decode(ranker.prompts(cases, "rec"), "rec", beam=5, top_k=5)
        scores[scoring] = {(row, item): score for row in range(len(items))
                           for item, score in zip(items[row].tolist(), sc[row].tolist())}
        assert (sc <= 1e-6).all()
    common = set(scores["prefix"]) & set(scores["vocab"])
    assert common and all(scores["prefix"][i] >= scores["vocab"][i] - 1e-5 for i in common)
