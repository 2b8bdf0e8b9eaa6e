"""Pure-torch references for every kernel in gpu_kernels/: the naive versions tests compare against.

They run anywhere (CPU included), compute in fp32, and are what the Triton kernels are tested
against; the store's CPU path runs them too. What the store runs on the GPU beside the kernels
(allocation-free torch ops into plan-time buffers) is in `torch_ops.py`, never here. Shapes use B = batch, Hq = query heads, Hkv = KV heads, G = Hq // Hkv, N = tokens,
d = head dim.
"""

from __future__ import annotations

import math

import torch

from gpu_kernels.torch_ops import page_views


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor,
    scale: float | None = None,
    return_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One query per sequence over a per-head token set (GQA-aware).

    Args:
        q: [B, Hq, d] query (any float dtype).
        k, v: [B, Hkv, N, d] keys and values (dequantized).
        valid: [B, Hkv, N] bool, which of the N tokens each KV head attends.
        scale: softmax scale, default 1/sqrt(d).
        return_probs: also return the probabilities.
    Returns:
        out [B, Hq, d] fp32, lse [B, Hq] fp32 (natural log of the softmax denominator over
        scaled logits; -inf when a head has no valid token, its out is then 0), and
        probs [B, Hq, N] fp32 or None.
    """
    B, Hq, d = q.shape
    Hkv = k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} not a multiple of KV heads {Hkv}")
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qf = q.float().view(B, Hkv, G, d)
    logits = torch.einsum("bhgd,bhnd->bhgn", qf, k.float()) * scale
    mask = valid.unsqueeze(2)
    logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [B, Hkv, G]
    safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(logits - safe_lse.unsqueeze(-1)).masked_fill(~mask, 0.0)
    out = torch.einsum("bhgn,bhnd->bhgd", probs, v.float())
    return (
        out.reshape(B, Hq, d),
        lse.reshape(B, Hq),
        probs.reshape(B, Hq, -1) if return_probs else None,
    )


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attention results over disjoint token sets (flash-decoding merge).

    Args:
        out_a, out_b: [..., d] partial outputs, each normalized over its own tokens.
        lse_a, lse_b: [...] their log-sum-exps (-inf for an empty set).
    Returns:
        (out [..., d] fp32, lse [...] fp32) equal to attention over the union.
    """
    lse = torch.logaddexp(lse_a.float(), lse_b.float())
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    wa = torch.exp(lse_a.float() - safe).masked_fill(~torch.isfinite(lse_a), 0.0)
    wb = torch.exp(lse_b.float() - safe).masked_fill(~torch.isfinite(lse_b), 0.0)
    out = out_a.float() * wa.unsqueeze(-1) + out_b.float() * wb.unsqueeze(-1)
    return out, lse


# ---- the same two ops into caller buffers (the decode run of KVStore: no allocation) ----------
#
# Same torch ops in the same order as `decode_attention` / `merge_attention` (einsum is the bmm
# it dispatches to, with the same operand layouts; isfinite-based where/masked_fill are the
# equivalent nan_to_num / masks), written with out= and in-place variants: the results are equal
# bit for bit (tests/test_decode_allocations.py). Every buffer comes from the caller.


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor, scale: float, past: int = 0
) -> torch.Tensor:
    """Causal attention of T new queries over `past` earlier tokens plus themselves (GQA).

    Args:
        q: [B, Hq, T, d]; k, v: [B, Hkv, past + T, d] (earlier tokens first).
        key_valid: [B, Hkv or 1, past + T] bool, which keys exist (padding and pruned tokens are False).
        scale: softmax scale.
    Returns:
        [B, Hq, T, d] in q's dtype. A query with no visible key (a padding row) returns zeros.
    """
    B, Hq, T, d = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    causal = torch.ones(T, N, dtype=torch.bool, device=q.device).tril(diagonal=past)
    mask = causal.view(1, 1, T, N) & key_valid.view(B, -1, 1, N)  # [B, Hkv|1, T, N]
    mask = mask.repeat_interleave(G, dim=1) if mask.shape[1] > 1 else mask
    k_rep = k.repeat_interleave(G, dim=1) if G > 1 else k
    v_rep = v.repeat_interleave(G, dim=1) if G > 1 else v
    has_key = mask.any(-1, keepdim=True)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k_rep, v_rep, attn_mask=mask | ~has_key, scale=scale
    )
    return out.masked_fill(~has_key, 0.0)


