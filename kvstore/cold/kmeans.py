"""PQ codebooks trained with torch on the store's device: every (KV head, sub-space) k-means of a
sequence's layer in the same batched matmuls, seeded, stopped by a convergence rule.

This is the trainer of a store on CUDA (`KVStoreConfig.pq_trainer="auto"`): a layer's codebooks are
trained right after its prefill, on keys already in GPU memory, in milliseconds (one layer of a
128K-token prompt: 16 problems of 128K points x 64 dims x 64 centroids, ~2 GFLOP each per
iteration). FAISS on host threads (`retrieval.codebook`) stays the trainer of a CPU store.

Same contract as `retrieval.codebook.train_codebook` (which it is tested against): trained on the
first `num_candidates` tokens (the search candidates), encodes all of them; fewer candidates than
centroids makes the candidates themselves the centroids (exact scores).

Training set: at most `max_points_per_centroid` candidates a centroid (K x that many, a sample drawn
by a CPU generator seeded from `seed`; FAISS's own default of 256, which PQCache's FAISS k-means
uses): at 128K candidates and K=64 that is 16K points, 8x less work an iteration than all of them,
for codebooks of the same quality (tests/test_kmeans.py against FAISS). Every token is encoded.

Determinism: the initial centroids are candidates picked by a CPU generator seeded from `seed`;
the update is a one-hot matmul (no atomics); the iteration count comes from the data: Lloyd stops
once at most `tol` of the points change their centroid in an iteration (between `min_iters` and
`max_iters`; each problem on its own), never from a clock. Same keys, same codebook, on a loaded
or an idle machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: points per matmul block: bounds the [problems, block, K] distance tensor
_BLOCK_POINTS = 1 << 15


@dataclass
class DeviceCodebook:
    """centroids: fp32 [H, m, K, d/m]; codes: uint8 [H, n, m] of tokens [0, n); iters: Lloyd iterations run."""

    centroids: torch.Tensor
    codes: torch.Tensor
    exact: bool
    iters: int


def _assign(x: torch.Tensor, cen: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Nearest centroid (L2) of every point. x [P, n, ds]; cen [P, K, ds] -> out int64 [P, n]."""
    c2 = cen.square().sum(-1).unsqueeze(1)  # [P, 1, K]
    for s in range(0, x.shape[1], _BLOCK_POINTS):
        xs = x[:, s: s + _BLOCK_POINTS]
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 is the same for every c
        torch.argmin(torch.baddbmm(c2, xs, cen.transpose(1, 2), alpha=-2.0), dim=-1, out=out[:, s: s + _BLOCK_POINTS])
    return out


def _update(x: torch.Tensor, assign: torch.Tensor, cen: torch.Tensor) -> torch.Tensor:
    """Mean of each centroid's points (one-hot matmul, deterministic); an empty centroid keeps its place."""
    P, n, _ = x.shape
    K = cen.shape[1]
    sums = torch.zeros_like(cen)
    counts = torch.zeros(P, K, 1, dtype=x.dtype, device=x.device)
    for s in range(0, n, _BLOCK_POINTS):
        a = assign[:, s: s + _BLOCK_POINTS]
        onehot = torch.zeros(P, K, a.shape[1], dtype=x.dtype, device=x.device).scatter_(1, a.unsqueeze(1), 1.0)
        sums.baddbmm_(onehot, x[:, s: s + _BLOCK_POINTS])
        counts += onehot.sum(-1, keepdim=True)
    return torch.where(counts > 0, sums / counts.clamp(min=1.0), cen)


def train_codebook(keys: torch.Tensor, num_candidates: int, m: int, bits: int, seed: int = 0,
                   min_iters: int = 3, max_iters: int = 300, tol: float = 1e-2,
                   max_points_per_centroid: int | None = None) -> DeviceCodebook:
    """Train one (sequence, layer) codebook on its device and encode its tokens.

    Args:
        keys: [H, n, d] post-RoPE keys (any float dtype) of tokens [0, n); the first
            `num_candidates` are the search candidates k-means is trained on.
        m, bits: sub-spaces and bits per code (K = 2^bits centroids, bits <= 8).
        seed: picks the initial centroids (a CPU generator: the same on every device).
        min_iters, max_iters, tol: Lloyd runs until at most `tol` of the training points change
            centroid in one iteration, within [min_iters, max_iters].
        max_points_per_centroid: train on a seeded sample of at most K x this many candidates
            (None: all of them).
    """
    cb = train_codebooks(keys.unsqueeze(0), num_candidates, m, bits, seed, min_iters, max_iters, tol,
                         max_points_per_centroid)
    return DeviceCodebook(cb.centroids[0], cb.codes[0], cb.exact, cb.iters)


