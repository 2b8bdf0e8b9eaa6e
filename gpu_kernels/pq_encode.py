"""Triton: the decode step's new key coded by its nearest centroids and written into the PQ codes, one launch.

Reference: `gpu_kernels/reference.py` (`pq_encode`). Per (sequence b, KV head h, sub-space j):

    code = argmin_c sum_e (k_new[b, h, j*dsub + e] - centroids[seq_ids[b], h, j, c, e])^2
    codes[seq_ids[b], h, positions[b], j] = code

The torch path (`PQCacheSelector.append` where Triton does not run) is nine launches a layer: the
batch's centroids gathered and widened to fp32, the differences, squares, sums, argmin, the cast
and the scatter. Here one program per (b, h, j) reads its K x dsub fp16 centroids where they live
(the store's [S, Hkv, m, K, dsub] buffer, indexed by `seq_ids`) and writes one byte.
The distances are fp32 sums in the kernel's order: a key at (nearly) equal distance from two
centroids may take the other one than torch's sum would (ties go to the lower index in both).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _encode_kernel(k_ptr, cen_ptr, seq_ptr, pos_ptr, codes_ptr,
                   stride_xb, stride_xh, stride_cs, stride_ch, stride_cj, stride_ks, stride_kh, stride_kn,
                   H: tl.constexpr, M: tl.constexpr, K: tl.constexpr, DSUB: tl.constexpr):
    pid = tl.program_id(0)
    j = pid % M
    h = (pid // M) % H
    b = pid // (M * H)
    seq = tl.load(seq_ptr + b).to(tl.int64)
    pos = tl.load(pos_ptr + b).to(tl.int64)
    e = tl.arange(0, DSUB)
    c = tl.arange(0, K)
    x = tl.load(k_ptr + b * stride_xb + h * stride_xh + j * DSUB + e).to(tl.float32)
    cen = tl.load(cen_ptr + seq * stride_cs + h * stride_ch + j * stride_cj + c[:, None] * DSUB + e[None, :])
    diff = cen.to(tl.float32) - x[None, :]
    dist = tl.sum(diff * diff, axis=1)  # [K]
    code = tl.argmin(dist, axis=0, tie_break_left=True)
    tl.store(codes_ptr + seq * stride_ks + h * stride_kh + pos * stride_kn + j, code.to(tl.uint8))


def pq_encode(k_new: torch.Tensor, centroids: torch.Tensor, seq_ids: torch.Tensor, positions: torch.Tensor,
              codes: torch.Tensor) -> None:
    """Code each (sequence, KV head)'s new key and store it at its position.

    Args:
        k_new: [B, Hkv, d] the step's keys (any float dtype; head dims contiguous, read at their strides).
        centroids: fp16 [S, Hkv, m, K, d/m], one layer's codebooks (contiguous in its last three dims).
        seq_ids: int [B] sequence slots; positions: int [B] the new token's position per sequence.
        codes: uint8 [S, Hkv, cap, m], one layer's codes (last dim contiguous); written in place.
    Allocates nothing and never syncs the host.
    """
    B, H, d = k_new.shape
    S, Hc, m, K, dsub = centroids.shape
    if Hc != H or m * dsub != d or codes.shape[1] != H or codes.shape[3] != m:
        raise ValueError(f"pq_encode: keys {tuple(k_new.shape)}, centroids {tuple(centroids.shape)} and codes "
                         f"{tuple(codes.shape)} disagree")
    if centroids.dtype != torch.float16 or codes.dtype != torch.uint8:
        raise ValueError(f"pq_encode: fp16 centroids and uint8 codes, not {centroids.dtype} / {codes.dtype}")
    if centroids.stride()[2:] != (K * dsub, dsub, 1) or codes.stride(3) != 1 or k_new.stride(2) != 1:
        raise ValueError("pq_encode: centroids contiguous in (m, K, dsub), codes in m and keys in d")
    if B == 0:
        return
    _encode_kernel[(B * H * m,)](k_new, centroids, seq_ids, positions, codes, k_new.stride(0), k_new.stride(1),
                                 centroids.stride(0), centroids.stride(1), centroids.stride(2),
                                 codes.stride(0), codes.stride(1), codes.stride(2),
                                 H=H, M=m, K=K, DSUB=dsub, num_warps=4)
