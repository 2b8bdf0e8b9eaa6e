"""Triton: the GPU cache of retrieved tokens (kvstore/cold/gpu_cache.py). `lookup`: the slot of each
selected position, with the misses to fetch and the hits' rows to read (17 torch ops a layer, one launch here). `admit`: the admission of one layer's misses
(`GPUCache.admit`), one program per (sequence, KV head).

Admission. The torch path (the CPU's, and the reference this kernel is tested against bit for bit) is
about 49 ops a layer: the score update, the protected scores, a top-k of the least valuable slots, a cumsum
ranking the misses, and the scatters into the slot map, the positions, the scores and the rows. On
the GPU a top-k alone is several kernels; a 32-layer step ran ~1,600 of these small launches.

Per row, in order (each step's global writes are made visible to the next by a barrier: a program
is one thread block):

  1. touch: LFU scores decay and gain 1 per hit, LRU hit scores become the step; the trash slot 0.
  2. protected scores: empty slots -inf (taken first), hit slots and the trash +inf (never taken),
     into the step's scratch row; the slots sorted by (score, slot) ascending: `tl.sort` of an int64
     key (the fp32 score's bits mapped to an order-preserving int32, high word; the slot, low word),
     so ties go to the lowest slot, as a stable sort (the torch path's `torch.sort(stable=True)`).
  3. the misses, in selection order, ranked by a running count (chunks of the selection, a carry);
     miss r takes the r-th victim while victims with a finite protected score remain: the victim's
     old position leaves the slot map, the new one enters, its row (the fetch's quantized bytes, or
     the 16-bit K and V) is copied into the slot, its position and score (1 / the step) written.

Entries that are not admitted copy no row (the torch path sends theirs to the trash slot, whose row is
never read); the trash slot's score and position end as the torch path leaves them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


#: selection entries a loop step (the rows copied a step are BLOCK_K x row bytes: at 256 entries and 200-byte
#: rows sm_90 spilled 6.6 KB a thread; 32 compiles to 128 registers, no spill: benchmarks/perf/kernel_resources.py)
ADMIT_LAUNCH = dict(block_k=32, num_warps=8)


@triton.jit
def _order_key(x):
    """int32 whose signed order is x's float order (no NaN)."""
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF)


