"""A small seeded k-means in torch (k-means++ seeding, then Lloyd iterations).

Used to initialise every codebook; kept here so the package needs no scikit-learn.
"""
from __future__ import annotations

import torch

# k-means++ and Lloyd cost O(points * k * dim) per pass: a seeded sample is plenty for an init.
MAX_POINTS = 32768


def _sq_dist(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    return (x * x).sum(1, keepdim=True) - 2 * x @ centres.T + (centres * centres).sum(1)[None, :]


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """`k` centres for the rows of `x` ([n, d]), deterministic for a seed."""
    x = x.detach().float()
    g = torch.Generator(device="cpu").manual_seed(seed)
    n = x.shape[0]
    if n > MAX_POINTS:
        x = x[torch.randperm(n, generator=g)[:MAX_POINTS].to(x.device)]
        n = MAX_POINTS
    if n <= k:
        # Fewer points than codes: every point is a centre, the rest are jittered copies so the
        # spare codes are distinct and can still move to where data lands later.
        extra = torch.randint(n, (k - n,), generator=g).to(x.device)
        noise = torch.randn(k - n, x.shape[1], generator=g).to(x.device)
        scale = x.std() * 0.01 + 1e-6
        return torch.cat([x, x[extra] + noise * scale])

    # k-means++ seeding: next centre drawn with probability proportional to squared distance
    first = int(torch.randint(n, (1,), generator=g))
    centres = [x[first]]
    closest = _sq_dist(x, x[first : first + 1]).squeeze(1).clamp_min(0)
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:  # all remaining points coincide with a centre
            idx = int(torch.randint(n, (1,), generator=g))
        else:
            idx = int(torch.multinomial((closest / total).cpu(), 1, generator=g))
        centres.append(x[idx])
        closest = torch.minimum(closest, _sq_dist(x, x[idx : idx + 1]).squeeze(1).clamp_min(0))
    c = torch.stack(centres)

    for _ in range(iters):
        assign = _sq_dist(x, c).argmin(1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1).to(x.dtype)
        # an empty cluster keeps its old centre rather than collapsing to the origin
        c = torch.where(counts > 0, sums / counts.clamp_min(1), c)
    return c
