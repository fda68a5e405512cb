"""Collision-free identifier assignment, its report, and cold-start items.

Every item gets exactly one semantic ID (shared codes + semantic codes) and one collaborative ID
(shared codes + collaborative codes); both start with the same shared codes. Token names: see
`naming.py` (`<a_i><b_j><s_k><t_l>` and `<a_i><b_j><c_k><d_l>` for 2 shared + 2 specific levels).

How codes are chosen, in order:
1. Nearest code at every level (the quantiser's own encoding).
   Reported as `collision_rate_argmin/{semantic,collaborative}`.
2. The paper's collision reduction (LC-Rec style): for each branch, the items of every colliding
   group get their *last* specific code re-chosen by a Sinkhorn-balanced assignment of the group
   onto the last codebook; repeated for the groups that still collide, up to
   `cfg.sinkhorn_rounds` rounds. This lowers collisions but cannot separate identical latents.
   What is left is reported as `collision_rate_before_rule/{semantic,collaborative}`.
3. The uniqueness rule (the guarantee), per branch: "nearest free code".
   - An item whose code path no other item has keeps it. In a colliding group the member
     closest to the codeword they share (smallest last-level quantisation error; ties: lower
     item_idx) keeps it.
   - Every other member, in item_idx order, is placed by walking its code path level by level,
     exactly as the quantiser encodes: it keeps each code of its path as long as the subtree
     below still has a free full code, and at the first level where it has none, takes the
     nearest codeword (to its residual at that level) whose subtree has room, then the nearest
     room-having code at each level below. So it keeps the longest possible prefix of its own
     path and changes only the deepest codes it must.
   - Normally only the last specific code changes. If a shared prefix ever holds more items than
     its specific levels can name (K ** specific_levels), the item moves to the nearest shared
     prefix with room in *both* branches, so its two IDs still share their prefix.
   Identifiers keep a fixed length (no extra token), and the rule succeeds whenever
   N <= K ** (shared_levels + specific_levels), the number of distinct paths; beyond that no
   fixed-length assignment exists and `assign_identifiers` raises ValueError.

Cold start (`assign_cold_start`): a new item has text, so a semantic embedding, but no
collaborative one. Its semantic latent z_s comes from the trained semantic encoder; the shared
codes are chosen on the semantic half of the shared codebooks only (the collaborative half is
unobserved), and the item's collaborative latent is taken to be what those shared codewords say
about it (their collaborative halves): the shared codebooks hold what both signals agree on, and
there is nothing else to go on. So its collaborative residual after the shared levels is zero and
its collaborative-specific codes are the codewords nearest to zero. Both IDs then pass through the
same nearest-free rule against every code already in the existing table (and the cold items placed
before it), so they are unique without retraining and without changing any existing ID.

Table layout (`identifiers/items`): `semantic_codes` and `collaborative_codes` hold the *full*
code path (shared codes first), one code per token of the ID string; `shared_codes` repeats the
shared prefix for convenience.
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from gensar_core.config import IdentifierConfig
from gensar_core.identifiers.checkpoint import load_quantiser
from gensar_core.identifiers.naming import format_id, token_letters
from gensar_core.identifiers.quantiser import DualQuantiser, collision_rate

log = logging.getLogger(__name__)

BRANCHES = ("semantic", "collaborative")

TABLE_SCHEMA = pa.schema([
    ("item_idx", pa.int64()),
    ("item_id", pa.string()),
    ("shared_codes", pa.list_(pa.int64())),
    ("semantic_codes", pa.list_(pa.int64())),
    ("collaborative_codes", pa.list_(pa.int64())),
    ("semantic_id", pa.string()),
    ("collaborative_id", pa.string()),
])


# ---------------------------------------------------------------- encoding
@dataclass
class Codebooks:
    """The trained codebooks as float64 numpy arrays (exact, stable distance orderings)."""

    shared: list[np.ndarray]  # [K, 2L] per shared level
    specific: dict[str, list[np.ndarray]]  # branch -> [K, L] per specific level
    latent_dim: int

    @classmethod
    def of(cls, model: DualQuantiser) -> "Codebooks":
        def arr(stack):
            return [cb.detach().cpu().double().numpy() for cb in stack.codebooks]

        return cls(arr(model.shared), {"semantic": arr(model.semantic),
                                       "collaborative": arr(model.collaborative)},
                   model.spec.latent_dim)

    def half(self, x: np.ndarray, branch: str) -> np.ndarray:
        L = self.latent_dim
        return x[..., :L] if branch == "semantic" else x[..., L:]

    def after_shared(self, z: np.ndarray, shared_codes: np.ndarray) -> np.ndarray:
        """Joint residual left after the shared levels (rows of z, or one z)."""
        r = z.astype(np.float64).copy()
        for level, cb in enumerate(self.shared):
            r -= cb[shared_codes[..., level]]
        return r


@dataclass
class Encoded:
    z: np.ndarray  # joint latent [N, 2L]
    shared: np.ndarray  # [N, S]
    specific: dict[str, np.ndarray]  # branch -> [N, P]


@torch.no_grad()
def encode_items(model: DualQuantiser, semantic, collaborative, batch: int = 8192) -> Encoded:
    """Nearest-code encoding of every item (eval mode, batched)."""
    model.eval()
    dev = next(model.parameters()).device
    sem = torch.as_tensor(np.asarray(semantic), dtype=torch.float32)
    col = torch.as_tensor(np.asarray(collaborative), dtype=torch.float32)
    zs, shared, s_codes, c_codes = [], [], [], []
    for i in range(0, len(sem), batch):
        z = model.encode(sem[i : i + batch].to(dev), col[i : i + batch].to(dev))
        q = model.quantise(z)
        zs.append(z.cpu())
        shared.append(q.shared_codes.cpu())
        s_codes.append(q.semantic_codes.cpu())
        c_codes.append(q.collaborative_codes.cpu())
    return Encoded(torch.cat(zs).double().numpy(), torch.cat(shared).numpy(),
                   {"semantic": torch.cat(s_codes).numpy(), "collaborative": torch.cat(c_codes).numpy()})


def _sq_dist(x: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Squared L2 distance of each row of x (or of one vector) to each codeword."""
    return ((x[..., None, :] - codebook) ** 2).sum(-1)


