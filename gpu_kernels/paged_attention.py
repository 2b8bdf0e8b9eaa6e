"""Triton decode attention over paged KV, flash-decoding split: quantized pages (both precision tiers)
and, below, pages in the model's dtype.

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
fp32 queries use fp32 dots ("ieee"). 16-bit codes are made as fp16(0x6400 | c) - 1024 (exact)
rather than by int-to-float conversions, which run at 16 per clock per SM on sm_90: 256 per token
and head, about 0.5 ms of the 1.3 ms at B=8, N=128K when the kernel used them.

Where the time went (H100, B=8, N=128K, 1.7 GB of K8V4 pages; a kernel that only reads the same
pages through the same page table: 0.585 ms, 97% of copy bandwidth):
  1.18 ms  first kernel: value codes converted to fp16 and staged through shared memory for the dot,
           each value byte loaded twice (once per nibble), 4 warps and two cross-warp reductions a block;
  1.00 ms  values as two head-dim halves, one dot each (a byte loaded once feeds both);
  0.735    the softmax denominator and the value zero-point term summed once after the loop (LAZY);
  0.638    K8 and V4 codes converted by PTX prmt (2 instructions per 2 codes), one warp per program, one
           page per step, 3 stages;
  0.607    values stored byte-major in the page (kvstore/hot/quantization.py), so the tensor-core operand
           (consecutive tokens of one element) loads as words rather than single bytes.
Then on the H200 (4.27 TB/s copy, SDPA over bf16 0.96 ms; `benchmarks.perf.kernel_resources` reads the
registers and the loop's instructions without a GPU):
  0.537 ms the kernel above: 248 registers a thread (the group of 4 padded to 16 query rows), so only
           8 one-warp programs fit an SM, each stalled most of the time: 75% of copy bandwidth;
  0.509    the query block unpadded (Triton >= 3.2 pads the dot itself): 168 registers, 12 programs;
  0.433    transposed: S^T = K Q^T and O^T += V^T P^T, tokens and head dims as the tiles'
           rows and the group as their columns; no replicated query rows moved into place every
           page (loop 902 -> 774 instructions, half the HMMAs);
  0.424    accumulators rescaled only on pages where a running max moved: 4,051 GB/s,
           95% of copy bandwidth, 2.26x SDPA. What is left is mostly memory time.
Tried and rejected: codes kept as fp16 1024 + c with the bias folded into the zero points (no
subtracts): 0.65 ms and 4.8e-3 relative error (results/h200).

Empty slots. A slot's int32 position (slot_pos, -1 = empty) is read only to mask empty slots. The
low tier has them (LeanKV prunes a low token without refilling its slot); the high tier of KVStore
does not: every index below n_high holds a token whenever this kernel runs (prefill packs the
kept tokens from index 0, a decode step's new token takes index n_high or the slot of a token that
leaves the high tier in that step, and each layer writes its new token before its attention; a step
stopped before its last layer is undone by the next plan: kvstore/store.py,
`KVStore._undo_unwritten_slots`; tests/test_policies.py checks it at every layer's attention). So
with HIGH_DENSE (DEFAULT_LAUNCH's high_dense) the high tier loads no position: 4 of the ~204 bytes a
token costs per head at K8V4, d=128. The emitted logits (below) are unchanged: they were written for
every slot below n_high, -inf only where the position was -1, which no longer occurs there.
high_dense=False keeps the old masking for callers whose high tier may have holes.

Retrieved pages (optional, HAS_RET). A launch may also attend per-step retrieved pages: pool pages
in the high tier's format, one row of ids per (batch row, KV head), walked as virtual pages after the
low tier in the same split partition and the same online softmax, so out and lse cover the hot and
the retrieved tokens: the store's retrieved tokens are attended in the hot tier's launch instead of
by a separate attention and an LSE merge. A retrieved slot is attended iff its position is >= 0
(-1 masks a selection narrower than the pages, or an invalid pick); its logits are not emitted.
Without them (HAS_RET off) the kernel compiles to the same code as before they existed.

With `logits` given, the kernel also writes each token's scaled logit by virtual page [B, Hq, W, S]:
column v is the head's v-th page in the kernel's walk (its high pages from the left of the table,
then its low pages from the right: `kvstore.hot.page_table.virtual_columns` maps them back), so W need
only cover the widest head's high + low pages, not the table's width (a table sized for a 128K
context made this buffer ~1 GB a sequence at Llama-3-8B's shape, with LeanKV holding a tenth of
it). Probabilities are exp(logit - lse) once the splits are merged (LeanKV's scores).

Pages in the model's dtype (`paged_decode_attention_full`, `_full_decode_kernel`). The hot tier of
full, pqcache and oracle keeps K and V unquantized, a page [K: T x d | V: T x d] in fp16, bf16 or
fp32 (kvstore/hot/page_format.py, FullFormat). Its kernel keeps this one's contract (page table,
null page 0, splits merged by `merge_splits`, the GQA group loaded once, the transposed dots
S^T = K @ Q^T and O^T += V^T @ P^T, the rescale only where a running max moved) with nothing to
dequantize: a page's K rows and its V rows (loaded as V^T [d, T], so both tiles go to shared memory
by asynchronous copies on sm_90) feed the dots directly. 16-bit pages under a query of their dtype
take tensor-core dots with fp32 accumulation (the products are exact; P is rounded to the pages'
dtype for P @ V, as flash attention does); fp32 pages, a query of another dtype, and bf16 pages in
the interpreter (whose bf16 dot is wrong) take fp32 "ieee" dots. One tier: no low tier, no retrieved
pages, no emitted logits (LeanKV and retrieval_attention='kernel' have quantized pages). Before it,
the GPU decoded these pages with torch (HotTier._attend_16bit: the pages gathered, copied to fp32 K
and V, attended: about 8x the bytes the step needs). FULL_LAUNCH is not yet timed on a GPU
(`benchmarks.perf.decode_attention --pages bf16 --sweep` times it; `benchmarks.perf.kernel_resources
--pages bf16` reads its registers and loop without one).

The low tier (LeanKV's K4V2 pages). A token's 4-bit keys are D/2 bytes whose low nibbles are the first
half of the head dim and whose high nibbles the second: they load once as one row and feed two dots
against the query's halves (Q^T loaded as two [D/2, G] halves). Its 2-bit values are D/4 bytes of four
bit planes, a half of the head dim per two planes, loaded once (with the contiguity hint where the low
pages allow it, so sm_90 copies them asynchronously). Before, every code loaded its own byte with its
own address (each key byte twice, each value byte four times): the H200 read the low tier at 355 GB/s
against 1,627 for K8V4 (results/h200_graphs/call3), and its loop was 3,641 sm_90 instructions against
1,821 now (`benchmarks.perf.kernel_resources`); the GPU timing is pending (results/h200_graphs/run10.sh).

Graph-safe: allocates nothing, syncs nothing; every buffer is passed in (built at plan time).
"""

from __future__ import annotations

import functools
import os
import types

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _codes_f16(b):
    """fp16 (exact) of int16 codes b < 1024.

    fp16 bits 0x6400 | c are exactly 1024 + c, so (bits as fp16) - 1024 is exactly c: an OR and an
    fp16 subtract per element instead of an int-to-float conversion (16 per clock per SM on sm_90,
    the slow pipe).
    """
    return ((b | 0x6400).to(tl.float16, bitcast=True) - 1024.0).to(tl.float16)


