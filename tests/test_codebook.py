"""retrieval/codebook.py: FAISS k-means codebooks per (KV head, sub-space), exact fallback."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.codebook import nearest_codes, train_codebook


def _clustered(H, n, d, centers=32, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(H, centers, d)).astype(np.float32) * 3
    which = rng.integers(0, centers, size=(H, n))
    return (np.take_along_axis(c, which[..., None], 1) + rng.normal(size=(H, n, d)) * 0.3).astype(np.float32)


def _recon(cb, keys):
    H, n, d = keys.shape
    m = cb.centroids.shape[1]
    out = np.empty_like(keys)
    for h in range(H):
        for j in range(m):
            out[h, :, j * d // m:(j + 1) * d // m] = cb.centroids[h, j][cb.codes[h, :, j]]
    return out


def test_shapes_and_codes_are_nearest_centroids():
    keys = _clustered(2, 700, 16)
    cb = train_codebook(keys, 600, m=2, bits=6, iters=5)
    assert cb.centroids.shape == (2, 2, 64, 8) and cb.codes.shape == (2, 700, 2) and cb.codes.dtype == np.uint8
    assert not cb.exact and cb.iters == 5
    for h in range(2):
        assert np.array_equal(cb.codes[h], nearest_codes(keys[h], cb.centroids[h]))


def test_more_bits_less_error():
    keys = _clustered(1, 3000, 16, centers=200)
    errs = [float(((_recon(train_codebook(keys, 3000, 2, b, 10), keys) - keys) ** 2).mean()) for b in (2, 4, 6)]
    # observed 2026-11: [~9.4, ~3.6, ~0.9]
    assert errs[0] > errs[1] > errs[2]


def test_fewer_candidates_than_centroids_is_exact():
    keys = _clustered(2, 50, 16)
    cb = train_codebook(keys, 40, m=4, bits=6, iters=5)
    assert cb.exact and cb.iters == 0
    assert np.array_equal(_recon(cb, keys)[:, :40], keys[:, :40])  # candidates reconstruct exactly
    assert (cb.codes[:, 40:] < 40).all()  # later tokens code to a real candidate centroid
    empty = train_codebook(keys[:, :5], 0, m=2, bits=4, iters=5)
    assert empty.exact and empty.codes.shape == (2, 5, 2)


def test_bad_subspaces_is_a_clear_error():
    with pytest.raises(ValueError, match="pq_subspaces"):
        train_codebook(_clustered(1, 100, 16), 100, m=3, bits=4, iters=3)