def train_codebooks(keys: torch.Tensor, num_candidates: int, m: int, bits: int, seed: int = 0,
                    min_iters: int = 3, max_iters: int = 300, tol: float = 1e-2,
                    max_points_per_centroid: int | None = None) -> DeviceCodebook:
    """`train_codebook` for G sequences of the same length and candidate count at once: keys
    [G, H, n, d] -> centroids [G, H, m, K, d/m], codes [G, H, n, m]; `iters` is the most any
    problem ran. Each (sequence, head, sub-space) problem starts from the same picks and stops
    at the same iteration as it would alone (a converged problem is frozen while others run), so
    a sequence's codebook does not depend on its batchmates.
    """
    G, H, n, d = keys.shape
    if d % m:
        raise ValueError(f"head dim {d} is not a multiple of pq_subspaces={m}")
    if not 0 <= num_candidates <= n:
        raise ValueError(f"num_candidates={num_candidates} outside [0, {n}]")
    if not 1 <= bits <= 8:
        raise ValueError(f"pq_bits={bits} outside [1, 8]")
    if max_points_per_centroid is not None and max_points_per_centroid < 1:
        raise ValueError(f"max_points_per_centroid={max_points_per_centroid} must be >= 1 (or None: every candidate)")
    K, ds, nc, P = 1 << bits, d // m, num_candidates, G * H * m
    x = keys.float().reshape(G * H, n, m, ds).permute(0, 2, 1, 3).reshape(P, n, ds).contiguous()  # [P, n, ds]
    codes = torch.empty(P, n, dtype=torch.int64, device=keys.device)
    exact, iters = nc < K, 0
    if exact:  # the candidates are the centroids; duplicates of the first fill the rest
        cen = x[:, :1].expand(P, K, ds).clone()
        cen[:, :nc] = x[:, :nc]
    else:
        g = torch.Generator().manual_seed(seed)
        cand = x[:, :nc]
        if max_points_per_centroid is not None and nc > K * max_points_per_centroid:
            # the training set: a seeded sample of the candidates (in order), the same for every problem
            sample = torch.randperm(nc, generator=g)[: K * max_points_per_centroid].sort().values
            cand = cand[:, sample.to(keys.device)]
            nc = cand.shape[1]
        pick = torch.stack([torch.randperm(nc, generator=g)[:K] if nc <= 4 * K else
                            torch.randint(nc, (K,), generator=g) for _ in range(H * m)])  # one sequence's
        pick = pick.repeat(G, 1).to(keys.device)
        cen = torch.gather(cand, 1, pick.unsqueeze(-1).expand(P, K, ds))
        prev = torch.full((P, nc), -1, dtype=torch.int64, device=keys.device)
        cur = torch.empty_like(prev)
        active = torch.ones(P, 1, 1, dtype=torch.bool, device=keys.device)
        limit = tol * nc
        while iters < max_iters:
            _assign(cand, cen, cur)
            iters += 1
            changed = (cur != prev).sum(-1)  # [P]
            cen = torch.where(active, _update(cand, cur, cen), cen)
            prev, cur = cur, prev
            if iters >= min_iters:
                active &= (changed > limit).view(P, 1, 1)
                if not bool(active.any().item()):  # one host sync per iteration
                    break
    _assign(x, cen, codes)
    if exact and nc:
        codes[:, :nc] = torch.arange(nc, device=keys.device)
    centroids = cen.view(G, H, m, K, ds)
    return DeviceCodebook(centroids, codes.view(G, H, m, n).transpose(2, 3).to(torch.uint8), exact, iters)
