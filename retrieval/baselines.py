"""Scoring logic of the baseline selectors: StreamingLLM, H2O, SnapKV, Quest.

Each baseline is a score over the search candidates of one (sequence, KV head); the shared
`select_topk` turns scores into the token indices a decode step attends beyond sinks + window.
Everything is batched over sequences and KV heads (no Python loop over them) and pure torch,
so it runs on any device. Shapes::

    B sequences, Hq query heads, Hkv KV heads (group G = Hq / Hkv), N candidate tokens, d head dim

How each method maps onto "select `budget` tokens per (sequence, layer, KV head)":

* StreamingLLM (Xiao et al. 2023): attention sinks + a recent window, nothing else. Under a
  budget it is the window made longer: the score is the token's position (most recent wins).
* H2O (Zhang et al. 2023): "heavy hitters", tokens with the largest attention accumulated
  over the steps so far. Score = running sum of each token's attention probability, summed over
  the GQA group. H2O evicts for good; here a low score only leaves the token unselected (it
  stays in the cold tier), which can only help H2O.
* SnapKV (Li et al. 2024): at prefill, the last `window` queries (the observation window) vote:
  softmax attention of each of them over the prefix, summed over the window's queries and the
  GQA group, then max-pooled along positions (kernel 7) so neighbours of a hit come along. The
  selection is fixed after prefill.
* Quest (Tang et al. 2024): per page of P tokens keep the element-wise min and max of the
  keys; the page's bound for query q is sum_i max(q_i * kmin_i, q_i * kmax_i) (an upper bound
  of q.k over the page), max over the GQA group; the top pages by bound are attended whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_gqa(num_q_heads: int, num_kv_heads: int) -> int:
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})")
    return num_q_heads // num_kv_heads


def select_topk(scores: torch.Tensor, k: int, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the top-`k` scores per row; -1 where fewer than k candidates exist.

    scores: float [..., N]; candidates: bool [..., N] (broadcastable) or None (all).
    Returns int64 [..., k], highest score first; ties go to the lower index.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    N = scores.shape[-1]
    s = scores.float()
    if candidates is not None:
        s = s.masked_fill(~candidates.bool(), float("-inf"))
    kk = min(k, N)
    # Stable tie-breaking: argsort is stable with stable=True; descending by score.
    order = torch.argsort(s, dim=-1, descending=True, stable=True)[..., :kk]
    top = torch.gather(s, -1, order)
    idx = torch.where(torch.isfinite(top), order, torch.full_like(order, -1))
    if kk < k:
        pad = torch.full((*idx.shape[:-1], k - kk), -1, dtype=idx.dtype, device=idx.device)
        idx = torch.cat([idx, pad], dim=-1)
    return idx


# ---- StreamingLLM ------------------------------------------------------------------------------


def streaming_scores(positions: torch.Tensor) -> torch.Tensor:
    """Recency: the score of a candidate is its position. positions int64 [..., N] -> float [..., N]."""
    return positions.to(torch.float32)


def streaming_keep(num_tokens: torch.Tensor, sink_tokens: int, window_tokens: int, max_tokens: int) -> torch.Tensor:
    """StreamingLLM's kept set as a mask: the first `sink_tokens` and the last `window_tokens`.

    num_tokens: int64 [B] tokens so far; returns bool [B, max_tokens].
    """
    pos = torch.arange(max_tokens, device=num_tokens.device)
    n = num_tokens.view(-1, 1)
    return (pos < n) & ((pos < sink_tokens) | (pos >= n - window_tokens))


# ---- H2O ---------------------------------------------------------------------------------------


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of one query per head over N keys, per query head.

    q: [B, Hq, d]; k: [B, Hkv, N, d]; valid: bool [B, Hkv, N] or None. -> float32 [B, Hq, N].
    """
    B, Hq, d = q.shape
    G = _check_gqa(Hq, k.shape[1])
    logits = torch.einsum("bhgd,bhnd->bhgn", q.float().view(B, -1, G, d), k.float()) * scale
    if valid is not None:
        logits = logits.masked_fill(~valid.bool().unsqueeze(2), float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0).reshape(B, Hq, -1)


