"""CPU retrieval service: PQ top-k over codes with FAISS on host threads, batched, returning futures.

It answers the same question as the GPU path (kvstore/cold/selection.py + gpu_kernels/pq_score.py)
for the same codebooks and codes, so it serves sequences whose codes are parked off the GPU,
hosts with no GPU, and is the oracle the GPU path is tested against.

Per (sequence, KV head) a request is answered by a FAISS `IndexPQ` with the inner-product
metric built over the request's codebook and codes (no copy of the keys; codes are uint8 with
8-bit FAISS codes, a b < 8 codebook padded with duplicate centroids that no code points at).
FAISS releases the GIL, so the thread pool runs requests in parallel; each worker sets its own
OpenMP thread count to 1 so the pool, not FAISS, owns the cores.

Selection rule (PQCache's GQA aggregation, see retrieval/exact.py): FAISS's asymmetric inner
products of the group's G query heads over the candidates, softmax per query head after the
softmax scale, summed over the group, top-k.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import faiss
import numpy as np

from retrieval.exact import group_scores, topk_ids

logger = logging.getLogger(__name__)


def pq_index(centroids: np.ndarray, codes: np.ndarray) -> faiss.IndexPQ:
    """A FAISS IndexPQ (inner product) over given codes. centroids [m, K, dsub]; codes uint8 [n, m]."""
    m, K, dsub = centroids.shape
    n = codes.shape[0]
    if codes.shape[1] != m or codes.dtype != np.uint8:
        raise ValueError(f"codes must be uint8 [n, {m}], got {codes.dtype} {codes.shape}")
    index = faiss.IndexPQ(m * dsub, m, 8, faiss.METRIC_INNER_PRODUCT)
    full = np.empty((m, 256, dsub), dtype=np.float32)
    full[:, :K] = centroids
    full[:, K:] = centroids[:, :1]
    faiss.copy_array_to_vector(full.ravel(), index.pq.centroids)
    index.is_trained = True
    if n:
        index.add_sa_codes(np.ascontiguousarray(codes))
    return index


def adc_scores(centroids: np.ndarray, codes: np.ndarray, q: np.ndarray) -> np.ndarray:
    """FAISS asymmetric inner products of queries with every code. q [G, d] -> float32 [G, n]."""
    n = codes.shape[0]
    out = np.full((q.shape[0], n), -np.inf, dtype=np.float32)
    if n == 0:
        return out
    index = pq_index(centroids, codes)
    D, I = index.search(np.ascontiguousarray(q, dtype=np.float32), n)
    np.put_along_axis(out, I, D, axis=1)
    return out


@dataclass
class SearchRequest:
    """One sequence's search: every KV head at once.

    centroids: float32 [Hkv, m, K, dsub]; codes: uint8 [Hkv, n, m] for tokens [start, start + n);
    q: float32 [Hq, d]; candidates are tokens [lo, hi); k tokens per KV head; scale: softmax scale.
    """

    centroids: np.ndarray
    codes: np.ndarray
    q: np.ndarray
    lo: int
    hi: int
    k: int
    scale: float
    start: int = 0


class RetrievalService:
    """Thread pool answering `SearchRequest`s; `submit` returns a Future of int64 [B, Hkv, k] positions.

    Positions are absolute token positions (-1 where a head has fewer than k candidates).
    """

    def __init__(self, num_threads: int | None = None):
        self.num_threads = num_threads or os.cpu_count() or 1
        self.pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="kvstore-retrieval",
                                       initializer=faiss.omp_set_num_threads, initargs=(1,))

    def _one_head(self, r: SearchRequest, h: int) -> np.ndarray:
        Hkv = r.codes.shape[0]
        G = r.q.shape[0] // Hkv
        a, b = max(r.lo - r.start, 0), max(min(r.hi - r.start, r.codes.shape[1]), 0)
        out = np.full(r.k, -1, dtype=np.int64)
        if b <= a:
            return out
        logits = adc_scores(r.centroids[h], r.codes[h, a:b], r.q[h * G:(h + 1) * G]) * r.scale
        ids = topk_ids(group_scores(logits), np.ones(b - a, dtype=bool), r.k)
        return np.where(ids >= 0, ids + a + r.start, -1)

    def submit(self, requests: list[SearchRequest]) -> "Future[np.ndarray]":
        """Answer a batch (one request per sequence), all (sequence, KV head) pairs in parallel."""
        if not requests:
            raise ValueError("submit needs at least one SearchRequest")
        Hkv = requests[0].codes.shape[0]
        k = max(r.k for r in requests)
        result: Future = Future()
        out = np.full((len(requests), Hkv, k), -1, dtype=np.int64)
        pending = [len(requests) * Hkv]
        lock = threading.Lock()

        def done(fut, b, h):
            try:
                ids = fut.result()
                out[b, h, : ids.shape[0]] = ids
            except BaseException as e:  # noqa: BLE001 - forwarded to the caller's future
                if not result.done():
                    result.set_exception(e)
            with lock:
                pending[0] -= 1
                last = pending[0] == 0
            if last and not result.done():
                result.set_result(out)

        for b, r in enumerate(requests):
            if r.codes.shape[0] != Hkv or r.q.shape[0] % Hkv:
                raise ValueError(f"request {b}: codes {r.codes.shape} / q {r.q.shape} do not match {Hkv} KV heads")
            for h in range(Hkv):
                self.pool.submit(self._one_head, r, h).add_done_callback(lambda f, b=b, h=h: done(f, b, h))
        return result

    def search_ip(self, centroids: np.ndarray, codes: np.ndarray, q: np.ndarray, k: int) -> "Future":
        """Plain FAISS MIPS top-k per query (no GQA aggregation): the benchmark's host baseline.

        centroids [m, K, dsub], codes uint8 [n, m], q float32 [nq, d] -> Future of (D, I).
        """
        index = pq_index(centroids, codes)
        return self.pool.submit(index.search, np.ascontiguousarray(q, dtype=np.float32), k)

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def __enter__(self) -> "RetrievalService":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
