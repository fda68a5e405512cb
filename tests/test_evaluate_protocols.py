"""Cases, history exclusion, the paper's candidate samplers and evaluate_ranker on tiny data."""
import numpy as np
import pandas as pd
import pytest

from gensar_core.config import PipelineConfig
from gensar_core.evaluate.context import EvalContext
from gensar_core.evaluate.protocols import (
    bm25_hard_negatives, clean_ranked_lists, evaluate_ranker, popularity_negatives, sampled_candidates,
)
from gensar_core.evaluate.ranking import ScoreRanker
from eval_warehouse import write_synthetic_warehouse


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_protocols")
    frames = write_synthetic_warehouse(root, n_items=160, n_users=40, semantic_dim=None, sasrec=False)
    return root, frames


def make_ctx(root, **evaluate):
    return EvalContext(PipelineConfig(warehouse=root, evaluate={"log_mlflow": False, **evaluate}))


@pytest.fixture(scope="module")
def ctx(warehouse):
    return make_ctx(warehouse[0])


class Oracle:
    """Returns the target first: every hit the protocol allows."""

    def rank(self, cases, task, k, candidates=None):
        return [np.array([t]) for t in cases["target"]]


class HistoryFirst(ScoreRanker):
    """Scores the user's own history items highest: the protocol must keep them out."""

    def score(self, cases, task):
        s = np.zeros((len(cases), self.ctx.n_items), dtype=np.float32)
        for i, seq in enumerate(cases["seq"]):
            s[i, seq] = 10.0
        return s


def test_cases_follow_the_splits(ctx, warehouse):
    _, frames = warehouse
    test = frames["test"]
    rec, search = ctx.cases("test", "rec"), ctx.cases("test", "search")
    assert len(rec) + len(search) == len(test) and len(rec) and len(search)
    assert set(test.loc[test["behavior"] == "search", "query"]) == set(search["query"])
    assert (search["query"].str.len() > 0).all()
    earlier = pd.concat([frames["train"], frames["valid"]]).sort_values(["user_id", "ts", "position"])
    for case in pd.concat([rec, search]).itertuples():
        assert ctx.item_index[case.item_id] == case.target
        mine = earlier[earlier["user_id"] == case.user_id]
        expected = [ctx.item_index[i] for i in mine["item_id"]]
        assert case.seq.tolist() == expected  # train + valid, by (ts, position)
        assert set(case.exclude.tolist()) == set(expected)
        assert [ctx.item_index[h["item_id"]] for h in case.history] == case.history_idx.tolist()
    # valid cases see train only
    valid = ctx.cases("valid", "rec").iloc[0]
    train_items = frames["train"][frames["train"]["user_id"] == valid.user_id]["item_id"]
    assert set(valid.exclude.tolist()) == {ctx.item_index[i] for i in train_items}


def test_valid_cases_of_several_valid_events_see_every_earlier_event(tmp_path):
    frames = write_synthetic_warehouse(tmp_path, n_items=160, n_users=12, semantic_dim=None, sasrec=False,
                                       valid_events=3)
    ctx = make_ctx(tmp_path)
    valid = pd.concat([ctx.cases("valid", "rec"), ctx.cases("valid", "search")])
    assert len(valid) == len(frames["valid"]) == 3 * frames["valid"]["user_id"].nunique()
    ordered = pd.concat([frames["train"], frames["valid"]]).sort_values(["user_id", "ts", "position"])
    for case in valid.itertuples():
        mine = ordered[ordered["user_id"] == case.user_id]
        before = mine[(mine["ts"] < case.ts) | ((mine["ts"] == case.ts) & (mine["position"] < case.position))]
        expected = [ctx.item_index[i] for i in before["item_id"]]
        assert case.seq.tolist() == expected  # train, then the earlier valid events
        assert set(case.exclude.tolist()) == set(expected)  # the earlier valid items are history too
        assert len(case.timeline) == len(expected)


def test_full_ranking_excludes_history(ctx):
    cfg = ctx.cfg
    ranker = HistoryFirst(ctx)
    for task in ("rec", "search"):
        cases = ctx.cases("test", task)
        lists = ranker.rank(cases, task, 10)
        for ranked, exclude in zip(lists, cases["exclude"]):
            assert len(ranked) == 10
            assert not set(ranked.tolist()) & set(exclude.tolist())
    # a ranker that returns only history items gets nothing through the protocol
    class Cheat:
        def rank(self, cases, task, k, candidates=None):
            return [np.asarray(s[-k:]) for s in cases["seq"]]

    out = evaluate_ranker(Cheat(), cfg, ctx=ctx, protocols=["full"])
    for task in ("rec", "search"):
        assert out["full"][task]["HR@10"] == 0.0
        assert out["full"][task]["dropped"]["not_allowed"] > 0