@triton.jit
def _from_key(s):
    return tl.where(s >= 0, s, s ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@triton.jit(do_not_specialize=["K", "NV", "N", "CAP1", "decay"])
def _admit_kernel(seq_ptr, pos_ptr, valid_ptr, slot_ptr, src_ptr, src_v_ptr,
                  score_ptr, cpos_ptr, slot_of_ptr, dst_ptr, dst_v_ptr, step_ptr, prot_ptr, vic_ptr, vals_ptr,
                  K, NV, N, CAP1, decay,
                  H: tl.constexpr, SLOTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  ROW: tl.constexpr, BLOCK_ROW: tl.constexpr, LFU: tl.constexpr, TOUCH: tl.constexpr,
                  TWO: tl.constexpr):
    r = tl.program_id(0)  # (batch row, KV head)
    b = r // H
    h = r % H
    seq = tl.load(seq_ptr + b).to(tl.int64)
    crow = seq * H + h  # the (sequence slot, head) row of the cache's [S, H, ...] buffers
    s_row = score_ptr + crow * N
    p_row = cpos_ptr + crow * N
    o_row = slot_of_ptr + crow * CAP1
    sel = r.to(tl.int64) * K  # this row's selection entries
    i = tl.arange(0, BLOCK_N)
    im = i < SLOTS
    inf = float("inf")
    # 1. touch
    if TOUCH:
        if LFU:
            sc = tl.load(s_row + i, mask=im, other=0.0)
            tl.store(s_row + i, sc * decay, mask=im)
        tl.debug_barrier()
        for k0 in range(0, K, BLOCK_K):
            j = k0 + tl.arange(0, BLOCK_K)
            sl = tl.load(slot_ptr + sel + j, mask=j < K, other=-1)
            if LFU:  # a slot is hit at most once a step (the selection's positions are distinct)
                tl.store(s_row + sl, tl.load(s_row + sl, mask=sl >= 0, other=0.0) + 1.0, mask=sl >= 0)
            else:
                tl.store(s_row + sl, tl.load(step_ptr), mask=sl >= 0)
        tl.store(s_row + SLOTS, 0.0)
        tl.debug_barrier()
    # 2. protected scores, sorted with their slots
    sc = tl.load(s_row + i, mask=im, other=0.0)
    pg = tl.load(p_row + i, mask=im, other=0)
    prot_row = prot_ptr + r.to(tl.int64) * BLOCK_N
    tl.store(prot_row + i, tl.where(im, tl.where(pg < 0, -inf, sc), inf))
    tl.debug_barrier()
    for k0 in range(0, K, BLOCK_K):
        j = k0 + tl.arange(0, BLOCK_K)
        sl = tl.load(slot_ptr + sel + j, mask=j < K, other=-1)
        tl.store(prot_row + sl, inf, mask=sl >= 0)
    tl.debug_barrier()
    key = (_order_key(tl.load(prot_row + i)).to(tl.int64) << 32) | i.to(tl.int64)
    key = tl.sort(key)
    v_row = vic_ptr + r.to(tl.int64) * BLOCK_N
    f_row = vals_ptr + r.to(tl.int64) * BLOCK_N
    tl.store(v_row + i, (key & 0xFFFFFFFF).to(tl.int32))
    tl.store(f_row + i, _from_key((key >> 32).to(tl.int32)))
    tl.debug_barrier()
    # 3. the misses take the victims in order
    carry = 0
    admitted = 0
    for k0 in range(0, K, BLOCK_K):
        j = k0 + tl.arange(0, BLOCK_K)
        jm = j < K
        sl = tl.load(slot_ptr + sel + j, mask=jm, other=0)
        va = tl.load(valid_ptr + sel + j, mask=jm, other=0) != 0
        miss = va & (sl < 0)
        cs = tl.cumsum(miss.to(tl.int32), 0) + carry
        carry = carry + tl.sum(miss.to(tl.int32), 0)
        rank = tl.minimum(tl.maximum(cs - 1, 0), NV - 1)
        ok = miss & (cs <= NV) & (tl.load(f_row + rank) < inf)
        admitted = admitted + tl.sum(ok.to(tl.int32), 0)
        tslot = tl.load(v_row + rank, mask=ok, other=0).to(tl.int64)
        old = tl.load(p_row + tslot, mask=ok, other=-1)
        tl.store(o_row + old, -1, mask=ok & (old >= 0))
        ps = tl.load(pos_ptr + sel + j, mask=ok, other=0)
        tl.store(o_row + tl.minimum(tl.maximum(ps, 0), CAP1 - 1), tslot.to(slot_of_ptr.dtype.element_ty), mask=ok)
        tl.store(p_row + tslot, ps.to(tl.int32), mask=ok)
        if LFU:
            tl.store(s_row + tslot, 1.0, mask=ok)
        else:
            tl.store(s_row + tslot, tl.load(step_ptr), mask=ok)
        # the row: the fetch's bytes (quantized) or K and V
        c = tl.arange(0, BLOCK_ROW)
        m2 = ok[:, None] & (c < ROW)[None, :]
        src = (sel + j)[:, None] * ROW + c[None, :]
        dst = (crow * N + tslot)[:, None] * ROW + c[None, :]
        tl.store(dst_ptr + dst, tl.load(src_ptr + src, mask=m2), mask=m2)
        if TWO:
            tl.store(dst_v_ptr + dst, tl.load(src_v_ptr + src, mask=m2), mask=m2)
    # as the torch path leaves them: a row not admitted scores the trash slot (never read: its protected
    # score is +inf), the trash holds no position, the slot map's last column no slot
    if admitted < K:  # some entries were not admitted (hits, invalid picks, misses past the victims)
        if LFU:
            tl.store(s_row + SLOTS, 1.0)
        else:
            tl.store(s_row + SLOTS, tl.load(step_ptr))
    tl.store(p_row + SLOTS, -1)
    tl.store(o_row + CAP1 - 1, -1)


def admit(seq_ids: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, slot: torch.Tensor,
          score: torch.Tensor, cache_pos: torch.Tensor, slot_of: torch.Tensor, dst: tuple[torch.Tensor, ...],
          src: tuple[torch.Tensor, ...], step: torch.Tensor, scratch: dict, lfu: bool, decay: float, touch: bool
          ) -> None:
    """One layer's admission in one launch (see the module docstring).

    Args:
        seq_ids int64 [B]; pos int64, valid bool, slot int64 (-1: a miss) [B, H, k] contiguous: the
            layer's selection and its lookup.
        score fp32 / cache_pos int32 [S, H, n] and slot_of int16/int32 [S, H, cap + 1]: the layer's
            cache state (n = slots + 1, slot `slots` the trash), contiguous.
        dst: the layer's rows, (uint8 [S, H, n, row_bytes],) quantized or (k, v) [S, H, n, d];
        src: the step's admitted data, (uint8 [B * H * k, row_bytes],) or (k, v) [B, H, k, d].
        step: fp32 0-dim device tensor (LRU's score). scratch: `admit_buffers`.
    Graph-safe: no allocation, no host sync.
    """
    B, H, k = pos.shape
    S_, H2, n = score.shape
    slots = n - 1
    if H2 != H or cache_pos.shape != score.shape or slot_of.shape[:2] != (S_, H):
        raise ValueError(f"admit: cache state {tuple(score.shape)}, {tuple(cache_pos.shape)}, "
                         f"{tuple(slot_of.shape)} does not match the selection's {H} heads")
    for t in (pos, valid, slot, score, cache_pos, slot_of, *dst, *src):
        if not t.is_contiguous():
            raise ValueError("admit: every tensor must be contiguous")
    if slots == 0 or B * H == 0 or k == 0:
        return
    row = dst[0].shape[-1] * dst[0].element_size() // src[0].element_size()
    nv = min(k, slots)
    bn = scratch["prot"].shape[-1]
    _admit_kernel[(B * H,)](
        seq_ids, pos, valid.view(torch.uint8), slot, src[0], src[-1], score, cache_pos, slot_of, dst[0], dst[-1],
        step, scratch["prot"], scratch["victims"], scratch["vals"], k, nv, n, slot_of.shape[-1], decay,
        H=H, SLOTS=slots, BLOCK_N=bn, BLOCK_K=min(ADMIT_LAUNCH["block_k"], triton.next_power_of_2(k)), ROW=row,
        BLOCK_ROW=triton.next_power_of_2(row), LFU=lfu, TOUCH=touch, TWO=len(dst) == 2,
        num_warps=ADMIT_LAUNCH["num_warps"],
    )


def admit_buffers(take, B: int, H: int, slots: int) -> dict:
    """The kernel's scratch rows (take(name, shape, dtype) -> a plan-time workspace view)."""
    bn = triton.next_power_of_2(max(slots, 1))
    return {"prot": take("prot", (B, H, bn), torch.float32), "victims": take("victims", (B, H, bn), torch.int32),
            "vals": take("vals", (B, H, bn), torch.float32)}


@triton.jit(do_not_specialize=["M", "K", "CAP1"])
def _lookup_kernel(seq_ptr, pos_ptr, valid_ptr, slot_of_ptr, slot_ptr, hits_ptr, lookups_ptr, miss_ptr, rows_ptr,
                   M, K, CAP1, NROW, H: tl.constexpr, COUNT: tl.constexpr, OUTS: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = i < M
    va = (tl.load(valid_ptr + i, mask=inside, other=0) != 0) & inside
    i = i.to(tl.int64)
    b = i // (H * K)
    h = (i // K) % H
    seq = tl.load(seq_ptr + b, mask=va, other=0)
    p = tl.minimum(tl.maximum(tl.load(pos_ptr + i, mask=va, other=0), 0), CAP1 - 1)
    s = tl.load(slot_of_ptr + (seq * H + h) * CAP1 + p, mask=va, other=-1).to(tl.int64)
    s = tl.where(va, s, -1)
    tl.store(slot_ptr + i, s, mask=inside)
    if OUTS:  # what the layer does next with the slots: fetch the misses, read the hits' rows
        tl.store(miss_ptr + i, (va & (s < 0)).to(tl.uint8), mask=inside)
        tl.store(rows_ptr + i, tl.where(s >= 0, (seq * H + h) * NROW + s, -1), mask=inside)
    if COUNT:
        tl.atomic_add(hits_ptr, tl.sum((s >= 0).to(tl.int64), 0))
        tl.atomic_add(lookups_ptr, tl.sum(va.to(tl.int64), 0))


def lookup(seq_ids: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, slot_of: torch.Tensor, slot: torch.Tensor,
           hits: torch.Tensor, lookups: torch.Tensor, count: bool,
           outs: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> torch.Tensor:
    """`GPUCache.lookup` in one launch: slot int64 [B, H, k] (written) = slot_of[seq, h, pos] where valid, else
    -1; with count, hits += the valid lookups that hit, lookups += the valid ones (int64 0-dim device tensors).
    seq_ids int64 [B]; pos int64, valid bool [B, H, k] and slot_of [S, H, cap + 1] (one layer's) contiguous.
    outs (miss, rows, n): also miss bool [B, H, k] = valid and not a hit, and rows int64 [B * H * k] = the
    hit's row (seq * H + h) * n + slot of a cache layer's [S * H * n] rows, -1 for the rest (contiguous).
    Graph-safe: no allocation, no host sync."""
    B, H, k = pos.shape
    if slot.shape != pos.shape or slot.dtype != torch.int64 or slot_of.shape[1] != H:
        raise ValueError(f"lookup: slot int64 {tuple(pos.shape)} and slot_of [S, {H}, cap + 1] expected; got "
                         f"{slot.dtype} {tuple(slot.shape)}, {tuple(slot_of.shape)}")
    for t in (pos, valid, slot_of, slot, *(outs[:2] if outs is not None else ())):
        if not t.is_contiguous():
            raise ValueError("lookup: pos, valid, slot_of, slot (and miss, rows) must be contiguous")
    if outs is not None and (outs[0].shape != pos.shape or outs[0].dtype != torch.bool
                             or outs[1].numel() != pos.numel() or outs[1].dtype != torch.int64):
        raise ValueError(f"lookup: miss bool {tuple(pos.shape)} and rows int64 [{pos.numel()}] expected")
    M = B * H * k
    if M == 0:
        return slot
    block = 1024
    miss, rows, n = (outs[0].view(torch.uint8), outs[1], outs[2]) if outs is not None else (slot, slot, 0)
    _lookup_kernel[(triton.cdiv(M, block),)](seq_ids, pos, valid.view(torch.uint8), slot_of, slot, hits, lookups, miss,
                                             rows, M, k, slot_of.shape[-1], n, H=H, COUNT=count, OUTS=outs is not None,
                                             BLOCK=block, num_warps=4)
    return slot
