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
Reference: `gpu_kernels/reference.py::gather_rows`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