# ---- quantization (kvstore/hot/quantization.py, gpu_kernels/quant.py) -----------------------------
#
# Per token, per KV head, asymmetric min-max over `groups` equal slices of the head dim:
#     zero = fp16(min),  scale = fp16((max - zero) / (2^bits - 1))  (1 where max == min),
#     each nudged down/up by 2^-10 relative where fp16 rounding would make an element saturate
#     code = clamp(floor((x - zero) / scale + 0.5), 0, 2^bits - 1),   x_hat = code * scale + zero
# Codes are packed "planar": with per = 8 // bits codes per byte, byte j of a row holds the
# codes of elements j, j + d/per, j + 2d/per, ... at bit offsets 0, bits, 2*bits, ... so that a
# kernel unpacks a whole row with one load and a shift per element.


def quantize(x: torch.Tensor, bits: int, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize rows. x: [N, d] float. Returns codes uint8 [N, d] (unpacked), scale and zero fp16 [N, groups]."""
    N, d = x.shape
    if d % groups:
        raise ValueError(f"head dim {d} is not a multiple of groups={groups}")
    xf = x.float().view(N, groups, d // groups)
    qmax = (1 << bits) - 1
    lo, hi = xf.amin(-1), xf.amax(-1)
    # fp16 zero <= min and zero + qmax * scale >= max, so no element saturates: the nearest fp16
    # when it already satisfies this (exact round trip), else one nudged by 2^-10 relative.
    zero = lo.to(torch.float16)
    zero = torch.where(zero.float() > lo, (lo - lo.abs() * 2 ** -10 - 2 ** -24).to(torch.float16), zero)
    rng = hi - zero.float()
    scale = torch.where(rng > 0, rng / qmax, torch.ones_like(rng)).to(torch.float16)
    short = scale.float() * qmax + zero.float() < hi
    scale = torch.where(short, (rng / qmax * (1 + 2 ** -10) + 2 ** -24).to(torch.float16), scale)
    codes = torch.floor((xf - zero.float().unsqueeze(-1)) / scale.float().unsqueeze(-1) + 0.5).clamp(0, qmax)
    return codes.to(torch.uint8).view(N, d), scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """codes uint8 [..., d] (unpacked), scale/zero fp16 [..., groups] -> fp32 [..., d]."""
    groups, d = scale.shape[-1], codes.shape[-1]
    c = codes.float().unflatten(-1, (groups, d // groups))
    return (c * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)).flatten(-2)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [..., d] codes < 2^bits -> uint8 [..., d * bits // 8], planar layout (see above)."""
    per = 8 // bits
    d = codes.shape[-1]
    parts = codes.unflatten(-1, (per, d // per)).to(torch.int32)  # [..., per, d/per]
    shifts = (torch.arange(per, device=codes.device, dtype=torch.int32) * bits).view(per, 1)
    return (parts << shifts).sum(-2).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 [..., d * bits // 8] -> uint8 [..., d]."""
    per = 8 // bits
    shifts = (torch.arange(per, device=packed.device, dtype=torch.int32) * bits).view(per, 1)
    parts = (packed.to(torch.int32).unsqueeze(-2) >> shifts) & ((1 << bits) - 1)  # [..., per, d/per]
    return parts.flatten(-2).to(torch.uint8)


def dequantize_pages(data: torch.Tensor, page_ids: torch.Tensor, key_bits: int, value_bits: int, groups: int,
                     tokens_per_page: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized K, V fp32 [..., tokens_per_page, head_dim] of quantized pages (kvstore/hot/quantization.py layout).

    data: uint8 [P, page_bytes]; page_ids: int [...]. 16 bits is not a quantized layout.
    """
    d = head_dim
    kc, vc, meta = page_views(data, tokens_per_page, d * key_bits // 8, d * value_bits // 8, groups)
    p = page_ids.long()
    m = meta[p]
    k = dequantize(unpack_codes(kc[p], key_bits, d), m[..., 0, :], m[..., 1, :])
    v = dequantize(unpack_codes(vc[p], value_bits, d), m[..., 2, :], m[..., 3, :])
    return k, v


def paged_decode_attention(
    q: torch.Tensor, data: torch.Tensor, pages: torch.Tensor, num_high: torch.Tensor, num_low_pages: torch.Tensor,
    slot_pos: torch.Tensor, high: tuple[int, int, int], low: tuple[int, int, int] | None, groups: int,
    scale: float, high_dense: bool = False, ret_pages: torch.Tensor | None = None, emit_cols: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode attention over quantized paged KV, both tiers and retrieved pages (reference of
    gpu_kernels/paged_attention.py).

    Args:
        q: [B, Hq, d] queries.
        data: uint8 [P, page_bytes] page pool.
        pages: int32 [B, Hkv, C] page table of the layer: high pages from the left, low from the right.
        num_high: int [B, Hkv] high-tier slots in use (index i in page pages[..., i // T_high]).
        num_low_pages: int [B, Hkv] low pages at the right end of the table.
        slot_pos: int32 [P, max_slots] token position per slot, -1 = empty (masked).
        high, low: (key_bits, value_bits, tokens_per_page) of each tier (low None: no low tier).
        groups: quantization groups; scale: softmax scale.
        high_dense: the kernel's HIGH_DENSE: high-tier slots below num_high are attended whatever
            their position (the store never leaves one empty); only the low tier's -1 slots are masked.
        ret_pages: optional int [B, Hkv, NRP] retrieved pages in the high format, attended in the same
            softmax where their slot_pos is >= 0.
        emit_cols: W, the width of the returned logits (None: C).
    Returns:
        out fp32 [B, Hq, d], lse fp32 [B, Hq] (natural log, over the retrieved tokens too), logits fp32
        [B, Hq, W, S] of the table's tokens by virtual page, as the kernel emits them: column v is the
        head's v-th page, its high pages (table columns 0 ..) then its low pages (columns C - 1, C - 2 ..)
        (S = max(T_high, T_low); -inf where no token), so their probs = exp(logits - lse).
    """
    B, Hq, d = q.shape
    Hkv, C = pages.shape[1], pages.shape[2]
    G = Hq // Hkv
    kb, vb, th = high
    S = max(th, low[2] if low else 0)
    col = torch.arange(C, device=q.device).view(1, 1, C, 1)
    slot = torch.arange(S, device=q.device).view(1, 1, 1, S)
    ks = torch.zeros(B, Hkv, C, S, d, device=q.device)
    vs = torch.zeros_like(ks)
    kh, vh = dequantize_pages(data, pages, kb, vb, groups, th, d)  # [B, H, C, th, d]
    ks[..., :th, :], vs[..., :th, :] = kh, vh
    valid = (col * th + slot < num_high.view(B, Hkv, 1, 1)) & (slot < th) & (col * th < num_high.view(B, Hkv, 1, 1))
    is_low = torch.zeros_like(valid)
    if low is not None:
        lkb, lvb, tl_ = low
        is_low = col >= C - num_low_pages.view(B, Hkv, 1, 1)
        kl, vl = dequantize_pages(data, pages, lkb, lvb, groups, tl_, d)
        low_slot = (slot < tl_).expand(B, Hkv, C, S)
        pad = S - tl_
        kl = torch.nn.functional.pad(kl, (0, 0, 0, pad))
        vl = torch.nn.functional.pad(vl, (0, 0, 0, pad))
        sel = is_low.unsqueeze(-1)
        ks, vs = torch.where(sel, kl, ks), torch.where(sel, vl, vs)
        valid = torch.where(is_low, low_slot, valid & ~is_low)
    pos = slot_pos[pages.long()][..., :S]  # [B, H, C, S']
    if pos.shape[-1] < S:
        pos = torch.nn.functional.pad(pos, (0, S - pos.shape[-1]), value=-1)
    valid = valid & ((pos >= 0) | (high_dense & ~is_low))
    ks, vs, valid = ks.view(B, Hkv, C * S, d), vs.view(B, Hkv, C * S, d), valid.view(B, Hkv, C * S)
    if ret_pages is not None:
        kr, vr = dequantize_pages(data, ret_pages, kb, vb, groups, th, d)  # [B, H, NRP, th, d]
        ret_valid = slot_pos[ret_pages.long()][..., :th] >= 0
        ks, vs = torch.cat([ks, kr.flatten(2, 3)], 2), torch.cat([vs, vr.flatten(2, 3)], 2)
        valid = torch.cat([valid, ret_valid.flatten(2)], 2)
    out, lse, probs = decode_attention(q, ks, vs, valid, scale, return_probs=True)
    logits = torch.log(probs[..., :C * S]).view(B, Hq, C, S) + lse.view(B, Hq, 1, 1)
    # table columns -> virtual pages: v < n_hp is column v, then low page j = v - n_hp is column C - 1 - j
    W = C if emit_cols is None else emit_cols
    v = torch.arange(W, device=q.device).view(1, 1, W)
    n_hp = (num_high.long().view(B, Hkv, 1) + th - 1) // th
    n_lp = num_low_pages.long().view(B, Hkv, 1) if low is not None else torch.zeros_like(n_hp)
    tc = torch.where(v < n_hp, v, C - 1 - (v - n_hp))
    ok = (v < n_hp + n_lp) & (tc >= 0) & (tc < C)
    idx = tc.clamp(0, C - 1).repeat_interleave(G, dim=1)  # [B, Hq, W]
    virt = torch.gather(logits, 2, idx.unsqueeze(-1).expand(B, Hq, W, S))
    return out, lse, virt.masked_fill(~ok.repeat_interleave(G, dim=1).unsqueeze(-1), float("-inf"))


def paged_decode_attention_full(
    q: torch.Tensor, data: torch.Tensor, dtype: torch.dtype, pages: torch.Tensor, num_tokens: torch.Tensor,
    slot_pos: torch.Tensor, tokens_per_page: int, scale: float, high_dense: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over pages in the model's dtype (reference of
    gpu_kernels/paged_attention.py's `paged_decode_attention_full`).

    Args:
        q: [B, Hq, d] queries.
        data: uint8 [P, page_bytes] page pool; a page is [K: T x d | V: T x d] in `dtype` from byte 0.
        pages: int [B, Hkv, C] page table of the layer; num_tokens: int [B, Hkv] tokens of each head
            (index i in page pages[..., i // T], slot i % T; T = tokens_per_page).
        slot_pos: int32 [P, max_slots], -1 = empty; read only with high_dense=False (then masked).
        scale: softmax scale.
    Returns:
        out fp32 [B, Hq, d], lse fp32 [B, Hq] (natural log; -inf and out 0 for a head with no token).
    """
    B, Hq, d = q.shape
    Hkv, C = pages.shape[1], pages.shape[2]
    T = tokens_per_page
    kv = data[:, :2 * T * d * dtype.itemsize].view(dtype).view(-1, 2, T, d)[pages.long()]  # [B, H, C, 2, T, d]
    k, v = kv[..., 0, :, :].reshape(B, Hkv, C * T, d), kv[..., 1, :, :].reshape(B, Hkv, C * T, d)
    valid = torch.arange(C * T, device=q.device).view(1, 1, -1) < num_tokens.view(B, Hkv, 1).to(q.device)
    if not high_dense:
        valid = valid & (slot_pos[pages.long()][..., :T].reshape(B, Hkv, C * T) >= 0)
    out, lse, _ = decode_attention(q, k, v, valid, scale)
    return out, lse


# ---- PQ retrieval (gpu_kernels/pq_score.py, gpu_kernels/fetch.py) -----------------------------
#
# PQCache's selection rule, per (sequence, KV head h) with query heads g of its group:
#     table[g, j, c] = scale * q_g[j-th sub-vector] . centroid[h, j, c]
#     logit[g, t]    = sum_j table[g, j, code[h, t, j]]          (asymmetric distance, inner product)
#     score[t]       = sum_g softmax over candidates t' in [lo, hi) of logit[g, t']
# Scores are -1 outside the candidates (probabilities are >= 0, so -1 never wins a top-k).


def pq_encode(k_new: torch.Tensor, centroids: torch.Tensor, seq_ids: torch.Tensor, positions: torch.Tensor,
              codes: torch.Tensor) -> None:
    """The new keys [B, Hkv, d] coded by their nearest centroids (fp16 [S, Hkv, m, K, d/m], gathered by
    `seq_ids`; fp32 squared distances, ties to the lower index) into codes uint8 [S, Hkv, cap, m] at `positions`."""
    B, H, d = k_new.shape
    m, dsub = centroids.shape[2], centroids.shape[4]
    dist = (k_new.float().view(B, H, m, 1, dsub) - centroids[seq_ids].float()).pow(2).sum(-1)  # [B, H, m, K]
    codes[seq_ids, :, positions] = dist.argmin(-1).to(torch.uint8)


def pq_tables(q: torch.Tensor, centroids: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, Hq, d]; centroids fp32 [B, Hkv, m, K, d/m] -> fp32 [B, Hq, m, K] (scaled sub-products)."""
    B, Hq, d = q.shape
    Hkv, m, K, dsub = centroids.shape[1:]
    G = Hq // Hkv
    qs = q.float().view(B, Hkv, G, m, dsub)
    return torch.einsum("bhgmd,bhmkd->bhgmk", qs, centroids.float()).reshape(B, Hq, m, K) * scale


def group_softmax_scores(logits: torch.Tensor, valid: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """logits fp32 [B, Hq, N] (scaled), valid bool [B, N] -> fp32 [B, Hkv, N]: softmax per query head
    over the valid tokens, summed over each KV head's group; -1 where not valid."""
    B, Hq, N = logits.shape
    mask = valid.view(B, 1, N)
    lg = logits.float().masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(lg, dim=-1, keepdim=True)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(lg - lse).masked_fill(~mask, 0.0)
    s = p.view(B, num_kv_heads, Hq // num_kv_heads, N).sum(2)
    return s.masked_fill(~mask, -1.0)


def pq_scores(table: torch.Tensor, codes: torch.Tensor, seq_ids: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
              num_tokens: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Aggregated PQ scores of tokens [0, num_tokens) (reference of gpu_kernels/pq_score.py).

    Args:
        table: fp32 [B, Hq, m, K] from `pq_tables`.
        codes: uint8 [S, Hkv, cap, m] codes of every sequence slot (cap >= num_tokens).
        seq_ids: int [B] slots of the batch; lo, hi: int [B] candidate range [lo, hi) per sequence.
        exclude: optional bool [S, Hkv, >= num_tokens]: tokens scored -1 (after the softmax: they stay
            in its denominators).
    Returns:
        fp32 [B, Hkv, num_tokens], -1 outside the candidates and where `exclude` is set.
    """
    B, Hq, m, K = table.shape
    Hkv = codes.shape[1]
    G = Hq // Hkv
    c = codes[seq_ids.long(), :, :num_tokens].long()  # [B, Hkv, N, m]
    c = c.repeat_interleave(G, dim=1)  # [B, Hq, N, m]
    logits = torch.gather(table.unsqueeze(2).expand(B, Hq, num_tokens, m, K), 4, c.unsqueeze(-1)).squeeze(-1).sum(-1)
    t = torch.arange(num_tokens, device=table.device).view(1, num_tokens)
    valid = (t >= lo.view(B, 1)) & (t < hi.view(B, 1))
    scores = group_softmax_scores(logits, valid, Hkv)
    if exclude is not None:
        scores = scores.masked_fill(exclude[seq_ids.long(), :, :num_tokens], -1.0)
    return scores


def gather_rows(src: torch.Tensor, rows: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """dst[i] = src[rows[i]] where rows[i] >= 0 (others untouched). src [R, D]; rows int [M]; dst [M, D]."""
    ok = rows >= 0
    picked = src[rows.clamp(min=0).long().to(src.device)].to(dst.device)
    dst.copy_(torch.where(ok.to(dst.device).view(-1, 1), picked, dst))
    return dst


def gather_dequantize_rows(src: torch.Tensor, rows: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor,
                           key_bits: int, value_bits: int, groups: int) -> None:
    """k_out[i], v_out[i] = the dequantized K and V of quantized row src[rows[i]] where rows[i] >= 0
    (others untouched). A quantized row is a one-token page of kvstore/hot/quantization.py's layout:
    [K codes d*kb/8 | V codes d*vb/8 | fp16 k_scale, k_zero, v_scale, v_zero per group].
    src uint8 [R, row_bytes]; rows int [M]; k_out, v_out [M, d] (written in their dtype)."""
    d = k_out.shape[-1]
    ok = (rows >= 0).to(k_out.device).view(-1, 1)
    picked = src[rows.clamp(min=0).long().to(src.device)].to(k_out.device)  # [M, row_bytes]
    k, v = dequantize_pages(picked, torch.arange(picked.shape[0], device=picked.device), key_bits, value_bits,
                            groups, 1, d)
    k_out.copy_(torch.where(ok, k[:, 0].to(k_out.dtype), k_out))
    v_out.copy_(torch.where(ok, v[:, 0].to(v_out.dtype), v_out))


def scatter_rows_to_pages(rows: torch.Tensor, page_ids: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                          data: torch.Tensor, slot_pos: torch.Tensor, key_bits: int, value_bits: int, groups: int,
                          tokens_per_page: int) -> None:
    """Quantized rows uint8 [M, row_bytes] (one-token pages) into slot slots[i] of page page_ids[i] of the pool
    data uint8 [P, page_bytes], and slot_pos[page_ids[i], slots[i]] = positions[i], in place; page_ids[i] < 0:
    row i skipped (reference of gpu_kernels/quant.py::scatter_rows_to_pages, bytes moved)."""
    d = (rows.shape[1] - 8 * groups) * 8 // (key_bits + value_bits)
    kB, vB = d * key_bits // 8, d * value_bits // 8
    kc, vc, meta = page_views(data, tokens_per_page, kB, vB, groups)
    ok = page_ids >= 0
    p, s, r = page_ids[ok].long(), slots[ok].long(), rows[ok]
    kc[p, s] = r[:, :kB]
    vc[p, s] = r[:, kB: kB + vB]
    meta[p, s] = r[:, kB + vB:].contiguous().view(torch.float16).view(-1, 4, groups)
    slot_pos[p, s] = positions[ok].to(slot_pos.dtype)


def lowest_mean_token(pages: torch.Tensor, limit: torch.Tensor, slot_pos: torch.Tensor, slot_score: torch.Tensor,
                      prompt_len: torch.Tensor, now: torch.Tensor, width: int, tpp: int, score_queries: int,
                      lowest: int, immune_tokens: int, from_end: bool = False) -> tuple[torch.Tensor, ...]:
    """LeanKV's victim of one tier per (sequence, layer, KV head): its lowest mean-attention candidate.

    Args:
        pages: int32 [B, L, H, C] the step's rows of the page table.
        limit: int [B, L, H]; indices [0, limit) may hold the tier's tokens. Index i is slot i % tpp of
            column i // tpp, or (from_end: the low tier fills the table from its last column) of column
            C - 1 - i // tpp; columns clamped into [0, C).
        slot_pos: int32 [P, >= tpp] position held by each slot of each page (-1 empty);
        slot_score: fp32 [P, >= tpp] summed attention of each slot's token.
        prompt_len, now: int64 [B] the prompt's length and the step's position.
        width: indices scanned (>= every limit).
    A candidate: page > 0, i < limit, lowest <= pos < now - immune_tokens. Its mean: score over the
    queries that saw it (prompt tokens: min(score_queries, n) capped at n - pos, plus the decode steps;
    later tokens: now - pos; at least 1).

    Returns:
        (min fp32 [B, L, H] (inf: no candidate), arg int64 (its index; 0 when none), and the page, slot
        and position (int64) at arg).
    """
    B, L, H, C = pages.shape
    idx = torch.arange(max(width, 1), device=pages.device)
    col = idx // tpp
    col = (C - 1 - col).clamp(min=0) if from_end else col.clamp(max=C - 1)
    page = torch.gather(pages, 3, col.view(1, 1, 1, -1).expand(B, L, H, -1)).long()
    slot = (idx % tpp).view(1, 1, 1, -1).expand_as(page)
    pos = slot_pos[page, slot].long()
    n, t = prompt_len.view(B, 1, 1, 1).long(), now.view(B, 1, 1, 1).long()
    q = torch.clamp(n, max=score_queries)
    count = torch.where(pos < n, torch.minimum(q, n - pos) + (t - n), t - pos).clamp(min=1).float()
    mean = slot_score[page, slot] / count
    cand = (pos >= lowest) & (pos < t - immune_tokens) & (idx.view(1, 1, 1, -1) < limit.unsqueeze(-1)) & (page > 0)
    vmin, arg = torch.where(cand, mean, float("inf")).min(-1)

    def at(x):
        return torch.gather(x, 3, arg.unsqueeze(-1)).squeeze(-1)

    return vmin, arg, at(page), at(slot), at(pos)


def observe_scores(logits: torch.Tensor, lse: torch.Tensor, pages: torch.Tensor, slot_score: torch.Tensor) -> None:
    """LeanKV's score update of one decode step, in place: every hot token's score gains its probability
    at that step, the max over its KV head's query group (kvstore/hot/policies.py).

    Args:
        logits: fp32 [L, B, Hq, W, SL] the step's emitted logits by virtual page (-inf: no token);
            overwritten (the probabilities).
        lse: fp32 [L, B, Hq] the step's log-sum-exp per query head (over hot + retrieved tokens).
        pages: int64 [L, B, Hkv, W] the pool page of each virtual page (0: the null page, skipped).
        slot_score: fp32 [P, max_slots] the pool's per-slot scores; slots min(SL, max_slots) are updated.
    """
    L, B, Hq, C, S = logits.shape
    Hkv = pages.shape[2]
    probs = logits.sub_(lse.view(L, B, Hq, 1, 1)).exp_().nan_to_num_(0.0)
    S = min(S, slot_score.shape[1])
    pmax = probs.view(L, B, Hkv, Hq // Hkv, C, -1)[..., :S].amax(3)  # [L, B, Hkv, W, S]
    pmax.mul_((pages > 0).unsqueeze(-1))  # past a head's pages: the null page, which gets + 0
    flat = pages.unsqueeze(-1) * slot_score.shape[1] + torch.arange(S, device=pages.device)
    # every page belongs to one (sequence, layer, head): no two entries but the null page's share an index
    slot_score.view(-1).index_add_(0, flat.view(-1), pmax.reshape(-1))
