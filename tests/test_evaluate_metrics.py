"""Ranking metrics against hand-computed cases, and the top-k helper they are fed by."""
import math

import numpy as np
import pytest

from gensar_core.evaluate.metrics import hit_rate_at_k, metric_names, ndcg_at_k, summarize, target_ranks
from gensar_core.evaluate.ranking import top_k

LISTS = [[3, 1, 2], [5, 6, 7], [9]]
TARGETS = [1, 7, 4]  # ranks 1, 2 and absent


def test_target_ranks():
    assert target_ranks(LISTS, TARGETS).tolist() == [1, 2, -1]
    # a repeated item counts at its first position
    assert target_ranks([[2, 1, 1]], [1]).tolist() == [1]
    with pytest.raises(ValueError, match="targets"):
        target_ranks(LISTS, [1])


def test_hit_rate_by_hand():
    assert hit_rate_at_k(LISTS, TARGETS, 1) == 0.0
    assert hit_rate_at_k(LISTS, TARGETS, 2) == pytest.approx(1 / 3)
    assert hit_rate_at_k(LISTS, TARGETS, 3) == pytest.approx(2 / 3)
    assert hit_rate_at_k(LISTS, TARGETS, 10) == pytest.approx(2 / 3)
    assert hit_rate_at_k([], [], 10) == 0.0


def test_ndcg_by_hand():
    # one relevant item: ideal DCG 1, DCG 1/log2(rank + 2)
    assert ndcg_at_k([[4]], [4], 1) == 1.0
    assert ndcg_at_k(LISTS, TARGETS, 2) == pytest.approx((1 / math.log2(3)) / 3)
    assert ndcg_at_k(LISTS, TARGETS, 3) == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / 3)
    tenth = [list(range(100, 109)) + [7]]
    assert ndcg_at_k(tenth, [7], 10) == pytest.approx(1 / math.log2(11))
    assert ndcg_at_k(tenth, [7], 5) == 0.0


def test_summarize_keys_and_values():
    out = summarize(LISTS, TARGETS)
    assert list(out) == ["HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10", "n"]
    assert out["n"] == 3
    assert out["HR@1"] == 0.0
    assert out["HR@5"] == out["HR@10"] == pytest.approx(2 / 3)
    assert out["NDCG@10"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / 3)
    assert summarize([[0, 1]], [0], ks=(1, 2)) == {"HR@1": 1.0, "HR@2": 1.0, "NDCG@2": 1.0, "n": 1}
    assert metric_names((10, 1, 5)) == ["HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10"]
    assert summarize([], [])["n"] == 0


def test_top_k_ties_and_masked_items():
    scores = np.array([[1.0, 3.0, 3.0, -np.inf, 2.0], [np.nan, -np.inf, 0.0, 0.0, -np.inf]])
    # ties: the lower tie-break value first
    assert [r.tolist() for r in top_k(scores, 3, tiebreak=np.array([4, 3, 2, 1, 0]))] == [[2, 1, 4], [3, 2]]
    assert [r.tolist() for r in top_k(scores, 2)] == [[1, 2], [2, 3]]
    assert top_k(scores, 10)[0].tolist() == [1, 2, 4, 0]  # -inf never returned


def test_agrees_with_embed_rank_metrics():
    """Ranked lists from top_k give the numbers embed's score-matrix metric gives."""
    from gensar_core.embed.collaborative import rank_metrics

    rng = np.random.default_rng(0)
    scores = rng.normal(size=(200, 50)).astype(np.float32)
    targets = rng.integers(0, 50, size=200)
    exclude = [rng.choice(50, size=5, replace=False) for _ in range(200)]
    masked = scores.copy()
    for i, ex in enumerate(exclude):
        masked[i, ex] = -np.inf
    ours = summarize(top_k(masked, 10), targets)
    ref = rank_metrics(scores, targets, exclude, k=10)
    assert ours["HR@10"] == pytest.approx(ref["hr@10"])
    assert ours["NDCG@10"] == pytest.approx(ref["ndcg@10"], rel=1e-5)


def test_per_case_ndcg_and_the_paired_bootstrap():
    from gensar_core.evaluate.metrics import ndcg_per_case, paired_bootstrap

    lists, targets = [[3, 1, 2], [5, 6, 7], [9, 8, 4]], [1, 0, 4]
    per_case = ndcg_per_case(lists, targets, 10)
    assert per_case.tolist() == pytest.approx([1 / np.log2(3), 0.0, 0.5])
    assert per_case.mean() == pytest.approx(ndcg_at_k(lists, targets, 10))
    rng = np.random.default_rng(0)
    a = rng.random(400)
    same = paired_bootstrap(a, a)
    assert same == {"diff": 0.0, "low": 0.0, "high": 0.0, "n": 400}
    b = a - 0.05 + rng.normal(0, 0.2, 400)  # a is better by 0.05 on average, with noise
    p = paired_bootstrap(a, b, draws=4000, seed=1)
    assert p["diff"] == pytest.approx(float((a - b).mean()))
    assert p["low"] < p["diff"] < p["high"] and p["low"] > 0  # 400 cases tell 0.05 apart
    assert p["high"] - p["low"] == pytest.approx(2 * 1.96 * (a - b).std() / np.sqrt(400), rel=0.15)
    with pytest.raises(ValueError, match="same cases"):
        paired_bootstrap(a, b[:10])
