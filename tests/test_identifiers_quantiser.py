"""Dual residual quantiser: k-means, forward pass, training, determinism, checkpoints."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from helpers import clustered as clustered_embeddings
import torch

from gensar_core.config import IdentifierConfig
from gensar_core.identifiers import (
    DualQuantiser, PlainResidualQuantiser, QuantiserSpec, load_quantiser, save_quantiser, train_quantiser)
from gensar_core.identifiers.kmeans import kmeans
from gensar_core.identifiers.quantiser import collision_rate, nearest_code



def clustered(**kwargs):
    sem, col = clustered_embeddings(**kwargs)
    return torch.from_numpy(sem), torch.from_numpy(col)


CFG = IdentifierConfig(hidden_dims=[64, 32], latent_dim=8, codebook_size=8, epochs=30,
                       batch_size=128, lr=3e-3, eval_every=5, kmeans_iters=10)


def small_model(seed=0):
    return DualQuantiser(QuantiserSpec.from_config(CFG, 32, 16), seed=seed)


@pytest.fixture(scope="module")
def trained():
    sem, col = clustered()
    model = small_model(seed=1)
    result = train_quantiser(model, sem, col, CFG, seed=1, device="cpu")
    return model, result, sem, col


def test_kmeans_is_seeded_and_beats_random_centres():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = centres.repeat_interleave(50, 0) + 0.1 * torch.randn(150, 2, generator=g)
    a, b = kmeans(x, 3, iters=10, seed=3), kmeans(x, 3, iters=10, seed=3)
    assert torch.equal(a, b)

    def inertia(c):
        return torch.cdist(x, c).min(1).values.pow(2).sum()

    assert inertia(a) < 0.1 * inertia(x[:3])  # three points of one blob
    assert torch.cdist(centres, a).min(1).values.max() < 0.5  # one centre found per blob


def test_kmeans_with_fewer_points_than_codes_gives_distinct_centres():
    x = torch.randn(5, 4)
    c = kmeans(x, 8, seed=0)
    assert c.shape == (8, 4)
    assert torch.unique(c, dim=0).shape[0] == 8


def test_forward_shapes_and_straight_through_gradients():
    sem, col = clustered(n=64)
    model = small_model()
    model.fit_scales(sem, col)
    model.init_codebooks(sem, col, iters=5)
    out = model(sem, col)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    # the encoders learn through the straight-through estimator, the codebooks through their loss
    assert model.semantic_encoder[0].weight.grad.abs().sum() > 0
    assert model.collaborative_encoder[0].weight.grad.abs().sum() > 0
    for stack in (model.shared, model.semantic, model.collaborative):
        assert all(cb.grad.abs().sum() > 0 for cb in stack.codebooks)
    sem_codes, col_codes = model.id_codes(sem, col)
    assert sem_codes.shape == col_codes.shape == (64, CFG.shared_levels + CFG.specific_levels)
    assert torch.equal(sem_codes[:, :2], col_codes[:, :2])  # shared prefix
    assert int(sem_codes.max()) < CFG.codebook_size and int(sem_codes.min()) >= 0


def centroid_residual(stack, x: torch.Tensor) -> torch.Tensor:
    """Checks that each code of each level sits at the centroid of the residuals nearest to it
    (a fixed point of Lloyd's iteration) and every code has some; returns the final residual."""
    residual = x
    for cb in stack.codebooks:
        assign = nearest_code(residual, cb)
        assert torch.unique(assign).tolist() == list(range(cb.shape[0]))
        for code in range(cb.shape[0]):
            torch.testing.assert_close(cb[code], residual[assign == code].mean(0), atol=1e-5, rtol=1e-4)
        residual = residual - cb[assign]
    return residual


def test_codebooks_are_kmeans_initialised():
    """Every code starts at a k-means centroid of the encoded batch, level after level, on the
    residual the levels above leave (shared levels on the joint latent, then each modality's)."""
    sem, col = clustered(n=200)
    model = small_model()
    model.fit_scales(sem, col)
    model.init_codebooks(sem, col, iters=100)
    half = model.spec.latent_dim
    with torch.no_grad():
        shared = centroid_residual(model.shared, model.encode(sem, col))
        centroid_residual(model.semantic, shared[:, :half])
        centroid_residual(model.collaborative, shared[:, half:])
    # a random start is no such fixed point
    random = small_model(seed=3)
    for cb in random.shared.codebooks:
        torch.nn.init.normal_(cb)
    with pytest.raises(AssertionError):
        centroid_residual(random.shared, random.encode(sem, col).detach())


def test_training_reduces_reconstruction_loss(trained):
    _, result, _, _ = trained
    first, last = result.history[0], result.history[-1]
    assert last["recon_loss"] < 0.7 * first["recon_loss"]
    assert last["loss"] < first["loss"]
    assert result.items_per_s > 0 and len(result.history) == CFG.epochs
    # the kept weights come from an evaluated epoch of the second half
    assert CFG.epochs // 2 <= result.selected_epoch <= CFG.epochs
    assert "collision_rate" in result.history[result.selected_epoch - 1]


def test_training_is_deterministic_for_a_seed(trained):
    model, _, sem, col = trained
    again = small_model(seed=1)
    train_quantiser(again, sem, col, CFG, seed=1, device="cpu")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    other = small_model(seed=2)
    train_quantiser(other, sem, col, CFG.model_copy(update={"epochs": 2}), seed=2, device="cpu")
    assert not torch.equal(other.shared.codebooks[0], model.shared.codebooks[0])


def test_checkpoint_roundtrip_is_safetensors_and_exact(trained, tmp_path):
    model, _, sem, col = trained
    folder = save_quantiser(model, tmp_path / "q", extra={"seed": 1})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    raw = (folder / "model.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])  # safetensors layout, no pickle
    assert "shared.codebooks.0" in header and "semantic_scale" in header
    config = json.loads((folder / "config.json").read_text())
    assert config["spec"]["codebook_size"] == CFG.codebook_size and config["seed"] == 1

    loaded = load_quantiser(folder)
    assert not loaded.training
    for x, y in zip(model.id_codes(sem, col), loaded.id_codes(sem, col)):
        assert torch.equal(x, y)
    for x, y in zip(model.reconstruct(sem, col), loaded.reconstruct(sem, col)):
        assert torch.equal(x, y)


def test_loader_rejects_other_folders(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_quantiser(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"kind": "something else"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="kind"):
        load_quantiser(tmp_path)


def test_plain_quantiser_trains_with_the_same_loop():
    sem, col = clustered(n=200)
    plain = PlainResidualQuantiser(32, 16, [64, 32], 16, levels=4, codebook_size=8, seed=0)
    result = train_quantiser(plain, sem, col, CFG.model_copy(update={"epochs": 10}), seed=0, device="cpu")
    assert result.history[-1]["recon_loss"] < result.history[0]["recon_loss"]
    (codes,) = plain.id_codes(sem, col)
    assert codes.shape == (200, 4)
    assert codes.dtype == torch.int64 and int(codes.min()) >= 0 and int(codes.max()) < 8  # a code of each level


def test_collision_rate_is_the_share_of_items_whose_path_another_item_already_has():
    codes = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0], [2, 2]])
    assert collision_rate(codes) == pytest.approx(2 / 5)  # 5 items, 3 distinct paths
    assert collision_rate(np.array([[0, 0], [0, 1]])) == 0.0