def test_clean_ranked_lists():
    cases = pd.DataFrame({"exclude": [np.array([1, 2]), np.array([], dtype=np.int64)]})
    lists, dropped = clean_ranked_lists([np.array([1, 5, 5, 99, 3, 4]), np.array([0, 1, 2])], cases, 10, k=2)
    assert [x.tolist() for x in lists] == [[5, 3], [0, 1]]
    assert dropped == {"unknown": 1, "repeated": 1, "not_allowed": 1}
    lists, dropped = clean_ranked_lists([np.array([7, 3]), np.array([4])], cases, 10, k=5,
                                        candidates=[np.array([3, 4]), np.array([4])])
    assert [x.tolist() for x in lists] == [[3], [4]] and dropped["not_allowed"] == 1


def test_popularity_negatives_unit():
    rng = np.random.default_rng(0)
    pop = np.array([0, 5, 0, 1, 1, 0, 0, 0], dtype=float)
    # target 3, history [1]: the only clicked item left is 4, the rest comes from never-clicked items
    neg = popularity_negatives(3, np.array([1]), pop, 3, rng)
    assert len(set(neg.tolist())) == 3 and 4 in neg and not {1, 3} & set(neg.tolist())
    # proportional: the heavy item is drawn far more often
    pop = np.array([100.0] + [1.0] * 20)
    draws = np.concatenate([popularity_negatives(20, np.array([], dtype=np.int64), pop, 1, rng) for _ in range(300)])
    assert (draws == 0).mean() > 0.6
    # too small a catalogue: everything that is left
    assert sorted(popularity_negatives(0, np.array([1]), np.ones(4), 10, rng).tolist()) == [2, 3]


def test_rec_candidates_100_distinct_with_target_no_history_deterministic(ctx, warehouse):
    cases = ctx.cases("test", "rec")
    cands = sampled_candidates(ctx, "test", "rec")
    assert len(cands) == len(cases)
    pop = ctx.popularity
    for cand, target, exclude in zip(cands, cases["target"], cases["exclude"]):
        assert len(cand) == 100 and len(np.unique(cand)) == 100
        assert target in cand
        assert not set(cand.tolist()) & set(exclude.tolist())
        negatives = cand[cand != target]
        clicked_left = int((pop > 0).sum()) - len(set(exclude.tolist()) | {int(target)})
        if clicked_left >= 99:
            assert (pop[negatives] > 0).all()
    again = sampled_candidates(make_ctx(warehouse[0]), "test", "rec")
    assert all(np.array_equal(a, b) for a, b in zip(cands, again))
    other = sampled_candidates(make_ctx(warehouse[0], seed=99), "test", "rec")
    assert not all(np.array_equal(a, b) for a, b in zip(cands, other))


def test_search_candidates_are_bm25_hard_negatives(ctx, warehouse):
    cases = ctx.cases("test", "search")
    cands = sampled_candidates(ctx, "test", "search")
    for cand, target, query in zip(cands, cases["target"], cases["query"]):
        assert len(cand) == 100 and len(np.unique(cand)) == 100 and target in cand
        scores = ctx.bm25.scores([query])[0]
        negatives = cand[cand != target]
        rest = np.setdiff1d(np.arange(ctx.n_items), cand)
        assert scores[negatives].min() >= scores[rest].max()
        assert scores[negatives].max() > 0
    again = sampled_candidates(make_ctx(warehouse[0]), "test", "search")
    assert all(np.array_equal(a, b) for a, b in zip(cands, again))
    # unit: the n best by score, the target left out
    scores = np.array([5.0, 1.0, 4.0, 3.0, 0.0])
    assert sorted(bm25_hard_negatives(scores, 0, 2).tolist()) == [2, 3]


def test_evaluate_ranker_shape_and_oracle(ctx):
    out = evaluate_ranker(Oracle(), ctx.cfg, "test", ctx=ctx)
    assert set(out) == {"full", "sampled"}
    for protocol in ("full", "sampled"):
        for task in ("rec", "search"):
            m = out[protocol][task]
            assert m["n"] == len(ctx.cases("test", task))
            assert m["HR@1"] == 1.0 and m["NDCG@10"] == 1.0  # no repeats: targets are never history


def test_unsupported_task_is_none(ctx):
    class RecOnly:
        def rank(self, cases, task, k, candidates=None):
            if task == "search":
                raise NotImplementedError
            return [np.array([t]) for t in cases["target"]]

    out = evaluate_ranker(RecOnly(), ctx.cfg, "test", ctx=ctx, protocols=["full"])
    assert out["full"]["search"] is None and out["full"]["rec"]["HR@1"] == 1.0


def test_max_cases_samples_a_seeded_subset(warehouse):
    a = make_ctx(warehouse[0], max_cases=5).cases("test", "rec")
    b = make_ctx(warehouse[0], max_cases=5).cases("test", "rec")
    assert len(a) == 5 and a["user_id"].tolist() == b["user_id"].tolist()


def test_running_histories_restart_at_each_user():
    from gensar_core.embed.collaborative import running_histories

    got = running_histories(["a", "a", "b", "b", "b"], [1, 2, 3, 4, 5], {"a": [9], "c": [7]})
    assert got == [[9], [9, 1], [], [3], [3, 4]]