@triton.jit
def _u8_f16_asm(b):
    """fp16 of uint8 codes, 4 per instance: prmt builds fp16 1024 + c from each byte, one f16x2 subtract per pair.

    The same exact values as `_codes_f16`, in two instructions per two codes instead of three (PTX:
    CUDA only, not the interpreter).
    """
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 m, k;
        mov.b32 m, 0x64646464;
        mov.b32 k, 0x64006400;
        prmt.b32 $0, $2, m, 0x4140;
        prmt.b32 $1, $2, m, 0x4342;
        sub.f16x2 $0, $0, k;
        sub.f16x2 $1, $1, k;
        }""",
        constraints="=r,=r,r", args=[b], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _u4x2_f16_asm(b):
    """(low nibbles, high nibbles) of uint8 bytes as fp16, 4 bytes per instance (PTX: CUDA only)."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 m, k, l, h;
        mov.b32 m, 0x64646464;
        mov.b32 k, 0x64006400;
        and.b32 l, $4, 0x0F0F0F0F;
        shr.b32 h, $4, 4;
        and.b32 h, h, 0x0F0F0F0F;
        prmt.b32 $0, l, m, 0x4140;
        prmt.b32 $1, l, m, 0x4342;
        prmt.b32 $2, h, m, 0x4140;
        prmt.b32 $3, h, m, 0x4342;
        sub.f16x2 $0, $0, k;
        sub.f16x2 $1, $1, k;
        sub.f16x2 $2, $2, k;
        sub.f16x2 $3, $3, k;
        }""",
        constraints="=r,=r,=r,=r,r", args=[b], dtype=(tl.float16, tl.float16), is_pure=True, pack=4)


@triton.jit
def _load_plane(rowptr, e0, BITS: tl.constexpr, D: tl.constexpr, W: tl.constexpr, BSTRIDE: tl.constexpr):
    """Codes int16 [BLOCK_T, W] of elements [e0, e0 + W) of planar-packed rows at byte pointers rowptr.

    Element e of a row lives in byte j = e % (D / per) at bit (e // (D / per)) * BITS (per = 8 // BITS
    codes a byte); byte j of a row is at rowptr + j * BSTRIDE (1 for keys, token-major; tokens per
    page for values, byte-major). Elements load their byte (repeats hit L1), so no register shuffle
    restores the order; `_load_halves` loads each byte once where the halves are whole bit planes.
    """
    PER: tl.constexpr = 8 // BITS
    SUB: tl.constexpr = D // PER
    e = e0 + tl.arange(0, W)
    b = tl.load(rowptr[:, None] + ((e % SUB) * BSTRIDE)[None, :]).to(tl.int16)
    if PER == 1:
        return b
    return (b >> ((e // SUB) * BITS).to(tl.int16)[None, :]) & ((1 << BITS) - 1)


@triton.jit
def _load_halves(rowptr, BITS: tl.constexpr, D: tl.constexpr, BSTRIDE: tl.constexpr):
    """Codes int16 ([BLOCK_T, D/2], [BLOCK_T, D/2]) of the two halves of the head dim.

    4 bits: the halves are the low and high nibbles of the same D/2 bytes, loaded once and split by
    constant masks and shifts (elementwise ops the compiler moves past the shared-memory stage, so
    the dot operands are read from shared memory as bytes, not as converted fp16).
    """
    H: tl.constexpr = D // 2
    if BITS == 4:
        b = tl.load(rowptr[:, None] + (tl.arange(0, H) * BSTRIDE)[None, :]).to(tl.int16)
        return b & 15, b >> 4
    return _load_plane(rowptr, 0, BITS, D, H, BSTRIDE), _load_plane(rowptr, H, BITS, D, H, BSTRIDE)


@triton.jit
def _concat_cols(a, b, W: tl.constexpr):
    """[rows, W] = a's columns then b's (each [rows, W / 2]): join, put the new axis before the columns, merge."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), (a.shape[0], W))


@triton.jit
def _operand(codes, FP32: tl.constexpr):
    """Dot operand of int16 codes: fp32 for fp32 queries, else exact fp16."""
    if FP32:
        x = codes.to(tl.float32)
    else:
        x = _codes_f16(codes)
    return x


