"""Training throughput of the dual residual quantiser against a plain residual quantiser.

Both are trained in this run, on the same data, with the same loop (`train_quantiser`), the same
optimiser settings, the same number of levels (shared + specific) and the same codebook size:

    dual   two encoders/decoders, 2 shared levels on the joint latent, 2+2 specific levels
    plain  one encoder/decoder on [semantic; collaborative], 4 levels on one latent of the
           same size as the dual joint latent (TIGER-style single identifier)

Throughput counts the optimisation loop only (items x epochs / seconds); k-means init is timed
separately. Each model is trained `--repeats` times, alternating, and the fastest run is kept, so
load from other processes on a shared machine skews the ratio less.

    python bench/quantiser.py [--items N --epochs E --repeats R --threads T --device cpu|cuda]
    python bench/quantiser.py --warehouse .gensar/warehouse   # real features/* tables
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from gensar_core.config import IdentifierConfig  # noqa: E402
from gensar_core.identifiers.quantiser import (  # noqa: E402
    DualQuantiser, PlainResidualQuantiser, QuantiserSpec, collision_rate, train_quantiser)


def synthetic(items: int, sem_dim: int, col_dim: int, seed: int):
    """Clustered embeddings shaped like the real ones: unit-norm text vectors, O(1) CF vectors."""
    rng = np.random.default_rng(seed)
    topics = rng.integers(64, size=items)
    sem = rng.normal(size=(64, sem_dim))[topics] + 0.7 * rng.normal(size=(items, sem_dim))
    sem /= np.linalg.norm(sem, axis=1, keepdims=True)
    col = rng.normal(size=(64, col_dim))[topics] + rng.normal(size=(items, col_dim))
    return torch.tensor(sem, dtype=torch.float32), torch.tensor(col, dtype=torch.float32)


def from_warehouse(root: str):
    from gensar_core.storage import Warehouse

    wh = Warehouse(root)
    s = wh.read("features/semantic").set_index("item_idx")
    c = wh.read("features/collaborative").set_index("item_idx")
    idx = s.index.intersection(c.index).sort_values()
    stack = lambda df: torch.tensor(np.stack(df.loc[idx, "vector"].to_numpy()), dtype=torch.float32)  # noqa: E731
    return stack(s), stack(c)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=8192)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=None, help="default: IdentifierConfig's")
    ap.add_argument("--dead-code-epochs", type=int, default=None,
                    help="dead-code restart patience, 0: off (default: IdentifierConfig's)")
    ap.add_argument("--codebook-size", type=int, default=256)
    # One thread by default: on a shared 2-core machine two torch threads contending with other
    # processes ran 10-15x slower than one, which swamps the comparison. 0: torch's default.
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--warehouse", default=None, help="read features/{semantic,collaborative} here")
    ap.add_argument("--seed", type=int, default=2025)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    sem, col = from_warehouse(args.warehouse) if args.warehouse else synthetic(args.items, 384, 64, args.seed)
    overrides = {k: v for k, v in (("batch_size", args.batch_size), ("dead_code_epochs", args.dead_code_epochs))
                 if v is not None}
    cfg = IdentifierConfig(epochs=args.epochs, codebook_size=args.codebook_size, eval_every=0,
                           device=args.device, **overrides)  # paper architecture otherwise
    levels = cfg.shared_levels + cfg.specific_levels

    def dual():
        return DualQuantiser(QuantiserSpec.from_config(cfg, sem.shape[1], col.shape[1]), seed=args.seed)

    def plain():
        return PlainResidualQuantiser(sem.shape[1], col.shape[1], cfg.hidden_dims, 2 * cfg.latent_dim,
                                      levels, cfg.codebook_size, cfg.beta, seed=args.seed)

    print(f"{len(sem)} items (semantic {sem.shape[1]}-d, collaborative {col.shape[1]}-d), "
          f"{args.epochs} epochs, batch {cfg.batch_size}, {levels} levels x {cfg.codebook_size} codes, "
          f"dead-code restarts {cfg.dead_code_epochs or 'off'}, "
          f"torch threads {torch.get_num_threads()}, device {args.device or 'auto'}")
    best: dict[str, dict] = {}
    t0 = time.perf_counter()
    for rep in range(args.repeats):
        for name, build in (("dual", dual), ("plain", plain)):
            model = build()
            r = train_quantiser(model, sem, col, cfg, seed=args.seed, device=args.device, desc=name)
            dev = next(model.parameters()).device
            codes = model.id_codes(sem.to(dev), col.to(dev))
            row = {"items_per_s": r.items_per_s, "seconds": r.seconds, "init_seconds": r.init_seconds,
                   "recon_loss": r.history[-1]["recon_loss"],
                   "collision_rate": float(np.mean([collision_rate(c) for c in codes])),
                   # share of each codebook in use, mean over the levels of the (first) identifier
                   "codebook_usage": float(np.mean([len(torch.unique(codes[0][:, i])) / cfg.codebook_size
                                                    for i in range(codes[0].shape[1])]))}
            print(f"  run {rep + 1} {name:5s} {row['items_per_s']:10.0f} items/s  train {row['seconds']:6.1f}s  "
                  f"init {row['init_seconds']:5.1f}s  recon {row['recon_loss']:.4f}  "
                  f"collisions {row['collision_rate']:.4f}  usage {row['codebook_usage']:.3f}")
            if name not in best or row["items_per_s"] > best[name]["items_per_s"]:
                best[name] = row
    ratio = best["dual"]["items_per_s"] / best["plain"]["items_per_s"]
    print(f"dual  quantiser: {best['dual']['items_per_s']:10.0f} items/s (best of {args.repeats})")
    print(f"plain quantiser: {best['plain']['items_per_s']:10.0f} items/s (best of {args.repeats})")
    print(f"ratio dual/plain: {ratio:.2f}x   (total {time.perf_counter() - t0:.0f}s)")
    return {"dual": best["dual"], "plain": best["plain"], "ratio": ratio}


if __name__ == "__main__":
    main()
