"""Prefill attention: causal attention of a prompt chunk through maintained flash kernels.

Nothing of size N x N is ever built (N = the tokens attended). Two cases:

* No earlier tokens (a one-shot prefill, or a chunked prefill's first chunk): SDPA with
  ``is_causal=True, enable_gqa=True``, which takes the flash backend on CUDA and on CPU. A
  batch with padding (any valid mask, left padding included) is first *compacted*: each row's
  valid tokens move to its front, in order, so the padding trails every valid token and plain
  causal attention never lets a valid query see it; outputs go back to their columns and the
  padding rows come out as zeros. Attention needs no positions: q and k are post-RoPE.
* Earlier tokens (a later chunk of a chunked prefill): the chunk attends to every valid past
  token (per sequence and KV head: a pruned or empty slot is not valid) and causally to itself.
  A past with no holes (every row n valid slots, then the last page's empty ones: `full`, `quant`,
  LeanKV's kept-whole earlier chunks, no padding) is plain causal attention aligned to the lower right: on CUDA in 16 bits, SDPA's flash
  kernel with `causal_lower_right` (no mask at all, GQA native). A past with holes on CUDA is
  FlexAttention (compiled; the validity mask is a score_mod reading a [B, Hkv, P] tensor, no mask
  matrix). Elsewhere it is SDPA with a boolean mask over blocks of queries, so the mask is at most
  `_CPU_MASK_ELEMENTS` elements, never chunk x N for a long chunk.

`gpu_kernels.reference.prefill_attention` is the plain (masked, N x N) reference this is
tested against.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

#: a padded batch whose [B, T, T] mask is at most this many elements attends with that mask, as
#: transformers' SDPA path does (the same kernel and masking, so `full` matches the unattached model
#: on short padded batches); longer ones are compacted and never build it
_SMALL_MASK_ELEMENTS = 1 << 24
#: CPU path with past tokens: largest mask (elements) one block of queries may build
_CPU_MASK_ELEMENTS = 1 << 26


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scale: float,
                      past: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Causal attention of T new tokens per sequence over the past tokens and themselves.

    Args:
        q: [B, Hq, T, d]; k, v: [B, Hkv, T, d] post-RoPE, one dtype.
        valid: bool [B, T], False for padding (neither attends nor is attended).
        scale: softmax scale.
        past: optional (k_past, v_past, past_valid): [B, Hkv, P, d] (q's dtype) and bool [B, Hkv, P]
            marking which of the P earlier slots hold a token (each valid query attends them all).
    Returns:
        [B, Hq, T, d] in q's dtype; rows of padding queries are zero.
    """
    B, Hq, T, d = q.shape
    Hkv = k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} not a multiple of KV heads {Hkv}")
    dense = bool(valid.all().item())  # one host sync per layer and chunk
    if not dense and past is None and B * T * T <= _SMALL_MASK_ELEMENTS:
        return _sdpa_padded_small(q, k, v, valid, scale)
    if not dense:  # compact: valid tokens first, in order (stable), padding after
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
        q, k, v = (_take(x, order) for x in (q, k, v))
    if past is None or past[0].shape[2] == 0:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=Hq != Hkv)
    elif q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and (n := _dense_prefix(past[2])) is not None:
        out = _flash_dense_past(q, k, v, past[0][:, :, :n], past[1][:, :, :n], scale)
    elif q.is_cuda:
        out = _flex_with_past(q, k, v, *past, scale)
    else:
        out = _sdpa_with_past(q, k, v, *past, scale)
    if dense:
        return out
    back = torch.empty_like(out)
    back.scatter_(2, order.view(B, 1, T, 1).expand(B, Hq, T, d), out)
    return back.masked_fill_(~valid.view(B, 1, T, 1), 0.0)


def _sdpa_padded_small(q, k, v, valid, scale):
    """Masked SDPA over a short padded batch (the mask is B x T x T booleans, bounded by the caller)."""
    B, Hq, T, d = q.shape
    G = Hq // k.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    mask = causal.view(1, 1, T, T) & valid.view(B, 1, 1, T)
    has_key = mask.any(-1, keepdim=True)
    k, v = (x.repeat_interleave(G, dim=1) if G > 1 else x for x in (k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~has_key, scale=scale)
    return out.masked_fill_(~has_key, 0.0)


def _take(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    B, H, T, d = x.shape
    return torch.gather(x, 2, order.view(B, 1, T, 1).expand(B, H, T, d))


def _sdpa_with_past(q, k, v, k_past, v_past, past_valid, scale):
    """SDPA over [past | chunk] with a boolean mask, built per block of queries (CPU path)."""
    B, Hq, T, d = q.shape
    Hkv, P = k.shape[1], k_past.shape[2]
    G = Hq // Hkv
    N = P + T
    keys = torch.cat([k_past, k], dim=2)
    values = torch.cat([v_past, v], dim=2)
    pv = past_valid.repeat_interleave(G, dim=1) if G > 1 else past_valid  # [B, Hq, P]
    block = max(1, min(T, _CPU_MASK_ELEMENTS // max(1, B * Hq * N)))
    out = torch.empty_like(q)
    cols = torch.arange(T, device=q.device)
    for s in range(0, T, block):  # blocks of queries: bounds the mask, not a loop over sequences or heads
        e = min(T, s + block)
        causal = cols.view(1, T) <= torch.arange(s, e, device=q.device).view(e - s, 1)  # [t, T]
        mask = torch.cat([pv.unsqueeze(2).expand(B, Hq, e - s, P), causal.expand(B, Hq, e - s, T)], dim=3)
        out[:, :, s:e] = F.scaled_dot_product_attention(q[:, :, s:e], keys, values, attn_mask=mask, scale=scale,
                                                        enable_gqa=G > 1)
    return out


def _dense_prefix(past_valid: torch.Tensor) -> int | None:
    """n when every row of past_valid [B, Hkv, P] is n valid slots then empty ones (the hot tier of
    `full`/`quant` after equal-length chunks: the last page's unused slots trail), else None."""
    n = past_valid.sum(-1)
    top = int(n.max().item())  # two host syncs per layer and chunk
    return top if bool(((n == top).all() & past_valid[..., :top].all()).item()) else None


def _flash_dense_past(q, k, v, k_past, v_past, scale):
    """Every past slot valid: causal attention over [past | chunk] aligned to the lower right (query i
    of the chunk sees all P past keys and chunk keys <= i), SDPA's flash kernel, no mask tensor."""
    from torch.nn.attention.bias import causal_lower_right

    keys = torch.cat([k_past, k], dim=2)
    values = torch.cat([v_past, v], dim=2)
    T, N = q.shape[2], keys.shape[2]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=causal_lower_right(T, N), scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def _flex_with_past(q, k, v, k_past, v_past, past_valid, scale):
    """FlexAttention over [past | chunk]: past slots by their validity, the chunk causally."""
    Hq, Hkv = q.shape[1], k.shape[1]
    G = Hq // Hkv
    P = k_past.shape[2]
    keys = torch.cat([k_past, k], dim=2)
    values = torch.cat([v_past, v], dim=2)
    last = torch.full((), P - 1, dtype=torch.int64, device=q.device)
    p = torch.full((), P, dtype=torch.int64, device=q.device)

    def score_mod(score, b, h, q_idx, kv_idx):
        seen = torch.where(kv_idx < p, past_valid[b, h // G, torch.minimum(kv_idx, last)], kv_idx - p <= q_idx)
        return torch.where(seen, score, -float("inf"))

    return _compiled_flex()(q, keys, values, score_mod=score_mod, scale=scale, enable_gqa=G > 1)