@triton.jit
def _attend_block(
    acc0, acc1, m_i, l_i, z_i, q, q_lo, q_hi, data_ptr, data16_ptr, data64_ptr, table, vp0, vp_end, n_high, n_hp, C, pos_ptr,
    max_slots, page_bytes, scale_log2, emit_ptr, emit_row_stride, DO_EMIT: tl.constexpr, IS_LOW: tl.constexpr,
    TPP: tl.constexpr, BT: tl.constexpr, NP: tl.constexpr, SLOTS: tl.constexpr, D: tl.constexpr,
    NG: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr, BLOCK_G: tl.constexpr, G: tl.constexpr,
    FP32: tl.constexpr, META64: tl.constexpr, LAZY: tl.constexpr, ASM_CVT: tl.constexpr, VHINT: tl.constexpr,
    DENSE: tl.constexpr,
):
    """NP virtual pages [vp0, vp0 + NP) (clipped at vp_end) of one head: BLOCK = NP * BT token rows.

    Transposed: tokens and head dims are the rows of the dots and the query group their columns,
    S^T = K @ Q^T [tokens, BLOCK_G] and O^T += V^T @ P^T [D/2, BLOCK_G] per half; q arrives as Q^T
    [D, BLOCK_G] and token vectors broadcast along columns. The tensor-core tile's 16 rows are then
    tokens or head dims, all real, and a small GQA group only pads the tile's 8 columns: no query
    rows replicated into registers and moved into place on every page.

    DENSE (the high tier under HIGH_DENSE): every slot below n_high holds a token, so the slots'
    positions are not loaded (4 of ~204 bytes a token at K8V4, d=128); otherwise a slot whose
    position is -1 is empty and masked (the low tier, whose prunes leave such slots).

    The output accumulates in two halves of the head dim, acc0 = dims [0, D/2) and acc1 = [D/2, D),
    each [D/2, BLOCK_G]: with 4-bit values (planar: low nibbles hold the first half, high nibbles the
    second) each value byte is loaded once and feeds both halves' dots, with no shuffle to restore
    the element order.

    LAZY (one scale group): the softmax denominator l_i and the value zero-point term z_i are kept
    per token slot, [NP * BT, BLOCK_G], and summed over tokens once after the loop, instead of two
    cross-warp reductions per block. Otherwise l_i is [BLOCK_G] and z_i unused (the zero-point term
    goes straight into the accumulators).

    The accumulators (and LAZY's l_i, z_i) are rescaled only on pages where some query's running max
    moved (alpha is exactly 1 otherwise, so the result is the same bit for bit).
    """
    KB: tl.constexpr = D * KBITS // 8
    VB: tl.constexpr = D * VBITS // 8
    H: tl.constexpr = D // 2
    r = tl.arange(0, NP * BT)
    vp = vp0 + r // BT
    slot = r % BT
    page_ok = (slot < TPP) & (vp < vp_end)
    if IS_LOW:
        col = C - 1 - (vp - n_hp)
        in_page = page_ok
    else:
        col = vp
        in_page = page_ok & (vp * TPP + slot < n_high)
    # Rows past the table read page 0 (masked below); a page's slots stay consecutive, so the value
    # rows of a page are contiguous runs of TPP bytes (the load hint below). Slots past n_high read
    # their page's unused bytes and are masked.
    col = tl.where(page_ok, col, 0)
    slot = tl.where(slot < TPP, slot, 0)
    page = tl.load(table + col, mask=page_ok, other=0).to(tl.int64)
    if DENSE:
        valid = in_page
    else:
        pos = tl.load(pos_ptr + page * max_slots + slot, mask=in_page, other=-1)
        valid = in_page & (pos >= 0)
    base = page * page_bytes
    if KBITS == 4:  # the halves of the head dim are the low and high nibbles of D/2 bytes: loaded once, two dots
        kb = tl.load((data_ptr + base + slot * KB)[:, None] + tl.arange(0, H)[None, :])
        if ASM_CVT and not FP32:
            k_lo, k_hi = _u4x2_f16_asm(kb)
        else:
            k_lo = _operand((kb & 15).to(tl.int16), FP32)
            k_hi = _operand((kb >> 4).to(tl.int16), FP32)
        if H < 16:  # halves narrower than a dot's K on a GPU (16): one dot over the joined halves
            kc = _concat_cols(k_lo, k_hi, D)
        else:
            kc = k_lo  # unused
    elif ASM_CVT and KBITS == 8 and not FP32:
        kc = _u8_f16_asm(tl.load((data_ptr + base + slot * KB)[:, None] + tl.arange(0, D)[None, :]))
    else:
        kc = _operand(_load_plane(data_ptr + base + slot * KB, 0, KBITS, D, D, 1), FP32)
    vrow = data_ptr + base + TPP * KB + slot  # byte j of a token's values at vrow + j * TPP
    if ASM_CVT and VBITS == 4 and not FP32:
        voff = (base + TPP * KB + slot)[:, None] + (tl.arange(0, H) * TPP)[None, :]
        if VHINT:  # runs of TPP consecutive tokens, 16-byte aligned (TPP % 16 == 0, page_bytes % 16 == 0)
            voff = tl.max_contiguous(tl.multiple_of(voff, [16, 1]), [TPP, 1])
        vc0, vc1 = _u4x2_f16_asm(tl.load(data_ptr + voff))
    elif VBITS == 2:  # four bit planes of D/4 bytes, loaded once: planes 0, 1 the first half, 2, 3 the second
        voff = (base + TPP * KB + slot)[:, None] + (tl.arange(0, D // 4) * TPP)[None, :]
        if VHINT:
            voff = tl.max_contiguous(tl.multiple_of(voff, [16, 1]), [TPP, 1])
        vb = tl.load(data_ptr + voff).to(tl.int16)
        vc0 = _operand(_concat_cols(vb & 3, (vb >> 2) & 3, H), FP32)
        vc1 = _operand(_concat_cols((vb >> 4) & 3, (vb >> 6) & 3, H), FP32)
    else:
        vh0, vh1 = _load_halves(vrow, VBITS, D, TPP)
        vc0 = _operand(vh0, FP32)
        vc1 = _operand(vh1, FP32)
    meta_b = base + TPP * (KB + VB) + slot * (8 * NG)  # byte offset of the slot's [ks, kz, vs, vz] (NG each)
    if META64:  # NG == 1: the four fp16 of a slot as one 8-byte load
        w = tl.load(data64_ptr + meta_b // 8)
        ks = (w & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        kz = ((w >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        vs0 = ((w >> 32) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        vz0 = ((w >> 48) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    dims = tl.arange(0, D)
    grp = dims // (D // NG)
    s = tl.zeros((NP * BT, BLOCK_G), dtype=tl.float32)
    for j in tl.static_range(NG):
        if not META64:
            ks = tl.load(data16_ptr + meta_b // 2 + j).to(tl.float32)
            kz = tl.load(data16_ptr + meta_b // 2 + NG + j).to(tl.float32)
        if NG == 1:
            qj = q
        else:
            qj = tl.where((grp == j)[:, None], q, 0.0)
        if KBITS == 4 and H >= 16:
            if NG == 1:
                qj_lo, qj_hi = q_lo, q_hi
            else:
                qj_lo = tl.where((tl.arange(0, H) // (D // NG) == j)[:, None], q_lo, 0.0)
                qj_hi = tl.where(((H + tl.arange(0, H)) // (D // NG) == j)[:, None], q_hi, 0.0)
            if FP32:
                dot = tl.dot(k_lo, qj_lo, input_precision="ieee") + tl.dot(k_hi, qj_hi, input_precision="ieee")
            else:
                dot = tl.dot(k_lo, qj_lo.to(tl.float16)) + tl.dot(k_hi, qj_hi.to(tl.float16))
        elif FP32:
            dot = tl.dot(kc, qj, input_precision="ieee")
        else:
            dot = tl.dot(kc, qj.to(tl.float16))
        qsum = tl.sum(qj.to(tl.float32), axis=0)
        s += dot * ks[:, None] + kz[:, None] * qsum[None, :]
    g = tl.arange(0, BLOCK_G)
    s = tl.where(valid[:, None], s * scale_log2, float("-inf"))
    if DO_EMIT:  # by virtual page (the head's walk), not by table column
        tl.store(emit_ptr + g[None, :] * emit_row_stride + (vp * SLOTS + slot)[:, None], s * 0.6931471805599453,
                 mask=(g[None, :] < G) & in_page[:, None])
    m_new = tl.maximum(m_i, tl.max(s, axis=0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[None, :])
    # past the first pages the running max rarely moves: alpha is then exactly 1 for every query
    moved = tl.max((m_new > m_i).to(tl.int32), axis=0) > 0
    if moved:
        acc0 = acc0 * alpha[None, :]
        acc1 = acc1 * alpha[None, :]
        if LAZY:
            l_i = l_i * alpha[None, :]
            z_i = z_i * alpha[None, :]
    if LAZY:
        l_i = l_i + p
    else:
        l_i = l_i * alpha + tl.sum(p, axis=0)
    for j in tl.static_range(NG):
        if not META64:
            vs0 = tl.load(data16_ptr + meta_b // 2 + 2 * NG + j).to(tl.float32)
            vz0 = tl.load(data16_ptr + meta_b // 2 + 3 * NG + j).to(tl.float32)
        vs = vs0[:, None]  # p, pw: P^T [tokens, BLOCK_G]
        vz = vz0[:, None]
        if FP32:
            pw = p * vs
        else:
            pw = (p * vs).to(tl.float16)
        if LAZY:
            z_i = z_i + p * vz
            pz = m_new  # unused: the zero-point term is summed after the loop
        else:
            pz = tl.sum(p * vz, axis=0)
        # group j covers dims [j * D / NG, (j + 1) * D / NG): which halves it touches is known at compile time
        if j * (D // NG) < H:
            acc0 = _add_half(acc0, pw, vc0, pz, j, 0, D, NG, FP32, LAZY)
        if (j + 1) * (D // NG) > H:
            acc1 = _add_half(acc1, pw, vc1, pz, j, H, D, NG, FP32, LAZY)
    return acc0, acc1, m_new, l_i, z_i


@triton.jit
def _add_half(acc, pw, vc, pz, j: tl.constexpr, E0: tl.constexpr, D: tl.constexpr, NG: tl.constexpr,
              FP32: tl.constexpr, LAZY: tl.constexpr):
    """acc^T += vc^T @ pw^T on the head-dim half [E0, E0 + D/2) (acc [D/2, BLOCK_G], pw P^T [tokens, BLOCK_G]),
    plus group j's zero-point term pz where j covers it."""
    if FP32:
        pv = tl.dot(tl.trans(vc), pw, input_precision="ieee")
    else:
        pv = tl.dot(tl.trans(vc), pw)
    if LAZY:
        acc += pv
    elif NG <= 2:
        acc += pv + pz[None, :]
    else:
        acc += tl.where(((E0 + tl.arange(0, D // 2)) // (D // NG) == j)[:, None], pv + pz[None, :], 0.0)
    return acc


@triton.jit
def _attend_retrieved(
    acc0, acc1, m_i, l_i, q, data_ptr, data16_ptr, data64_ptr, row, nrp, v0, v1, r0, C, pos_ptr, max_slots,
    page_bytes, scale_log2, emit_ptr, emit_row_stride, TPP: tl.constexpr, BT: tl.constexpr, NP: tl.constexpr,
    SLOTS: tl.constexpr, D: tl.constexpr, NG: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr,
    BLOCK_G: tl.constexpr, G: tl.constexpr, FP32: tl.constexpr, META64: tl.constexpr, ASM_CVT: tl.constexpr,
    VHINT: tl.constexpr,
):
    """The retrieved pages `row` [nrp] (high format) as virtual pages [r0, r0 + nrp), this split's share [v0, v1).

    `_attend_block` reads a high page's id at table + vp: the table is `row` moved back by r0 (masked
    rows read table + 0, which the mask keeps from being loaded), and an n_high of (r0 + nrp) * TPP puts
    every slot of the segment below it, so that only slot_pos >= 0 selects the attended slots. Eager
    sums, no emitted logits (the emitted logits are the page table's tokens only).
    """
    table = row - r0
    n_end = (r0 + nrp) * TPP
    z_r = l_i  # unused: eager sums
    for vp in range(tl.maximum(v0, r0), v1, NP):
        acc0, acc1, m_i, l_i, z_r = _attend_block(
            acc0, acc1, m_i, l_i, z_r, q, q, q, data_ptr, data16_ptr, data64_ptr, table, vp, v1, n_end, r0, C,
            pos_ptr, max_slots, page_bytes, scale_log2, emit_ptr, emit_row_stride, False, False,
            TPP, BT, NP, SLOTS, D, NG, KBITS, VBITS, BLOCK_G, G, FP32, META64, False, ASM_CVT, VHINT, False,
        )
    return acc0, acc1, m_i, l_i


# The sizes that vary from call to call are not specialized on (Triton compiles a variant for an int
# argument equal to 1 and for one divisible by 16): the layer index, the page-table width and the
# split sizes would otherwise each trigger a compile (seconds) inside a serving step, when a batch
# of another length or a longer sequence first arrives. The page-table strides follow its width.
@triton.jit(do_not_specialize=["layer", "C", "max_slots", "pages_per_split", "stride_ps", "stride_pl", "stride_ph", "nrp",
                               "emit_cols"])
def _paged_decode_kernel(
    q_ptr, data_ptr, data16_ptr, data64_ptr, pages_ptr, num_high_ptr, num_low_pages_ptr, seq_ptr, pos_ptr,
    part_out_ptr, part_lse_ptr, emit_ptr,
    layer, C, page_bytes, max_slots, pages_per_split, scale_log2,
    stride_qb, stride_qh,
    stride_ps, stride_pl, stride_ph,  # page table [S, L, H, C] (last stride 1)
    stride_ns, stride_nl,  # num_high / num_low_pages [S, L, H] (last stride 1)
    ret_ptr, nrp,  # retrieved pages int32 [B, H, nrp] (read only with HAS_RET); last, so the other arguments keep their offsets
    emit_cols,  # virtual pages a row of the emitted logits holds (read only with DO_EMIT)
    HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, NG: tl.constexpr,
    TPP_H: tl.constexpr, BLOCK_TH: tl.constexpr, NP_H: tl.constexpr, KB_H: tl.constexpr, VB_H: tl.constexpr,
    HAS_LOW: tl.constexpr, TPP_L: tl.constexpr, BLOCK_TL: tl.constexpr, NP_L: tl.constexpr,
    KB_L: tl.constexpr, VB_L: tl.constexpr,
    SLOTS: tl.constexpr, DO_EMIT: tl.constexpr, FP32: tl.constexpr, META64: tl.constexpr, LAZY: tl.constexpr,
    ASM_CVT: tl.constexpr, VHINT: tl.constexpr, HIGH_DENSE: tl.constexpr, HAS_RET: tl.constexpr,
    VHINT_L: tl.constexpr = False,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    seq = tl.load(seq_ptr + b)
    g = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, D)
    gmask = g < G
    qrow = q_ptr + b * stride_qb + (h * G + g)[:, None] * stride_qh
    q = tl.load(qrow + dims[None, :], mask=gmask[:, None], other=0.0)
    # the halves of Q^T [D/2, BLOCK_G]: the dots of 4-bit keys (low nibbles: dims [0, D/2), high: [D/2, D))
    q_lo = tl.load(qrow + tl.arange(0, D // 2)[None, :], mask=gmask[:, None], other=0.0)
    q_hi = tl.load(qrow + D // 2 + tl.arange(0, D // 2)[None, :], mask=gmask[:, None], other=0.0)
    if FP32:
        q = q.to(tl.float32)
        q_lo = q_lo.to(tl.float32)
        q_hi = q_hi.to(tl.float32)
    q = tl.trans(q)  # Q^T [D, BLOCK_G]
    q_lo = tl.trans(q_lo)
    q_hi = tl.trans(q_hi)
    n_high = tl.load(num_high_ptr + seq * stride_ns + layer * stride_nl + h)
    n_hp = (n_high + TPP_H - 1) // TPP_H
    if HAS_LOW:
        n_lp = tl.load(num_low_pages_ptr + seq * stride_ns + layer * stride_nl + h)
    else:
        n_lp = 0
    table = pages_ptr + seq * stride_ps + layer * stride_pl + h * stride_ph
    v0 = split * pages_per_split
    if HAS_RET:  # virtual pages [n_hp + n_lp, n_hp + n_lp + nrp): the retrieved pages
        v1 = tl.minimum(v0 + pages_per_split, n_hp + n_lp + nrp)
        l_end = tl.minimum(v1, n_hp + n_lp)
    else:
        v1 = tl.minimum(v0 + pages_per_split, n_hp + n_lp)
        l_end = v1
    acc0 = tl.zeros((D // 2, BLOCK_G), dtype=tl.float32)  # O^T, dims [0, D/2)
    acc1 = tl.zeros((D // 2, BLOCK_G), dtype=tl.float32)  # O^T, dims [D/2, D)
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    emit_row_stride = emit_cols * SLOTS
    emit_base = emit_ptr + (b * HKV * G + h * G).to(tl.int64) * emit_row_stride
    h_end = tl.minimum(v1, n_hp)
    if LAZY:
        l_h = tl.zeros((NP_H * BLOCK_TH, BLOCK_G), dtype=tl.float32)
        z_h = tl.zeros((NP_H * BLOCK_TH, BLOCK_G), dtype=tl.float32)
    else:
        l_h = l_i
        z_h = l_i
    for vp in range(v0, h_end, NP_H):
        acc0, acc1, m_i, l_h, z_h = _attend_block(
            acc0, acc1, m_i, l_h, z_h, q, q_lo, q_hi, data_ptr, data16_ptr, data64_ptr, table, vp, h_end, n_high, n_hp, C,
            pos_ptr, max_slots, page_bytes, scale_log2, emit_base, emit_row_stride, DO_EMIT, False,
            TPP_H, BLOCK_TH, NP_H, SLOTS, D, NG, KB_H, VB_H, BLOCK_G, G, FP32, META64, LAZY, ASM_CVT, VHINT, HIGH_DENSE,
        )
    if LAZY:
        l_i = tl.sum(l_h, axis=0)
        zsum = tl.sum(z_h, axis=0)
        acc0 += zsum[None, :]
        acc1 += zsum[None, :]
    else:
        l_i = l_h
    if HAS_LOW:  # eager sums (l_i [BLOCK_G]); z_l is unused
        z_l = l_i
        for vp in range(tl.maximum(v0, n_hp), l_end, NP_L):
            acc0, acc1, m_i, l_i, z_l = _attend_block(
                acc0, acc1, m_i, l_i, z_l, q, q_lo, q_hi, data_ptr, data16_ptr, data64_ptr, table, vp, l_end, n_high, n_hp,
                C,
                pos_ptr, max_slots, page_bytes, scale_log2, emit_base, emit_row_stride, DO_EMIT, True,
                TPP_L, BLOCK_TL, NP_L, SLOTS, D, NG, KB_L, VB_L, BLOCK_G, G, FP32, META64, False, ASM_CVT, VHINT_L, False,
            )
    if HAS_RET:
        acc0, acc1, m_i, l_i = _attend_retrieved(
            acc0, acc1, m_i, l_i, q, data_ptr, data16_ptr, data64_ptr, ret_ptr + (b * HKV + h) * nrp, nrp, v0, v1,
            n_hp + n_lp, C, pos_ptr, max_slots, page_bytes, scale_log2, emit_base, emit_row_stride,
            TPP_H, BLOCK_TH, NP_H, SLOTS, D, NG, KB_H, VB_H, BLOCK_G, G, FP32, META64, ASM_CVT, VHINT,
        )
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    hd = tl.arange(0, D // 2)
    lse = tl.where(l_i > 0, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    row = (b * HKV * G + h * G + g) * tl.num_programs(1) + split  # not a constexpr: one compile for all split counts
    tl.store(part_out_ptr + row[None, :] * D + hd[:, None], acc0 / l_safe[None, :], mask=gmask[None, :])
    tl.store(part_out_ptr + row[None, :] * D + D // 2 + hd[:, None], acc1 / l_safe[None, :], mask=gmask[None, :])
    tl.store(part_lse_ptr + row, lse, mask=gmask)


@triton.jit
def softmax_step(acc, m_i, l_t, k, vt, q, valid, scale_log2, DOT_F32: tl.constexpr):
    """One block of the transposed online softmax over rows in the model's dtype: S^T = K Q^T (k [rows, D]),
    invalid rows -inf, O^T += V^T P^T (vt [D, rows]); l_t keeps the denominator per row (summed at the
    split's end, `store_split`). The rescale runs only where some query's running max moved (alpha is
    exactly 1 otherwise). DOT_F32: fp32 operands and "ieee" dots; else tensor-core dots in k's dtype."""
    if DOT_F32:
        s = tl.dot(k.to(tl.float32), q, input_precision="ieee")
    else:
        s = tl.dot(k, q)
    s = tl.where(valid[:, None], s * scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[None, :])
    # past the first blocks the running max rarely moves: alpha is then exactly 1 for every query
    moved = tl.max((m_new > m_i).to(tl.int32), axis=0) > 0
    if moved:
        alpha = tl.exp2(m_i - m_safe)
        acc = acc * alpha[None, :]
        l_t = l_t * alpha[None, :]
    l_t = l_t + p
    if DOT_F32:
        acc += tl.dot(vt.to(tl.float32), p, input_precision="ieee")
    else:
        acc += tl.dot(vt, p.to(vt.dtype))
    return acc, m_new, l_t


@triton.jit
def store_split(part_out_ptr, part_lse_ptr, acc, l_t, m_i, row, dims, gmask, D: tl.constexpr):
    """A split's end (the transposed kernels): O^T [D, BLOCK_G] normalized over the split into
    part_out[row], its natural-log lse (-inf where the split held no valid token) into part_lse[row];
    l_t holds the softmax denominator per token row (summed here), m_i the running max (log2 units)."""
    l_i = tl.sum(l_t, axis=0)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    lse = tl.where(l_i > 0, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(part_out_ptr + row[None, :] * D + dims[:, None], acc / l_safe[None, :], mask=gmask[None, :])
    tl.store(part_lse_ptr + row, lse, mask=gmask)


@triton.jit(do_not_specialize=["nsplit"])
def _merge_kernel(part_out_ptr, part_lse_ptr, out_ptr, lse_ptr, nsplit, BLOCK_S: tl.constexpr, D: tl.constexpr):
    r = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, D)
    lse = tl.load(part_lse_ptr + r * nsplit + s, mask=s < nsplit, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_safe)
    total = tl.sum(w, axis=0)
    parts = tl.load(part_out_ptr + (r * nsplit + s)[:, None] * D + dims[None, :], mask=(s < nsplit)[:, None], other=0.0)
    t_safe = tl.where(total > 0, total, 1.0)
    out = tl.sum(parts * w[:, None], axis=0) / t_safe
    tl.store(out_ptr + r * D + dims, out.to(out_ptr.dtype.element_ty))
    tl.store(lse_ptr + r, tl.where(total > 0, m_safe + tl.log(t_safe), float("-inf")))


def merge_splits(part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge per-split partial results: part_out fp32 [R, NSPLIT, d], part_lse fp32 [R, NSPLIT] -> out [R, d], lse [R]."""
    R, nsplit, d = part_out.shape
    _merge_kernel[(R,)](part_out, part_lse, out, lse, nsplit, BLOCK_S=triton.next_power_of_2(nsplit), D=d)


@functools.lru_cache(maxsize=None)
def min_dot_rows() -> int:
    """Fewest rows a 16-bit tl.dot takes on this Triton's NVIDIA backend: 1 where it pads to the
    tensor-core tile itself (Triton >= 3.2), 16 on older versions (and wherever the backend's rule
    cannot be read). The interpreter takes any shape, but the same block is used there so that CI
    runs the shapes the GPU runs."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import min_dot_size

        rows = min_dot_size(GPUTarget("cuda", 90, 32))(tl.block_type(tl.float16, [16, 16]),
                                                        tl.block_type(tl.float16, [16, 16]))[0]
        return max(1, int(rows))
    except Exception:  # noqa: BLE001 - an older backend without the rule: the tensor-core tile
        return 16


def query_block(group: int) -> int:
    """Rows of the query block: the GQA group, padded to a power of two and to min_dot_rows().

    Why it matters (H200, B=8, N=128K, one-warp programs): padding a group of 4 to 16 rows made
    the accumulators, the softmax tiles and the query 4x larger, 248 registers a thread, so 8 warps
    fit an SM; the unpadded block needs 168, and 12 fit (the tensor-core dot pads internally).
    """
    return max(min_dot_rows(), triton.next_power_of_2(group))


# Launch defaults KVStore uses (HotTier.attend): the winners of benchmarks/perf/decode_attention.py --sweep
# (H100, B=8, N=128K: one warp per program, one 32-token page per step, 3 stages: 0.607 ms against 0.735
# for 2 warps x 64 tokens, and 1.18 ms for the first 4-warp kernel; see results/).
# H200 (168 registers, 12 one-warp programs an SM): 24 splits at B=8, N=128K, 0.424 ms; 2 warps x 64
# tokens 0.461, register caps (maxnreg 128/144) within noise.
DEFAULT_LAUNCH = dict(asm_cvt=True, high_dense=True, num_warps=1, num_stages=3, block_tokens=32,
                      programs_per_sm_small=12, programs_per_sm_large=12)


def choose_splits(batch: int, num_kv_heads: int, max_pages: int, num_sms: int = 132) -> int:
    """Splits per (sequence, KV head), at least 8 pages per split: about as many one-warp programs
    as an SM holds at once (DEFAULT_LAUNCH's programs_per_sm_*: 12 since the query block is unpadded).

    H200: B=1 (8 heads) best at 198 splits, B=8 (64 heads) at 24 (0.509 ms; 16: 0.583, 32: 0.594).
    """
    heads = max(1, batch * num_kv_heads)
    per_sm = DEFAULT_LAUNCH["programs_per_sm_small" if heads < 32 else "programs_per_sm_large"]
    want = max(1, (per_sm * num_sms) // heads)
    # at least 8 pages a split: short contexts pay the merge and the launch of many tiny splits
    # (B=1, N=8K: 132 splits of 2 pages took 0.14 ms, 5x the best)
    return int(max(1, min(want, max_pages // 8, 256)))


@functools.lru_cache(maxsize=256)
def kernel_constexprs(
    num_kv_heads: int, group: int, head_dim: int, groups: int, high: tuple[int, int, int],
    low: tuple[int, int, int] | None, page_bytes: int, block_tokens: int, emit: bool, fp32: bool,
    asm_cvt: bool, high_dense: bool, has_ret: bool = False,
) -> types.MappingProxyType:
    """The compile-time parameters of `_paged_decode_kernel` for one launch (also what
    benchmarks/perf/kernel_resources.py compiles, so its report is of the kernel KVStore runs).

    Cached: every layer of every step launches with the same few argument sets, so the decode path
    looks them up rather than recomputing them; the mapping is read-only. has_ret: the launch attends
    retrieved pages (HAS_RET, a separate compile; off, the kernel is the one without them).
    """
    kb, vb, th = high
    lkb, lvb, tlow = low if low is not None else (kb, vb, th)
    # A block of `block_tokens` rows spans block_tokens // BLOCK_T pages per loop step: more bytes
    # in flight and fewer softmax rescales than one page (32 tokens) per step (1.2 TB/s at one page).
    bth, btl = triton.next_power_of_2(th), triton.next_power_of_2(tlow)
    bth, btl = max(16 if bth <= block_tokens else bth, bth), max(btl, 16)
    # One scale/zero group: a slot's [k scale, k zero, v scale, v zero] is one aligned 8-byte word.
    meta64 = groups == 1 and page_bytes % 8 == 0 and (th * (kb + vb) * head_dim // 8) % 8 == 0 and (
        low is None or (tlow * (lkb + lvb) * head_dim // 8) % 8 == 0)
    return types.MappingProxyType(dict(
        HKV=num_kv_heads, G=group, BLOCK_G=query_block(group), D=head_dim, NG=groups,
        TPP_H=th, BLOCK_TH=bth, NP_H=max(1, block_tokens // bth), KB_H=kb, VB_H=vb,
        HAS_LOW=low is not None, TPP_L=tlow, BLOCK_TL=btl, NP_L=max(1, block_tokens // btl), KB_L=lkb, VB_L=lvb,
        SLOTS=max(th, tlow if low is not None else 0), DO_EMIT=emit, FP32=fp32, META64=meta64, LAZY=groups == 1,
        ASM_CVT=bool(asm_cvt), VHINT=th % 16 == 0 and bth == th and page_bytes % 16 == 0, HIGH_DENSE=bool(high_dense),
        HAS_RET=bool(has_ret), VHINT_L=low is not None and tlow % 16 == 0 and btl == tlow and page_bytes % 16 == 0,
    ))


def paged_decode_attention(
    q: torch.Tensor, data: torch.Tensor, pages: torch.Tensor, num_high: torch.Tensor,
    num_low_pages: torch.Tensor | None, seq_ids: torch.Tensor, layer: int, slot_pos: torch.Tensor,
    high: tuple[int, int, int], low: tuple[int, int, int] | None, groups: int, scale: float,
    out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor,
    pages_per_split: int, logits: torch.Tensor | None = None, num_warps: int | None = None,
    num_stages: int | None = None, block_tokens: int | None = None, asm_cvt: bool | None = None,
    maxnreg: int | None = None, high_dense: bool | None = None, ret_pages: torch.Tensor | None = None,
) -> None:
    """Decode attention of one layer over the quantized hot tier (and retrieved pages), written into `out` and `lse`.

    Args:
        q: [B, Hq, d] bf16/fp16/fp32, last stride 1.
        data: uint8 [P, page_bytes] page pool.
        pages: int32 [S, L, Hkv, C] page tables of all sequence slots and layers (high pages from the
            left, low pages from the right); num_high int32 [S, L, Hkv] high slots in use;
            num_low_pages int32 [S, L, Hkv] or None.
        seq_ids: int64 [B] sequence slots of the batch rows; layer: the layer.
        slot_pos: int32 [P, max_slots], -1 marks an empty slot (never attended). With high_dense
            (DEFAULT_LAUNCH) only the low tier's positions are read: the caller guarantees that every
            high-tier slot below num_high holds a token, and an empty one there would be attended with
            whatever bytes its page holds. KVStore keeps its high tiers so (kvstore/store.py,
            `KVStore._undo_unwritten_slots`, says how; tests/test_policies.py checks it at every
            layer's decode attention). high_dense=False masks empty high slots too, as the low tier's.
        high / low: (key_bits, value_bits, tokens_per_page) per tier (low None: no low tier).
        out: [B, Hq, d] (any float dtype), lse fp32 [B, Hq]: results (natural-log lse, -inf if empty).
        part_out fp32 [B, Hq, NSPLIT, d], part_lse fp32 [B, Hq, NSPLIT]: split workspace.
        pages_per_split: pages each split walks; NSPLIT * pages_per_split must cover the widest head's
            high + low pages, plus NRP with ret_pages.
        logits: optional fp32 [B, Hq, W, max(T_high, T_low)]: per-token scaled logits (-inf = no token) of
            the page table's tokens (never the retrieved ones) by virtual page (see the module docstring),
            W >= the widest head's high + low pages; the kernel writes only its tokens' entries.
        num_warps / num_stages / block_tokens / asm_cvt / maxnreg / high_dense: launch variant (None:
            DEFAULT_LAUNCH's); asm_cvt converts K8 and V4 codes with PTX (prmt), CUDA only: ignored in
            the interpreter and on CPU tensors, which use the portable 0x6400 bit trick; maxnreg caps the
            registers a thread (more programs an SM, at the price of spills; CUDA only); high_dense skips
            the high tier's position loads (see slot_pos).
        ret_pages: optional int32 [B, Hkv, NRP] contiguous, per batch row (not sequence slot): pool pages in
            the high tier's format attended after the low tier, in the same softmax (out and lse cover them);
            a slot of them is attended iff its slot_pos is >= 0 (-1 masks unused or invalid picks), whatever
            high_dense says; every id must be a pool page (its bytes are read unmasked). None: the kernel
            without them (HAS_RET off).
    """
    high_dense = DEFAULT_LAUNCH["high_dense"] if high_dense is None else high_dense
    asm_ok = q.is_cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")  # PTX: not in the interpreter
    asm_cvt = bool(DEFAULT_LAUNCH["asm_cvt"] if asm_cvt is None else asm_cvt) and asm_ok
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
    slots = max(high[2], low[2] if low is not None else 0)
    if logits is not None and (logits.dim() != 4 or logits.shape[:2] != (B, Hq) or logits.shape[3] != slots
                               or not logits.is_contiguous()):
        raise ValueError(f"logits {tuple(logits.shape)}: want contiguous [B, Hq, W, {slots}]")
    nlp = num_low_pages if num_low_pages is not None else num_high
    if ret_pages is not None and (ret_pages.dtype != torch.int32 or ret_pages.dim() != 3
                                  or ret_pages.shape[:2] != (B, Hkv) or not ret_pages.is_contiguous()):
        raise ValueError(f"ret_pages {tuple(ret_pages.shape)} {ret_pages.dtype}: want contiguous int32 [B, Hkv, NRP]")
    grid = (B * Hkv, nsplit)
    maxnreg = DEFAULT_LAUNCH.get("maxnreg") if maxnreg is None else maxnreg
    extra = dict(maxnreg=maxnreg) if maxnreg and q.is_cuda else {}  # a register cap (CUDA compiles only)
    # fp32 dots (FMA) for fp32 queries, and below a head dim of 32: there the 16-bit tensor-core path's
    # half-width (D/2 < 16) value dots gave wrong outputs on an H200 (bf16, d=16: rel. RMS 0.56; the fp32
    # path's same layout was right), which the interpreter does not show; head dims of real models are >= 64
    fp32 = q.dtype == torch.float32 or d < 32
    consts = kernel_constexprs(Hkv, G, d, groups, tuple(high), tuple(low) if low is not None else None, data.shape[1],
                               block_tokens, logits is not None, fp32, asm_cvt, bool(high_dense),
                               ret_pages is not None)
    _paged_decode_kernel[grid](
        q, data, data.view(torch.float16), data.view(torch.int64) if consts["META64"] else data, pages, num_high, nlp, seq_ids, slot_pos,
        part_out, part_lse, logits if logits is not None else part_lse,
        layer, C, data.shape[1], slot_pos.shape[1], pages_per_split, scale * LOG2E,
        q.stride(0), q.stride(1),
        pages.stride(0), pages.stride(1), pages.stride(2),
        num_high.stride(0), num_high.stride(1),
        ret_pages if ret_pages is not None else pages, ret_pages.shape[2] if ret_pages is not None else 0,
        logits.shape[2] if logits is not None else 0,
        **consts,
        num_warps=num_warps, num_stages=num_stages, **extra,
    )
    merge_splits(part_out.view(B * Hq, nsplit, d), part_lse.view(B * Hq, nsplit), out.view(B * Hq, d), lse.view(B * Hq))


# ---- pages in the model's dtype (kvstore/hot/page_format.py, FullFormat) -------------------------


@triton.jit(do_not_specialize=["layer", "C", "max_slots", "pages_per_split", "stride_ps", "stride_pl", "stride_ph"])
def _full_decode_kernel(
    q_ptr, kv_ptr, pages_ptr, num_tokens_ptr, seq_ptr, pos_ptr, part_out_ptr, part_lse_ptr,
    layer, C, page_elems, max_slots, pages_per_split, scale_log2,
    stride_qb, stride_qh,
    stride_ps, stride_pl, stride_ph,  # page table [S, L, H, C] (last stride 1)
    stride_ns, stride_nl,  # num_tokens [S, L, H] (last stride 1)
    HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, TPP: tl.constexpr,
    BLOCK_T: tl.constexpr, NP: tl.constexpr, DOT_F32: tl.constexpr, DENSE: tl.constexpr,
):
    """One (batch row, KV head, split) over pages of the model's dtype: [K: TPP x D | V: TPP x D] each.

    Transposed as the quantized kernel: S^T = K @ Q^T [tokens, BLOCK_G], O^T += V^T @ P^T [D, BLOCK_G],
    NP pages (NP * BLOCK_T token rows, rows >= TPP of a page masked) a step. DOT_F32: fp32 operands and
    "ieee" dots (fp32 pages or queries, or bf16 pages in the interpreter); else tensor-core dots in the
    pages' dtype with fp32 accumulation, the probabilities rounded to it for P @ V. The softmax
    denominator is kept per token row and summed once after the loop (the quantized kernel's LAZY).
    """
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    seq = tl.load(seq_ptr + b)
    g = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, D)
    gmask = g < G
    q = tl.load(q_ptr + b * stride_qb + (h * G + g)[:, None] * stride_qh + dims[None, :], mask=gmask[:, None], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    else:
        q = q.to(kv_ptr.dtype.element_ty)
    q = tl.trans(q)  # Q^T [D, BLOCK_G]
    n = tl.load(num_tokens_ptr + seq * stride_ns + layer * stride_nl + h)
    table = pages_ptr + seq * stride_ps + layer * stride_pl + h * stride_ph
    v0 = split * pages_per_split
    v1 = tl.minimum(v0 + pages_per_split, (n + TPP - 1) // TPP)
    acc = tl.zeros((D, BLOCK_G), dtype=tl.float32)  # O^T
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_t = tl.zeros((NP * BLOCK_T, BLOCK_G), dtype=tl.float32)  # denominator per token row
    r = tl.arange(0, NP * BLOCK_T)
    for vp0 in range(v0, v1, NP):
        vp = vp0 + r // BLOCK_T
        slot = r % BLOCK_T
        page_ok = (slot < TPP) & (vp < v1)
        valid = page_ok & (vp * TPP + slot < n)
        col = tl.where(page_ok, vp, 0)
        if BLOCK_T != TPP:
            slot = tl.where(slot < TPP, slot, 0)
        page = tl.load(table + col, mask=page_ok, other=0).to(tl.int64)
        if not DENSE:
            pos = tl.load(pos_ptr + page * max_slots + slot, mask=valid, other=-1)
            valid = valid & (pos >= 0)
        krow = kv_ptr + page * page_elems + slot * D
        # masked rows load zeros: no stale bytes (NaN, inf) of an unused slot reach P @ V
        k = tl.load(krow[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        vt = tl.load((krow + TPP * D)[None, :] + dims[:, None], mask=valid[None, :], other=0.0)  # V^T [D, rows]
        acc, m_i, l_t = softmax_step(acc, m_i, l_t, k, vt, q, valid, scale_log2, DOT_F32)
    row = (b * HKV * G + h * G + g) * tl.num_programs(1) + split
    store_split(part_out_ptr, part_lse_ptr, acc, l_t, m_i, row, dims, gmask, D)


# Launch defaults of the 16-bit kernel: not yet timed on a GPU (a guess from the page size: a 32-token
# page of d=128 bf16 is 16 KB of K and V, so 4 warps share a page's tiles and 3 stages keep two pages
# in flight in 48 KB of shared memory).
FULL_LAUNCH = dict(num_warps=4, num_stages=3, block_tokens=32, high_dense=True)
FULL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=256)
def full_kernel_constexprs(num_kv_heads: int, group: int, head_dim: int, tokens_per_page: int, block_tokens: int,
                           dot_f32: bool, high_dense: bool) -> types.MappingProxyType:
    """The compile-time parameters of `_full_decode_kernel` for one launch (cached, read-only, as
    `kernel_constexprs`). A page's rows are padded to a power of two >= 16 (the tensor-core dot's
    reduction over tokens); `block_tokens` rows a loop step, whole pages."""
    bt = max(16, triton.next_power_of_2(tokens_per_page))
    return types.MappingProxyType(dict(
        HKV=num_kv_heads, G=group, BLOCK_G=query_block(group), D=head_dim, TPP=tokens_per_page, BLOCK_T=bt,
        NP=max(1, block_tokens // bt), DOT_F32=bool(dot_f32), DENSE=bool(high_dense),
    ))


def paged_decode_attention_full(
    q: torch.Tensor, data: torch.Tensor, dtype: torch.dtype, pages: torch.Tensor, num_tokens: torch.Tensor,
    seq_ids: torch.Tensor, layer: int, slot_pos: torch.Tensor, tokens_per_page: int, scale: float,
    out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor, pages_per_split: int,
    num_warps: int | None = None, num_stages: int | None = None, block_tokens: int | None = None,
    high_dense: bool | None = None,
) -> None:
    """Decode attention of one layer over pages in the model's dtype (FullFormat), into `out` and `lse`.

    Args:
        q: [B, Hq, d] bf16/fp16/fp32, last stride 1; d a power of two >= 16.
        data: uint8 [P, page_bytes] page pool; a page is [K: T x d | V: T x d] in `dtype` (fp16, bf16 or
            fp32), T = tokens_per_page, from byte 0 of its row.
        pages: int32 [S, L, Hkv, C] page tables of all sequence slots and layers (0 = the null page);
            num_tokens int32 [S, L, Hkv]: tokens of each head, at indices [0, n) (index i in page
            pages[..., i // T], slot i % T).
        seq_ids: int64 [B] sequence slots of the batch rows; layer: the layer.
        slot_pos: int32 [P, max_slots], -1 = empty slot; read only with high_dense=False (FULL_LAUNCH's
            high_dense=True: every index below n holds a token, as KVStore keeps its high tier).
        out: [B, Hq, d] contiguous (any float dtype), lse fp32 [B, Hq]: results (natural-log lse; a head
            with no token gives lse -inf and out 0).
        part_out fp32 [B, Hq, NSPLIT, d], part_lse fp32 [B, Hq, NSPLIT]: split workspace, merged by
            `merge_splits`; NSPLIT * pages_per_split must cover the widest head's pages.
        num_warps / num_stages / block_tokens / high_dense: launch variant (None: FULL_LAUNCH's).
    Graph-safe: allocates nothing (views of data only), syncs nothing.
    """
    if dtype not in FULL_DTYPES:
        raise ValueError(f"pages of {dtype}: the decode kernel reads fp16, bf16 or fp32 pages")
    launch = dict(FULL_LAUNCH)
    launch.update({k: v for k, v in dict(num_warps=num_warps, num_stages=num_stages, block_tokens=block_tokens,
                                         high_dense=high_dense).items() if v is not None})
    B, Hq, d = q.shape
    S_, L, Hkv, C = pages.shape
    T = tokens_per_page
    elem = dtype.itemsize
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} not a multiple of KV heads {Hkv}")
    if q.stride(-1) != 1 or pages.stride(-1) != 1 or num_tokens.stride(-1) != 1:
        raise ValueError("q, pages and num_tokens need a last stride of 1")
    if data.dtype != torch.uint8 or not data.is_contiguous():
        raise ValueError("data must be the contiguous uint8 page pool")
    if d & (d - 1) or d < 16:
        raise ValueError(f"head dim {d} must be a power of two >= 16 for the Triton decode kernel")
    if data.shape[1] % elem or 2 * T * d * elem > data.shape[1]:
        raise ValueError(f"pages of {data.shape[1]} B cannot hold {T} tokens of K and V at d={d} in {dtype}")
    nsplit = part_out.shape[2]
    if part_out.shape != (B, Hq, nsplit, d) or part_lse.shape != (B, Hq, nsplit):
        raise ValueError(f"part_out {tuple(part_out.shape)} / part_lse {tuple(part_lse.shape)}: want [B, Hq, NSPLIT, d] / [B, Hq, NSPLIT]")
    if out.shape != (B, Hq, d) or lse.shape != (B, Hq) or not out.is_contiguous():
        raise ValueError(f"out {tuple(out.shape)} / lse {tuple(lse.shape)}: want contiguous [B, Hq, d] / [B, Hq]")
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    # fp32 dots where an operand is fp32, and for bf16 pages in the interpreter, whose bf16 dot is wrong
    # (the products of bf16 operands are exact in fp32 either way; only P's rounding to bf16 differs)
    dot_f32 = dtype == torch.float32 or q.dtype != dtype or (interpret and dtype == torch.bfloat16)
    consts = full_kernel_constexprs(Hkv, Hq // Hkv, d, T, launch["block_tokens"], dot_f32, launch["high_dense"])
    kv = data.view(dtype)
    _full_decode_kernel[(B * Hkv, nsplit)](
        q, kv, pages, num_tokens, seq_ids, slot_pos, part_out, part_lse,
        layer, C, kv.shape[1], slot_pos.shape[1], pages_per_split, scale * LOG2E,
        q.stride(0), q.stride(1),
        pages.stride(0), pages.stride(1), pages.stride(2),
        num_tokens.stride(0), num_tokens.stride(1),
        **consts, num_warps=launch["num_warps"], num_stages=launch["num_stages"],
    )
    merge_splits(part_out.view(B * Hq, nsplit, d), part_lse.view(B * Hq, nsplit), out.view(B * Hq, d), lse.view(B * Hq))
