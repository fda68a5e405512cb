"""The dual residual quantiser of GenSAR (docs/method.md "Dual-purpose identifiers") and its training loop.

    semantic x_s -> enc_s -> z_s (latent_dim) ┐
                                              ├ z = [z_s; z_c] -> shared residual codebooks (2*latent)
    collab.  x_c -> enc_c -> z_c (latent_dim) ┘        |
                      remaining residual r = z - sum(shared codewords), split in halves
                      r_s -> semantic codebooks (latent)     r_c -> collaborative codebooks (latent)
    z_s_hat = shared codewords[:L] + semantic codewords      -> dec_s -> x_s_hat
    z_c_hat = shared codewords[L:] + collaborative codewords -> dec_c -> x_c_hat

loss = MSE(x_s_hat, x_s) + MSE(x_c_hat, x_c) + mean over codebooks of
       (codebook loss + beta * commitment loss), with a straight-through estimator from the
       quantised latents back to the encoders. Every codebook is k-means initialised, level after
       level, on the (residual) latents of the data before the first step.

Dead-code restarts (`IdentifierConfig.dead_code_epochs`, default 1). The k-means init sees the
latents of *untrained* encoders (total variance ~0.002); within a few epochs the latents grow by
orders of magnitude, and the codewords, which only move when picked, are left behind: on
MovieLens-100K (1,682 items, 2 shared + 2 specific levels x 256 codes) the first shared level
ended with 9 codes in use (perplexity ~6), 116 distinct shared prefixes, collisions at argmin of
9% / 23% (semantic / collaborative). So, after every epoch, each stack counts which codes the
epoch's batches picked; a code unused for `dead_code_epochs` epochs in a row is re-seeded with
the current residual, at its level, of an item drawn with probability proportional to its
quantisation error there (k-means++ style: new codes go where the data is served worst, which
splits crowded codes). Levels are handled top-down on one no-grad pass over the data (a seeded
sample of at most kmeans.MAX_POINTS rows), with their own seeded generator, so training stays
deterministic for a seed. Measured on that data (seed 2025, CPU, one thread): usage of every
level 0.97-1.00 (shared_1 perplexity 6 -> ~217), collisions before the uniqueness rule
0.4% / 1.1% -> 0.06% / 0%, for ~+20% training time. Tried and dropped: a second k-means init on
the latents after 20 warm-up epochs (shared_1 usage only 0.36, no gain on top of restarts), beta
0.1 instead of 0.25 (no gain). The restart bookkeeping buffers are not persistent: checkpoints
are unchanged.

With restarts the quantisation error is negligible (decoding the unquantised latent gives the same
reconstruction error); what is left is the autoencoders' own under-fit, which is why the default
batch is 256 rather than the paper's 1024 (a 1.7k-item catalogue got 2 optimiser steps an epoch):
semantic relative reconstruction MSE 0.78 -> 0.59, collaborative 0.20 -> 0.14, in ~43 s of CPU
for the whole step (was ~30 s).

`PlainResidualQuantiser` is the single-identifier baseline (one encoder over the concatenated
embeddings, one residual stack): the benchmark and TIGER-style baselines use it. Both models share
`train_quantiser`, so their throughputs compare like for like.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from gensar_core.config import IdentifierConfig
from gensar_core.devices import pick_device
from gensar_core.identifiers.kmeans import MAX_POINTS, kmeans

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- architecture
@dataclass(frozen=True)
class QuantiserSpec:
    """Everything needed to rebuild the module (saved as JSON beside the weights)."""

    semantic_dim: int
    collaborative_dim: int
    hidden_dims: tuple[int, ...] = (512, 256, 128, 64)
    latent_dim: int = 32
    shared_levels: int = 2
    specific_levels: int = 2
    codebook_size: int = 256
    beta: float = 0.25

    @classmethod
    def from_config(cls, cfg: IdentifierConfig, semantic_dim: int, collaborative_dim: int):
        return cls(
            semantic_dim=semantic_dim,
            collaborative_dim=collaborative_dim,
            hidden_dims=tuple(cfg.hidden_dims),
            latent_dim=cfg.latent_dim,
            shared_levels=cfg.shared_levels,
            specific_levels=cfg.specific_levels,
            codebook_size=cfg.codebook_size,
            beta=cfg.beta,
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden_dims"] = list(self.hidden_dims)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantiserSpec":
        return cls(**{**d, "hidden_dims": tuple(d["hidden_dims"])})


def mlp(dims: Sequence[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last: latents and outputs are real)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def nearest_code(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codeword (squared L2) for every row of x."""
    d = (x * x).sum(1, keepdim=True) - 2 * x @ codebook.T + (codebook * codebook).sum(1)[None, :]
    return d.argmin(1)


