"""retrieval/service.py: FAISS-backed top-k on host threads; the oracle the GPU path is checked against."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.codebook import train_codebook
from retrieval.exact import exact_topk, group_scores, topk_ids
from retrieval.service import RetrievalService, SearchRequest, adc_scores


def _structured(H, n, d, seed):
    """Keys in clusters, queries pointing at a few of them (what a retrieval head sees)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(H, 24, d)).astype(np.float32)
    which = rng.integers(0, 24, size=(H, n))
    keys = np.take_along_axis(centers, which[..., None], 1) * 2 + rng.normal(size=(H, n, d)).astype(np.float32) * 0.4
    return keys.astype(np.float32), centers


def test_adc_scores_are_table_sums():
    rng = np.random.default_rng(0)
    cen = rng.normal(size=(2, 64, 8)).astype(np.float32)
    codes = rng.integers(0, 64, size=(100, 2)).astype(np.uint8)
    q = rng.normal(size=(3, 16)).astype(np.float32)
    want = (q[:, :8] @ cen[0].T)[:, codes[:, 0]] + (q[:, 8:] @ cen[1].T)[:, codes[:, 1]]
    np.testing.assert_allclose(adc_scores(cen, codes, q), want, rtol=1e-5, atol=1e-5)


def test_service_equals_the_rule_computed_by_hand():
    rng = np.random.default_rng(1)
    H, G, d, n, S = 2, 2, 16, 300, 4
    keys, _ = _structured(H, n, d, 1)
    cb = train_codebook(keys[:, S:], 250, m=2, bits=6, iters=5)
    q = rng.normal(size=(H * G, d)).astype(np.float32)
    with RetrievalService(2) as svc:
        got = svc.submit([SearchRequest(cb.centroids, cb.codes, q, lo=S, hi=S + 250, k=20, scale=0.25, start=S)]).result()
    assert got.shape == (1, H, 20)
    for h in range(H):
        logits = np.stack([adc_scores(cb.centroids[h], cb.codes[h, :250], q[h * G + g:h * G + g + 1])[0] for g in range(G)])
        want = topk_ids(group_scores(logits * 0.25), np.ones(250, bool), 20) + S
        assert np.array_equal(np.sort(got[0, h]), np.sort(want))
        assert ((got[0, h] >= S) & (got[0, h] < S + 250)).all()


def test_batched_requests_and_short_candidates():
    rng = np.random.default_rng(2)
    keys, _ = _structured(2, 100, 16, 2)
    cb = train_codebook(keys, 100, 2, 4, 4)
    q = rng.normal(size=(4, 16)).astype(np.float32)
    reqs = [SearchRequest(cb.centroids, cb.codes, q, 0, 100, 8, 1.0), SearchRequest(cb.centroids, cb.codes, q, 10, 13, 8, 1.0)]
    with RetrievalService(3) as svc:
        got = svc.submit(reqs).result()
    assert got.shape == (2, 2, 8)
    assert set(got[1, 0].tolist()) == {10, 11, 12, -1} and (got[1, :, 3:] == -1).all()
    with pytest.raises(ValueError):
        RetrievalService(1).submit([])


def test_pq_recall_against_exact_topk():
    """Random keys with 32 planted needles per KV head aligned with that head's queries."""
    rng = np.random.default_rng(3)
    H, G, d, n, k = 2, 4, 32, 3000, 32
    recalls = []
    with RetrievalService(2) as svc:
        for trial in range(2):
            keys = rng.normal(size=(H, n, d)).astype(np.float32)
            direction = rng.normal(size=(H, d)).astype(np.float32)
            needles = rng.choice(n, size=(H, k), replace=False)
            for h in range(H):
                keys[h, needles[h]] = direction[h] * 0.8 + rng.normal(size=(k, d)) * 0.6
            q = (np.repeat(direction, G, 0) * 2 + rng.normal(size=(H * G, d)) * 0.5).astype(np.float32)
            cb = train_codebook(keys, n, m=4, bits=8, iters=10)
            got = svc.submit([SearchRequest(cb.centroids, cb.codes, q, 0, n, k, d ** -0.5)]).result()[0]
            want = exact_topk(q, keys, np.ones(n, bool), k, d ** -0.5)
            recalls += [len(set(got[h]) & set(want[h])) / k for h in range(H)]
    # observed 2026-11: mean recall@32 = 0.93 (m=4, b=8; per head 0.81..1.0)
    assert np.mean(recalls) > 0.8, recalls
