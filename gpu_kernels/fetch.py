"""Triton: gather rows of (pinned) host memory into a GPU buffer: the fetch of retrieval misses.

On CUDA the source is a pinned host tensor; Triton accepts it (unified virtual addressing: a
pinned host pointer is a valid device pointer), so the kernel reads host memory over PCIe
directly, one program per BLOCK_R rows, with no host round trip and no staging copy. A row id
of -1 means "nothing to fetch" (a cache hit): the destination row is left as it is, so the
grid and the buffers have the same size every step (no host sync to learn the miss count).
Order matters more than launch shape (H100, 256-byte rows, pinned copy ceiling 55 GB/s): the GPU
reaches pinned host memory through a translation cache that covers a few hundred MB, so rows in
address order move 51-52 GB/s while the same rows in random order move 26 GB/s over a 1 GiB slab
and 10 GB/s over 4 GiB (512-byte rows: 49 and 19); every rows-per-program / warps setting gave the
same figure. The store's fetch comes in address order within each (sequence, KV head): the top-k
positions (torch.topk(sorted=False) on CUDA returns them ascending) map to rows that grow with
the position in the cold tier's chunk layout (benchmarks/perf/retrieval.py, "store order").
A quantized cold tier (K8V4: 200-byte rows at d = 128, against 512 at bf16) is fetched by
`gather_dequantize_rows`: the same gather of host rows, dequantized on the way into the model's
dtype (one pass over PCIe, no staging buffer). A row is a one-token page of the hot tier's
quantized format (kvstore/hot/quantization.py): K codes, V codes, fp16 scale and zero per group.
References: `gpu_kernels/reference.py::gather_rows`, `::gather_dequantize_rows`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_kernels.quant import _check_pow2, _unpack


@triton.jit(do_not_specialize=["M"])  # the row count varies per call: one compile for all
def _gather_rows(src_ptr, rows_ptr, dst_ptr, M, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < M
    row = tl.load(rows_ptr + r, mask=rmask, other=-1).to(tl.int64)
    ok = rmask & (row >= 0)
    d = tl.arange(0, BLOCK_D)
    m = ok[:, None] & (d < D)[None, :]
    x = tl.load(src_ptr + row[:, None] * D + d[None, :], mask=m)
    tl.store(dst_ptr + r.to(tl.int64)[:, None] * D + d[None, :], x, mask=m)


def gather_rows(src: torch.Tensor, rows: torch.Tensor, dst: torch.Tensor, block_r: int = 64,
                num_warps: int = 8) -> torch.Tensor:
    """dst[i] = src[rows[i]] where rows[i] >= 0; other rows of dst untouched.

    Args:
        src: [R, D] contiguous, pinned host memory (or any memory the kernel's device can read).
        rows: int32/int64 [M] on dst's device, -1 = skip.
        dst: [M, D] contiguous, same dtype as src.
        block_r, num_warps: rows per program and warps (benchmarks/perf/retrieval.py sweeps them: on
            the H100 all settings gave the same GB/s; the row order sets it, see above).
    """
    if src.dim() != 2 or dst.dim() != 2 or src.shape[1] != dst.shape[1] or rows.shape != (dst.shape[0],):
        raise ValueError(f"gather_rows: src [R, D], rows [M], dst [M, D] expected; got {tuple(src.shape)}, "
                         f"{tuple(rows.shape)}, {tuple(dst.shape)}")
    if src.dtype != dst.dtype or not src.is_contiguous() or not dst.is_contiguous():
        raise ValueError(f"gather_rows: src and dst must be contiguous with one dtype; got {src.dtype}, {dst.dtype}")
    if src.device.type == "cpu" and dst.device.type == "cuda" and not src.is_pinned():
        raise ValueError("gather_rows: a host source must be pinned for the GPU to read it")
    if rows.device != dst.device:
        raise ValueError(f"gather_rows: rows on {rows.device}, dst on {dst.device}")
    M, D = dst.shape
    if M == 0:
        return dst
    grid = (triton.cdiv(M, block_r),)
    _gather_rows[grid](src, rows, dst, M, D=D, BLOCK_R=block_r, BLOCK_D=triton.next_power_of_2(D),
                       num_warps=num_warps)
    return dst


@triton.jit(do_not_specialize=["M"])
def _gather_dequantize_rows(src_ptr, src16_ptr, rows_ptr, k_out, v_out, M, RB: tl.constexpr, D: tl.constexpr,
                            NG: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr, BLOCK_R: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < M
    row = tl.load(rows_ptr + r, mask=rmask, other=-1).to(tl.int64)
    ok = rmask & (row >= 0)
    row = tl.where(ok, row, 0)  # a skipped row reads row 0 (any valid row) and stores nothing
    KB: tl.constexpr = D * KBITS // 8
    VB: tl.constexpr = D * VBITS // 8
    dims = tl.arange(0, D)
    kc = _unpack(src_ptr, row, D, KBITS, RB, 1)
    vc = _unpack(src_ptr + KB, row, D, VBITS, RB, 1)  # one token per row: byte-major = token-major
    meta = (row * RB + KB + VB)[:, None] // 2 + (dims // (D // NG))[None, :]
    ks = tl.load(src16_ptr + meta).to(tl.float32)
    kz = tl.load(src16_ptr + meta + NG).to(tl.float32)
    vs = tl.load(src16_ptr + meta + 2 * NG).to(tl.float32)
    vz = tl.load(src16_ptr + meta + 3 * NG).to(tl.float32)
    out = r.to(tl.int64)[:, None] * D + dims[None, :]
    tl.store(k_out + out, (kc * ks + kz).to(k_out.dtype.element_ty), mask=ok[:, None])
    tl.store(v_out + out, (vc * vs + vz).to(v_out.dtype.element_ty), mask=ok[:, None])


def gather_dequantize_rows(src: torch.Tensor, rows: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor,
                           key_bits: int, value_bits: int, groups: int = 1, block_r: int = 16,
                           num_warps: int = 4) -> None:
    """k_out[i], v_out[i] = dequantized K, V of quantized row src[rows[i]] where rows[i] >= 0; other rows
    of k_out / v_out untouched.

    Args:
        src: uint8 [R, row_bytes] contiguous, row_bytes = d * (key_bits + value_bits) / 8 + 8 * groups;
            pinned host memory (read over PCIe) or device memory.
        rows: int32/int64 [M] on the outputs' device, -1 = skip.
        k_out, v_out: [M, d] contiguous, any float dtype (computed in fp32, stored in theirs).
        key_bits, value_bits: 8, 4 or 2; groups: scale/zero groups along d (powers of two).
    """
    M, d = k_out.shape
    row_bytes = d * (key_bits + value_bits) // 8 + 8 * groups
    if src.dim() != 2 or src.dtype != torch.uint8 or src.shape[1] != row_bytes or not src.is_contiguous():
        raise ValueError(f"gather_dequantize_rows: src must be contiguous uint8 [R, {row_bytes}] (K{key_bits}V{value_bits}, "
                         f"d={d}, groups={groups}); got {src.dtype} {tuple(src.shape)}")
    if v_out.shape != (M, d) or rows.shape != (M,) or not (k_out.is_contiguous() and v_out.is_contiguous()):
        raise ValueError(f"gather_dequantize_rows: rows [M], k_out and v_out contiguous [M, d] expected; got "
                         f"{tuple(rows.shape)}, {tuple(k_out.shape)}, {tuple(v_out.shape)}")
    if src.device.type == "cpu" and k_out.device.type == "cuda" and not src.is_pinned():
        raise ValueError("gather_dequantize_rows: a host source must be pinned for the GPU to read it")
    if rows.device != k_out.device:
        raise ValueError(f"gather_dequantize_rows: rows on {rows.device}, outputs on {k_out.device}")
    _check_pow2("head_dim", d)
    _check_pow2("groups", groups)
    if M == 0 or src.shape[0] == 0:
        return
    _gather_dequantize_rows[(triton.cdiv(M, block_r),)](
        src, src.view(torch.float16), rows, k_out, v_out, M, RB=row_bytes, D=d, NG=groups, KBITS=key_bits,
        VBITS=value_bits, BLOCK_R=block_r, num_warps=num_warps)


@triton.jit(do_not_specialize=["M", "K", "cols", "layer", "C"])
def _fetch_kernel(pos_ptr, want_ptr, seq_ptr, table_ptr, chunk_slab_ptr, chunk_local_ptr, slab_n_ptr, slab_addr_ptr,
                  raw_ptr, raw16_ptr, k_out, v_out, M, K, cols, layer, C,
                  H: tl.constexpr, D: tl.constexpr, QUANT: tl.constexpr, DEQUANT: tl.constexpr, RB: tl.constexpr,
                  BLOCK_B: tl.constexpr, NG: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr,
                  BLOCK_R: tl.constexpr):
    i = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    want = (tl.load(want_ptr + i, mask=i < M, other=0) != 0) & (i < M)
    i = i.to(tl.int64)
    p = tl.maximum(tl.load(pos_ptr + i, mask=want, other=0), 0)
    b = i // (H * K)
    h = (i // K) % H
    seq = tl.load(seq_ptr + b, mask=want, other=0)
    # the host tier's `rows`: chunk table -> (slab, chunk within the slab) -> the row in the slab's row view
    chunk = tl.maximum(tl.load(table_ptr + seq * cols + p // C, mask=want, other=0), 0)
    slab = tl.load(chunk_slab_ptr + chunk, mask=want, other=0)
    local = tl.load(chunk_local_ptr + chunk, mask=want, other=0)
    n = tl.load(slab_n_ptr + slab, mask=want, other=0)
    base = tl.load(slab_addr_ptr + slab, mask=want, other=0)
    dims = tl.arange(0, D)
    dst = i[:, None] * D + dims[None, :]
    if QUANT:  # rows as stored into raw (the GPU cache admits these bytes), then dequantized from there
        row = ((n * layer + local) * H + h) * C + p % C
        src = base.to(tl.pointer_type(tl.uint8)) + row * RB
        j = tl.arange(0, BLOCK_B)
        m = want[:, None] & (j < RB)[None, :]
        x = tl.load(src[:, None] + j[None, :], mask=m)
        tl.store(raw_ptr + i[:, None] * RB + j[None, :], x, mask=m)
        if DEQUANT:
            tl.debug_barrier()  # this program's rows of raw are written: read them back (device memory, not the link)
            KB: tl.constexpr = D * KBITS // 8
            VB: tl.constexpr = D * VBITS // 8
            r = tl.where(want, i, 0)
            kc = _unpack(raw_ptr, r, D, KBITS, RB, 1)
            vc = _unpack(raw_ptr + KB, r, D, VBITS, RB, 1)
            meta = (r * RB + KB + VB)[:, None] // 2 + (dims // (D // NG))[None, :]
            # rows not wanted read row 0 of raw (stale bytes): their scales load as 0, so nothing overflows
            mw = want[:, None]
            ks = tl.load(raw16_ptr + meta, mask=mw, other=0.0).to(tl.float32)
            kz = tl.load(raw16_ptr + meta + NG, mask=mw, other=0.0).to(tl.float32)
            vs = tl.load(raw16_ptr + meta + 2 * NG, mask=mw, other=0.0).to(tl.float32)
            vz = tl.load(raw16_ptr + meta + 3 * NG, mask=mw, other=0.0).to(tl.float32)
            tl.store(k_out + dst, (kc * ks + kz).to(k_out.dtype.element_ty), mask=want[:, None])
            tl.store(v_out + dst, (vc * vs + vz).to(v_out.dtype.element_ty), mask=want[:, None])
    else:  # 16-bit rows: K at row, V at row + H * C of the slab's [L * n * 2 * H * C, d] view
        row = ((n * layer + local) * 2 * H + h) * C + p % C
        src = base.to(tl.pointer_type(k_out.dtype.element_ty))
        kv = tl.load(src[:, None] + row[:, None] * D + dims[None, :], mask=want[:, None])
        tl.store(k_out + dst, kv, mask=want[:, None])
        kv = tl.load(src[:, None] + (row + H * C)[:, None] * D + dims[None, :], mask=want[:, None])
        tl.store(v_out + dst, kv, mask=want[:, None])


def fetch_positions(pos: torch.Tensor, want: torch.Tensor, seq_ids: torch.Tensor, maps: dict,
                    layer: int, chunk_tokens: int, head_dim: int, out: torch.Tensor | None,
                    raw: torch.Tensor | None = None, fmt: tuple[int, int, int] | None = None, dequantize: bool = True,
                    block_r: int = 8, num_warps: int = 4) -> None:
    """The cold tier's fetch in one launch: each wanted (sequence, KV head, position) of one layer, mapped
    to its slab row on the device (the chunk maps of `ColdTier.device_maps`) and read from that slab (a
    pinned host tensor on CUDA) by its address; rows not wanted untouched. The torch path of
    `ColdTier.fetch` (`rows`, then a gather per slab) is its reference.

    Args:
        pos: int64 [B, H, k] positions (any value where not wanted); want: bool [B, H, k]; both contiguous.
        seq_ids: int64 [B] sequence slots; maps (`ColdTier.device_maps`): "table" int64 [S, cols], "slab"
            and "local" int64 [chunks], "slab_n" int64 [slabs] (chunks a slab holds), "addr" int64 [slabs]
            (each slab's data_ptr(), its row view's first byte).
        out: [2, B, H, k, d] (K, V) contiguous: 16-bit rows in the slabs' dtype; quantized, any float dtype
            (None where a quantized fetch stops at raw: dequantize=False).
        raw: quantized tier: uint8 [B * H * k, row_bytes] contiguous, the rows as stored.
        fmt: (key_bits, value_bits, groups) of a quantized tier (None: 16-bit rows of out's dtype).
        dequantize: quantized only: False stops at raw (out untouched).
        block_r, num_warps: rows a program and its warps (sm_90, K8V4 at d=128: 8 rows on 4 warps compile to
            128 registers; 16 on 8 to 228; 32 spill. Not yet timed: benchmarks/perf/kernel_resources.py).
    Graph-safe: no allocation, no host sync.
    """
    B, H, k = pos.shape
    d = head_dim
    M = B * H * k
    quant = fmt is not None
    if out is None and not (quant and not dequantize):
        raise ValueError("fetch_positions: out is needed unless a quantized fetch stops at raw (dequantize=False)")
    if (out is not None and (out.shape != (2, B, H, k, d) or not out.is_contiguous())) or want.shape != pos.shape:
        raise ValueError(f"fetch_positions: pos/want [B, H, k] and a contiguous out [2, B, H, k, d] expected; got "
                         f"{tuple(pos.shape)}, {tuple(want.shape)}, {None if out is None else tuple(out.shape)}")
    if pos.dtype != torch.int64 or not (pos.is_contiguous() and want.is_contiguous()):
        raise ValueError("fetch_positions: pos must be contiguous int64 and want contiguous")
    _check_pow2("head_dim", d)
    if quant:
        key_bits, value_bits, groups = fmt
        _check_pow2("groups", groups)
        rb = d * (key_bits + value_bits) // 8 + 8 * groups
        if raw is None or raw.shape != (M, rb) or raw.dtype != torch.uint8 or not raw.is_contiguous():
            raise ValueError(f"fetch_positions: a quantized fetch needs raw uint8 [{M}, {rb}] contiguous")
    else:
        key_bits = value_bits = groups = 1
        rb, raw = d * out.element_size(), out  # raw unused
    if M == 0:
        return
    k_out, v_out = (raw, raw) if out is None else (out[0], out[1])  # None: not written (DEQUANT off)
    _fetch_kernel[(triton.cdiv(M, block_r),)](
        pos, want.view(torch.uint8), seq_ids, maps["table"], maps["slab"], maps["local"], maps["slab_n"], maps["addr"],
        raw, raw.view(torch.float16) if quant else raw, k_out, v_out, M, k, maps["table"].shape[1], layer,
        chunk_tokens, H=H, D=d, QUANT=quant, DEQUANT=quant and dequantize, RB=rb,
        BLOCK_B=triton.next_power_of_2(rb), NG=groups, KBITS=key_bits, VBITS=value_bits, BLOCK_R=block_r,
        num_warps=num_warps)
