"""SASRec collaborative embeddings on a tiny synthetic catalogue.

Users walk a cycle of items (i, i+1, i+2, ...), alternating recommendation and search clicks, so
the next item is learnable; the last 4 items are never clicked in train.
"""
import numpy as np
import pandas as pd
import pytest
import torch

from gensar_core.config import CollaborativeEmbedConfig, PipelineConfig
from gensar_core.embed import collaborative, read_vectors
from gensar_core.embed.collaborative import (
    load_sasrec, rank_metrics, run_embed_collaborative, train_sasrec, training_windows, user_sequences,
)
from gensar_core.storage import atomic_dir, write_table

N_ITEMS, CYCLE, N_USERS = 40, 36, 40
SMALL = {"dim": 16, "layers": 1, "heads": 2, "max_len": 8, "dropout": 0.1, "epochs": 12,
         "batch_size": 16, "lr": 5e-3, "device": "cpu"}



def synthetic_events(seed=0):
    rng = np.random.default_rng(seed)
    rows = {"train": [], "valid": [], "test": []}
    for u in range(N_USERS):
        start, length = int(rng.integers(CYCLE)), int(rng.integers(6, 12))
        for pos in range(length + 2):
            split = "train" if pos < length else ("valid" if pos == length else "test")
            search = pos % 2 == 1
            rows[split].append({
                "user_id": f"u{u}", "item_id": f"i{(start + pos) % CYCLE}", "ts": 1000 + 10 * pos,
                "behavior": "search" if search else "rec", "query": "q" if search else None,
                "session_id": None, "position": pos,
            })
    return {k: pd.DataFrame(v) for k, v in rows.items()}


def write_warehouse(root):
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(N_ITEMS)],
                          "item_idx": np.arange(N_ITEMS, dtype=np.int64)})
    items["title"] = items["item_id"]
    items["text"] = items["item_id"]
    items["categories"] = [["c"]] * N_ITEMS
    with atomic_dir(root / "curated" / "items") as stage:
        write_table(items, stage)
    for split, df in synthetic_events().items():
        with atomic_dir(root / "splits" / split) as stage:
            write_table(df, stage)


@pytest.fixture
def cfg(tmp_path):
    write_warehouse(tmp_path)
    return PipelineConfig(warehouse=tmp_path, seed=7, embed={"collaborative": SMALL})


def test_user_sequences_order_by_ts_then_position_across_behaviours():
    events = pd.DataFrame({
        "user_id": ["b", "a", "a", "a", "b"],
        "item_id": ["x", "z", "x", "y", "y"],
        "ts": [5, 9, 1, 1, 5],
        "position": [1, 2, 1, 0, 0],
    })
    index = {"x": 0, "y": 1, "z": 2}
    assert user_sequences(events, index) == {"a": [1, 0, 2], "b": [1, 0]}
    with pytest.raises(ValueError, match="missing"):
        user_sequences(events.assign(item_id="w"), index)


def test_training_windows_cover_every_transition():
    seq = list(range(23))
    windows = training_windows([seq, [5]], max_len=5, rng=np.random.default_rng(0))
    assert windows.shape[1] == 6
    pairs = {(int(a) - 1, int(b) - 1) for w in windows for a, b in zip(w[:-1], w[1:]) if a}
    assert pairs == {(i, i + 1) for i in range(22)}  # the 1-item sequence gives nothing
    assert (windows[:, -1] > 0).all()  # left-padded: the newest item is last


def test_loss_falls_and_training_is_deterministic():
    seqs = list(user_sequences(synthetic_events()["train"], {f"i{i}": i for i in range(N_ITEMS)}).values())
    ccfg = CollaborativeEmbedConfig(**SMALL)
    state = torch.random.get_rng_state()
    model_a, losses_a = train_sasrec(seqs, N_ITEMS, ccfg, seed=3, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)  # caller's RNG untouched
    model_b, losses_b = train_sasrec(seqs, N_ITEMS, ccfg, seed=3, progress=False)
    _, losses_c = train_sasrec(seqs, N_ITEMS, ccfg, seed=4, progress=False)

    assert len(losses_a) == SMALL["epochs"]
    assert losses_a[-1] < 0.6 * losses_a[0]
    assert losses_a == losses_b
    for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(a, b), name
    assert losses_a != losses_c


def test_rank_metrics_excludes_history():
    scores = np.array([[0.9, 0.8, 0.1, 0.5], [0.1, 0.2, 0.3, 0.4]], dtype=np.float32)
    # row 0: item 0 excluded, target 1 becomes rank 0; row 1: target 0 is last of 4
    m = rank_metrics(scores, targets=[1, 0], exclude=[[0], []], k=2)
    assert m == {"hr@2": 0.5, "ndcg@2": 0.5, "n": 2}
    # an excluded target is a miss
    assert rank_metrics(scores[:1], [0], [[0]], k=4)["hr@4"] == 0.0


def test_step_writes_table_for_every_item_and_a_loadable_model(cfg):
    stats = run_embed_collaborative(cfg, progress=False)
    assert stats["items"] == N_ITEMS and stats["dim"] == SMALL["dim"]
    assert stats["users"] == N_USERS and stats["items_unseen_in_train"] == N_ITEMS - CYCLE
    assert stats["valid_events"] == N_USERS
    assert stats["valid_hr@10"] > 0.5  # the +1 walk is learnt
    assert 0 < stats["valid_ndcg@10"] <= stats["valid_hr@10"]

    vectors = read_vectors(cfg.warehouse / "features" / "collaborative")
    assert vectors.shape == (N_ITEMS, SMALL["dim"]) and np.isfinite(vectors).all()

    model = load_sasrec(cfg.warehouse / "features" / "sasrec")
    np.testing.assert_array_equal(model.item_embeddings(), vectors)
    assert not list((cfg.warehouse / "features" / "sasrec").glob("*.pt*"))  # safetensors only
    scores = model.score([[0, 1, 2], [], list(range(30))])
    assert scores.shape == (3, N_ITEMS) and np.isfinite(scores).all()
    assert int(np.argmax(scores[0])) == 3


def test_failed_step_keeps_previous_outputs(cfg, monkeypatch):
    fast = cfg.model_copy(update={"embed": cfg.embed.model_copy(
        update={"collaborative": CollaborativeEmbedConfig(**{**SMALL, "epochs": 1})})})
    run_embed_collaborative(fast, progress=False)
    features = cfg.warehouse / "features"
    before = read_vectors(features / "collaborative")
    weights = (features / "sasrec" / "model.safetensors").read_bytes()

    def save_then_die(model, folder):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(collaborative, "save_sasrec", save_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        run_embed_collaborative(fast.model_copy(update={"seed": 99}), progress=False)
    np.testing.assert_array_equal(read_vectors(features / "collaborative"), before)
    assert (features / "sasrec" / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in features.iterdir()) == ["collaborative", "sasrec"]
