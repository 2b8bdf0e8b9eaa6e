"""PQ codebooks: FAISS k-means per (KV head, sub-space) on post-RoPE keys, trained on host threads.

One `PQCodebook` covers one (sequence, layer): every KV head, m sub-spaces of d/m dims, K = 2^b
centroids each. It is trained on the search candidates of that sequence only (tokens in
[S, n - W): sinks excluded, window not searched; never rows of another request or unwritten
buffer rows, PQCache's stale-row defect) and then encodes every token in [S, n) (the window's
tokens get their codes now, with the codebook they would get on leaving the window).

Fewer candidates than centroids: the codebook's first n centroids *are* the candidates'
sub-vectors and token i gets code i in every sub-space, so the asymmetric-distance score of a
candidate equals its exact q.k (the "exact scores for that layer" rule, with no second code
path). Later tokens get nearest-centroid codes as usual.

The iteration count is fixed (`KVStoreConfig.kmeans_iters`): PQCache sizes it to the prefill
time the build hides behind, which made its codebooks, and so its answers, depend on the
machine's load. A CUDA store trains on the device instead (`kvstore/cold/kmeans.py`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import faiss
import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class PQCodebook:
    """centroids: float32 [H, m, K, d/m]; codes: uint8 [H, n, m] for tokens [start, start + n)."""

    centroids: np.ndarray
    codes: np.ndarray
    start: int
    exact: bool  # fewer candidates than centroids: scores of candidates are exact
    iters: int
    seconds: float


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def build_workers() -> int:
    """Host threads for the build: all cores but two (the decode/prefill thread spins in CUDA syncs,
    the cold tier's copy thread). Override with KVSTORE_PQ_BUILD_THREADS."""
    env = os.environ.get("KVSTORE_PQ_BUILD_THREADS")
    if env:
        return max(1, int(env))
    return max(1, (os.cpu_count() or 1) - 2)


def _pool() -> ThreadPoolExecutor:
    """One process-wide pool; each worker runs FAISS with ONE OpenMP thread. The k-means jobs of a
    layer (H x m of them, each small: 32K points, K=64) run side by side instead of one after the
    other with FAISS's OpenMP team over all cores: a small OpenMP job per barrier on cores shared
    with spinning threads is what made the PQCache build 10x slower than its FLOPs (H100 run,
    16 cores: 33.5 s of build for 8 layers of 32K tokens)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(build_workers(), thread_name_prefix="kvstore-kmeans",
                                       initializer=faiss.omp_set_num_threads, initargs=(1,))
        return _POOL


def _kmeans(x: np.ndarray, k: int, iters: int, seed: int, max_points_per_centroid: int | None = None) -> np.ndarray:
    """float32 [n, dsub] -> centroids float32 [k, dsub] (FAISS Lloyd, one init from random points; on a
    seeded sample of at most k x max_points_per_centroid points, None: all of them)."""
    # min_points_per_centroid=1: FAISS would print a warning to stderr for every (head, sub-space)
    # with fewer than 39 points per centroid (a prompt under ~2.5K candidates at K=64); k-means
    # is still well defined there, and `train_codebook` logs the case once per codebook instead.
    km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, verbose=False, min_points_per_centroid=1,
                      max_points_per_centroid=max_points_per_centroid or 1 << 30)
    km.train(x)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def nearest_codes(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest centroid (L2) per sub-space. x float32 [n, d]; centroids [m, K, dsub] -> uint8 [n, m]."""
    m, K, dsub = centroids.shape
    xs = x.reshape(x.shape[0], m, dsub)
    out = np.empty((x.shape[0], m), dtype=np.uint8)
    for j in range(m):
        index = faiss.IndexFlatL2(dsub)
        index.add(np.ascontiguousarray(centroids[j]))
        _, ids = index.search(np.ascontiguousarray(xs[:, j]), 1)
        out[:, j] = ids[:, 0]
    return out


def train_codebook(keys: np.ndarray, num_candidates: int, m: int, bits: int, iters: int, seed: int = 0,
                   start: int = 0, max_points_per_centroid: int | None = None) -> PQCodebook:
    """Train one (sequence, layer) codebook and encode its tokens.

    Args:
        keys: float32 [H, n, d] post-RoPE keys of tokens [start, start + n); the first
            `num_candidates` of them are the search candidates k-means is trained on.
        m, bits: sub-spaces and bits per code (K = 2^bits centroids, bits <= 8).
        iters: Lloyd iterations.
        max_points_per_centroid: train on a seeded sample of at most K x this many candidates
            (FAISS's sampling; None: all of them).
    """
    t0 = time.perf_counter()
    H, n, d = keys.shape
    if d % m:
        raise ValueError(f"head dim {d} is not a multiple of pq_subspaces={m}")
    if not 0 <= num_candidates <= n:
        raise ValueError(f"num_candidates={num_candidates} outside [0, {n}]")
    K, dsub = 1 << bits, d // m
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    centroids = np.zeros((H, m, K, dsub), dtype=np.float32)
    nc = num_candidates
    exact = nc < K
    if exact:
        if nc:
            cand = keys[:, :nc].reshape(H, nc, m, dsub).transpose(0, 2, 1, 3)  # [H, m, nc, dsub]
            centroids[:, :, :nc] = cand
            centroids[:, :, nc:] = cand[:, :, :1]  # duplicates: never nearer than centroid 0
    else:
        if nc < 39 * K:  # FAISS's own threshold for a warning (silenced in `_kmeans`)
            logger.debug("PQ codebook: k-means on %d candidates for %d centroids (%.1f per centroid)", nc, K, nc / K)

        def fit(hj):
            h, j = hj
            x = np.ascontiguousarray(keys[h, :nc, j * dsub:(j + 1) * dsub])
            centroids[h, j] = _kmeans(x, K, iters, seed + 1000 * h + j, max_points_per_centroid)

        list(_pool().map(fit, [(h, j) for h in range(H) for j in range(m)]))
    codes = np.empty((H, n, m), dtype=np.uint8)

    def encode(h):
        codes[h] = nearest_codes(keys[h], centroids[h])
        if exact and nc:
            codes[h, :nc] = np.arange(nc, dtype=np.uint8)[:, None]

    list(_pool().map(encode, range(H)))
    return PQCodebook(centroids, codes, start, exact, 0 if exact else iters, time.perf_counter() - t0)
