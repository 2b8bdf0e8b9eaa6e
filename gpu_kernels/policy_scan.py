"""Triton: LeanKV's plan-time work of a decode step: the victim search, one pass over a tier's slots per
(sequence, layer, KV head), and the score update (`observe_scores`, at the end of this file).

Reference: `gpu_kernels/reference.py` (`lowest_mean_token`), which the CPU path runs. LeanKV's plan
asks, every decode step and for every (sequence, layer, KV head), which high-tier token and which
low-tier token have the lowest mean attention among the candidates (not a sink, not immune). In torch
that is ~25 ops over [B, L, H, tokens] with int64 temporaries: at 32K x 4 on the 32-layer shape each
op moves ~0.3 GB, and the two scans were a large part of `tiered`'s plan on the H200
(results/h200_graphs). Here one program per row walks its slots once (page id, position and score:
12 B a token), keeps the first minimum (torch's `min` tie rule) and writes the victim's index, page,
slot and position. The mean divides with IEEE rounding (`div_rn`), so the result equals the
reference bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["C", "width", "stride_pos", "stride_score", "score_queries", "lowest", "immune"])
def _lowest_mean_kernel(pages_ptr, limit_ptr, pos_ptr, score_ptr, n_ptr, now_ptr,
                        min_ptr, arg_ptr, page_out_ptr, slot_out_ptr, pos_out_ptr,
                        C, width, stride_pos, stride_score, score_queries, lowest, immune,
                        LH: tl.constexpr, TPP: tl.constexpr, FROM_END: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)  # the (sequence, layer, head) row
    b = r // LH
    n = tl.load(n_ptr + b).to(tl.int64)
    now = tl.load(now_ptr + b).to(tl.int64)
    lim = tl.load(limit_ptr + r).to(tl.int64)
    q = tl.minimum(n, score_queries)
    row = pages_ptr + r.to(tl.int64) * C
    best = tl.full((), float("inf"), tl.float32)
    best_i = tl.zeros((), dtype=tl.int64)
    for start in range(0, width, BLOCK):
        i = start + tl.arange(0, BLOCK).to(tl.int64)
        col = i // TPP
        if FROM_END:
            col = tl.maximum(C - 1 - col, 0)
        else:
            col = tl.minimum(col, C - 1)
        inside = i < width
        page = tl.load(row + col, mask=inside, other=0).to(tl.int64)
        slot = i % TPP
        pos = tl.load(pos_ptr + page * stride_pos + slot, mask=inside, other=-1).to(tl.int64)
        score = tl.load(score_ptr + page * stride_score + slot, mask=inside, other=0.0)
        count = tl.where(pos < n, tl.minimum(q, n - pos) + (now - n), now - pos)
        mean = tl.math.div_rn(score, tl.maximum(count, 1).to(tl.float32))
        cand = inside & (pos >= lowest) & (pos < now - immune) & (i < lim) & (page > 0)
        vals = tl.where(cand, mean, float("inf"))
        m = tl.min(vals, axis=0)
        first = tl.min(tl.where(vals == m, i, width + BLOCK), axis=0)
        better = m < best
        best_i = tl.where(better, first, best_i)
        best = tl.where(better, m, best)
    col = best_i // TPP
    if FROM_END:
        col = tl.maximum(C - 1 - col, 0)
    else:
        col = tl.minimum(col, C - 1)
    page = tl.load(row + col).to(tl.int64)
    slot = best_i % TPP
    tl.store(min_ptr + r, best)
    tl.store(arg_ptr + r, best_i)
    tl.store(page_out_ptr + r, page)
    tl.store(slot_out_ptr + r, slot)
    tl.store(pos_out_ptr + r, tl.load(pos_ptr + page * stride_pos + slot).to(tl.int64))


def lowest_mean_token(pages: torch.Tensor, limit: torch.Tensor, slot_pos: torch.Tensor, slot_score: torch.Tensor,
                      prompt_len: torch.Tensor, now: torch.Tensor, width: int, tpp: int, score_queries: int,
                      lowest: int, immune_tokens: int, from_end: bool = False) -> tuple[torch.Tensor, ...]:
    """`reference.lowest_mean_token` in one launch (same arguments, same results bit for bit)."""
    B, L, H, C = pages.shape
    dev = pages.device
    pages = pages.contiguous()
    limit = limit.reshape(B, L, H).to(torch.int64).contiguous()
    vmin = torch.empty(B, L, H, dtype=torch.float32, device=dev)
    arg, page, slot, pos = (torch.empty(B, L, H, dtype=torch.int64, device=dev) for _ in range(4))
    if B * L * H == 0:
        return vmin, arg, page, slot, pos
    if slot_pos.stride(1) != 1 or slot_score.stride(1) != 1:
        raise ValueError("lowest_mean_token: slot_pos and slot_score need unit stride along the slots")
    _lowest_mean_kernel[(B * L * H,)](
        pages, limit, slot_pos, slot_score, prompt_len.to(torch.int64).contiguous(), now.to(torch.int64).contiguous(),
        vmin, arg, page, slot, pos, C, max(width, 1), slot_pos.stride(0), slot_score.stride(0), score_queries, lowest,
        immune_tokens, LH=L * H, TPP=tpp, FROM_END=from_end, BLOCK=1024, num_warps=4,
    )
    return vmin, arg, page, slot, pos


@triton.jit(do_not_specialize=["rows", "W", "S", "SL", "stride_score", "B", "L", "C"])
def _observe_kernel(logits_ptr, lse_ptr, pages_ptr, score_ptr, seq_ptr, ntok_ptr, nlow_ptr, rows, W, S, SL,
                    stride_score, B, L, C, HKV: tl.constexpr, G: tl.constexpr, BLOCK_W: tl.constexpr,
                    BLOCK_S: tl.constexpr, TPP: tl.constexpr):
    r = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)  # (layer, sequence, KV head, virtual page) rows
    inside = r < rows
    w = r % W
    lbh = r // W
    h = lbh % HKV
    lb = lbh // HKV  # layer * B + sequence
    # the virtual page's pool page, from the page table (`PageTable.virtual_pages`, in the kernel)
    seq = tl.load(seq_ptr + lb % B, mask=inside, other=0).to(tl.int64)
    head = (seq * L + lb // B) * HKV + h  # the (sequence slot, layer, head) row of the table
    n_hp = (tl.load(ntok_ptr + head, mask=inside, other=0) + TPP - 1) // TPP
    n_lp = tl.load(nlow_ptr + head, mask=inside, other=0)
    col = tl.where(w < n_hp, w, C - 1 - (w - n_hp))
    col = tl.minimum(tl.maximum(col, 0), C - 1)
    page = tl.load(pages_ptr + head * C + col, mask=inside & (w < n_hp + n_lp), other=0)
    live = inside & (page > 0)  # the null page (past a head's pages) gets nothing
    s = tl.arange(0, BLOCK_S)
    m = live[:, None] & (s < S)[None, :]
    best = tl.zeros((BLOCK_W, BLOCK_S), dtype=tl.float32)
    for g in tl.static_range(G):
        hq = lb * (HKV * G) + h * G + g  # the query head's row of lse [L * B * Hq]
        lse = tl.load(lse_ptr + hq, mask=live, other=0.0)
        lse = tl.where(lse == float("-inf"), 0.0, lse)  # a head without a token: its logits are -inf, p = 0
        x = tl.load(logits_ptr + ((hq * W + w) * SL)[:, None] + s[None, :], mask=m, other=float("-inf"))
        p = tl.exp(x - lse[:, None])
        p = tl.where(p != p, 0.0, tl.minimum(p, 3.4028234663852886e38))  # torch's nan_to_num(0.0)
        best = tl.maximum(best, p)
    at = score_ptr + page.to(tl.int64)[:, None] * stride_score + s[None, :]
    tl.store(at, tl.load(at, mask=m, other=0.0) + best, mask=m)


def observe_scores(logits: torch.Tensor, lse: torch.Tensor, table: tuple, slot_score: torch.Tensor) -> None:
    """`reference.observe_scores` in one launch: the logits read once (the torch ops made five passes over
    them, ~0.6 GB each at 32K x 4 on the 32-layer shape), each live page's slots updated by the program
    that owns it (a page belongs to one (sequence, layer, head): no atomics). logits are left as they are.

    table: (pages int32 [S, L, Hkv, C], num_tokens int32 [S, L, Hkv], num_low_pages int32 [S, L, Hkv], seq_ids
    int [B], tokens_per_page), contiguous: the page table the virtual pages are looked up in, in the kernel
    (where the reference takes `PageTable.virtual_pages`' [L, B, Hkv, W]: ~19 ops and a gather of the batch's
    tables)."""
    L, B, Hq, W, SL = logits.shape
    pages, ntok, nlow, seq_ids, tpp = table
    Hkv = pages.shape[2]
    if (pages.dim() != 4 or pages.shape[1] != L or ntok.shape != pages.shape[:3] or nlow.shape != ntok.shape
            or seq_ids.shape != (B,) or Hq % Hkv or lse.shape != (L, B, Hq)):
        raise ValueError(f"observe_scores: logits [L, B, Hq, W, S], lse [L, B, Hq], table pages [S, L, Hkv, C] "
                         f"and counts [S, L, Hkv], seq_ids [B] expected; got {tuple(logits.shape)}, "
                         f"{tuple(lse.shape)}, {tuple(pages.shape)}, {tuple(ntok.shape)}, {tuple(seq_ids.shape)}")
    if not all(t.is_contiguous() for t in (logits, lse, pages, ntok, nlow, seq_ids)) or slot_score.stride(1) != 1:
        raise ValueError("observe_scores: contiguous logits, lse and table, and slot_score with unit stride along "
                         "slots")
    S = min(SL, slot_score.shape[1])
    rows = L * B * Hkv * W
    if rows == 0 or S == 0:
        return
    block_w = 8
    _observe_kernel[(triton.cdiv(rows, block_w),)](
        logits, lse, pages, slot_score, seq_ids, ntok, nlow, rows, W, S, SL, slot_score.stride(0), B, L,
        pages.shape[-1], HKV=Hkv, G=Hq // Hkv, BLOCK_W=block_w, BLOCK_S=triton.next_power_of_2(S), TPP=tpp,
        num_warps=4,
    )
