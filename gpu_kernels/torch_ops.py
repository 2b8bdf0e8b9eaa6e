"""The allocation-free torch ops the store runs in production beside the Triton kernels.

Each writes into buffers taken at plan time (a `Workspace`), so a decode step allocates nothing
and syncs nothing: the 16-bit hot tier's decode attention, the attention of retrieved tokens and
its log-sum-exp merge with the hot tier's, PQ's lookup tables, the oracle's scores, and the
no-copy views of a quantized page pool. Each is tested bit for bit against its naive version in
`reference.py` (tests/test_decode_allocations.py); nothing here imports `reference`.
"""

from __future__ import annotations

import torch


def decode_attention_buffers(take, B: int, Hq: int, Hkv: int, N: int, d: int, kv_fp32: bool) -> dict:
    """Buffers of `decode_attention_out`; take(name, shape, dtype) -> tensor (a plan-time workspace)."""
    f32 = torch.float32
    G = Hq // Hkv
    ws = {
        "qf": take("qf", (B, Hkv, G, d), f32),
        "logits": take("logits", (B, Hkv, G, N), f32),
        "lse": take("lse", (B, Hkv, G), f32),
        "safe": take("safe", (B, Hkv, G), f32),
        "out": take("out", (B, Hkv, G, d), f32),
    }
    if not kv_fp32:  # the fp32 upcasts of K and V
        ws["kf"] = take("kf", (B, Hkv, N, d), f32)
        ws["vf"] = take("vf", (B, Hkv, N, d), f32)
    return ws


