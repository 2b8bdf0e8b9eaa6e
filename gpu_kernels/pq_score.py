"""Triton: PQCache's asymmetric-distance tables and scores with GQA aggregation, then top-k per KV head.

Reference: `gpu_kernels/reference.py` (`pq_tables`, `pq_scores`). `pq_tables`: one launch per step
and layer for the ADC tables (the query's sub-vectors against every centroid). Per (sequence b, KV head h):

    logit[g, t] = sum_j table[b, h*G + g, j, codes[seq_ids[b], h, t, j]]     (table is pre-scaled)
    score[t]    = sum_g exp(logit[g, t] - lse[g]),   lse[g] = logsumexp over candidates [lo_b, hi_b)

Two passes over the codes, both grid (B * Hkv, ceil(N / BLOCK_N)): pass 1 writes each block's
max and sum of exponentials per query head, torch folds them into lse [B, Hq] (tiny), pass 2
recomputes the logits (codes are m bytes per token, cheaper to re-read than logits are to
store: 4*G bytes per token) and writes the summed probabilities. Pass 2 folds pass 1's per-block
(max, sum) into each query head's lse itself (every program re-reads G x NB floats, ~2 KB), so a
step is two launches and no torch glue: at B=8, N=128K the previous torch fold (amax, exp, sum,
log, where: ~8 launches) cost more than the kernels. Outside the candidates the
score is -1; with `exclude` (tiered: the tokens the hot tier holds, attended anyway) pass 2 also
writes -1 where it is set, read where it lives ([S, Hkv, >= N], by `seq_ids`): those tokens stay in
the softmax denominators (their mass is real attention mass), only the top-k skips them. Codes are
read where they live (the store's [S, Hkv, cap, m] buffer, indexed by `seq_ids`): nothing is copied
or re-sent per step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["N", "NB", "stride_cs", "stride_ch", "stride_es", "stride_eh"])  # they vary with the candidates
def _pq_pass(table_ptr, codes_ptr, seq_ptr, lo_ptr, hi_ptr, lse_ptr, part_max_ptr, part_sum_ptr, score_ptr,
             excl_ptr, N, NB, stride_cs, stride_ch, stride_cn, stride_es, stride_eh,
             HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, M: tl.constexpr, K: tl.constexpr,
             BLOCK_N: tl.constexpr, FINAL: tl.constexpr, NBP: tl.constexpr, EXCLUDE: tl.constexpr):
    pid = tl.program_id(0)
    blk = tl.program_id(1)
    b = pid // HKV
    h = pid % HKV
    seq = tl.load(seq_ptr + b).to(tl.int64)
    lo = tl.load(lo_ptr + b)
    hi = tl.load(hi_ptr + b)
    n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.arange(0, GP)
    nmask = n < N
    cand = nmask & (n >= lo) & (n < hi)
    gmask = g < G
    acc = tl.zeros((GP, BLOCK_N), dtype=tl.float32)
    cbase = codes_ptr + seq * stride_cs + h * stride_ch + n.to(tl.int64) * stride_cn
    row = (b * HKV + h) * G + g  # query head rows of the group [GP]
    tbase = table_ptr + row.to(tl.int64) * (M * K)
    for j in tl.static_range(M):
        c = tl.load(cbase + j, mask=nmask, other=0).to(tl.int32)
        acc += tl.load(tbase[:, None] + j * K + c[None, :], mask=gmask[:, None] & nmask[None, :], other=0.0)
    valid = gmask[:, None] & cand[None, :]
    logits = tl.where(valid, acc, float("-inf"))
    if FINAL:
        # fold pass 1's per-block (max, sum) of this group's query heads here: no torch glue between passes
        nb = tl.arange(0, NBP)
        pm = gmask[:, None] & (nb < NB)[None, :]
        poff = row[:, None] * NB + nb[None, :]
        bmax = tl.load(part_max_ptr + poff, mask=pm, other=float("-inf"))
        bsum = tl.load(part_sum_ptr + poff, mask=pm, other=0.0)
        gmax = tl.max(bmax, axis=1)
        gsafe = tl.where(gmax == float("-inf"), 0.0, gmax)
        tot = tl.sum(tl.where(pm, bsum * tl.exp(bmax - gsafe[:, None]), 0.0), axis=1)
        lse = tl.where(tot > 0, gsafe + tl.log(tl.where(tot > 0, tot, 1.0)), 0.0)
        p = tl.where(valid, tl.exp(logits - lse[:, None]), 0.0)
        keep = cand
        if EXCLUDE:  # held by the hot tier: in the denominators above, never selected
            ex = tl.load(excl_ptr + seq * stride_es + h * stride_eh + n, mask=cand, other=0)
            keep = cand & (ex == 0)
        s = tl.where(keep, tl.sum(p, axis=0), -1.0)
        tl.store(score_ptr + (b * HKV + h).to(tl.int64) * N + n, s, mask=nmask)
    else:
        mx = tl.max(logits, axis=1)
        safe = tl.where(mx == float("-inf"), 0.0, mx)
        sm = tl.sum(tl.where(valid, tl.exp(logits - safe[:, None]), 0.0), axis=1)
        off = row * NB + blk
        tl.store(part_max_ptr + off, mx, mask=gmask)
        tl.store(part_sum_ptr + off, sm, mask=gmask)


@triton.jit
def _table_kernel(q_ptr, cen_ptr, seq_ptr, table_ptr, scale, stride_qb, stride_qh, stride_cs, stride_ch, stride_cj,
                  H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, M: tl.constexpr, K: tl.constexpr,
                  DSUB: tl.constexpr):
    pid = tl.program_id(0)  # one (sequence b, KV head h, sub-space j)
    j = pid % M
    h = (pid // M) % H
    b = pid // (M * H)
    seq = tl.load(seq_ptr + b).to(tl.int64)
    g = tl.arange(0, GP)
    e = tl.arange(0, DSUB)
    c = tl.arange(0, K)
    gmask = g < G
    q = tl.load(q_ptr + b * stride_qb + (h * G + g)[:, None] * stride_qh + j * DSUB + e[None, :],
                mask=gmask[:, None], other=0.0).to(tl.float32)  # [GP, DSUB]
    cen = tl.load(cen_ptr + seq * stride_cs + h * stride_ch + j * stride_cj + c[:, None] * DSUB + e[None, :])
    if DSUB >= 16:  # [GP, K]: an fp32 dot (FMA, no tensor-core rounding); GP >= 16 rows (a dot's least M)
        prod = tl.dot(q, tl.trans(cen.to(tl.float32)), input_precision="ieee")
    else:  # a dot's K must be >= 16 on a GPU (the interpreter does not check): products summed in registers
        prod = tl.sum(q[:, None, :] * cen.to(tl.float32)[None, :, :], axis=2)
    row = (b * H + h) * G + g  # the table's query-head rows [B * Hq]
    tl.store(table_ptr + (row[:, None] * M + j) * K + c[None, :], prod * scale, mask=gmask[:, None])


def pq_tables(q: torch.Tensor, centroids: torch.Tensor, seq_ids: torch.Tensor, scale: float,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """PQCache's ADC tables of the step's queries, one launch; same contract as `reference.pq_tables`
    on the batch's centroids (`centroids[seq_ids]`), which it reads where they live.

    The torch path (`torch_ops.pq_tables_out`) is five launches a layer: the batch's centroids
    gathered and widened to fp32, the queries permuted, the bmm and the scaling. The sums here run
    in the kernel's order: a table entry may differ from the bmm's in its last bits.

    Args:
        q: [B, Hq, d] the step's queries (any float dtype; head dims contiguous).
        centroids: fp16 [S, Hkv, m, K, d/m], one layer's codebooks (contiguous in its last three dims).
        seq_ids: int [B] sequence slots.
        out: optional fp32 [B, Hq, m, K] contiguous (plan-time allocation).
    Returns:
        fp32 [B, Hq, m, K]: table[b, h * G + g, j, c] = scale * q[b, h * G + g, j-th sub-vector] . centroid c.
    """
    B, Hq, d = q.shape
    S, H, m, K, dsub = centroids.shape
    if Hq % H or m * dsub != d or centroids.dtype != torch.float16 or q.stride(2) != 1 \
            or centroids.stride()[2:] != (K * dsub, dsub, 1):
        raise ValueError(f"pq_tables: q [B, Hq, d] with contiguous head dims and fp16 centroids [S, Hkv, m, K, d/m] "
                         f"contiguous in (m, K, d/m) expected; got q {tuple(q.shape)}, centroids {centroids.dtype} "
                         f"{tuple(centroids.shape)}")
    G = Hq // H
    if out is None:
        out = torch.empty(B, Hq, m, K, dtype=torch.float32, device=q.device)
    elif out.shape != (B, Hq, m, K) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"pq_tables: out must be fp32 contiguous [{B}, {Hq}, {m}, {K}], got {out.dtype} {tuple(out.shape)}")
    if B:
        _table_kernel[(B * H * m,)](q, centroids, seq_ids, out, scale, q.stride(0), q.stride(1), centroids.stride(0),
                                    centroids.stride(1), centroids.stride(2), H=H, G=G,
                                    GP=max(16, triton.next_power_of_2(G)), M=m, K=K, DSUB=dsub, num_warps=4)
    return out


def score_blocks(num_tokens: int, block_n: int | None = None) -> tuple[int, int]:
    """(tokens per program, programs per row NB) of `pq_scores` over `num_tokens` tokens: what its
    `part` buffers are sized by (a plan sizes them before any layer runs).

    Default block: 512 from 64K tokens on, else 2048 (the fastest on an H100 in
    benchmarks/perf/retrieval.py: 0.205 vs 0.326 ms at B=8, N=128K; 0.051 vs 0.086 ms at B=1, N=32K).
    """
    if block_n is None:
        block_n = 512 if num_tokens >= 65536 else 2048
    block_n = min(block_n, triton.next_power_of_2(max(num_tokens, 1)))
    return block_n, triton.cdiv(num_tokens, block_n)


def pq_scores(table: torch.Tensor, codes: torch.Tensor, seq_ids: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
              num_tokens: int, out: torch.Tensor | None = None, block_n: int | None = None,
              part: tuple[torch.Tensor, torch.Tensor] | None = None,
              exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Aggregated PQ scores; same contract as `reference.pq_scores`.

    Args:
        table: fp32 [B, Hq, m, K] contiguous (`reference.pq_tables`).
        codes: uint8 [S, Hkv, cap, m], last dim contiguous; cap >= num_tokens.
        seq_ids: int [B]; lo, hi: int32/int64 [B] candidate range per sequence.
        out: optional fp32 [B, Hkv, num_tokens] contiguous buffer (plan-time allocation).
        block_n: tokens per program; default from `score_blocks`.
        part: optional fp32 (max, sum) buffers [B, Hq, NB] contiguous of the passes' per-block
            partials, NB from `score_blocks(num_tokens, block_n)`; with `out` and `part` given,
            nothing is allocated (the decode run of KVStore).
        exclude: optional bool [S, Hkv, >= num_tokens], last dim contiguous, by sequence slot: tokens
            scored -1 though inside the candidates (still in the softmax denominators).
    Returns:
        fp32 [B, Hkv, num_tokens], -1 outside the candidates (and where `exclude` is set).
    """
    B, Hq, M, K = table.shape
    S, Hkv, cap, m = codes.shape
    if m != M or Hq % Hkv or codes.dtype != torch.uint8 or table.dtype != torch.float32 or not table.is_contiguous():
        raise ValueError(f"pq_scores: table fp32 contiguous [B, Hq, m, K] and codes uint8 [S, Hkv, cap, m] with Hq % Hkv == 0 "
                         f"expected; got table {table.dtype} {tuple(table.shape)}, codes {codes.dtype} {tuple(codes.shape)}")
    if codes.stride(3) != 1 or num_tokens > cap:
        raise ValueError(f"pq_scores: codes need a contiguous last dim and cap {cap} >= num_tokens {num_tokens}")
    for name, t in (("codes", codes), ("seq_ids", seq_ids), ("lo", lo), ("hi", hi)):
        if t.device != table.device:
            raise ValueError(f"pq_scores: {name} is on {t.device}, table on {table.device}")
    if exclude is not None and (exclude.dtype != torch.bool or exclude.dim() != 3 or exclude.shape[1] != Hkv
                                or exclude.shape[0] < S or exclude.shape[2] < num_tokens or exclude.stride(2) != 1
                                or exclude.device != table.device):
        raise ValueError(f"pq_scores: exclude must be bool [>= {S}, {Hkv}, >= {num_tokens}] with a contiguous last "
                         f"dim on {table.device}, got {exclude.dtype} {tuple(exclude.shape)} on {exclude.device}")
    G = Hq // Hkv
    if out is None:
        out = torch.empty(B, Hkv, num_tokens, dtype=torch.float32, device=table.device)
    elif out.shape != (B, Hkv, num_tokens) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"pq_scores: out must be fp32 contiguous [{B}, {Hkv}, {num_tokens}], got {out.dtype} {tuple(out.shape)}")
    if num_tokens == 0:
        return out
    block_n, NB = score_blocks(num_tokens, block_n)
    if part is None:
        part_max = torch.empty(B, Hq, NB, dtype=torch.float32, device=table.device)
        part_sum = torch.empty_like(part_max)
    else:
        part_max, part_sum = part
        for t in part:
            if t.shape != (B, Hq, NB) or t.dtype != torch.float32 or not t.is_contiguous() or t.device != table.device:
                raise ValueError(f"pq_scores: part buffers must be fp32 contiguous [{B}, {Hq}, {NB}] on "
                                 f"{table.device}, got {t.dtype} {tuple(t.shape)} on {t.device}")
    grid = (B * Hkv, NB)
    GP = triton.next_power_of_2(G)
    NBP = triton.next_power_of_2(NB)
    args = (codes, seq_ids, lo, hi)
    excl = exclude.view(torch.uint8) if exclude is not None else codes  # (unread without EXCLUDE)
    strides = (num_tokens, NB, codes.stride(0), codes.stride(1), codes.stride(2), excl.stride(0), excl.stride(1))
    meta = dict(HKV=Hkv, G=G, GP=GP, M=M, K=K, BLOCK_N=block_n, NBP=NBP)
    _pq_pass[grid](table, *args, part_max, part_max, part_sum, out, excl, *strides, FINAL=False, EXCLUDE=False, **meta)
    _pq_pass[grid](table, *args, part_max, part_max, part_sum, out, excl, *strides, FINAL=True,
                   EXCLUDE=exclude is not None, **meta)
    return out


def pq_topk(scores: torch.Tensor, k: int, out: tuple[torch.Tensor, torch.Tensor] | None = None,
            sorted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k per (sequence, KV head) of `pq_scores`' output: (values fp32, token indices int64) [B, Hkv, k].

    A selected entry is a real candidate iff its value >= 0.
    """
    if out is not None:
        return torch.topk(scores, k, dim=-1, sorted=sorted, out=out)
    return torch.topk(scores, k, dim=-1, sorted=sorted)
