"""Exact top-k oracle: PQCache's selection rule over true q.k, on the host (numpy).

The rule every selector approximates, per (sequence, KV head):
    logits[g, t] = scale * q_g . k_t          for the G query heads g of the group
    p[g, t]      = softmax over candidates t of logits[g, :]
    score[t]     = sum_g p[g, t]
    selected     = the k candidates of largest score
"""

from __future__ import annotations

import numpy as np


def group_scores(logits: np.ndarray) -> np.ndarray:
    """float [..., G, N] scaled logits (-inf = not a candidate) -> float64 [..., N] summed softmax."""
    lg = logits.astype(np.float64)
    mx = lg.max(axis=-1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    e = np.exp(lg - mx)
    s = e.sum(axis=-1, keepdims=True)
    p = np.where(s > 0, e / np.where(s > 0, s, 1.0), 0.0)
    return p.sum(axis=-2)


def topk_ids(scores: np.ndarray, valid: np.ndarray, k: int) -> np.ndarray:
    """int64 [..., k] ids of the k largest scores among `valid` (ids -1 where fewer exist), by score desc."""
    s = np.where(valid, scores, -np.inf)
    k_eff = min(k, s.shape[-1])
    order = np.argsort(-s, axis=-1, kind="stable")[..., :k_eff]
    ok = np.take_along_axis(valid, order, axis=-1)
    out = np.full(s.shape[:-1] + (k,), -1, dtype=np.int64)
    out[..., :k_eff] = np.where(ok, order, -1)
    return out


def exact_topk(q: np.ndarray, keys: np.ndarray, valid: np.ndarray, k: int, scale: float) -> np.ndarray:
    """Exact selection for one sequence.

    Args:
        q: [Hq, d] queries; keys: [Hkv, N, d]; valid: bool [N] candidates; k: tokens per KV head.
    Returns:
        int64 [Hkv, k] token indices (-1 padding when fewer than k candidates), by score.
    """
    Hq, d = q.shape
    Hkv = keys.shape[0]
    G = Hq // Hkv
    logits = np.einsum("hgd,hnd->hgn", q.reshape(Hkv, G, d).astype(np.float64), keys.astype(np.float64)) * scale
    logits = np.where(valid[None, None, :], logits, -np.inf)
    return topk_ids(group_scores(logits), np.broadcast_to(valid, (Hkv, valid.shape[0])), k)
