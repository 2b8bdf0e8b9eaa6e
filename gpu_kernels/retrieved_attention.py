"""Triton: the retrieved tokens' decode attention and its log-sum-exp merge with the hot tier's result,
in two launches.

Reference: `reference.decode_attention` then `reference.merge_attention` (the CPU path runs their
allocation-free twins, `torch_ops.decode_attention_out` and `torch_ops.merge_attention_out`). Where
the retrieved tokens are not attended in the hot tier's own launch (retrieval_attention="merge", the
default), a layer of pqcache or tiered attends the step's selection — K/V rows [B, Hkv, k, d] of the
hits and the fetched misses, a validity mask — and merges it with the hot tier's (out, lse). In torch
that is 31 small ops a layer (the fp32 upcasts, two bmm, the masked softmax, the merge's eleven ops
and its non-finite guards): about a thousand kernels of a 32-layer step, each a few microseconds of a
captured graph on an H200 (results/h200_graphs/call3: tiered's step launched 8,320 kernels, quant's
1,555). Here:

  1. `_retrieved_split_kernel`, one program per (sequence, KV head, split): the whole query group
     against a split of the head's selected rows, an online softmax (exp2), a partial output
     normalized over the split and its natural-log lse (-inf for a split without a valid row).
  2. `_merge_hot_kernel`, one program per (sequence, query head): the hot tier's (out, lse) and the
     splits' partials, weighted by exp(lse - max) (zero for -inf); writes the output in the
     caller's dtype (the store's per-layer output buffer: no copy after) and the merged lse (the
     LeanKV policy's `lse_all`, read at the next plan).

Transposed as the paged kernels (gpu_kernels/paged_attention.py): S^T = K Q^T [rows, BLOCK_G],
O^T += V^T P^T [D, BLOCK_G]. Invalid rows load as zeros (a stale row's NaN never reaches P @ V) and
score -inf. A (sequence, query head) with no valid token anywhere gets out 0 and lse -inf, as the
reference. fp32 operands and "ieee" dots where K/V or the query are fp32, and for bf16 in the
interpreter (its bf16 dot is wrong); else tensor-core dots in the rows' dtype, P rounded to it.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from gpu_kernels.paged_attention import LOG2E, softmax_step, store_split

#: rows of K/V a loop step, warps, and programs per SM the split count aims at. Not yet timed on a GPU; compiled
#: for sm_90 at d=128, G=4 (benchmarks/perf/kernel_resources.py): 32 rows on 8 warps take 97 registers (bf16
#: rows; fp32 194), two programs an SM; on 4 warps 207 (fp32: 255 and a 64-byte spill); 64 rows spill at fp32
RETRIEVED_LAUNCH = dict(block_rows=32, num_warps=8, num_stages=2, programs_per_sm=2)


@triton.jit(do_not_specialize=["N", "rows_per_split", "stride_qb", "stride_qh"])
def _retrieved_split_kernel(q_ptr, k_ptr, v_ptr, valid_ptr, part_out_ptr, part_lse_ptr,
                            N, rows_per_split, scale_log2, stride_qb, stride_qh,
                            HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                            BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    g = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, D)
    gmask = g < G
    q = tl.load(q_ptr + b * stride_qb + (h * G + g)[:, None] * stride_qh + dims[None, :], mask=gmask[:, None],
                other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    else:
        q = q.to(k_ptr.dtype.element_ty)
    q = tl.trans(q)  # Q^T [D, BLOCK_G]
    base = bh.to(tl.int64) * N
    r0 = split * rows_per_split
    r1 = tl.minimum(r0 + rows_per_split, N)
    acc = tl.zeros((D, BLOCK_G), dtype=tl.float32)  # O^T
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_t = tl.zeros((BLOCK_N, BLOCK_G), dtype=tl.float32)  # the denominator per row, summed after the loop
    rows = tl.arange(0, BLOCK_N)
    for start in range(r0, r1, BLOCK_N):
        i = start + rows
        inside = i < r1
        ok = tl.load(valid_ptr + base + i, mask=inside, other=0) != 0
        off = (base + i) * D
        k = tl.load(k_ptr + off[:, None] + dims[None, :], mask=ok[:, None], other=0.0)
        vt = tl.load(v_ptr + off[None, :] + dims[:, None], mask=ok[None, :], other=0.0)  # V^T [D, rows]
        acc, m_i, l_t = softmax_step(acc, m_i, l_t, k, vt, q, ok, scale_log2, DOT_F32)
    row = (b * HKV * G + h * G + g) * tl.num_programs(1) + split
    store_split(part_out_ptr, part_lse_ptr, acc, l_t, m_i, row, dims, gmask, D)


@triton.jit(do_not_specialize=["nsplit", "stride_hb", "stride_hh", "stride_ob", "stride_oh"])
def _merge_hot_kernel(hot_out_ptr, hot_lse_ptr, part_out_ptr, part_lse_ptr, out_ptr, lse_ptr, nsplit,
                      stride_hb, stride_hh, stride_ob, stride_oh,
                      HQ: tl.constexpr, BLOCK_S: tl.constexpr, D: tl.constexpr):
    r = tl.program_id(0)  # the (sequence, query head) row
    b = r // HQ
    hq = r % HQ
    s = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, D)
    smask = s < nsplit
    lse_h = tl.load(hot_lse_ptr + r)
    lse_s = tl.load(part_lse_ptr + r * nsplit + s, mask=smask, other=float("-inf"))
    m = tl.maximum(lse_h, tl.max(lse_s, axis=0))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w_h = tl.where(lse_h == float("-inf"), 0.0, tl.exp(lse_h - m_safe))
    w_s = tl.where(lse_s == float("-inf"), 0.0, tl.exp(lse_s - m_safe))
    total = w_h + tl.sum(w_s, axis=0)
    t_safe = tl.where(total > 0, total, 1.0)
    o_h = tl.load(hot_out_ptr + b * stride_hb + hq * stride_hh + dims).to(tl.float32)
    parts = tl.load(part_out_ptr + (r * nsplit + s)[:, None] * D + dims[None, :], mask=smask[:, None], other=0.0)
    out = (o_h * w_h + tl.sum(parts * w_s[:, None], axis=0)) / t_safe
    tl.store(out_ptr + b * stride_ob + hq * stride_oh + dims, out.to(out_ptr.dtype.element_ty))
    tl.store(lse_ptr + r, tl.where(total > 0, m_safe + tl.log(t_safe), float("-inf")))


@functools.lru_cache(maxsize=None)
def _sms(device: str) -> int:
    """SMs of a CUDA device (4 elsewhere: the interpreter's split count stays small)."""
    dev = torch.device(device)
    return torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4


def choose_splits(batch: int, num_kv_heads: int, rows: int, device: torch.device | str = "cpu") -> int:
    """Splits of each (sequence, KV head)'s `rows` selected tokens: about RETRIEVED_LAUNCH's
    programs_per_sm programs an SM, whole loop steps a split (one split for a short selection)."""
    steps = -(-max(rows, 1) // RETRIEVED_LAUNCH["block_rows"])
    want = max(1, RETRIEVED_LAUNCH["programs_per_sm"] * _sms(str(torch.device(device))) // max(1, batch * num_kv_heads))
    return int(max(1, min(steps, want, 256)))


def retrieved_buffers(take, B: int, Hq: int, Hkv: int, rows: int, d: int, device: torch.device | str) -> dict:
    """Plan-time buffers of `retrieved_attention_merge` (take(name, shape, dtype) -> a workspace view):
    the splits' partials and the merged lse where the caller has no lse buffer of its own."""
    nsplit = choose_splits(B, Hkv, rows, device)
    f32 = torch.float32
    return {"part_out": take("part_out", (B, Hq, nsplit, d), f32), "part_lse": take("part_lse", (B, Hq, nsplit), f32),
            "lse": take("lse", (B, Hq), f32), "out": take("out", (B, Hq, d), f32)}


def retrieved_attention_merge(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scale: float,
                              hot_out: torch.Tensor, hot_lse: torch.Tensor, ws: dict,
                              out: torch.Tensor | None = None, lse: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over the retrieved rows merged with the hot tier's result, in two launches.

    Args:
        q: [B, Hq, d] bf16/fp16/fp32, last stride 1; d a power of two >= 16.
        k, v: [B, Hkv, N, d] contiguous, one float dtype: the selection's rows (any bytes where invalid).
        valid: bool [B, Hkv, N] contiguous: which rows each KV head attends.
        hot_out: [B, Hq, d] (last stride 1, any float dtype), hot_lse fp32 [B, Hq] contiguous: the hot
            tier's attention over its own tokens (lse -inf: none).
        ws: `retrieved_buffers` of the same B, Hq, Hkv, N, d.
        out: [B, Hq, d] (last stride 1, any float dtype) to write; None: ws["out"] (fp32).
        lse: fp32 [B, Hq] contiguous to write; None: ws["lse"].
    Returns (out, lse), equal to `reference.merge_attention(hot_out, hot_lse,
    *reference.decode_attention(q, k, v, valid, scale)[:2])` up to fp32 rounding. Graph-safe:
    allocates nothing, syncs nothing.
    """
    B, Hq, d = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} not a multiple of KV heads {Hkv}")
    if d & (d - 1) or d < 16:
        raise ValueError(f"head dim {d} must be a power of two >= 16 for the retrieved-attention kernel")
    if k.shape != (B, Hkv, N, d) or v.shape != k.shape or valid.shape != (B, Hkv, N):
        raise ValueError(f"k {tuple(k.shape)}, v {tuple(v.shape)}, valid {tuple(valid.shape)}: want [B, Hkv, N, d] "
                         f"and [B, Hkv, N] for q {tuple(q.shape)}")
    if k.dtype != v.dtype or not (k.is_contiguous() and v.is_contiguous() and valid.is_contiguous()):
        raise ValueError("k and v need one dtype and, with valid, a contiguous layout")
    if q.stride(-1) != 1 or hot_out.stride(-1) != 1 or hot_out.shape != (B, Hq, d):
        raise ValueError("q and hot_out need a last stride of 1 and hot_out the shape [B, Hq, d]")
    out = ws["out"] if out is None else out
    lse = ws["lse"] if lse is None else lse
    if out.shape != (B, Hq, d) or out.stride(-1) != 1 or lse.shape != (B, Hq) or not lse.is_contiguous():
        raise ValueError(f"out {tuple(out.shape)} / lse {tuple(lse.shape)}: want [B, Hq, d] (last stride 1) / [B, Hq]")
    part_out, part_lse = ws["part_out"], ws["part_lse"]
    nsplit = part_out.shape[2]
    if part_out.shape != (B, Hq, nsplit, d) or part_lse.shape != (B, Hq, nsplit):
        raise ValueError(f"part_out {tuple(part_out.shape)} / part_lse {tuple(part_lse.shape)}: want [B, Hq, NSPLIT, d]")
    hot_lse = hot_lse.contiguous()
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    dot_f32 = k.dtype == torch.float32 or q.dtype != k.dtype or (interpret and k.dtype == torch.bfloat16)
    G = Hq // Hkv
    block = RETRIEVED_LAUNCH["block_rows"]
    per_split = -(-max(N, 1) // (nsplit * block)) * block
    _retrieved_split_kernel[(B * Hkv, nsplit)](
        q, k, v, valid.view(torch.uint8), part_out, part_lse, N, per_split, scale * LOG2E, q.stride(0), q.stride(1),
        HKV=Hkv, G=G, BLOCK_G=max(16, triton.next_power_of_2(G)), D=d, BLOCK_N=block, DOT_F32=dot_f32,
        num_warps=RETRIEVED_LAUNCH["num_warps"], num_stages=RETRIEVED_LAUNCH["num_stages"],
    )
    _merge_hot_kernel[(B * Hq,)](
        hot_out, hot_lse, part_out, part_lse, out, lse, nsplit,
        hot_out.stride(0), hot_out.stride(1), out.stride(0), out.stride(1),
        HQ=Hq, BLOCK_S=triton.next_power_of_2(nsplit), D=d,
    )
    return out, lse
