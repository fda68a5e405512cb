"""Every baseline returns valid item indexes under both protocols; each does what it says."""
import numpy as np
import pytest
import torch

from gensar_core.baselines import BASELINES, TUNED_ONLY, build_baselines
from gensar_core.baselines.bm25 import case_queries
from gensar_core.baselines.two_stage import ALPHAS, DEPTHS, TwoStageRanker
from gensar_core.config import PipelineConfig
from gensar_core.evaluate.context import EvalContext
from gensar_core.evaluate.protocols import sampled_candidates
from eval_warehouse import hash_encoder, write_synthetic_warehouse

DIM = 64



@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_baselines")
    write_synthetic_warehouse(root, n_items=150, n_users=36, semantic_dim=DIM, sasrec=True, sasrec_epochs=2)
    return root


def make_ctx(root, **evaluate):
    cfg = PipelineConfig(warehouse=root, evaluate={"log_mlflow": False, **evaluate})
    return EvalContext(cfg, query_encoder=hash_encoder(DIM))


@pytest.fixture(scope="module")
def ctx(root):
    return make_ctx(root)


@pytest.fixture(scope="module")
def rankers(ctx):
    return build_baselines(ctx)


def test_every_baseline_returns_valid_items(ctx, rankers):
    assert list(rankers) == [n for n in BASELINES if n not in TUNED_ONLY]
    for name, ranker in rankers.items():
        for task in ("rec", "search"):
            cases = ctx.cases("test", task)
            full = ranker.rank(cases, task, 10)
            assert len(full) == len(cases), name
            for ranked, exclude in zip(full, cases["exclude"]):
                assert ranked.dtype == np.int64 and len(ranked) == 10, (name, task)
                assert len(np.unique(ranked)) == 10
                assert ((ranked >= 0) & (ranked < ctx.n_items)).all()
                assert not set(ranked.tolist()) & set(exclude.tolist()), (name, task)
            cands = sampled_candidates(ctx, "test", task)
            sampled = ranker.rank(cases, task, 10, cands)
            for ranked, cand in zip(sampled, cands):
                assert len(ranked) == 10 and set(ranked.tolist()) <= set(cand.tolist()), (name, task)


def test_popularity_is_train_counts(ctx, rankers):
    cases = ctx.cases("test", "rec")
    pop = ctx.popularity
    ranked = rankers["popularity"].rank(cases.iloc[:1], "rec", 5)[0]
    allowed = np.setdiff1d(np.arange(ctx.n_items), cases["exclude"].iloc[0])
    assert pop[ranked].min() >= np.sort(pop[allowed])[-5]


def test_sasrec_scores_the_full_sequence(ctx, rankers):
    cases = ctx.cases("test", "search")
    scores = rankers["sasrec"].score(cases, "search")
    expected = ctx.sasrec.score([c.tolist() for c in cases["seq"]])
    np.testing.assert_allclose(scores, expected, rtol=1e-6)


def test_bm25_finds_the_item_by_its_title(ctx, rankers):
    cases = ctx.cases("test", "search").iloc[:3].copy()
    cases["query"] = [ctx.items["title"].iat[t] for t in cases["target"]]
    cases["exclude"] = [np.zeros(0, dtype=np.int64)] * len(cases)
    top = rankers["bm25"].rank(cases, "search", 1)
    assert [int(t[0]) for t in top] == cases["target"].tolist()
    # recommendation: the recent history's queries and titles are the query
    rec = ctx.cases("test", "rec").iloc[:2]
    for text, hist in zip(case_queries(ctx, rec, "rec"), rec["history"]):
        for h in hist:
            assert ctx.items["title"].iat[ctx.item_index[h["item_id"]]] in text
            if h["query"]:
                assert h["query"] in text


def test_dense_uses_query_and_history_mean(ctx, rankers):
    dense = rankers["dense"]
    search = ctx.cases("test", "search").iloc[:2]
    np.testing.assert_allclose(dense.score(search, "search"),
                               hash_encoder(DIM)(search["query"].tolist()) @ ctx.semantic_vectors.T, atol=1e-5)
    rec = ctx.cases("test", "rec").iloc[:2]
    for i, hist in enumerate(rec["history_idx"]):
        mean = ctx.semantic_vectors[hist].mean(axis=0)
        np.testing.assert_allclose(dense.user_vectors(rec, "rec")[i], mean / np.linalg.norm(mean), atol=1e-5)


