"""Triton kernels: quantize-and-append K/V rows into quantized pages, and dequantize pages.

Page layout and quantization formulas: kvstore/hot/quantization.py and gpu_kernels/reference.py
(`quantize`, `pack_codes`); these kernels reproduce them bit for bit on the same inputs (the
same fp32 operations: fp16 rounding of scale and zero, floor(x / scale + 0.5)).
The head dim and the group count must be powers of two (the kernels reshape rows into
[codes per byte, d / codes per byte] and [groups, d / groups]).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _quantize_row(x, NG: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """x fp32 [D] -> packed int32 [D // PER] (values < 256), scale fp32 [NG], zero fp32 [NG] (fp16-rounded)."""
    QMAX: tl.constexpr = (1 << BITS) - 1
    PER: tl.constexpr = 8 // BITS
    xg = tl.reshape(x, (NG, D // NG))
    lo = tl.min(xg, axis=1)
    hi = tl.max(xg, axis=1)
    zero = lo.to(tl.float16).to(tl.float32)
    nudged = (lo - tl.abs(lo) * 0.0009765625 - 5.960464477539063e-08).to(tl.float16).to(tl.float32)
    zero = tl.where(zero > lo, nudged, zero)
    rng = hi - zero
    scale = tl.where(rng > 0, rng / QMAX, 1.0).to(tl.float16).to(tl.float32)
    wider = (rng / QMAX * 1.0009765625 + 5.960464477539063e-08).to(tl.float16).to(tl.float32)
    scale = tl.where(scale * QMAX + zero < hi, wider, scale)
    codes = tl.floor((xg - zero[:, None]) / scale[:, None] + 0.5)
    codes = tl.minimum(tl.maximum(codes, 0.0), QMAX).to(tl.int32)
    codes = tl.reshape(codes, (PER, D // PER))
    shifts = tl.arange(0, PER)[:, None] * BITS
    packed = tl.sum(codes << shifts, axis=0)
    return packed, scale, zero


@triton.jit
def _quantize_into_pages_kernel(
    data_ptr, data16_ptr, page_ptr, slot_ptr, k_ptr, v_ptr, pos_ptr, slot_pos_ptr, slot_score_ptr,
    stride_k, stride_v, page_bytes, stride_sp, stride_ss,
    TPP: tl.constexpr, D: tl.constexpr, NG: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr,
    POS: tl.constexpr, SCORE: tl.constexpr,
):
    row = tl.program_id(0)
    page = tl.load(page_ptr + row).to(tl.int64)
    slot = tl.load(slot_ptr + row).to(tl.int64)
    KB: tl.constexpr = D * KBITS // 8
    VB: tl.constexpr = D * VBITS // 8
    dims = tl.arange(0, D)
    base = page * page_bytes
    k = tl.load(k_ptr + row * stride_k + dims).to(tl.float32)
    kp, ks, kz = _quantize_row(k, NG, D, KBITS)
    tl.store(data_ptr + base + slot * KB + tl.arange(0, KB), kp.to(tl.uint8))
    v = tl.load(v_ptr + row * stride_v + dims).to(tl.float32)
    vp, vs, vz = _quantize_row(v, NG, D, VBITS)
    tl.store(data_ptr + base + TPP * KB + tl.arange(0, VB) * TPP + slot, vp.to(tl.uint8))  # V byte-major
    meta = (base + TPP * (KB + VB)) // 2 + slot * 4 * NG
    g = tl.arange(0, NG)
    tl.store(data16_ptr + meta + g, ks.to(tl.float16))
    tl.store(data16_ptr + meta + NG + g, kz.to(tl.float16))
    tl.store(data16_ptr + meta + 2 * NG + g, vs.to(tl.float16))
    tl.store(data16_ptr + meta + 3 * NG + g, vz.to(tl.float16))
    if POS:  # the pool's slot bookkeeping: the token's position, and no attention mass yet
        tl.store(slot_pos_ptr + page * stride_sp + slot, tl.load(pos_ptr + row))
    if SCORE:
        tl.store(slot_score_ptr + page * stride_ss + slot, 0.0)


def _check_pow2(name: str, n: int) -> None:
    if n & (n - 1) or n <= 0:
        raise ValueError(f"{name}={n} must be a power of two for the Triton quantization kernels")


def quantize_into_pages(data: torch.Tensor, page_ids: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor, key_bits: int, value_bits: int, groups: int, tokens_per_page: int,
                        slot_meta: tuple | None = None) -> None:
    """Quantize rows of K and V and write them into their pages, in place.

    Args:
        data: uint8 [P, page_bytes] the page pool (written in place, never copied).
        page_ids, slots: int [N] where row i goes.
        k, v: [N, d] any float dtype, rows contiguous (last stride 1).
        key_bits, value_bits: 8, 4 or 2; groups: scale/zero groups along d; tokens_per_page: T of the format.
        slot_meta: optional (slot_pos int32 [P, >= T], positions int32 [N], slot_score fp32 [P, >= T] or None),
            last dims contiguous: also slot_pos[page, slot] = positions[i] and slot_score[page, slot] = 0 (the
            pool's bookkeeping of a decode write, in the same launch).
    """
    N, d = k.shape
    if v.shape != (N, d) or page_ids.shape != (N,) or slots.shape != (N,):
        raise ValueError(f"shapes: k {tuple(k.shape)}, v {tuple(v.shape)}, page_ids {tuple(page_ids.shape)}, "
                         f"slots {tuple(slots.shape)}: want [N, d], [N, d], [N], [N]")
    if data.dtype != torch.uint8 or not data.is_contiguous() or data.shape[1] % 2:
        raise ValueError("data must be a contiguous uint8 [P, page_bytes] pool with an even page size")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("k and v rows must be contiguous (last stride 1)")
    _check_pow2("head_dim", d)
    _check_pow2("groups", groups)
    spos, pos, sscore = slot_meta if slot_meta is not None else (None, None, None)
    if slot_meta is not None and (spos.dtype != torch.int32 or pos.dtype != torch.int32 or pos.shape != (N,)
                                  or spos.stride(-1) != 1 or not pos.is_contiguous()
                                  or (sscore is not None and (sscore.dtype != torch.float32 or sscore.stride(-1) != 1))):
        raise ValueError("slot_meta: slot_pos int32 [P, M], positions int32 [N] and slot_score fp32 [P, M] (or None), "
                         "last dims contiguous")
    if N == 0:
        return
    _quantize_into_pages_kernel[(N,)](
        data, data.view(torch.float16), page_ids.to(torch.int32).contiguous(), slots.to(torch.int32).contiguous(),
        k, v, pos if pos is not None else data, spos if spos is not None else data,
        sscore if sscore is not None else data, k.stride(0), v.stride(0), data.shape[1],
        spos.stride(0) if spos is not None else 0, sscore.stride(0) if sscore is not None else 0,
        TPP=tokens_per_page, D=d, NG=groups, KBITS=key_bits, VBITS=value_bits, POS=spos is not None,
        SCORE=sscore is not None,
    )


@triton.jit
def _unpack(packed_ptr, rows, D: tl.constexpr, BITS: tl.constexpr, stride_row, stride_byte):
    """Codes fp32 [BLOCK_T, D] of `rows`: byte j of row r at rows[r] * stride_row + j * stride_byte."""
    PER: tl.constexpr = 8 // BITS
    SUB: tl.constexpr = D // PER
    dims = tl.arange(0, D)
    byte = tl.load(packed_ptr + rows[:, None] * stride_row + ((dims % SUB) * stride_byte)[None, :]).to(tl.int32)
    return ((byte >> ((dims // SUB) * BITS)[None, :]) & ((1 << BITS) - 1)).to(tl.float32)


@triton.jit
def _dequantize_pages_kernel(
    data_ptr, data16_ptr, page_ptr, k_out, v_out, page_bytes,
    TPP: tl.constexpr, BLOCK_T: tl.constexpr, D: tl.constexpr, NG: tl.constexpr,
    KBITS: tl.constexpr, VBITS: tl.constexpr,
):
    i = tl.program_id(0)
    page = tl.load(page_ptr + i).to(tl.int64)
    KB: tl.constexpr = D * KBITS // 8
    VB: tl.constexpr = D * VBITS // 8
    t = tl.arange(0, BLOCK_T)
    tmask = t < TPP
    tt = tl.where(tmask, t, 0)
    dims = tl.arange(0, D)
    base = page * page_bytes
    grp = dims // (D // NG)
    meta = (base + TPP * (KB + VB)) // 2 + tt[:, None] * 4 * NG + grp[None, :]
    kc = _unpack(data_ptr + base, tt, D, KBITS, KB, 1)
    vc = _unpack(data_ptr + base + TPP * KB, tt, D, VBITS, 1, TPP)  # values byte-major
    ks = tl.load(data16_ptr + meta).to(tl.float32)
    kz = tl.load(data16_ptr + meta + NG).to(tl.float32)
    vs = tl.load(data16_ptr + meta + 2 * NG).to(tl.float32)
    vz = tl.load(data16_ptr + meta + 3 * NG).to(tl.float32)
    out = (i * TPP + t)[:, None] * D + dims[None, :]
    tl.store(k_out + out, (kc * ks + kz).to(k_out.dtype.element_ty), mask=tmask[:, None])
    tl.store(v_out + out, (vc * vs + vz).to(v_out.dtype.element_ty), mask=tmask[:, None])


def dequantize_pages(data: torch.Tensor, page_ids: torch.Tensor, key_bits: int, value_bits: int, groups: int,
                     tokens_per_page: int, head_dim: int, dtype: torch.dtype = torch.float32
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized K and V, `dtype` [M, tokens_per_page, head_dim] each, of pages page_ids int [M]
    (computed in fp32, stored in `dtype`: a 16-bit reader gets no fp32 temporaries)."""
    _check_pow2("head_dim", head_dim)
    _check_pow2("groups", groups)
    M = page_ids.numel()
    k = torch.empty(M, tokens_per_page, head_dim, dtype=dtype, device=data.device)
    v = torch.empty_like(k)
    if M:
        _dequantize_pages_kernel[(M,)](
            data, data.view(torch.float16), page_ids.to(torch.int32).contiguous(), k, v, data.shape[1],
            TPP=tokens_per_page, BLOCK_T=triton.next_power_of_2(tokens_per_page), D=head_dim, NG=groups,
            KBITS=key_bits, VBITS=value_bits,
        )
    return k, v


@triton.jit(do_not_specialize=["M"])
def _scatter_rows_to_pages_kernel(rows_ptr, page_ptr, slot_ptr, pos_ptr, data_ptr, slot_pos_ptr, M, page_bytes,
                                  max_slots, TPP: tl.constexpr, KB: tl.constexpr, VB: tl.constexpr,
                                  RB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    page = tl.load(page_ptr + r, mask=r < M, other=-1).to(tl.int64)
    ok = page >= 0
    slot = tl.load(slot_ptr + r, mask=ok, other=0).to(tl.int64)
    pos = tl.load(pos_ptr + r, mask=ok, other=-1).to(tl.int32)
    # byte b of a row lands at base[b] + slot * step[b] in its page: K token-major, V byte-major, meta token-major
    b = tl.arange(0, BLOCK_B)
    is_k = b < KB
    is_v = (b >= KB) & (b < KB + VB)
    base = tl.where(is_k, b, tl.where(is_v, TPP * KB + (b - KB) * TPP, TPP * (KB + VB) + b - KB - VB))
    step = tl.where(is_k, KB, tl.where(is_v, 1, RB - KB - VB))
    mask = ok[:, None] & (b < RB)[None, :]
    x = tl.load(rows_ptr + r.to(tl.int64)[:, None] * RB + b[None, :], mask=mask)
    tl.store(data_ptr + page[:, None] * page_bytes + slot[:, None] * step[None, :] + base[None, :], x, mask=mask)
    tl.store(slot_pos_ptr + page * max_slots + slot, pos, mask=ok)


_SCATTER_BLOCK_R = 16


def scatter_rows_to_pages(rows: torch.Tensor, page_ids: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                          data: torch.Tensor, slot_pos: torch.Tensor, key_bits: int, value_bits: int, groups: int,
                          tokens_per_page: int) -> None:
    """Copy quantized rows into page slots, in place (bytes moved, no requantization; no allocation, no host
    sync: graph-safe).

    Args:
        rows: uint8 [M, row_bytes] contiguous quantized rows (one-token pages of kvstore/hot/quantization.py's
            layout), row_bytes = d * (key_bits + value_bits) / 8 + 8 * groups.
        page_ids, slots, positions: int32/int64 [M] contiguous. Row i goes to slot slots[i] of page page_ids[i]
            (K codes token-major, V code bytes byte-major, meta token-major) and slot_pos[page_ids[i], slots[i]]
            = positions[i] (-1: the slot is masked, its bytes are still written); page_ids[i] < 0: row i is
            skipped (nothing written). The (page, slot) pairs of the rows written must be distinct.
        data: uint8 [P, page_bytes] contiguous page pool, page_bytes >= tokens_per_page * row_bytes.
        slot_pos: int32 [P, max_slots] contiguous, max_slots >= tokens_per_page.
        key_bits, value_bits: 8, 4 or 2; groups: scale/zero groups along d; tokens_per_page: T of the format.
    """
    M, row_bytes = rows.shape
    bits = key_bits + value_bits
    d = (row_bytes - 8 * groups) * 8 // bits
    if rows.dtype != torch.uint8 or not rows.is_contiguous() or d <= 0 or d % 8 or d * bits // 8 + 8 * groups != row_bytes:
        raise ValueError(f"scatter_rows_to_pages: rows must be contiguous uint8 [M, d * {bits} / 8 + {8 * groups}], d a "
                         f"multiple of 8 (K{key_bits}V{value_bits}, groups={groups}); got {rows.dtype} {tuple(rows.shape)}")
    idx = (page_ids, slots, positions)
    if any(t.dtype not in (torch.int32, torch.int64) or t.shape != (M,) or not t.is_contiguous() for t in idx):
        raise ValueError(f"scatter_rows_to_pages: page_ids, slots, positions must be contiguous int32/int64 [{M}]; "
                         f"got {[(t.dtype, tuple(t.shape)) for t in idx]}")
    if data.dim() != 2 or data.dtype != torch.uint8 or not data.is_contiguous() or data.shape[1] < tokens_per_page * row_bytes:
        raise ValueError(f"scatter_rows_to_pages: data must be a contiguous uint8 [P, >= {tokens_per_page * row_bytes}] "
                         f"pool; got {data.dtype} {tuple(data.shape)}")
    if (slot_pos.dtype != torch.int32 or not slot_pos.is_contiguous() or slot_pos.dim() != 2
            or slot_pos.shape[0] != data.shape[0] or slot_pos.shape[1] < tokens_per_page):
        raise ValueError(f"scatter_rows_to_pages: slot_pos must be contiguous int32 [{data.shape[0]}, >= "
                         f"{tokens_per_page}]; got {slot_pos.dtype} {tuple(slot_pos.shape)}")
    if any(t.device != data.device for t in (rows, *idx, slot_pos)):
        raise ValueError(f"scatter_rows_to_pages: every tensor must be on data's device {data.device}")
    if M == 0:
        return
    _scatter_rows_to_pages_kernel[(triton.cdiv(M, _SCATTER_BLOCK_R),)](
        rows, page_ids, slots, positions, data, slot_pos, M, data.shape[1], slot_pos.shape[1], TPP=tokens_per_page,
        KB=d * key_bits // 8, VB=d * value_bits // 8, RB=row_bytes, BLOCK_R=_SCATTER_BLOCK_R,
        BLOCK_B=triton.next_power_of_2(row_bytes))