def h2o_update(acc: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Add one step's attention to the accumulated scores (returns the new tensor).

    acc: float32 [B, Hkv, N]; probs: [B, Hq, N] attention probabilities of the step's query
    heads; summed over each KV head's group of G = Hq / Hkv query heads.
    """
    B, Hkv, N = acc.shape
    G = _check_gqa(probs.shape[1], Hkv)
    return acc + probs.float().view(B, Hkv, G, N).sum(dim=2)


def h2o_prefill_scores(q: torch.Tensor, k: torch.Tensor, scale: float, key_valid: torch.Tensor | None = None,
                       chunk: int = 512) -> torch.Tensor:
    """H2O's scores after prefill: attention of every prompt query, causally, summed.

    q: [B, Hq, T, d]; k: [B, Hkv, T, d]; key_valid: bool [B, T] or None (padding neither attends
    nor is attended). Returns float32 [B, Hkv, T] (sum over queries and the group). Queries are
    processed `chunk` at a time so the scores never hold more than B*Hq*chunk*T floats.
    """
    B, Hq, T, d = q.shape
    Hkv = k.shape[1]
    G = _check_gqa(Hq, Hkv)
    kf = k.float()
    pos = torch.arange(T, device=q.device)
    out = torch.zeros(B, Hkv, T, dtype=torch.float32, device=q.device)
    for start in range(0, T, chunk):  # query blocks (memory bound), not sequences or heads
        stop = min(T, start + chunk)
        qf = q[:, :, start:stop].float().view(B, Hkv, G, stop - start, d)
        logits = torch.einsum("bhgtd,bhnd->bhgtn", qf, kf) * scale
        mask = pos.view(1, T) <= pos[start:stop].view(-1, 1)  # [t, n] causal
        if key_valid is not None:
            kv = key_valid.bool()
            mask = mask.view(1, 1, 1, stop - start, T) & kv.view(B, 1, 1, 1, T) & kv[:, start:stop].view(B, 1, 1, -1, 1)
        probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
        out += probs.sum(dim=(2, 3))
    return out


# ---- SnapKV ------------------------------------------------------------------------------------


def snapkv_scores(q_obs: torch.Tensor, k: torch.Tensor, scale: float, kernel_size: int = 7,
                  key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """SnapKV's votes of the observation window over the prefix.

    q_obs: [B, Hq, W, d] the last W prompt queries; k: [B, Hkv, N, d] all N prompt keys (the
    window's own keys are the last W). Each window query attends causally (the prefix and the
    window up to itself); its softmax over the prefix keys (the first N - W) is summed over the
    window's queries and the GQA group, then max-pooled along positions with `kernel_size`
    (odd, same length). key_valid: bool [B, N] or None (padding keys get no votes).
    Returns float32 [B, Hkv, N - W].
    """
    B, Hq, W, d = q_obs.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = _check_gqa(Hq, Hkv)
    if W > N:
        raise ValueError(f"observation window ({W}) longer than the prompt ({N})")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
    logits = torch.einsum("bhgwd,bhnd->bhgwn", q_obs.float().view(B, Hkv, G, W, d), k.float()) * scale
    # window query w sits at position N - W + w: it sees keys 0 .. N - W + w
    pos = torch.arange(N, device=k.device)
    qpos = N - W + torch.arange(W, device=k.device)
    logits = logits.masked_fill(pos.view(1, N) > qpos.view(W, 1), float("-inf"))
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid.bool().view(B, 1, 1, 1, N), float("-inf"))
    votes = torch.softmax(logits, dim=-1).nan_to_num(0.0)[..., : N - W].sum(dim=(2, 3))  # [B, Hkv, N - W]
    if kernel_size > 1 and N - W > 0:
        votes = F.max_pool1d(votes, kernel_size, stride=1, padding=kernel_size // 2)
    return votes


# ---- Quest -------------------------------------------------------------------------------------


def quest_page_bounds(k: torch.Tensor, page_size: int, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise min and max of the keys of each page of `page_size` consecutive tokens.

    k: [B, Hkv, N, d]; valid: bool [B, Hkv, N] or None (invalid tokens do not count).
    Returns (kmin, kmax), float32 [B, Hkv, P, d] with P = ceil(N / page_size); a page with no
    valid token gets kmin = +inf, kmax = -inf (its bound is -inf).
    """
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    B, H, N, d = k.shape
    P = -(-N // page_size)
    kf = k.float()
    if valid is None:
        valid = torch.ones(B, H, N, dtype=torch.bool, device=k.device)
    pad = P * page_size - N
    if pad:
        kf = F.pad(kf, (0, 0, 0, pad))
        valid = F.pad(valid, (0, pad), value=False)
    kf = kf.view(B, H, P, page_size, d)
    v = valid.view(B, H, P, page_size, 1)
    kmin = kf.masked_fill(~v, float("inf")).amin(dim=3)
    kmax = kf.masked_fill(~v, float("-inf")).amax(dim=3)
    return kmin, kmax


def quest_page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Quest's upper bound of q.k per page, max over the GQA group.

    q: [B, Hq, d]; kmin, kmax: [B, Hkv, P, d] -> float32 [B, Hkv, P] (-inf for empty pages).
    """
    B, Hq, d = q.shape
    Hkv = kmin.shape[1]
    G = _check_gqa(Hq, Hkv)
    qf = q.float().view(B, Hkv, G, 1, d)
    lo, hi = kmin.unsqueeze(2), kmax.unsqueeze(2)  # [B, Hkv, 1, P, d]
    empty = torch.isinf(lo).all(-1) & (lo > 0).all(-1)  # +inf mins: no valid token
    bound = torch.maximum(qf * lo.nan_to_num(posinf=0.0, neginf=0.0), qf * hi.nan_to_num(posinf=0.0, neginf=0.0)).sum(-1)
    bound = bound.amax(dim=2)  # [B, Hkv, P]
    return bound.masked_fill(empty.squeeze(2), float("-inf"))


def quest_select(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, page_size: int, budget: int,
                 num_tokens: int) -> torch.Tensor:
    """Token indices of the top pages by Quest's bound, budget // page_size pages (at least 1).

    Returns int64 [B, Hkv, num_pages * page_size], -1 past `num_tokens` or for missing pages.
    """
    scores = quest_page_scores(q, kmin, kmax)
    num_pages = max(1, budget // page_size)
    pages = select_topk(scores, num_pages)  # [B, Hkv, p]
    offs = torch.arange(page_size, device=q.device)
    tok = pages.unsqueeze(-1) * page_size + offs  # [B, Hkv, p, page_size]
    tok = torch.where((pages.unsqueeze(-1) >= 0) & (tok < num_tokens), tok, torch.full_like(tok, -1))
    return tok.flatten(-2)