# ---------------------------------------------------------------- collision reduction (paper)
def colliding_groups(codes: np.ndarray) -> list[np.ndarray]:
    """Item indices of every code path held by more than one item, ordered by path."""
    if len(codes) == 0:
        return []
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    order = np.argsort(inverse.reshape(-1), kind="stable")
    groups = np.split(order, np.cumsum(counts)[:-1])
    return [g for g in groups if len(g) > 1]


@torch.no_grad()
def sinkhorn_assign_batched(distances: torch.Tensor, mask: torch.Tensor, epsilon: float = 0.003,
                            iters: int = 100) -> torch.Tensor:
    """Balanced assignment of items to codes for many groups at once: argmax of the Sinkhorn plan.

    distances [G, B, K] (float64), mask [G, B] marks the real items of each padded group.
    Each group's distances are first mapped to [-1, 1] (as the official code does, so `epsilon`
    means the same at any scale); the iterations run in the log domain, which cannot overflow
    at small epsilon. Returns codes [G, B] (padding rows are meaningless).
    """
    m = mask[:, :, None]
    big = torch.finfo(distances.dtype).max
    lo = torch.where(m, distances, big).amin((1, 2), keepdim=True)
    hi = torch.where(m, distances, -big).amax((1, 2), keepdim=True)
    mid = (lo + hi) / 2
    d = (distances - mid) / (hi - mid + 1e-5)
    rows = mask.sum(1).to(d.dtype)[:, None, None]  # real items per group
    cols = d.shape[2]
    logq = torch.where(m, -d / epsilon, -torch.inf)
    for _ in range(iters):
        # each item carries mass 1/rows, each code receives 1/cols
        logq = logq - torch.logsumexp(logq, 2, keepdim=True).nan_to_num(neginf=0.0) - rows.log()
        logq = logq - torch.logsumexp(logq, 1, keepdim=True) - math.log(cols)
        logq = torch.where(m, logq, -torch.inf)
    return logq.argmax(2)


def sinkhorn_assign(distances: np.ndarray, epsilon: float = 0.003, iters: int = 100) -> np.ndarray:
    """One group: distances [B, K] -> code per item."""
    d = torch.as_tensor(distances, dtype=torch.float64)[None]
    return sinkhorn_assign_batched(d, torch.ones(d.shape[:2], dtype=torch.bool), epsilon, iters)[0].numpy()


# padded groups per Sinkhorn call are capped at this many distance entries (memory)
_SINKHORN_CHUNK = 1 << 22