def test_two_stage_blend_ends(ctx, rankers):
    cases = ctx.cases("test", "search")
    bm25, sasrec = rankers["bm25"], rankers["sasrec"]
    # alpha 1: the retriever's own order
    pure = TwoStageRanker(ctx, bm25, sasrec, top_n=100, alpha=1.0)
    mask_free = [r.tolist() for r in bm25.rank(cases, "search", 10)]
    got = [r.tolist() for r in pure.rank(cases, "search", 10)]
    for a, b, query in zip(got, mask_free, cases["query"]):
        scores = ctx.bm25.scores([query])[0]
        np.testing.assert_allclose(scores[a], scores[b])  # same scores (ties may swap places)
    # alpha 0 over the whole catalogue: SASRec's order
    personal = TwoStageRanker(ctx, bm25, sasrec, top_n=ctx.n_items, alpha=0.0)
    assert [r.tolist() for r in personal.rank(cases, "search", 10)] == \
        [r.tolist() for r in sasrec.rank(cases, "search", 10)]
    # first stage: only the retriever's top-N survive
    narrow = TwoStageRanker(ctx, bm25, sasrec, top_n=5, alpha=0.0)
    for ranked, top5 in zip(narrow.rank(cases, "search", 10), bm25.rank(cases, "search", 5)):
        assert set(ranked.tolist()) == set(top5.tolist())
    # rec traffic goes to the recommender
    rec = ctx.cases("test", "rec")
    assert [r.tolist() for r in pure.rank(rec, "rec", 10)] == [r.tolist() for r in sasrec.rank(rec, "rec", 10)]


def test_two_stage_depth_and_alpha_are_tuned_on_the_split_before_the_scored_one(root, ctx, rankers):
    ranker = rankers["bm25+sasrec"]  # scoring test: tuned on valid
    assert ranker.alpha in ALPHAS and ranker.top_n in DEPTHS + (ctx.n_items,)
    info = ranker.info()
    assert info["tuned_on"].startswith("valid search cases")
    settings = [row["settings"] for row in info["sweep"]]
    depths = sorted({s["top_n"] for s in settings})
    assert depths == ([d for d in DEPTHS if d < ctx.n_items] or [ctx.n_items])
    assert len(settings) == len(ALPHAS) * len(depths)
    best = max(row["valid_search_ndcg10"] for row in info["sweep"])
    chosen = next(row for row in info["sweep"] if row["settings"] == {"top_n": ranker.top_n, "alpha": ranker.alpha})
    assert chosen["valid_search_ndcg10"] == best
    # a depth fixed in the config is kept; only the blend is tuned
    fixed = TwoStageRanker(ctx, rankers["bm25"], rankers["sasrec"], top_n=7)
    assert fixed.alpha in ALPHAS and fixed.top_n == 7 and len(fixed.info()["sweep"]) == len(ALPHAS)
    # scoring valid: tuned on train, never on the cases being scored
    on_valid = build_baselines(make_ctx(root, split="valid"), ["bm25+sasrec"])["bm25+sasrec"]
    assert on_valid.alpha in ALPHAS and on_valid.info()["tuned_on"].startswith("train search cases")


def test_two_stage_without_tuning_cases_fails_loudly(root, monkeypatch):
    ctx = make_ctx(root)
    ranker = build_baselines(ctx, ["bm25+sasrec"])["bm25+sasrec"]
    no_cases = ctx.cases("valid", "search").iloc[:0]
    monkeypatch.setattr(ctx, "cases", lambda split, task: no_cases)
    with pytest.raises(ValueError, match="splits/valid has no search cases.*blend_alpha"):
        ranker.alpha


def test_missing_inputs_name_the_step(tmp_path):
    write_synthetic_warehouse(tmp_path, n_items=120, n_users=8, semantic_dim=None, sasrec=False)
    ctx = make_ctx(tmp_path)
    with pytest.raises(FileNotFoundError, match="embed_collaborative"):
        build_baselines(ctx, ["sasrec"])
    with pytest.raises(FileNotFoundError, match="embed_semantic"):
        build_baselines(ctx, ["dense"])
    assert list(build_baselines(ctx, ["popularity", "bm25"])) == ["popularity", "bm25"]
    with pytest.raises(ValueError, match="unknown baseline"):
        build_baselines(ctx, ["gru4rec"])


def test_dense_with_the_packaged_minilm(tmp_path):
    """The real encoder: features/semantic from embed_semantic, queries encoded with MiniLM."""
    from gensar_core.embed.semantic import run_embed_semantic

    write_synthetic_warehouse(tmp_path, n_items=110, n_users=10, semantic_dim=None, sasrec=False)
    cfg = PipelineConfig(warehouse=tmp_path, embed={"semantic": {"device": "cpu"}})
    run_embed_semantic(cfg, progress=False)
    ctx = EvalContext(cfg)
    ranker = build_baselines(ctx, ["dense"])["dense"]
    cases = ctx.cases("test", "search").iloc[:3].copy()
    cases["query"] = [ctx.items["title"].iat[t] for t in cases["target"]]
    cases["exclude"] = [np.zeros(0, dtype=np.int64)] * len(cases)
    top = ranker.rank(cases, "search", 3)
    assert all(int(t) in r.tolist() for t, r in zip(cases["target"], top))