def decode_attention_out(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, invalid: torch.Tensor, scale: float,
                         ws: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference.decode_attention` (no probs) into `decode_attention_buffers` ws: no allocation.

    q [B, Hq, d] any float; k, v [B, Hkv, N, d] fp32 contiguous or, with ws["kf"], any float;
    invalid bool [B, Hkv, N] = ~valid. Returns views of ws: out fp32 [B, Hq, d], lse fp32 [B, Hq].
    """
    B, Hq, d = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    qf, logits, lse, safe, out = ws["qf"], ws["logits"], ws["lse"], ws["safe"], ws["out"]
    qf.view(B, Hq, d).copy_(q)
    kf = ws["kf"].copy_(k) if "kf" in ws else k
    vf = ws["vf"].copy_(v) if "vf" in ws else v
    torch.bmm(qf.view(B * Hkv, G, d), kf.view(B * Hkv, N, d).transpose(1, 2), out=logits.view(B * Hkv, G, N))
    logits.mul_(scale)
    inv = invalid.unsqueeze(2)
    logits.masked_fill_(inv, float("-inf"))
    torch.logsumexp(logits, -1, out=lse)
    torch.nan_to_num(lse, nan=0.0, posinf=0.0, neginf=0.0, out=safe)
    probs = torch.sub(logits, safe.unsqueeze(-1), out=logits).exp_().masked_fill_(inv, 0.0)
    torch.bmm(probs.view(B * Hkv, G, N), vf.view(B * Hkv, N, d), out=out.view(B * Hkv, G, d))
    return out.view(B, Hq, d), lse.view(B, Hq)


def merge_attention_buffers(take, B: int, Hq: int, d: int) -> dict:
    """Buffers of `merge_attention_out`; take(name, shape, dtype) -> tensor."""
    f32 = torch.float32
    ws = {name: take(name, (B, Hq), f32) for name in ("lse", "safe", "wa", "wb", "abs")}
    ws.update({name: take(name, (B, Hq), torch.bool) for name in ("nf", "nan")})
    ws.update({name: take(name, (B, Hq, d), f32) for name in ("oa", "ob", "out")})
    return ws


def _not_finite(x: torch.Tensor, ws: dict) -> torch.Tensor:
    """~isfinite(x) into ws["nf"] (isfinite has no out= variant): |x| == inf or x != x."""
    torch.eq(torch.abs(x, out=ws["abs"]), float("inf"), out=ws["nf"])
    return ws["nf"].logical_or_(torch.ne(x, x, out=ws["nan"]))


def merge_attention_out(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor,
                        ws: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference.merge_attention` of fp32 [B, Hq, d] / [B, Hq] inputs into `merge_attention_buffers` ws."""
    lse = torch.logaddexp(lse_a, lse_b, out=ws["lse"])
    safe = torch.nan_to_num(lse, nan=0.0, posinf=0.0, neginf=0.0, out=ws["safe"])
    wa = torch.sub(lse_a, safe, out=ws["wa"]).exp_().masked_fill_(_not_finite(lse_a, ws), 0.0)
    wb = torch.sub(lse_b, safe, out=ws["wb"]).exp_().masked_fill_(_not_finite(lse_b, ws), 0.0)
    torch.mul(out_a, wa.unsqueeze(-1), out=ws["oa"])
    torch.mul(out_b, wb.unsqueeze(-1), out=ws["ob"])
    return torch.add(ws["oa"], ws["ob"], out=ws["out"]), lse


def page_views(data: torch.Tensor, tokens_per_page: int, key_bytes: int, value_bytes: int, groups: int):
    """No-copy views of a quantized page pool uint8 [P, page_bytes] (kvstore/hot/quantization.py layout).

    Returns K codes uint8 [P, T, kB] (token-major), V codes uint8 [P, T, vB] (a transposed view: in
    the page, V bytes are stored byte-major, [vB, T], so the T tokens of one value byte are
    contiguous), meta fp16 [P, T, 4, groups] (k scale, k zero, v scale, v zero).
    """
    T, kB, vB = tokens_per_page, key_bytes, value_bytes
    P = data.shape[0]
    kc = data[:, : T * kB].view(P, T, kB)
    vc = data[:, T * kB: T * (kB + vB)].view(P, vB, T).transpose(1, 2)
    mo = T * (kB + vB)
    meta = data[:, mo: mo + T * 8 * groups].view(torch.float16).view(P, T, 4, groups)
    return kc, vc, meta


def pq_tables_out(q: torch.Tensor, centroids: torch.Tensor, scale: float, qperm: torch.Tensor, prod: torch.Tensor,
                  table: torch.Tensor) -> torch.Tensor:
    """`reference.pq_tables` into caller buffers, bit for bit (the bmm its einsum dispatches to): centroids fp32
    [B, Hkv, m, K, d/m] contiguous; qperm fp32 [B, Hkv, m, G, d/m], prod fp32 [B * Hkv * m, G, K];
    returns table fp32 [B, Hq, m, K] (contiguous, written)."""
    B, Hq, d = q.shape
    Hkv, m, K, dsub = centroids.shape[1:]
    G = Hq // Hkv
    qperm.copy_(q.reshape(B, Hkv, G, m, dsub).permute(0, 1, 3, 2, 4))
    torch.bmm(qperm.view(B * Hkv * m, G, dsub), centroids.view(B * Hkv * m, K, dsub).transpose(1, 2), out=prod)
    torch.mul(prod.view(B, Hkv, m, G, K).permute(0, 1, 3, 2, 4), scale, out=table.view(B, Hkv, G, m, K))
    return table


def group_softmax_scores_out(logits: torch.Tensor, invalid: torch.Tensor, num_kv_heads: int, lse: torch.Tensor,
                             out: torch.Tensor) -> torch.Tensor:
    """`reference.group_softmax_scores` into caller buffers, bit for bit: logits fp32 [B, Hq, N] (overwritten),
    invalid bool [B, 1, N] (= ~valid), lse fp32 [B, Hq, 1]; returns out fp32 [B, Hkv, N]."""
    B, Hq, N = logits.shape
    lg = logits.masked_fill_(invalid, float("-inf"))
    torch.logsumexp(lg, -1, keepdim=True, out=lse)
    torch.nan_to_num(lse, nan=0.0, posinf=0.0, neginf=0.0, out=lse)
    p = torch.sub(lg, lse, out=lg).exp_().masked_fill_(invalid, 0.0)
    torch.sum(p.view(B, num_kv_heads, Hq // num_kv_heads, N), 2, out=out)
    return out.masked_fill_(invalid, -1.0)