def _sinkhorn_groups(groups: list[np.ndarray], residual: np.ndarray, codebook: np.ndarray,
                     epsilon: float, iters: int) -> list[np.ndarray]:
    """Sinkhorn codes for every group; groups of similar size are padded and run together."""
    out: list[Optional[np.ndarray]] = [None] * len(groups)
    K = len(codebook)
    buckets: dict[int, list[int]] = defaultdict(list)
    for gi, g in enumerate(groups):  # pad to the next power of two: at most 2x waste
        buckets[1 << (len(g) - 1).bit_length()].append(gi)
    for width, members in sorted(buckets.items()):
        step = max(1, _SINKHORN_CHUNK // (width * K))
        for c in range(0, len(members), step):
            chunk = members[c : c + step]
            d = np.zeros((len(chunk), width, K))
            mask = np.zeros((len(chunk), width), dtype=bool)
            for row, gi in enumerate(chunk):
                g = groups[gi]
                d[row, : len(g)] = _sq_dist(residual[g], codebook)
                mask[row, : len(g)] = True
            codes = sinkhorn_assign_batched(torch.from_numpy(d), torch.from_numpy(mask), epsilon, iters).numpy()
            for row, gi in enumerate(chunk):
                out[gi] = codes[row, : len(groups[gi])]
    return out  # type: ignore[return-value]


def sinkhorn_rounds(full_codes: np.ndarray, last_residual: np.ndarray, last_codebook: np.ndarray,
                    rounds: int, epsilon: float, iters: int) -> tuple[np.ndarray, int]:
    """Re-choose the last code of colliding groups by Sinkhorn, up to `rounds` times.

    Returns the new full codes and the number of rounds run.
    """
    codes = full_codes.copy()
    done = 0
    for done in range(1, rounds + 1):
        groups = colliding_groups(codes)
        if not groups:
            return codes, done - 1
        changed = False
        for g, new in zip(groups, _sinkhorn_groups(groups, last_residual, last_codebook, epsilon, iters)):
            changed |= bool((codes[g, -1] != new).any())
            codes[g, -1] = new
        if not changed:  # deterministic: the same groups would get the same answer again
            break
    return codes, done


# ---------------------------------------------------------------- uniqueness rule
class Occupancy:
    """How many items hold each code prefix, per branch; a prefix is full when every full path
    below it is taken."""

    def __init__(self, shared_levels: int, specific_levels: int, codebook_size: int):
        self.depth = shared_levels + specific_levels
        self.size = codebook_size
        self.counts: dict[str, dict[tuple, int]] = {b: defaultdict(int) for b in BRANCHES}

    def capacity(self, prefix_len: int) -> int:
        return self.size ** (self.depth - prefix_len)

    def full(self, branch: str, prefix: tuple) -> bool:
        return self.counts[branch].get(prefix, 0) >= self.capacity(len(prefix))

    def full_any(self, prefix: tuple) -> bool:
        return any(self.full(b, prefix) for b in BRANCHES)

    def taken(self, branch: str, path: Sequence[int]) -> bool:
        return self.counts[branch].get(tuple(int(c) for c in path), 0) > 0

    def claim(self, branch: str, path: Sequence[int]) -> None:
        path = tuple(int(c) for c in path)
        if self.counts[branch].get(path, 0):
            raise AssertionError(f"{branch} path {path} is already taken")
        for i in range(1, len(path) + 1):
            self.counts[branch][path[:i]] += 1

    def release(self, branch: str, path: Sequence[int]) -> None:
        path = tuple(int(c) for c in path)
        for i in range(1, len(path) + 1):
            self.counts[branch][path[:i]] -= 1


def descend(residual: np.ndarray, codebooks: list[np.ndarray], prefix: tuple,
            is_full: Callable[[tuple], bool], preferred: Optional[Sequence[int]] = None) -> tuple:
    """Codes for `codebooks` below `prefix`: the preferred code while its subtree has room, else
    the nearest codeword with room; once off the preferred path, nearest with room all the way.

    Never fails when `prefix` itself is not full (some child of a non-full node has room).
    """
    r = np.asarray(residual, dtype=np.float64)
    codes: list[int] = []
    for level, cb in enumerate(codebooks):
        pick = None
        if preferred is not None and not is_full(prefix + (int(preferred[level]),)):
            pick = int(preferred[level])
        else:
            preferred = None  # the rest of the preferred path hangs off another parent
            for c in np.argsort(_sq_dist(r, cb), kind="stable"):
                if not is_full(prefix + (int(c),)):
                    pick = int(c)
                    break
        if pick is None:
            raise AssertionError(f"no free code below {prefix}: caller passed a full prefix")
        codes.append(pick)
        prefix = prefix + (pick,)
        r = r - cb[pick]
    return tuple(codes)


def make_unique(enc: Encoded, books: Codebooks, quant_error: dict[str, np.ndarray],
                occ: Occupancy) -> dict:
    """Apply the nearest-free rule in place on `enc`; returns counts of what it changed."""
    n = len(enc.z)
    keep = {}
    for b in BRANCHES:
        full = np.concatenate([enc.shared, enc.specific[b]], 1)
        keep[b] = np.ones(n, dtype=bool)
        for g in colliding_groups(full):
            keep[b][g] = False
            # closest member keeps the code; lexsort: last key is primary
            keep[b][g[np.lexsort((g, quant_error[b][g]))[0]]] = True
        for i in np.flatnonzero(keep[b]):
            occ.claim(b, np.concatenate([enc.shared[i], enc.specific[b][i]]))

    stats = {"reassigned/semantic": 0, "reassigned/collaborative": 0, "moved_shared_prefix": 0}
    pending = np.flatnonzero(~keep["semantic"] | ~keep["collaborative"])
    for i in pending:
        need = [b for b in BRANCHES if not keep[b][i]]
        p = tuple(int(c) for c in enc.shared[i])
        moved = any(occ.full(b, p) for b in need)
        if moved:
            # no room left under this shared prefix: move the whole item, both IDs together
            for b in BRANCHES:
                if keep[b][i]:
                    occ.release(b, p + tuple(int(c) for c in enc.specific[b][i]))
            need = list(BRANCHES)
            p = descend(enc.z[i], books.shared, (), occ.full_any, preferred=p)
            enc.shared[i] = p
            stats["moved_shared_prefix"] += 1
        r = books.after_shared(enc.z[i], np.asarray(p))
        for b in need:
            spec = descend(books.half(r, b), books.specific[b], p, lambda q, b=b: occ.full(b, q),
                           preferred=None if moved else enc.specific[b][i])
            enc.specific[b][i] = spec
            occ.claim(b, p + spec)
            stats[f"reassigned/{b}"] += 1
    return stats


# ---------------------------------------------------------------- report
def codebook_metrics(codes: np.ndarray, size: int, names: Sequence[str]) -> dict:
    """Per level: share of the codebook in use, and perplexity exp(entropy) of the code counts."""
    out = {}
    for level, name in enumerate(names):
        counts = np.bincount(codes[:, level], minlength=size).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        out[f"usage/{name}"] = float((counts > 0).sum() / size)
        out[f"perplexity/{name}"] = float(np.exp(-(p * np.log(p)).sum()))
    return out


def level_names(shared_levels: int, specific_levels: int) -> list[str]:
    """Report names of the levels: shared_1.., semantic_1.., collaborative_1.."""
    return ([f"shared_{i + 1}" for i in range(shared_levels)]
            + [f"semantic_{i + 1}" for i in range(specific_levels)]
            + [f"collaborative_{i + 1}" for i in range(specific_levels)])


@torch.no_grad()
def reconstruction_metrics(model: DualQuantiser, semantic, collaborative, batch: int = 8192) -> dict:
    """MSE of the decoded embeddings in the inputs' own units, and relative to their variance."""
    model.eval()
    dev = next(model.parameters()).device
    out = {}
    for b, x in (("semantic", semantic), ("collaborative", collaborative)):
        out[b] = np.asarray(x, dtype=np.float32)
    err = {"semantic": 0.0, "collaborative": 0.0}
    n = len(out["semantic"])
    for i in range(0, n, batch):
        s = torch.as_tensor(out["semantic"][i : i + batch], device=dev)
        c = torch.as_tensor(out["collaborative"][i : i + batch], device=dev)
        rs, rc = model.reconstruct(s, c)
        err["semantic"] += float(((rs - s) ** 2).sum())
        err["collaborative"] += float(((rc - c) ** 2).sum())
    metrics = {}
    for b in BRANCHES:
        mse = err[b] / out[b].size
        var = float(out[b].var(0).mean()) or 1.0
        metrics[f"recon_mse/{b}"] = mse
        metrics[f"recon_relative_mse/{b}"] = mse / var
    return metrics


# ---------------------------------------------------------------- main entry points
@dataclass
class Assignment:
    shared_codes: np.ndarray  # [N, S]
    semantic_codes: np.ndarray  # [N, S+P]: full path, shared first
    collaborative_codes: np.ndarray  # [N, S+P]
    semantic_ids: list[str]
    collaborative_ids: list[str]
    metrics: dict


def _check_capacity(n: int, spec) -> None:
    paths = spec.codebook_size ** (spec.shared_levels + spec.specific_levels)
    if n > paths:
        raise ValueError(
            f"{n} items cannot get unique identifiers from {paths} code paths "
            f"(codebook_size {spec.codebook_size} ** {spec.shared_levels + spec.specific_levels} "
            f"levels): raise codebook_size or the number of levels")


def assign_identifiers(model: DualQuantiser, semantic, collaborative, cfg: IdentifierConfig) -> Assignment:
    """Unique semantic and collaborative IDs for every row of the two embedding matrices."""
    spec = model.spec
    _check_capacity(len(semantic), spec)
    letters = token_letters(spec.shared_levels, spec.specific_levels)
    books = Codebooks.of(model)
    enc = encode_items(model, semantic, collaborative)
    metrics: dict = {"n_items": len(enc.z)}

    quant_error = {}
    after_shared = books.after_shared(enc.z, enc.shared)
    for b in BRANCHES:
        full = np.concatenate([enc.shared, enc.specific[b]], 1)
        metrics[f"collision_rate_argmin/{b}"] = collision_rate(full)
        # residual that the last specific level quantises
        r = books.half(after_shared, b).copy()
        for level, cb in enumerate(books.specific[b][:-1]):
            r -= cb[enc.specific[b][:, level]]
        full, used = sinkhorn_rounds(full, r, books.specific[b][-1], cfg.sinkhorn_rounds,
                                     cfg.sinkhorn_epsilon, cfg.sinkhorn_iters)
        enc.specific[b] = full[:, spec.shared_levels :].copy()
        metrics[f"collision_rate_before_rule/{b}"] = collision_rate(full)
        metrics[f"sinkhorn_rounds/{b}"] = used
        quant_error[b] = ((r - books.specific[b][-1][full[:, -1]]) ** 2).sum(1)

    occ = Occupancy(spec.shared_levels, spec.specific_levels, spec.codebook_size)
    metrics.update(make_unique(enc, books, quant_error, occ))

    sem_full = np.concatenate([enc.shared, enc.specific["semantic"]], 1).astype(np.int64)
    col_full = np.concatenate([enc.shared, enc.specific["collaborative"]], 1).astype(np.int64)
    sem_ids = [format_id(c, letters.semantic_id) for c in sem_full]
    col_ids = [format_id(c, letters.collaborative_id) for c in col_full]
    for b, ids in (("semantic", sem_ids), ("collaborative", col_ids)):
        metrics[f"collision_rate_final/{b}"] = 1 - len(set(ids)) / max(len(ids), 1)
    if metrics["collision_rate_final/semantic"] or metrics["collision_rate_final/collaborative"]:
        raise AssertionError("uniqueness rule left a collision: this is a bug")

    all_codes = np.concatenate([enc.shared, enc.specific["semantic"], enc.specific["collaborative"]], 1)
    metrics.update(codebook_metrics(all_codes, spec.codebook_size,
                                    level_names(spec.shared_levels, spec.specific_levels)))
    metrics.update(reconstruction_metrics(model, semantic, collaborative))
    S = spec.shared_levels
    metrics["prefix_shared_share"] = float((sem_full[:, :S] == col_full[:, :S]).all(1).mean()) if len(sem_full) else 1.0
    return Assignment(enc.shared.astype(np.int64), sem_full, col_full, sem_ids, col_ids, metrics)


def identifier_table(assignment: Assignment, item_idx: Sequence[int], item_id: Sequence[str]) -> pd.DataFrame:
    """The `identifiers/items` rows (see TABLE_SCHEMA)."""
    return pd.DataFrame({
        "item_idx": np.asarray(item_idx, dtype=np.int64),
        "item_id": [str(x) for x in item_id],
        "shared_codes": [list(map(int, c)) for c in assignment.shared_codes],
        "semantic_codes": [list(map(int, c)) for c in assignment.semantic_codes],
        "collaborative_codes": [list(map(int, c)) for c in assignment.collaborative_codes],
        "semantic_id": assignment.semantic_ids,
        "collaborative_id": assignment.collaborative_ids,
    })


def to_arrow(df: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(df[TABLE_SCHEMA.names], schema=TABLE_SCHEMA, preserve_index=False)


def _codes_matrix(column, width: int, name: str) -> np.ndarray:
    rows = [np.asarray(c, dtype=np.int64) for c in column]
    if any(len(r) != width for r in rows):
        raise ValueError(f"existing table: every {name} must have {width} codes")
    return np.stack(rows) if rows else np.zeros((0, width), dtype=np.int64)


def assign_cold_start(checkpoint: Union[str, Path, DualQuantiser], semantic_vectors,
                      existing_table: pd.DataFrame) -> pd.DataFrame:
    """IDs for new items that only have a semantic embedding, unique against `existing_table`.

    `semantic_vectors`: an array [M, semantic_dim], or a DataFrame with a `vector` column (its
    `item_idx` / `item_id` columns, when present, are carried into the result). Returns one row
    per new item, in input order, with the `identifiers/items` code and ID columns. The existing
    IDs are never changed. See the module docstring for how the collaborative ID is derived.
    """
    model = checkpoint if isinstance(checkpoint, DualQuantiser) else load_quantiser(checkpoint)
    model.eval()
    spec = model.spec
    S, P, L = spec.shared_levels, spec.specific_levels, spec.latent_dim
    letters = token_letters(S, P)
    books = Codebooks.of(model)

    carry = pd.DataFrame(index=range(len(semantic_vectors)))
    if isinstance(semantic_vectors, pd.DataFrame):
        for col in ("item_idx", "item_id"):
            if col in semantic_vectors:
                carry[col] = semantic_vectors[col].to_numpy()
        vectors = np.stack([np.asarray(v, dtype=np.float32) for v in semantic_vectors["vector"]]) \
            if len(semantic_vectors) else np.zeros((0, spec.semantic_dim), np.float32)
    else:
        vectors = np.asarray(semantic_vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != spec.semantic_dim:
        raise ValueError(f"semantic vectors of shape {vectors.shape}: the quantiser expects "
                         f"[items, {spec.semantic_dim}] dims")
    _check_capacity(len(existing_table) + len(vectors), spec)

    # occupancy of the existing IDs; they must already be unique
    occ = Occupancy(S, P, spec.codebook_size)
    for b in BRANCHES:
        existing = _codes_matrix(existing_table[f"{b}_codes"], S + P, f"{b}_codes")
        if collision_rate(existing) > 0:
            raise ValueError(f"existing table has duplicate {b} codes")
        for path in existing:
            occ.claim(b, path)

    with torch.no_grad():
        dev = next(model.parameters()).device
        x = torch.as_tensor(vectors, device=dev) / model.semantic_scale
        z_sem = model.semantic_encoder(x).cpu().double().numpy() if len(x) else np.zeros((0, L))

    # shared codes compared on their semantic half only: the collaborative half is unobserved
    shared_sem_half = [cb[:, :L] for cb in books.shared]
    rows = {"shared_codes": [], "semantic_codes": [], "collaborative_codes": [],
            "semantic_id": [], "collaborative_id": []}
    for zs in z_sem:
        p = descend(zs, shared_sem_half, (), occ.full_any)
        r_sem = zs - sum(cb[c] for cb, c in zip(shared_sem_half, p))
        r_col = np.zeros(L)  # collaborative latent := collaborative half of the shared codewords
        sem = p + descend(r_sem, books.specific["semantic"], p, lambda q: occ.full("semantic", q))
        col = p + descend(r_col, books.specific["collaborative"], p, lambda q: occ.full("collaborative", q))
        occ.claim("semantic", sem)
        occ.claim("collaborative", col)
        rows["shared_codes"].append(list(p))
        rows["semantic_codes"].append(list(sem))
        rows["collaborative_codes"].append(list(col))
        rows["semantic_id"].append(format_id(sem, letters.semantic_id))
        rows["collaborative_id"].append(format_id(col, letters.collaborative_id))
    return pd.concat([carry, pd.DataFrame(rows, index=carry.index)], axis=1)
