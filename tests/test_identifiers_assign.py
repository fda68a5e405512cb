"""Identifier assignment: naming, Sinkhorn, the uniqueness rule, cold start, the pipeline step."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import clustered
import torch

from gensar_core.config import IdentifierConfig, PipelineConfig
from gensar_core.identifiers import (
    DualQuantiser, QuantiserSpec, assign_cold_start, assign_identifiers, format_id, identifier_table,
    parse_id, run_learn_identifiers, save_quantiser, token_letters, train_quantiser, vocabulary)
from gensar_core.identifiers import step as step_module
from gensar_core.identifiers.assign import (
    Occupancy, colliding_groups, descend, sinkhorn_assign, sinkhorn_assign_batched)
from gensar_core.storage import Warehouse, write_table

SEM_ID = re.compile(r"^<a_\d+><b_\d+><s_\d+><t_\d+>$")
COL_ID = re.compile(r"^<a_\d+><b_\d+><c_\d+><d_\d+>$")





CFG = IdentifierConfig(hidden_dims=[64, 32], latent_dim=8, codebook_size=8, epochs=20,
                       batch_size=128, lr=3e-3, eval_every=5, kmeans_iters=10, sinkhorn_iters=50)


def fit(sem, col, cfg=CFG, seed=0):
    model = DualQuantiser(QuantiserSpec.from_config(cfg, sem.shape[1], col.shape[1]), seed=seed)
    train_quantiser(model, torch.from_numpy(sem), torch.from_numpy(col), cfg, seed=seed, device="cpu")
    return model


@pytest.fixture(scope="module")
def trained():
    sem, col = clustered()
    model = fit(sem, col)
    return model, sem, col, assign_identifiers(model, sem, col, CFG)


def check_ids(sem_ids, col_ids, sem_codes, col_codes, shared_levels=2):
    assert len(set(sem_ids)) == len(sem_ids) and len(set(col_ids)) == len(col_ids)
    assert all(SEM_ID.match(i) for i in sem_ids) and all(COL_ID.match(i) for i in col_ids)
    for s, c, sc, cc in zip(sem_ids, col_ids, sem_codes, col_codes):
        assert [code for _, code in parse_id(s)] == list(sc)
        assert [code for _, code in parse_id(c)] == list(cc)
        assert list(sc[:shared_levels]) == list(cc[:shared_levels])
        assert s.split("><")[:shared_levels] == c.split("><")[:shared_levels]


# ---------------------------------------------------------------- naming
def test_token_letters_follow_level_counts():
    paper = token_letters(2, 2)
    assert paper.semantic_id == ("a", "b", "s", "t") and paper.collaborative_id == ("a", "b", "c", "d")
    deep = token_letters(3, 3)
    assert deep.shared == ("a", "b", "c") and deep.collaborative == ("d", "e", "f")
    assert deep.semantic == ("s", "t", "u")
    with pytest.raises(ValueError):
        token_letters(10, 9)
    with pytest.raises(ValueError):
        token_letters(1, 9)
    assert format_id([3, 7, 1, 0], paper.semantic_id) == "<a_3><b_7><s_1><t_0>"
    assert parse_id("<a_3><b_7><c_1><d_0>") == [("a", 3), ("b", 7), ("c", 1), ("d", 0)]
    with pytest.raises(ValueError):
        parse_id("<a_3>junk")
    vocab = vocabulary(2, 2, 8)
    assert len(vocab) == len(set(vocab)) == 6 * 8 and "<t_7>" in vocab and "<d_0>" in vocab


# ---------------------------------------------------------------- Sinkhorn and the rule
def test_sinkhorn_spreads_a_group_that_prefers_one_code():
    # four items all nearest to code 0, with slightly different second choices
    d = np.array([[0.0, 1.0, 2.0, 3.0], [0.0, 2.0, 1.0, 3.0], [0.0, 3.0, 2.0, 1.0], [0.0, 1.5, 1.6, 1.7]])
    codes = sinkhorn_assign(d, epsilon=0.05, iters=200)
    assert len(set(codes.tolist())) == 4
    # padded batch gives the same answer as one group alone
    padded = torch.zeros(2, 8, 4, dtype=torch.float64)
    padded[0, :4] = torch.from_numpy(d)
    padded[1, :3] = torch.from_numpy(d[:3])
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, :4] = True
    mask[1, :3] = True
    both = sinkhorn_assign_batched(padded, mask, 0.05, 200)
    assert both[0, :4].tolist() == codes.tolist()
    assert both[1, :3].tolist() == sinkhorn_assign(d[:3], 0.05, 200).tolist()


def test_descend_takes_the_nearest_free_code_and_keeps_the_prefix():
    occ = Occupancy(shared_levels=1, specific_levels=2, codebook_size=3)
    books = [np.array([[0.0], [1.0], [5.0]]), np.array([[0.0], [0.1], [3.0]])]
    occ.claim("semantic", (0, 1, 0))
    full = lambda q: occ.full("semantic", q)  # noqa: E731
    # preferred path free: kept
    assert descend(np.array([1.0]), books, (0,), full, preferred=(1, 1)) == (1, 1)
    # preferred path taken: last code moves to the nearest free codeword
    assert descend(np.array([1.0]), books, (0,), full, preferred=(1, 0)) == (1, 1)
    occ.claim("semantic", (0, 1, 1))
    occ.claim("semantic", (0, 1, 2))  # subtree (0, 1) is full now
    assert occ.full("semantic", (0, 1)) and not occ.full("semantic", (0,))
    # next nearest first-level code 0 (residual stays 1.0), then its nearest free code 0.1
    assert descend(np.array([1.0]), books, (0,), full, preferred=(1, 0)) == (0, 1)
    assert colliding_groups(np.array([[1, 2], [0, 0], [1, 2], [3, 3], [0, 0], [1, 2]]))[1].tolist() == [0, 2, 5]


def test_assignment_is_unique_shaped_and_shares_the_prefix(trained):
    model, sem, col, a = trained
    assert len(a.semantic_ids) == len(sem)
    check_ids(a.semantic_ids, a.collaborative_ids, a.semantic_codes, a.collaborative_codes)
    assert (a.shared_codes == a.semantic_codes[:, :2]).all()
    m = a.metrics
    assert m["prefix_shared_share"] == 1.0
    assert m["collision_rate_final/semantic"] == m["collision_rate_final/collaborative"] == 0.0
    for b in ("semantic", "collaborative"):
        assert 0 <= m[f"collision_rate_before_rule/{b}"] <= m[f"collision_rate_argmin/{b}"] <= 1
        assert m[f"recon_mse/{b}"] > 0 and m[f"recon_relative_mse/{b}"] < 1
    for level in ("shared_1", "shared_2", "semantic_1", "semantic_2", "collaborative_1", "collaborative_2"):
        assert 0 < m[f"usage/{level}"] <= 1 and 1 <= m[f"perplexity/{level}"] <= CFG.codebook_size
    # same model, same inputs: same identifiers
    again = assign_identifiers(model, sem, col, CFG)
    assert again.semantic_ids == a.semantic_ids and again.collaborative_ids == a.collaborative_ids


def test_exact_duplicates_are_disambiguated(trained):
    model, sem, col, _ = trained
    # 30 items, each repeated 5 times: identical latents, which Sinkhorn cannot separate
    dup_sem, dup_col = np.repeat(sem[:30], 5, 0), np.repeat(col[:30], 5, 0)
    a = assign_identifiers(model, dup_sem, dup_col, CFG)
    assert a.metrics["collision_rate_before_rule/semantic"] >= 0.5
    assert a.metrics["reassigned/semantic"] >= 120 and a.metrics["reassigned/collaborative"] >= 120
    check_ids(a.semantic_ids, a.collaborative_ids, a.semantic_codes, a.collaborative_codes)
    # the rule only changes what it must: copies keep their shared prefix (room is plentiful)
    for k in range(30):
        assert len({tuple(c) for c in a.shared_codes[5 * k : 5 * k + 5]}) == 1


def test_full_shared_prefix_moves_both_ids_and_capacity_is_enforced():
    cfg = CFG.model_copy(update={"codebook_size": 2, "shared_levels": 1, "specific_levels": 1,
                                 "epochs": 2, "eval_every": 0})
    sem, col = clustered(n=4)
    sem[:], col[:] = sem[0], col[0]  # four identical items; a shared prefix names only two
    model = fit(sem, col, cfg)
    a = assign_identifiers(model, sem, col, cfg)
    assert sorted(map(tuple, a.semantic_codes.tolist())) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert len(set(a.collaborative_ids)) == 4
    assert (a.semantic_codes[:, 0] == a.collaborative_codes[:, 0]).all()
    assert a.metrics["moved_shared_prefix"] == 2
    with pytest.raises(ValueError, match="cannot get unique identifiers"):
        assign_identifiers(model, np.repeat(sem, 2, 0)[:5], np.repeat(col, 2, 0)[:5], cfg)


# ---------------------------------------------------------------- cold start
def test_cold_start_ids_are_unique_against_the_existing_table(trained, tmp_path):
    model, sem, col, a = trained
    existing = identifier_table(a, np.arange(len(sem)), [f"i{i}" for i in range(len(sem))])
    before = existing.copy(deep=True)
    rng = np.random.default_rng(5)
    # copies of existing items' text (their best codes are taken) plus new random text
    new_sem = np.concatenate([sem[:20], sem[:5], rng.normal(size=(15, sem.shape[1]))]).astype(np.float32)
    folder = save_quantiser(model, tmp_path / "q")
    cold = assign_cold_start(folder, new_sem, existing)
    assert len(cold) == 40
    check_ids(cold["semantic_id"], cold["collaborative_id"], cold["semantic_codes"], cold["collaborative_codes"])
    assert not set(cold["semantic_id"]) & set(existing["semantic_id"])
    assert not set(cold["collaborative_id"]) & set(existing["collaborative_id"])
    pd.testing.assert_frame_equal(existing, before)  # existing IDs never change

    # a DataFrame input carries its keys; the in-memory model gives the same answer as the file
    frame = pd.DataFrame({"item_idx": np.arange(1000, 1040), "item_id": [f"new{i}" for i in range(40)],
                          "vector": list(new_sem)})
    cold2 = assign_cold_start(model, frame, existing)
    assert cold2["item_idx"].tolist() == list(range(1000, 1040)) and cold2["item_id"].iloc[0] == "new0"
    assert cold2["semantic_id"].tolist() == cold["semantic_id"].tolist()
    with pytest.raises(ValueError, match="dims"):
        assign_cold_start(model, np.zeros((2, 5), np.float32), existing)


# ---------------------------------------------------------------- pipeline step
STEP_CFG = {"hidden_dims": [32], "latent_dim": 8, "codebook_size": 8, "epochs": 8, "batch_size": 128,
            "eval_every": 4, "kmeans_iters": 5, "sinkhorn_iters": 30, "lr": 3e-3}


def make_warehouse(root, n=300, cold=5):
    sem, col = clustered(n=n, sem_dim=24, col_dim=12, seed=3)
    wh = Warehouse(root)
    vec = lambda x: pa.array(list(x), type=pa.list_(pa.float32()))  # noqa: E731
    write_table(pa.table({"item_idx": pa.array(np.arange(n), pa.int64()), "vector": vec(sem)}),
                wh.path("features", "semantic"))
    # the last `cold` items were never clicked: no collaborative embedding
    write_table(pa.table({"item_idx": pa.array(np.arange(n - cold), pa.int64()), "vector": vec(col[: n - cold])}),
                wh.path("features", "collaborative"))
    write_table(pd.DataFrame({"item_id": [f"m{i}" for i in range(n)], "item_idx": np.arange(n),
                              "title": "t", "text": "x", "categories": [["a"]] * n}),
                wh.path("curated", "items"))
    return PipelineConfig(warehouse=root, seed=7, identifiers=STEP_CFG)


def test_step_writes_outputs_is_deterministic_and_atomic(tmp_path, monkeypatch):
    cfg = make_warehouse(tmp_path / "wh")
    metrics = run_learn_identifiers(cfg)
    out = tmp_path / "wh" / "identifiers"
    assert sorted(p.name for p in out.iterdir()) == ["codebook_usage.png", "items", "metrics.json", "quantiser"]
    assert (out / "codebook_usage.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (out / "quantiser").iterdir()) == ["config.json", "model.safetensors", "training.json"]
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(metrics)
    assert metrics["n_items"] == 300 and metrics["n_cold_start_items"] == 5

    table = pq.read_table(out / "items")
    assert table.schema.field("item_idx").type == pa.int64()
    assert table.schema.field("semantic_codes").type == pa.list_(pa.int64())
    df = table.to_pandas()
    assert df["item_idx"].tolist() == list(range(300))
    assert df["item_id"].tolist() == [f"m{i}" for i in range(300)]
    check_ids(df["semantic_id"], df["collaborative_id"], df["semantic_codes"], df["collaborative_codes"])
    assert all(list(s) == list(c[:2]) for s, c in zip(df["shared_codes"], df["semantic_codes"]))

    # same config and seed: the same identifiers
    first = (out / "items" / "part-0.parquet").read_bytes()
    run_learn_identifiers(cfg)
    assert pq.read_table(out / "items").to_pandas().equals(df)

    # a crash while writing leaves the previous output in place and no staging folder behind
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(step_module, "plot_codebook_usage", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        run_learn_identifiers(cfg.model_copy(update={"seed": 8}))
    assert (out / "items" / "part-0.parquet").read_bytes() == first
    assert sorted(p.name for p in out.parent.iterdir()) == ["curated", "features", "identifiers"]


def test_step_rejects_inconsistent_features(tmp_path):
    cfg = make_warehouse(tmp_path / "wh", n=40, cold=0)
    wh = Warehouse(tmp_path / "wh")
    write_table(pa.table({"item_idx": pa.array([0, 0], pa.int64()),
                          "vector": pa.array([[1.0], [2.0]], pa.list_(pa.float32()))}),
                wh.path("features", "collaborative"))
    with pytest.raises(ValueError, match="duplicate item_idx"):
        run_learn_identifiers(cfg)
    assert not (tmp_path / "wh" / "identifiers").exists()