class ResidualStack(nn.Module):
    """`levels` codebooks of `size` x `dim`, each quantising what the previous ones left."""

    def __init__(self, levels: int, size: int, dim: int, beta: float):
        super().__init__()
        self.beta = beta
        # zeros until k-means init; ParameterList keys ('codebooks.0', ...) are safetensors-friendly
        self.codebooks = nn.ParameterList(nn.Parameter(torch.zeros(size, dim)) for _ in range(levels))
        # training-time bookkeeping for dead-code restarts; not persistent (not in checkpoints)
        self.register_buffer("code_counts", torch.zeros(levels, size, dtype=torch.long), persistent=False)
        self.register_buffer("idle_epochs", torch.zeros(levels, size, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor):
        """-> (sum of codewords, codes [B, levels], per-level losses, residual left over)."""
        residual, total = x, torch.zeros_like(x)
        codes, losses = [], []
        for level, cb in enumerate(self.codebooks):
            idx = nearest_code(residual.detach(), cb)
            if self.training:
                self.code_counts[level] += torch.bincount(idx, minlength=cb.shape[0])
            q = F.embedding(idx, cb)
            # codebook loss moves the codeword, commitment loss moves the encoder
            losses.append(F.mse_loss(q, residual.detach()) + self.beta * F.mse_loss(residual, q.detach()))
            # detach q so every level's commitment term reaches the encoder through the residual
            residual = residual - q.detach()
            total = total + q
            codes.append(idx)
        return total, torch.stack(codes, 1), losses, residual

    @torch.no_grad()
    def init_kmeans(self, x: torch.Tensor, iters: int, seed: int) -> torch.Tensor:
        """k-means each level on the residual the levels above leave; returns the final residual."""
        residual = x
        for level, cb in enumerate(self.codebooks):
            cb.copy_(kmeans(residual, cb.shape[0], iters, seed=seed + level))
            residual = residual - cb[nearest_code(residual, cb)]
        self.code_counts.zero_()
        self.idle_epochs.zero_()
        return residual

    @torch.no_grad()
    def restart_dead_codes(self, x: torch.Tensor, patience: int, generator: torch.Generator) -> tuple[int, torch.Tensor]:
        """End-of-epoch dead-code restart; returns (codes restarted, final residual of `x`).

        A code that no training batch picked for `patience` epochs in a row is re-seeded with the
        current residual (at its level) of an item drawn with probability proportional to that
        item's quantisation error there, so new codes go where the data is served worst, which
        also splits crowded codes. `x` is the stack's input for (a sample of) the data, with the
        current encoder; levels are handled top-down, each on the residual the (already
        restarted) levels above leave. Resets the per-epoch usage counts.
        """
        residual, restarted = x, 0
        for level, cb in enumerate(self.codebooks):
            used = self.code_counts[level] > 0
            self.idle_epochs[level] = torch.where(used, 0, self.idle_epochs[level] + 1)
            self.code_counts[level].zero_()
            idx = nearest_code(residual, cb)
            dead = (self.idle_epochs[level] >= patience).nonzero().squeeze(1)
            if len(dead):
                err = (residual - cb[idx]).pow(2).sum(1).double().cpu()
                candidates = int((err > 0).sum())
                if candidates:
                    pick = torch.multinomial(err / err.sum(), len(dead), replacement=len(dead) > candidates,
                                             generator=generator).to(x.device)
                    seeds = residual[pick]
                    if len(dead) > candidates:  # repeated draws: jitter so the new codes differ
                        noise = torch.randn(seeds.shape, generator=generator).to(x.device)
                        seeds = seeds + noise * (residual.std() * 0.01 + 1e-6)
                    cb[dead] = seeds
                    self.idle_epochs[level, dead] = 0
                    restarted += len(dead)
                    idx = nearest_code(residual, cb)
            residual = residual - cb[idx]
        return restarted, residual


class _Base(nn.Module):
    """Per-modality input scales (buffers, so they travel in the checkpoint)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("semantic_scale", torch.ones(()))
        self.register_buffer("collaborative_scale", torch.ones(()))

    @torch.no_grad()
    def fit_scales(self, semantic: torch.Tensor, collaborative: torch.Tensor, mode: str = "rms"):
        # A unit-norm 384-d text vector has entries ~0.05 while collaborative vectors are often
        # O(1): without scaling the semantic reconstruction term would barely count.
        if mode == "rms":
            self.semantic_scale.fill_(float(semantic.pow(2).mean().sqrt().clamp_min(1e-8)))
            self.collaborative_scale.fill_(float(collaborative.pow(2).mean().sqrt().clamp_min(1e-8)))
        elif mode == "none":
            self.semantic_scale.fill_(1.0)
            self.collaborative_scale.fill_(1.0)
        else:
            raise ValueError(f"unknown input scaling {mode!r}")

    def scaled(self, semantic, collaborative):
        return semantic / self.semantic_scale, collaborative / self.collaborative_scale


class Output(NamedTuple):
    loss: torch.Tensor
    recon_loss: torch.Tensor
    quant_loss: torch.Tensor
    recon_semantic: torch.Tensor  # MSE in the scaled input space
    recon_collaborative: torch.Tensor


class Quantised(NamedTuple):
    semantic: torch.Tensor  # quantised semantic latent [B, L] (straight-through)
    collaborative: torch.Tensor
    shared_codes: torch.Tensor  # [B, shared_levels]
    semantic_codes: torch.Tensor  # [B, specific_levels], specific part only
    collaborative_codes: torch.Tensor
    losses: list


def _seeded_init(module_factory, seed: int):
    # fork the global RNG so building a model neither depends on nor disturbs the caller's state
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return module_factory()


class DualQuantiser(_Base):
    def __init__(self, spec: QuantiserSpec, seed: int = 0):
        super().__init__()
        self.spec = spec
        L, h, K = spec.latent_dim, list(spec.hidden_dims), spec.codebook_size

        def build():
            return (
                mlp([spec.semantic_dim, *h, L]),
                mlp([spec.collaborative_dim, *h, L]),
                mlp([L, *reversed(h), spec.semantic_dim]),
                mlp([L, *reversed(h), spec.collaborative_dim]),
            )

        (self.semantic_encoder, self.collaborative_encoder,
         self.semantic_decoder, self.collaborative_decoder) = _seeded_init(build, seed)
        self.shared = ResidualStack(spec.shared_levels, K, 2 * L, spec.beta)
        self.semantic = ResidualStack(spec.specific_levels, K, L, spec.beta)
        self.collaborative = ResidualStack(spec.specific_levels, K, L, spec.beta)

    def encode(self, semantic: torch.Tensor, collaborative: torch.Tensor) -> torch.Tensor:
        """Joint latent [B, 2L] of raw (unscaled) inputs."""
        xs, xc = self.scaled(semantic, collaborative)
        return torch.cat([self.semantic_encoder(xs), self.collaborative_encoder(xc)], 1)

    def quantise(self, z: torch.Tensor) -> Quantised:
        L = self.spec.latent_dim
        shared_q, shared_codes, shared_losses, residual = self.shared(z)
        sem_q, sem_codes, sem_losses, _ = self.semantic(residual[:, :L])
        col_q, col_codes, col_losses, _ = self.collaborative(residual[:, L:])
        zs, zc = z[:, :L], z[:, L:]
        sem_hat = shared_q[:, :L] + sem_q
        col_hat = shared_q[:, L:] + col_q
        # straight-through: forward uses the codewords, backward passes gradients to z unchanged
        return Quantised(
            semantic=zs + (sem_hat - zs).detach(),
            collaborative=zc + (col_hat - zc).detach(),
            shared_codes=shared_codes,
            semantic_codes=sem_codes,
            collaborative_codes=col_codes,
            losses=shared_losses + sem_losses + col_losses,
        )

    def forward(self, semantic: torch.Tensor, collaborative: torch.Tensor) -> Output:
        xs, xc = self.scaled(semantic, collaborative)
        z = torch.cat([self.semantic_encoder(xs), self.collaborative_encoder(xc)], 1)
        q = self.quantise(z)
        recon_s = F.mse_loss(self.semantic_decoder(q.semantic), xs)
        recon_c = F.mse_loss(self.collaborative_decoder(q.collaborative), xc)
        quant = torch.stack(q.losses).mean()  # mean over codebooks, as the official code
        recon = recon_s + recon_c
        return Output(recon + quant, recon, quant, recon_s, recon_c)

    @torch.no_grad()
    def init_codebooks(self, semantic, collaborative, iters: int = 20, seed: int = 0):
        L = self.spec.latent_dim
        residual = self.shared.init_kmeans(self.encode(semantic, collaborative), iters, seed)
        self.semantic.init_kmeans(residual[:, :L], iters, seed + 100)
        self.collaborative.init_kmeans(residual[:, L:], iters, seed + 200)

    @torch.no_grad()
    def restart_dead_codes(self, semantic, collaborative, patience: int, generator: torch.Generator) -> int:
        """Dead-code restart of every stack (see ResidualStack.restart_dead_codes); -> codes restarted."""
        L = self.spec.latent_dim
        n, residual = self.shared.restart_dead_codes(self.encode(semantic, collaborative), patience, generator)
        n += self.semantic.restart_dead_codes(residual[:, :L], patience, generator)[0]
        n += self.collaborative.restart_dead_codes(residual[:, L:], patience, generator)[0]
        return n

    @torch.no_grad()
    def reconstruct(self, semantic, collaborative):
        """Decoded inputs in the caller's (unscaled) units."""
        q = self.quantise(self.encode(semantic, collaborative))
        return (self.semantic_decoder(q.semantic) * self.semantic_scale,
                self.collaborative_decoder(q.collaborative) * self.collaborative_scale)

    @torch.no_grad()
    def id_codes(self, semantic, collaborative) -> list[torch.Tensor]:
        """Nearest-code identifiers, full paths: [semantic [B, S+P], collaborative [B, S+P]]."""
        q = self.quantise(self.encode(semantic, collaborative))
        return [torch.cat([q.shared_codes, q.semantic_codes], 1),
                torch.cat([q.shared_codes, q.collaborative_codes], 1)]


class PlainResidualQuantiser(_Base):
    """Baseline: one encoder on [x_s; x_c], `levels` codebooks of dim `latent`, one decoder."""

    def __init__(self, semantic_dim: int, collaborative_dim: int, hidden_dims: Sequence[int],
                 latent_dim: int, levels: int, codebook_size: int, beta: float = 0.25, seed: int = 0):
        super().__init__()
        self.split = semantic_dim
        d = semantic_dim + collaborative_dim
        self.encoder, self.decoder = _seeded_init(
            lambda: (mlp([d, *hidden_dims, latent_dim]), mlp([latent_dim, *reversed(hidden_dims), d])), seed)
        self.stack = ResidualStack(levels, codebook_size, latent_dim, beta)

    def encode(self, semantic, collaborative):
        return self.encoder(torch.cat(self.scaled(semantic, collaborative), 1))

    def forward(self, semantic, collaborative) -> Output:
        xs, xc = self.scaled(semantic, collaborative)
        z = self.encoder(torch.cat([xs, xc], 1))
        zq, _, losses, _ = self.stack(z)
        out = self.decoder(z + (zq - z).detach())
        recon_s = F.mse_loss(out[:, : self.split], xs)
        recon_c = F.mse_loss(out[:, self.split :], xc)
        quant = torch.stack(losses).mean()
        return Output(recon_s + recon_c + quant, recon_s + recon_c, quant, recon_s, recon_c)

    @torch.no_grad()
    def init_codebooks(self, semantic, collaborative, iters: int = 20, seed: int = 0):
        self.stack.init_kmeans(self.encode(semantic, collaborative), iters, seed)

    @torch.no_grad()
    def restart_dead_codes(self, semantic, collaborative, patience: int, generator: torch.Generator) -> int:
        return self.stack.restart_dead_codes(self.encode(semantic, collaborative), patience, generator)[0]

    @torch.no_grad()
    def id_codes(self, semantic, collaborative) -> list[torch.Tensor]:
        return [self.stack(self.encode(semantic, collaborative))[1]]


# ---------------------------------------------------------------- training
def collision_rate(codes) -> float:
    """Share of items whose code path another item already has, (N - distinct) / N: the official
    code's definition. `codes` [N, levels], a tensor or an array."""
    codes = torch.as_tensor(codes)
    n = codes.shape[0]
    return (n - torch.unique(codes, dim=0).shape[0]) / n if n else 0.0


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # one row per epoch
    seconds: float = 0.0  # optimisation loop only (no k-means init, no collision checks)
    init_seconds: float = 0.0
    items_per_s: float = 0.0
    selected_epoch: int = 0  # epoch whose weights were kept (1-based)
    selected_collision_rate: Optional[float] = None


@torch.no_grad()
def _collisions(model, inputs, batch: int = 8192) -> float:
    model.eval()
    parts = [model.id_codes(*(x[i : i + batch] for x in inputs)) for i in range(0, len(inputs[0]), batch)]
    model.train()
    kinds = len(parts[0])  # mean over the model's identifier kinds (semantic, collaborative)
    return sum(collision_rate(torch.cat([p[k] for p in parts])) for k in range(kinds)) / kinds


def _sample(inputs, generator: torch.Generator, limit: int = MAX_POINTS):
    """All rows, or a seeded sample of `limit` rows (a restart needs no more)."""
    n = inputs[0].shape[0]
    if n <= limit:
        return inputs
    idx = torch.randperm(n, generator=generator)[:limit].to(inputs[0].device)
    return tuple(x[idx] for x in inputs)


def train_quantiser(model: nn.Module, semantic: torch.Tensor, collaborative: torch.Tensor,
                    cfg: IdentifierConfig, seed: int = 0, device: Optional[str] = None,
                    desc: str = "quantiser") -> TrainResult:
    """Fit `model` (DualQuantiser or PlainResidualQuantiser) in place; returns its history.

    Deterministic on CPU for a seed: the weights come from the seeded constructor, the batch
    order from a seeded generator, the k-means init from the seed.
    """
    dev = pick_device(device or cfg.device)
    model.to(dev)
    inputs = (semantic.float().to(dev), collaborative.float().to(dev))
    n = inputs[0].shape[0]
    result = TrainResult()

    t0 = time.perf_counter()
    model.fit_scales(*inputs, mode=cfg.input_scaling)
    model.init_codebooks(*inputs, iters=cfg.kmeans_iters, seed=seed)
    result.init_seconds = time.perf_counter() - t0

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    g = torch.Generator(device="cpu").manual_seed(seed)
    batch = min(cfg.batch_size, n)
    # Like the official code, keep the weights with the fewest collisions; only from the second
    # half of training on, so an under-trained early state cannot win by luck.
    first_eval = max(1, cfg.epochs // 2)
    best: Optional[tuple[float, float]] = None
    best_state = None

    # dead-code restarts draw from their own generator: the batch order does not depend on them
    g_restart = torch.Generator(device="cpu").manual_seed(seed + 1)

    model.train()
    bar = tqdm(range(1, cfg.epochs + 1), desc=desc, disable=None, leave=False)
    for epoch in bar:
        t_epoch = time.perf_counter()
        perm = torch.randperm(n, generator=g).to(dev)
        totals = torch.zeros(3, device=dev)
        for start in range(0, n, batch):
            idx = perm[start : start + batch]
            out = model(inputs[0][idx], inputs[1][idx])
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            totals += torch.stack([out.loss, out.recon_loss, out.quant_loss]).detach() * len(idx)
        restarted = 0
        if cfg.dead_code_epochs:
            restarted = model.restart_dead_codes(*_sample(inputs, g_restart), cfg.dead_code_epochs, g_restart)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        result.seconds += time.perf_counter() - t_epoch
        loss, recon, quant = (totals / n).tolist()
        row = {"epoch": epoch, "loss": loss, "recon_loss": recon, "quant_loss": quant,
               "restarted_codes": restarted}

        if cfg.eval_every and epoch >= first_eval and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
            row["collision_rate"] = coll = _collisions(model, inputs)
            if best is None or (coll, loss) < best:
                best, best_state = (coll, loss), copy.deepcopy(model.state_dict())
                result.selected_epoch, result.selected_collision_rate = epoch, coll
            log.info("%s epoch %d loss %.4f recon %.4f collisions %.4f", desc, epoch, loss, recon, coll)
        result.history.append(row)
        bar.set_postfix(loss=f"{loss:.4f}")

    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        result.selected_epoch = cfg.epochs
    model.eval()
    result.items_per_s = n * cfg.epochs / max(result.seconds, 1e-9)
    log.info("%s trained %d items x %d epochs in %.1fs (%.0f items/s), kept epoch %d",
             desc, n, cfg.epochs, result.seconds, result.items_per_s, result.selected_epoch)
    return result