def test_dead_codes_are_restarted_from_residuals_after_patience_epochs():
    from gensar_core.identifiers.quantiser import ResidualStack, nearest_code

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, generator=g)
    stack = ResidualStack(levels=2, size=8, dim=4, beta=0.25)
    stack.init_kmeans(x, iters=5, seed=0)
    with torch.no_grad():
        stack.codebooks[0][3] = 100.0  # far from every point: never picked
    stack.train()

    def epoch(patience, seed=1):
        stack(x)  # training forward: counts the codes the batch picked
        return stack.restart_dead_codes(x, patience, torch.Generator().manual_seed(seed))[0]

    assert epoch(patience=2) == 0  # idle one epoch: not yet
    assert torch.all(stack.codebooks[0][3] == 100.0)
    assert epoch(patience=2) >= 1  # idle two epochs in a row: restarted
    new = stack.codebooks[0][3].detach()
    assert torch.isclose(x, new).all(1).any()  # re-seeded with a level-1 residual (here: an input row)
    assert (nearest_code(x, stack.codebooks[0].detach()) == 3).any()  # and now in use
    assert stack.idle_epochs[0, 3] == 0 and stack.code_counts.sum() == 0

    # deterministic for a generator; off when patience is never reached
    a = ResidualStack(2, 8, 4, 0.25)
    b = ResidualStack(2, 8, 4, 0.25)
    for s in (a, b):
        s.init_kmeans(x, iters=5, seed=0)
        with torch.no_grad():
            s.codebooks[1][:4] = 50.0
        s.train()
        s(x)
        s.restart_dead_codes(x, 1, torch.Generator().manual_seed(7))
    assert all(torch.equal(p, q) for p, q in zip(a.codebooks, b.codebooks))
    assert (a.codebooks[1][:4] != 50.0).all()
    assert not any(k.startswith(("code_counts", "idle_epochs")) for k in a.state_dict())  # not saved


def test_restarts_revive_a_collapsed_shared_codebook():
    # every shared codeword but one far away: without restarts the items all share one code
    sem, col = clustered(n=200)
    cfg = CFG.model_copy(update={"epochs": 6, "eval_every": 0})
    usage = {}
    for patience in (0, 1):
        model = small_model()
        real_init = model.init_codebooks

        def collapsed_init(*args, _model=model, _init=real_init, **kw):
            _init(*args, **kw)
            with torch.no_grad():
                _model.shared.codebooks[0][1:] = 1e3

        model.init_codebooks = collapsed_init
        result = train_quantiser(model, sem, col, cfg.model_copy(update={"dead_code_epochs": patience}),
                                 seed=0, device="cpu")
        usage[patience] = len(torch.unique(model.id_codes(sem, col)[0][:, 0]))
        restarted = sum(r["restarted_codes"] for r in result.history)
        assert (restarted > 0) == bool(patience)
    assert usage[0] == 1 and usage[1] == CFG.codebook_size
