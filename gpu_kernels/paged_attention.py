"""Triton decode attention over quantized paged KV (both precision tiers), flash-decoding split.

One program per (sequence, KV head, split). A program loads the whole query group [G, d] of its
KV head once, walks its share of the head's pages (high pages from the left of the page table,
then low pages from the right), dequantizes in registers and keeps an online softmax. Each
split writes a partial output and its log-sum-exp; `merge_splits` combines them (the same
merge combines partial results over any disjoint token sets, see reference.merge_attention).

Dequantization is folded into the dot products, so no dequantized key is ever materialized:

    q . k_hat = scale_k * (q . codes_k) + zero_k * sum(q)        (per quantization group)
    p @ v_hat = (p * scale_v) @ codes_v + (p . zero_v)

Codes (< 256) are exact in fp16, and so is a bf16 query of magnitude in [6e-5, 65504] (bf16's 8
mantissa bits fit fp16's 10), so with a 16-bit query the tensor-core fp16 dot q . codes_k is exact
up to fp32 accumulation (fp16 rather than bf16 operands: the same exactness, and the Triton
interpreter's bf16 dot is wrong). The value side rounds p * scale_v to fp16 (2^-11 relative).
fp32 queries use fp32 dots ("ieee"). With fast_cvt (DEFAULT_LAUNCH), 16-bit codes are made as
fp16(0x6400 | c) - 1024 (exact) rather than by int-to-float conversions, which run at 16 per clock
per SM on sm_90: 256 per token and head, about 0.5 ms of the 1.3 ms at B=8, N=128K before.

With `logits` given, the kernel also writes each token's scaled logit in the page table's layout
[B, Hq, C, S]; probabilities are exp(logit - lse) once the splits are merged (LeanKV's scores).

Graph-safe: allocates nothing, syncs nothing; every buffer is passed in (built at plan time).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _load_codes(rowptr, BITS: tl.constexpr, D: tl.constexpr):
    """Codes [BLOCK_T, D] int32 of planar-packed rows starting at byte pointers rowptr [BLOCK_T].

    Element e of a row lives in byte e % (D / per) at bit (e // (D / per)) * BITS: every element
    loads its byte (repeats hit L1) so no register shuffle is needed to restore the order.
    """
    PER: tl.constexpr = 8 // BITS
    SUB: tl.constexpr = D // PER
    dims = tl.arange(0, D)
    if PER == 1:
        return tl.load(rowptr[:, None] + dims[None, :]).to(tl.int32)
    byte = tl.load(rowptr[:, None] + (dims % SUB)[None, :]).to(tl.int32)
    return (byte >> ((dims // SUB) * BITS)[None, :]) & ((1 << BITS) - 1)


@triton.jit
def _load_codes_f16(rowptr, BITS: tl.constexpr, D: tl.constexpr):
    """As `_load_codes`, but fp16 codes made without int-to-float conversions (the slow conversion pipe).

    fp16 bits 0x6400 | c (c < 1024) are exactly 1024 + c, so (bits as fp16) - 1024 is exactly c: an OR
    and an fp16 subtract per element instead of a cvt (16 per clock per SM on sm_90).
    """
    PER: tl.constexpr = 8 // BITS
    SUB: tl.constexpr = D // PER
    dims = tl.arange(0, D)
    if PER == 1:
        b = tl.load(rowptr[:, None] + dims[None, :]).to(tl.int16)
    else:
        b = tl.load(rowptr[:, None] + (dims % SUB)[None, :]).to(tl.int16)
        b = (b >> ((dims // SUB) * BITS).to(tl.int16)[None, :]) & ((1 << BITS) - 1)
    return ((b | 0x6400).to(tl.float16, bitcast=True) - 1024.0).to(tl.float16)


@triton.jit
def _attend_block(
    acc, m_i, l_i, q, data_ptr, data16_ptr, table, vp0, vp_end, n_high, n_hp, C, pos_ptr, max_slots, page_bytes,
    scale_log2, emit_ptr, emit_row_stride, DO_EMIT: tl.constexpr, IS_LOW: tl.constexpr,
    TPP: tl.constexpr, BT: tl.constexpr, NP: tl.constexpr, SLOTS: tl.constexpr, D: tl.constexpr,
    NG: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr, BLOCK_G: tl.constexpr, G: tl.constexpr,
    FP32: tl.constexpr, FAST_CVT: tl.constexpr,
):
    """NP virtual pages [vp0, vp0 + NP) (clipped at vp_end) of one head: BLOCK = NP * BT token rows."""
    KB: tl.constexpr = D * KBITS // 8
    VB: tl.constexpr = D * VBITS // 8
    r = tl.arange(0, NP * BT)
    vp = vp0 + r // BT
    slot = r % BT
    in_page = (slot < TPP) & (vp < vp_end)
    if IS_LOW:
        col = C - 1 - (vp - n_hp)
    else:
        col = vp
        in_page = in_page & (vp * TPP + slot < n_high)
    col = tl.where(in_page, col, 0)
    slot = tl.where(in_page, slot, 0)
    page = tl.load(table + col, mask=in_page, other=0).to(tl.int64)
    pos = tl.load(pos_ptr + page * max_slots + slot, mask=in_page, other=-1)
    valid = in_page & (pos >= 0)
    base = page * page_bytes
    if FAST_CVT and not FP32:
        kc = _load_codes_f16(data_ptr + base + slot * KB, KBITS, D)
        vc = _load_codes_f16(data_ptr + base + TPP * KB + slot * VB, VBITS, D)
    else:
        kc = _load_codes(data_ptr + base + slot * KB, KBITS, D)
        vc = _load_codes(data_ptr + base + TPP * KB + slot * VB, VBITS, D)
    meta = (base + TPP * (KB + VB)) // 2 + slot * (4 * NG)
    dims = tl.arange(0, D)
    grp = dims // (D // NG)
    s = tl.zeros((BLOCK_G, NP * BT), dtype=tl.float32)
    for j in tl.static_range(NG):
        ks = tl.load(data16_ptr + meta + j).to(tl.float32)
        kz = tl.load(data16_ptr + meta + NG + j).to(tl.float32)
        if NG == 1:
            qj = q
        else:
            qj = tl.where((grp == j)[None, :], q, 0.0)
        if FP32:
            dot = tl.dot(qj, tl.trans(kc.to(tl.float32)), input_precision="ieee")
        else:
            dot = tl.dot(qj.to(tl.float16), tl.trans(kc.to(tl.float16)))
        qsum = tl.sum(qj.to(tl.float32), axis=1)
        s += dot * ks[None, :] + qsum[:, None] * kz[None, :]
    s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
    if DO_EMIT:
        g = tl.arange(0, BLOCK_G)
        tl.store(emit_ptr + g[:, None] * emit_row_stride + (col * SLOTS + slot)[None, :], s * 0.6931471805599453,
                 mask=(g[:, None] < G) & in_page[None, :])
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    for j in tl.static_range(NG):
        vs = tl.load(data16_ptr + meta + 2 * NG + j).to(tl.float32)
        vz = tl.load(data16_ptr + meta + 3 * NG + j).to(tl.float32)
        if FP32:
            pv = tl.dot(p * vs[None, :], vc.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot((p * vs[None, :]).to(tl.float16), vc.to(tl.float16))
        pz = tl.sum(p * vz[None, :], axis=1)
        if NG == 1:
            acc += pv + pz[:, None]
        else:
            acc += tl.where((grp == j)[None, :], pv + pz[:, None], 0.0)
    return acc, m_new, l_i


@triton.jit
def _paged_decode_kernel(
    q_ptr, data_ptr, data16_ptr, pages_ptr, num_high_ptr, num_low_pages_ptr, seq_ptr, pos_ptr,
    part_out_ptr, part_lse_ptr, emit_ptr,
    layer, C, page_bytes, max_slots, pages_per_split, scale_log2,
    stride_qb, stride_qh,
    stride_ps, stride_pl, stride_ph,  # page table [S, L, H, C] (last stride 1)
    stride_ns, stride_nl,  # num_high / num_low_pages [S, L, H] (last stride 1)
    HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, NG: tl.constexpr,
    TPP_H: tl.constexpr, BLOCK_TH: tl.constexpr, NP_H: tl.constexpr, KB_H: tl.constexpr, VB_H: tl.constexpr,
    HAS_LOW: tl.constexpr, TPP_L: tl.constexpr, BLOCK_TL: tl.constexpr, NP_L: tl.constexpr,
    KB_L: tl.constexpr, VB_L: tl.constexpr,
    SLOTS: tl.constexpr, DO_EMIT: tl.constexpr, FP32: tl.constexpr, FAST_CVT: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    seq = tl.load(seq_ptr + b)
    g = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, D)
    gmask = g < G
    q = tl.load(q_ptr + b * stride_qb + (h * G + g)[:, None] * stride_qh + dims[None, :], mask=gmask[:, None], other=0.0)
    if FP32:
        q = q.to(tl.float32)
    n_high = tl.load(num_high_ptr + seq * stride_ns + layer * stride_nl + h)
    n_hp = (n_high + TPP_H - 1) // TPP_H
    if HAS_LOW:
        n_lp = tl.load(num_low_pages_ptr + seq * stride_ns + layer * stride_nl + h)
    else:
        n_lp = 0
    table = pages_ptr + seq * stride_ps + layer * stride_pl + h * stride_ph
    v0 = split * pages_per_split
    v1 = tl.minimum(v0 + pages_per_split, n_hp + n_lp)
    acc = tl.zeros((BLOCK_G, D), dtype=tl.float32)
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    emit_row_stride = C * SLOTS
    emit_base = emit_ptr + (b * HKV * G + h * G).to(tl.int64) * emit_row_stride
    h_end = tl.minimum(v1, n_hp)
    for vp in range(v0, h_end, NP_H):
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, data_ptr, data16_ptr, table, vp, h_end, n_high, n_hp, C, pos_ptr, max_slots,
            page_bytes, scale_log2, emit_base, emit_row_stride, DO_EMIT, False,
            TPP_H, BLOCK_TH, NP_H, SLOTS, D, NG, KB_H, VB_H, BLOCK_G, G, FP32, FAST_CVT,
        )
    if HAS_LOW:
        for vp in range(tl.maximum(v0, n_hp), v1, NP_L):
            acc, m_i, l_i = _attend_block(
                acc, m_i, l_i, q, data_ptr, data16_ptr, table, vp, v1, n_high, n_hp, C, pos_ptr, max_slots,
                page_bytes, scale_log2, emit_base, emit_row_stride, DO_EMIT, True,
                TPP_L, BLOCK_TL, NP_L, SLOTS, D, NG, KB_L, VB_L, BLOCK_G, G, FP32, FAST_CVT,
            )
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i > 0, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    row = (b * HKV * G + h * G + g) * tl.num_programs(1) + split  # not a constexpr: one compile for all split counts
    tl.store(part_out_ptr + row[:, None] * D + dims[None, :], out, mask=gmask[:, None])
    tl.store(part_lse_ptr + row, lse, mask=gmask)


@triton.jit
def _merge_kernel(part_out_ptr, part_lse_ptr, out_ptr, lse_ptr, NSPLIT: tl.constexpr, BLOCK_S: tl.constexpr,
                  D: tl.constexpr):
    r = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, D)
    lse = tl.load(part_lse_ptr + r * NSPLIT + s, mask=s < NSPLIT, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_safe)
    total = tl.sum(w, axis=0)
    parts = tl.load(part_out_ptr + (r * NSPLIT + s)[:, None] * D + dims[None, :], mask=(s < NSPLIT)[:, None], other=0.0)
    t_safe = tl.where(total > 0, total, 1.0)
    out = tl.sum(parts * w[:, None], axis=0) / t_safe
    tl.store(out_ptr + r * D + dims, out.to(out_ptr.dtype.element_ty))
    tl.store(lse_ptr + r, tl.where(total > 0, m_safe + tl.log(t_safe), float("-inf")))


def merge_splits(part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge per-split partial results: part_out fp32 [R, NSPLIT, d], part_lse fp32 [R, NSPLIT] -> out [R, d], lse [R]."""
    R, nsplit, d = part_out.shape
    _merge_kernel[(R,)](part_out, part_lse, out, lse, NSPLIT=nsplit, BLOCK_S=triton.next_power_of_2(nsplit), D=d)


# Launch defaults KVStore uses (HotTier.attend): the winners of benchmarks/perf_decode_attention --sweep.
DEFAULT_LAUNCH = dict(fast_cvt=True, num_warps=4, num_stages=2, block_tokens=128, programs_per_sm_small=4,
                      programs_per_sm_large=8)


def choose_splits(batch: int, num_kv_heads: int, max_pages: int, num_sms: int = 132) -> int:
    """Splits per (sequence, KV head), at least one page per split.

    About 4 programs per SM when there are few heads (B x Hkv < 32: H100 B=1 best at 66 splits) and 8
    when there are many (B=8, Hkv=8: 16 splits beat 8, 1.31 vs 1.40 ms at N=128K).
    """
    heads = max(1, batch * num_kv_heads)
    per_sm = DEFAULT_LAUNCH["programs_per_sm_small" if heads < 32 else "programs_per_sm_large"]
    want = max(1, (per_sm * num_sms) // heads)
    return int(max(1, min(want, max_pages, 256)))


def paged_decode_attention(
    q: torch.Tensor, data: torch.Tensor, pages: torch.Tensor, num_high: torch.Tensor,
    num_low_pages: torch.Tensor | None, seq_ids: torch.Tensor, layer: int, slot_pos: torch.Tensor,
    high: tuple[int, int, int], low: tuple[int, int, int] | None, groups: int, scale: float,
    out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor,
    pages_per_split: int, logits: torch.Tensor | None = None, num_warps: int | None = None,
    num_stages: int | None = None, block_tokens: int | None = None, fast_cvt: bool | None = None,
) -> None:
    """Decode attention of one layer over the quantized hot tier, written into `out` and `lse`.

    Args:
        q: [B, Hq, d] bf16/fp16/fp32, last stride 1.
        data: uint8 [P, page_bytes] page pool.
        pages: int32 [S, L, Hkv, C] page tables of all sequence slots and layers (high pages from the
            left, low pages from the right); num_high int32 [S, L, Hkv] high slots in use;
            num_low_pages int32 [S, L, Hkv] or None.
        seq_ids: int64 [B] sequence slots of the batch rows; layer: the layer.
        slot_pos: int32 [P, max_slots], -1 marks an empty slot (never attended).
        high / low: (key_bits, value_bits, tokens_per_page) per tier (low None: no low tier).
        out: [B, Hq, d] (any float dtype), lse fp32 [B, Hq]: results (natural-log lse, -inf if empty).
        part_out fp32 [B, Hq, NSPLIT, d], part_lse fp32 [B, Hq, NSPLIT]: split workspace.
        pages_per_split: pages each split walks; NSPLIT * pages_per_split must cover the widest head.
        logits: optional fp32 [B, Hq, C, max(T_high, T_low)]: per-token scaled logits (-inf = no token).
        num_warps / num_stages / block_tokens / fast_cvt: launch variant (None: DEFAULT_LAUNCH's);
            fast_cvt makes fp16 codes by the 0x6400 bit trick instead of int-to-float conversions.
    """
    fast_cvt = DEFAULT_LAUNCH["fast_cvt"] if fast_cvt is None else fast_cvt
    num_warps = DEFAULT_LAUNCH["num_warps"] if num_warps is None else num_warps
    num_stages = DEFAULT_LAUNCH["num_stages"] if num_stages is None else num_stages
    block_tokens = DEFAULT_LAUNCH["block_tokens"] if block_tokens is None else block_tokens
    B, Hq, d = q.shape
    S_, L, Hkv, C = pages.shape
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} not a multiple of KV heads {Hkv}")
    if q.stride(-1) != 1 or pages.stride(-1) != 1 or num_high.stride(-1) != 1:
        raise ValueError("q, pages and num_high need a last stride of 1")
    if data.dtype != torch.uint8 or not data.is_contiguous():
        raise ValueError("data must be the contiguous uint8 page pool")
    if d & (d - 1) or d < 16:
        raise ValueError(f"head dim {d} must be a power of two >= 16 for the Triton decode kernel")
    nsplit = part_out.shape[2]
    if part_out.shape != (B, Hq, nsplit, d) or part_lse.shape != (B, Hq, nsplit):
        raise ValueError(f"part_out {tuple(part_out.shape)} / part_lse {tuple(part_lse.shape)}: want [B, Hq, NSPLIT, d] / [B, Hq, NSPLIT]")
    if out.shape != (B, Hq, d) or lse.shape != (B, Hq) or not out.is_contiguous():
        raise ValueError(f"out {tuple(out.shape)} / lse {tuple(lse.shape)}: want contiguous [B, Hq, d] / [B, Hq]")
    G = Hq // Hkv
    kb, vb, th = high
    lkb, lvb, tlow = low if low is not None else (kb, vb, th)
    slots = max(th, tlow if low is not None else 0)
    if logits is not None and logits.shape != (B, Hq, C, slots):
        raise ValueError(f"logits {tuple(logits.shape)}: want [B, Hq, C={C}, {slots}]")
    nlp = num_low_pages if num_low_pages is not None else num_high
    # A block of `block_tokens` rows spans block_tokens // BLOCK_T pages per loop step: more bytes
    # in flight and fewer softmax rescales than one page (32 tokens) per step (1.2 TB/s at one page).
    bth, btl = triton.next_power_of_2(th), triton.next_power_of_2(tlow)
    bth, btl = max(16 if bth <= block_tokens else bth, bth), max(btl, 16)
    grid = (B * Hkv, nsplit)
    _paged_decode_kernel[grid](
        q, data, data.view(torch.float16), pages, num_high, nlp, seq_ids, slot_pos,
        part_out, part_lse, logits if logits is not None else part_lse,
        layer, C, data.shape[1], slot_pos.shape[1], pages_per_split, scale * LOG2E,
        q.stride(0), q.stride(1),
        pages.stride(0), pages.stride(1), pages.stride(2),
        num_high.stride(0), num_high.stride(1),
        HKV=Hkv, G=G, BLOCK_G=max(16, triton.next_power_of_2(G)), D=d, NG=groups,
        TPP_H=th, BLOCK_TH=bth, NP_H=max(1, block_tokens // bth), KB_H=kb, VB_H=vb,
        HAS_LOW=low is not None, TPP_L=tlow, BLOCK_TL=btl, NP_L=max(1, block_tokens // btl), KB_L=lkb, VB_L=lvb,
        SLOTS=slots, DO_EMIT=logits is not None, FP32=q.dtype == torch.float32, FAST_CVT=bool(fast_cvt),
        num_warps=num_warps, num_stages=num_stages,
    )
    merge_splits(part_out.view(B * Hq, nsplit, d), part_lse.view(B * Hq, nsplit), out.view(B * Hq, d), lse.view(B * Hq))
