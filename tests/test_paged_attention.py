"""Triton decode attention over paged KV (quantized pages, and pages in the model's dtype) vs its pure-torch
references (interpreter on CPU)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from gpu_kernels import reference
from gpu_kernels.paged_attention import (DEFAULT_LAUNCH, FULL_LAUNCH, merge_splits, paged_decode_attention,
                                         paged_decode_attention_full)
from kvstore.hot.page_format import FullFormat
from kvstore.hot.quantization import QuantFormat

#: where the kernels run: the GPU where Triton compiles (TRITON_INTERPRET unset or 0), else the CPU (interpreter)
_DEV = "cuda" if torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET", "0") in ("", "0") \
    else "cpu"


def _layout(B, Hkv, d, n_high, n_low, tpp, groups, seed, holes=True, high_holes=False):
    """A pool with per-head high pages (left) and low pages (right), random K/V, some empty low slots.

    The high tier has no empty slot below num_high, as in KVStore (what the kernel's HIGH_DENSE, on
    in DEFAULT_LAUNCH, relies on); `high_holes` empties slot 2 of every high page holding 4+ tokens
    (only the high_dense=False kernel masks them)."""
    g = torch.Generator().manual_seed(seed)
    hi, lo = QuantFormat(8, 4, d, torch.bfloat16, groups), QuantFormat(4, 2, d, torch.bfloat16, groups)
    page_bytes = hi.bytes_per_token * tpp
    t_low = lo.tokens_per_page(page_bytes)
    C = math.ceil(max(n_high) / tpp) + math.ceil(max(n_low) / t_low) + 1
    P = B * Hkv * C + 1
    data = torch.zeros(P, page_bytes, dtype=torch.uint8)
    slot_pos = torch.full((P, max(tpp, t_low)), -1, dtype=torch.int32)
    pages = torch.zeros(B, 1, Hkv, C, dtype=torch.int32)
    num_high = torch.zeros(B, 1, Hkv, dtype=torch.int32)
    num_low_pages = torch.zeros_like(num_high)
    nxt = 1
    for b in range(B):
        for h in range(Hkv):
            num_high[b, 0, h] = n_high[b]
            for col in range(math.ceil(n_high[b] / tpp)):
                cnt = min(tpp, n_high[b] - col * tpp)
                pages[b, 0, h, col] = nxt
                hi.write(data, torch.full((cnt,), nxt), torch.arange(cnt), torch.randn(cnt, d, generator=g) * 2,
                         torch.randn(cnt, d, generator=g))
                slot_pos[nxt, :cnt] = torch.arange(cnt)
                if high_holes and cnt > 3:
                    slot_pos[nxt, 2] = -1
                nxt += 1
            num_low_pages[b, 0, h] = math.ceil(n_low[b] / t_low)
            for j in range(num_low_pages[b, 0, h]):
                cnt = min(t_low, n_low[b] - j * t_low)
                pages[b, 0, h, C - 1 - j] = nxt
                lo.write(data, torch.full((cnt,), nxt), torch.arange(cnt), torch.randn(cnt, d, generator=g),
                         torch.randn(cnt, d, generator=g))
                slot_pos[nxt, :cnt] = torch.arange(cnt) + 10_000
                if holes and cnt > 2:
                    slot_pos[nxt, 1] = -1  # a pruned token: never attended
                nxt += 1
    return data, pages, num_high, num_low_pages, slot_pos, t_low


def _with_retrieved(data, slot_pos, B, Hkv, d, tpp, groups, nrp, seed):
    """The pool grown by nrp retrieved high-format pages per (batch row, KV head), and ret_pages int32 [B, Hkv, nrp].

    Some slots are masked (slot_pos -1): a random third of them, the unused tail of each head's last
    page (a selection narrower than nrp * tpp), and every slot of batch row 1's last head, whose picks
    are all page 0 (no token: an invalid pick)."""
    g = torch.Generator().manual_seed(seed)
    hi = QuantFormat(8, 4, d, torch.bfloat16, groups)
    P = data.shape[0]
    n = B * Hkv * nrp
    data = torch.cat([data, torch.zeros(n, data.shape[1], dtype=torch.uint8)])
    ids = torch.arange(P, P + n)
    hi.write(data, ids.repeat_interleave(tpp), torch.arange(tpp).repeat(n), torch.randn(n * tpp, d, generator=g) * 2,
             torch.randn(n * tpp, d, generator=g))
    pos = torch.arange(n * tpp, dtype=torch.int32).view(n, tpp) + 20_000
    pos[torch.rand(n, tpp, generator=g) < 1 / 3] = -1
    pos.view(B, Hkv, nrp, tpp)[:, :, -1, tpp // 2:] = -1
    slot_pos = torch.cat([slot_pos, torch.full((n, slot_pos.shape[1]), -1, dtype=torch.int32)])
    slot_pos[P:, :tpp] = pos
    ret_pages = ids.to(torch.int32).view(B, Hkv, nrp).clone()
    ret_pages[1, -1] = 0
    return data, slot_pos, ret_pages


def _run(q, data, pages, num_high, num_low_pages, slot_pos, tpp, t_low, groups, nsplit, with_low=True, emit=True,
         ret_pages=None, **launch):
    B, Hq, d = q.shape
    C = pages.shape[-1]
    vmax = int((num_high.long() + tpp - 1).div(tpp, rounding_mode="floor").add(num_low_pages).max())
    vmax += ret_pages.shape[2] if ret_pages is not None else 0  # the splits cover the retrieved pages too
    pps = max(1, math.ceil(vmax / nsplit))
    nsplit = max(1, math.ceil(vmax / pps))
    dev = _DEV  # the kernel on the GPU where Triton compiles, else in the interpreter; the reference on the CPU
    out = torch.full((B, Hq, d), float("nan"), device=dev)  # poisoned: every element must be written
    lse = torch.full((B, Hq), float("nan"), device=dev)
    po, pl = torch.empty(B, Hq, nsplit, d, device=dev), torch.empty(B, Hq, nsplit, device=dev)
    slots = max(tpp, t_low) if with_low else tpp
    logits = torch.full((B, Hq, C, slots), float("-inf"), device=dev) if emit else None
    low = (4, 2, t_low) if with_low else None
    paged_decode_attention(q.to(dev), data.to(dev), pages.to(dev), num_high.to(dev),
                           num_low_pages.to(dev) if with_low else None, torch.arange(B, device=dev), 0,
                           slot_pos.to(dev), (8, 4, tpp), low, groups, q.shape[-1] ** -0.5, out, lse, po, pl, pps,
                           logits, ret_pages=ret_pages.to(dev) if ret_pages is not None else None, **launch)
    out, lse, logits = out.cpu(), lse.cpu(), logits.cpu() if emit else None
    dense = DEFAULT_LAUNCH["high_dense"] if launch.get("high_dense") is None else launch["high_dense"]
    ref = reference.paged_decode_attention(q, data, pages[:, 0], num_high[:, 0], num_low_pages[:, 0] if with_low
                                           else torch.zeros_like(num_high[:, 0]), slot_pos, (8, 4, tpp), low, groups,
                                           q.shape[-1] ** -0.5, high_dense=dense, ret_pages=ret_pages)
    return (out, lse, logits), ref


def _rel_rms(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _assert_matches(kernel, reference, note=""):
    """The kernel's (out, lse, logits) against the reference's: rel. RMS < 1e-3 on the output, the lse,
    and the emitted logits finite exactly where the reference's are and close there."""
    (out, lse, logits), (r_out, r_lse, r_logits) = kernel, reference
    assert _rel_rms(out, r_out) < 1e-3, note  # observed 1e-7 (fp32) to 2e-4 (16-bit queries)
    torch.testing.assert_close(lse, r_lse, rtol=1e-5, atol=1e-4)
    fin = torch.isfinite(r_logits)
    assert torch.equal(torch.isfinite(logits), fin)
    torch.testing.assert_close(logits[fin], r_logits[fin], rtol=1e-4, atol=1e-3)


CASES = [
    # tokens, low tokens, tpp (page size +-1 around 8), G, d, groups, dtype
    (1, 0, 8, 1, 64, 1, torch.bfloat16),
    (17, 0, 7, 4, 64, 1, torch.bfloat16),
    (97, 0, 9, 8, 128, 1, torch.float16),
    (17, 23, 8, 4, 128, 1, torch.bfloat16),
    (97, 5, 7, 1, 64, 2, torch.float32),
    (1, 61, 9, 8, 64, 4, torch.bfloat16),
    (33, 1, 8, 4, 128, 2, torch.float32),
    (21, 30, 8, 4, 16, 1, torch.bfloat16),  # d=16: K4 key halves of 8, one dot over the joined halves
    (9, 12, 8, 2, 16, 1, torch.float32),
]


@pytest.mark.parametrize("n_high,n_low,tpp,G,d,groups,dtype", CASES,
                         ids=[f"n{c[0]}+{c[1]}-t{c[2]}-G{c[3]}-d{c[4]}-g{c[5]}-{str(c[6])[6:]}" for c in CASES])
def test_kernel_matches_reference(n_high, n_low, tpp, G, d, groups, dtype):
    B, Hkv = 2, 2
    # the second sequence is shorter: heads of different lengths in one launch
    nh, nl = [n_high, max(1, n_high // 3)], [n_low, n_low // 2]
    data, pages, num_high, nlp, slot_pos, t_low = _layout(B, Hkv, d, nh, nl, tpp, groups, seed=n_high + d)
    q = torch.randn(B, Hkv * G, d, generator=torch.Generator().manual_seed(7)).to(dtype)
    with_low = n_low > 0
    (out, lse, logits), (r_out, r_lse, r_logits) = _run(q, data, pages, num_high, nlp, slot_pos, tpp, t_low, groups,
                                                        nsplit=3, with_low=with_low)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    _assert_matches((out, lse, logits), (r_out, r_lse, r_logits))
    # probabilities from the emitted logits sum to one per query head
    probs = torch.exp(logits - lse.view(B, -1, 1, 1))
    torch.testing.assert_close(probs.sum((-1, -2)), torch.ones(B, Hkv * G), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("groups,tpp", [(2, 9), (2, 8), (1, 8), (1, 9)])
def test_launch_variants_match_reference(groups, tpp):
    """64-token steps over 8 warps, both tiers, G=4, d=128: one scale group (lazy softmax sums, a slot's
    metadata as one 8-byte word) or two (eager sums, per-group fp16 loads), 8- or 9-token pages."""
    data, pages, num_high, nlp, slot_pos, t_low = _layout(2, 2, 128, [45, 13], [19, 7], tpp, groups, seed=11)
    q = torch.randn(2, 8, 128, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    (out, lse, logits), (r_out, r_lse, r_logits) = _run(q, data, pages, num_high, nlp, slot_pos, tpp, t_low, groups,
                                                        nsplit=2, block_tokens=64, num_warps=8)
    _assert_matches((out, lse, logits), (r_out, r_lse, r_logits))


def test_high_dense_equals_the_masking_kernel_without_holes():
    """HIGH_DENSE (no position load in the high tier) gives the masking kernel's results on a high tier
    without holes (what KVStore keeps): the same outputs, lse and emitted logits, bit for bit (the low
    tier's holes are masked in both)."""
    data, pages, num_high, nlp, slot_pos, t_low = _layout(2, 2, 128, [45, 13], [19, 7], 8, 1, seed=12)
    q = torch.randn(2, 8, 128, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    res = {}
    for dense in (True, False):
        (out, lse, logits), ref = _run(q, data, pages, num_high, nlp, slot_pos, 8, t_low, 1, nsplit=2, high_dense=dense)
        assert _rel_rms(out, ref[0]) < 1e-3
        res[dense] = (out, lse, logits)
    for a, b in zip(res[True], res[False]):
        assert torch.equal(a, b)


def test_high_tier_holes_are_masked_with_high_dense_off():
    """high_dense=False, the old path: empty high slots (position -1) are never attended, as the
    reference masks them; with HIGH_DENSE the kernel does not read positions there and attends them
    (the reference's high_dense=True), so it is only for high tiers without holes."""
    data, pages, num_high, nlp, slot_pos, t_low = _layout(2, 2, 64, [45, 13], [19, 7], 8, 1, seed=13,
                                                          high_holes=True)
    assert (slot_pos[pages[:, 0, :, 0].long(), 2] == -1).all()  # the first high page of every head has a hole
    q = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    outs = {}
    for dense in (False, True):
        (out, lse, logits), (r_out, r_lse, r_logits) = _run(q, data, pages, num_high, nlp, slot_pos, 8, t_low, 1,
                                                            nsplit=2, high_dense=dense)
        _assert_matches((out, lse, logits), (r_out, r_lse, r_logits))
        outs[dense] = (out, torch.isfinite(r_logits))
    assert not outs[False][1][:, :, 0, 2].any()  # the holes: masked (-inf logits)
    assert outs[True][1][:, :, 0, 2].all()  # attended
    assert _rel_rms(outs[True][0], outs[False][0]) > 1e-3


RET_CASES = [
    # tokens, low tokens, tpp, G, d, groups, dtype, retrieved pages per head
    (17, 0, 8, 4, 64, 1, torch.bfloat16, 3),
    (17, 23, 9, 4, 128, 1, torch.bfloat16, 2),
    (33, 5, 7, 2, 64, 2, torch.float32, 4),
    (1, 61, 8, 8, 64, 4, torch.float16, 1),
]


def _ret_case(n_high, n_low, tpp, G, d, groups, dtype, nrp):
    nh, nl = [n_high, max(1, n_high // 3)], [n_low, n_low // 2]
    data, pages, num_high, nlp, slot_pos, t_low = _layout(2, 2, d, nh, nl, tpp, groups, seed=n_high + d + nrp)
    data, slot_pos, ret_pages = _with_retrieved(data, slot_pos, 2, 2, d, tpp, groups, nrp, seed=nrp)
    q = torch.randn(2, 2 * G, d, generator=torch.Generator().manual_seed(8)).to(dtype)
    return q, data, pages, num_high, nlp, slot_pos, t_low, ret_pages


@pytest.mark.parametrize("n_high,n_low,tpp,G,d,groups,dtype,nrp", RET_CASES,
                         ids=[f"n{c[0]}+{c[1]}-t{c[2]}-G{c[3]}-g{c[5]}-{str(c[6])[6:]}-r{c[7]}" for c in RET_CASES])
def test_retrieved_pages_match_reference(n_high, n_low, tpp, G, d, groups, dtype, nrp):
    """Retrieved pages after the hot tiers, in the same softmax: the kernel equals the reference (masked
    retrieved slots, a head with every retrieved slot masked), and the emitted logits stay the hot tokens'."""
    q, data, pages, num_high, nlp, slot_pos, t_low, ret_pages = _ret_case(n_high, n_low, tpp, G, d, groups, dtype, nrp)
    kernel, ref = _run(q, data, pages, num_high, nlp, slot_pos, tpp, t_low, groups, nsplit=3, with_low=n_low > 0,
                       ret_pages=ret_pages)
    _assert_matches(kernel, ref)
    (_, lse, logits), (_, hot_lse, hot_logits) = kernel, _run(q, data, pages, num_high, nlp, slot_pos, tpp, t_low,
                                                              groups, nsplit=3, with_low=n_low > 0)[1]
    assert torch.equal(torch.isfinite(logits), torch.isfinite(hot_logits))
    # the retrieved tokens raise every lse but that of batch row 1's last head (all masked)
    G_ = q.shape[1] // 2
    assert (lse[1, G_:] - hot_lse[1, G_:]).abs().max() < 1e-4
    assert (lse[0] > hot_lse[0] + 1e-4).all() and (lse[1, :G_] > hot_lse[1, :G_] + 1e-4).all()


@pytest.mark.parametrize("case", RET_CASES[:2], ids=["hot", "hot+low"])
def test_retrieved_pages_equal_hot_and_retrieved_attention_merged(case):
    """One pass over hot + retrieved pages = hot attention and retrieved attention merged by their lse
    (what the store did before: a separate attention over the dequantized retrieved tokens, then a merge)."""
    n_high, n_low, tpp, G, d, groups, dtype, nrp = case
    q, data, pages, num_high, nlp, slot_pos, t_low, ret_pages = _ret_case(*case)
    (out, lse, _), _ = _run(q, data, pages, num_high, nlp, slot_pos, tpp, t_low, groups, nsplit=3,
                            with_low=n_low > 0, ret_pages=ret_pages)
    _, (h_out, h_lse, _) = _run(q, data, pages, num_high, nlp, slot_pos, tpp, t_low, groups, nsplit=3,
                                with_low=n_low > 0)
    kr, vr = reference.dequantize_pages(data, ret_pages, 8, 4, groups, tpp, d)
    valid = slot_pos[ret_pages.long()][..., :tpp] >= 0
    r_out, r_lse, _ = reference.decode_attention(q, kr.flatten(2, 3), vr.flatten(2, 3), valid.flatten(2), d ** -0.5)
    m_out, m_lse = reference.merge_attention(h_out, h_lse, r_out, r_lse)
    assert _rel_rms(out, m_out) < 1e-3
    torch.testing.assert_close(lse, m_lse, rtol=1e-5, atol=1e-4)


def test_split_count_does_not_change_the_result():
    data, pages, num_high, nlp, slot_pos, t_low = _layout(1, 2, 64, [150], [40], 8, 1, seed=3)
    q = torch.randn(1, 8, 64).to(torch.bfloat16)
    outs = [_run(q, data, pages, num_high, nlp, slot_pos, 8, t_low, 1, nsplit=n, emit=False)[0][0] for n in (1, 4, 32)]
    for o in outs[1:]:
        assert _rel_rms(o, outs[0]) < 1e-3  # p * scale_v rounds to fp16 against each split's max: observed 4e-4


def test_empty_head_gives_zero_and_minus_inf():
    data, pages, num_high, nlp, slot_pos, t_low = _layout(2, 1, 64, [5, 0], [0, 0], 8, 1, seed=4)
    q = torch.randn(2, 4, 64)
    (out, lse, _), _ = _run(q, data, pages, num_high, nlp, slot_pos, 8, t_low, 1, nsplit=2, with_low=False)
    assert (out[1] == 0).all() and torch.isinf(lse[1]).all() and torch.isfinite(lse[0]).all()


def test_merge_combines_disjoint_token_sets():
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(2, 4, 32, generator=g), torch.randn(2, 2, 40, 32, generator=g), torch.randn(2, 2, 40, 32, generator=g)
    valid = torch.ones(2, 2, 40, dtype=torch.bool)
    full, full_lse, _ = reference.decode_attention(q, k, v, valid, None)
    parts = [reference.decode_attention(q, k[:, :, a:b], v[:, :, a:b], valid[:, :, a:b], None) for a, b in
             ((0, 13), (13, 14), (14, 40))]
    empty_out = torch.zeros(2, 4, 32)
    empty_lse = torch.full((2, 4), float("-inf"))  # an empty split merges as nothing
    po = torch.stack([p[0] for p in parts] + [empty_out], 2).view(8, 4, 32).contiguous()
    pl = torch.stack([p[1] for p in parts] + [empty_lse], 2).view(8, 4).contiguous()
    out, lse = torch.empty(8, 32, device=_DEV), torch.empty(8, device=_DEV)
    merge_splits(po.to(_DEV), pl.to(_DEV), out, lse)
    out, lse = out.cpu(), lse.cpu()
    torch.testing.assert_close(out.view(2, 4, 32), full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.view(2, 4), full_lse, rtol=1e-5, atol=1e-5)
    ref_out, ref_lse = reference.merge_attention(parts[0][0], parts[0][1], parts[1][0], parts[1][1])
    ref_out, ref_lse = reference.merge_attention(ref_out, ref_lse, parts[2][0], parts[2][1])
    torch.testing.assert_close(ref_out, full, rtol=1e-5, atol=1e-6)


def test_bad_shapes_are_refused():
    data, pages, num_high, nlp, slot_pos, t_low = _layout(1, 2, 64, [5], [0], 8, 1, seed=6)
    q = torch.randn(1, 6, 64)  # 6 query heads over 2 KV heads is fine; 5 is not
    out, lse = torch.empty(1, 5, 64), torch.empty(1, 5)
    with pytest.raises(ValueError, match="multiple"):
        paged_decode_attention(torch.randn(1, 5, 64), data, pages, num_high, None, torch.arange(1), 0, slot_pos,
                               (8, 4, 8), None, 1, 0.1, out, lse, torch.empty(1, 5, 1, 64), torch.empty(1, 5, 1), 1)
    with pytest.raises(ValueError, match="part_out"):
        paged_decode_attention(q, data, pages, num_high, None, torch.arange(1), 0, slot_pos, (8, 4, 8), None, 1, 0.1,
                               torch.empty(1, 6, 64), torch.empty(1, 6), torch.empty(1, 6, 2, 32), torch.empty(1, 6, 2), 1)
    with pytest.raises(ValueError, match="ret_pages"):  # per batch row and KV head, int32
        paged_decode_attention(q, data, pages, num_high, None, torch.arange(1), 0, slot_pos, (8, 4, 8), None, 1, 0.1,
                               torch.empty(1, 6, 64), torch.empty(1, 6), torch.empty(1, 6, 2, 64), torch.empty(1, 6, 2), 1,
                               ret_pages=torch.zeros(1, 2, 3, dtype=torch.int64))


# ---- pages in the model's dtype (FullFormat): paged_decode_attention_full --------------------------


def _full_layout(d, n_tokens, tpp, dtype, seed, layers=3, layer=1, holes=False):
    """A pool of FullFormat pages and a page table [S, layers, Hkv, C] (S = len(n_tokens) sequence slots):
    slot s's head h holds n_tokens[s][h] tokens at `layer` and other counts at the other layers (other
    pages the kernel must not read). `holes` empties slot 2 of every page of 4+ tokens (position -1)."""
    g = torch.Generator().manual_seed(seed)
    fmt = FullFormat(d, dtype)
    S, Hkv = len(n_tokens), len(n_tokens[0])
    counts = torch.tensor([[[n_tokens[s][h] if l == layer else (3 * n_tokens[s][h] + l + h) % 23 for h in range(Hkv)]
                            for l in range(layers)] for s in range(S)], dtype=torch.int32)
    C = max(1, math.ceil(int(counts.max()) / tpp))
    P = int(((counts + tpp - 1) // tpp).sum()) + 1
    data = torch.zeros(P, fmt.bytes_per_token * tpp, dtype=torch.uint8)
    slot_pos = torch.full((P, tpp), -1, dtype=torch.int32)
    pages = torch.zeros(S, layers, Hkv, C, dtype=torch.int32)
    nxt = 1
    for s, l, h in itertools.product(range(S), range(layers), range(Hkv)):
        n = int(counts[s, l, h])
        for col in range(math.ceil(n / tpp)):
            cnt = min(tpp, n - col * tpp)
            pages[s, l, h, col] = nxt
            fmt.write(data, torch.full((cnt,), nxt), torch.arange(cnt), torch.randn(cnt, d, generator=g) * 2,
                      torch.randn(cnt, d, generator=g))
            slot_pos[nxt, :cnt] = torch.arange(cnt) + col * tpp
            if holes and cnt > 3:
                slot_pos[nxt, 2] = -1
            nxt += 1
    return data, pages, counts, slot_pos


def _run_full(q, data, dtype, pages, counts, slot_pos, tpp, nsplit, layer=1, out_dtype=torch.float32, **launch):
    """The kernel at `layer` for batch rows over sequence slots in reverse order, and the reference."""
    B, Hq, d = q.shape
    dev = _DEV
    seq_ids = torch.arange(B - 1, -1, -1)
    n = counts[seq_ids, layer]
    vmax = max(1, int(((n + tpp - 1) // tpp).max()))
    pps = math.ceil(vmax / nsplit)
    nsplit = math.ceil(vmax / pps)
    out = torch.full((B, Hq, d), float("nan"), dtype=out_dtype, device=dev)  # poisoned: every element must be written
    lse = torch.full((B, Hq), float("nan"), device=dev)
    po, pl = torch.empty(B, Hq, nsplit, d, device=dev), torch.empty(B, Hq, nsplit, device=dev)
    paged_decode_attention_full(q.to(dev), data.to(dev), dtype, pages.to(dev), counts.to(dev), seq_ids.to(dev), layer,
                                slot_pos.to(dev), tpp, d ** -0.5, out, lse, po, pl, pps, **launch)
    out, lse = out.to(q.device), lse.to(q.device)  # beside the reference, which runs where the inputs are
    dense = FULL_LAUNCH["high_dense"] if launch.get("high_dense") is None else launch["high_dense"]
    ref = reference.paged_decode_attention_full(q, data, dtype, pages[seq_ids, layer], n, slot_pos, tpp, d ** -0.5,
                                                high_dense=dense)
    return (out, lse), ref


def _full_tol(page_dtype, q_dtype):
    """rel. RMS bound of the output: fp32 dots (fp32 pages or queries; bf16 pages in the interpreter) sum
    exact products, observed 2e-7; fp16 dots round P to fp16 (2^-11), observed 1e-4 (2e-4 with the output
    stored in fp16); bf16 dots on a GPU round P to bf16 (2^-9)."""
    if page_dtype == torch.float32 or q_dtype != page_dtype:
        return 1e-5
    return 1e-3 if page_dtype == torch.float16 else 4e-3


FULL_CASES = [
    # page dtype, q dtype, G, d, tpp, tokens per (sequence slot, KV head): empty heads, full and partial pages
    (torch.float16, torch.float16, 1, 16, 8, [[0, 13], [8, 29]]),
    (torch.float16, torch.float16, 4, 64, 16, [[40, 1], [0, 17]]),
    (torch.bfloat16, torch.bfloat16, 4, 64, 7, [[20, 1], [0, 44]]),
    (torch.bfloat16, torch.bfloat16, 1, 16, 32, [[70, 0], [5, 33]]),
    (torch.float32, torch.float32, 4, 16, 9, [[33, 0], [16, 5]]),
    (torch.bfloat16, torch.float32, 4, 16, 8, [[19, 3], [0, 26]]),
]


@pytest.mark.parametrize("page_dtype,q_dtype,G,d,tpp,n_tokens", FULL_CASES,
                         ids=[f"{str(c[0])[6:]}-q{str(c[1])[6:]}-G{c[2]}-d{c[3]}-t{c[4]}" for c in FULL_CASES])
def test_full_kernel_matches_reference(page_dtype, q_dtype, G, d, tpp, n_tokens):
    """Ragged heads (empty, one token, full and partial last pages) over 3 splits, layer 1 of a 3-layer
    table, batch rows over sequence slots in reverse; the output in q's dtype where q is 16-bit."""
    data, pages, counts, slot_pos = _full_layout(d, n_tokens, tpp, page_dtype, seed=d + tpp)
    q = torch.randn(2, 2 * G, d, generator=torch.Generator().manual_seed(tpp)).to(q_dtype)
    out_dtype = q_dtype if q_dtype == torch.float16 else torch.float32
    (out, lse), (r_out, r_lse) = _run_full(q, data, page_dtype, pages, counts, slot_pos, tpp, nsplit=3,
                                           out_dtype=out_dtype)
    assert not out.isnan().any() and not lse.isnan().any()
    assert _rel_rms(out, r_out) < _full_tol(page_dtype, q_dtype)
    torch.testing.assert_close(lse, r_lse, rtol=1e-5, atol=1e-4)  # -inf where the reference's is
    empty = torch.isinf(r_lse)
    assert empty.any() and (out[empty] == 0).all()


def test_full_kernel_masks_empty_slots_with_high_dense_off():
    """high_dense=False masks slots whose position is -1, as the reference does; the default
    (high_dense) reads no position and attends every index below the head's count."""
    data, pages, counts, slot_pos = _full_layout(16, [[13, 29], [8, 3]], 8, torch.float16, seed=5, holes=True)
    q = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(1)).to(torch.float16)
    outs = {}
    for dense in (False, True):
        (out, lse), (r_out, r_lse) = _run_full(q, data, torch.float16, pages, counts, slot_pos, 8, nsplit=2,
                                               high_dense=dense)
        assert _rel_rms(out, r_out) < 1e-3
        torch.testing.assert_close(lse, r_lse, rtol=1e-5, atol=1e-4)
        outs[dense] = out
    assert _rel_rms(outs[True], outs[False]) > 1e-2  # the holes were attended in one and not the other


def test_full_kernel_split_count_and_launch_do_not_change_the_result():
    """1, 2 or 8 splits, one or four 8-token pages a loop step, 1 or 4 warps: the same output up to the
    rounding of P to fp16 against each split's running max (observed 1e-4)."""
    data, pages, counts, slot_pos = _full_layout(16, [[61, 30]], 8, torch.float16, seed=6, layers=1, layer=0)
    q = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(2)).to(torch.float16)
    runs = [dict(nsplit=1), dict(nsplit=2), dict(nsplit=8), dict(nsplit=2, block_tokens=64, num_warps=1)]
    outs = [_run_full(q, data, torch.float16, pages, counts, slot_pos, 8, layer=0, **r)[0] for r in runs]
    for out, lse in outs[1:]:
        assert _rel_rms(out, outs[0][0]) < 1e-3
        torch.testing.assert_close(lse, outs[0][1], rtol=1e-5, atol=1e-5)


def test_full_kernel_refuses_what_it_cannot_read():
    data, pages, counts, slot_pos = _full_layout(16, [[5, 3]], 8, torch.float16, seed=7, layers=1, layer=0)
    q = torch.randn(1, 2, 16, dtype=torch.float16)
    bufs = (torch.empty(1, 2, 16), torch.empty(1, 2), torch.empty(1, 2, 1, 16), torch.empty(1, 2, 1), 1)
    seq = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
        paged_decode_attention_full(q, data, torch.int8, pages, counts, seq, 0, slot_pos, 8, 0.25, *bufs)
    with pytest.raises(ValueError, match="cannot hold"):  # fp32 pages need twice the bytes
        paged_decode_attention_full(q, data, torch.float32, pages, counts, seq, 0, slot_pos, 8, 0.25, *bufs)
    with pytest.raises(ValueError, match="part_out"):
        paged_decode_attention_full(q, data, torch.float16, pages, counts, seq, 0, slot_pos, 8, 0.25, *bufs[:2],
                                    torch.empty(1, 2, 1, 8), *bufs[3:])


def test_full_hot_tier_runs_the_kernel_and_equals_the_reference_path():
    """A `full` store with use_triton='always' decodes through the kernel (no 16-bit reference buffers
    in its plan) and gives the reference path's outputs (use_triton='never'); retrieved pages are refused."""
    from kvstore import KVStoreConfig
    from kvstore.geometry import ModelGeometry
    from kvstore.store import KVStore

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 11, 16, generator=g).to(_DEV) for h in (4, 2, 2))
    valid = torch.ones(2, 11, dtype=torch.bool, device=_DEV)
    valid[1, :6] = False  # a shorter sequence: another count per head
    step = [torch.randn(2, h, 1, 16, generator=g).to(_DEV) for h in (4, 2, 2)]
    outs = {}
    for use in ("never", "always"):
        store = KVStore(KVStoreConfig.preset("full", page_size=4, use_triton=use),
                        ModelGeometry(2, 4, 2, 16, torch.float32, torch.device(_DEV)))
        ids = store.add_sequences(2)
        for layer in range(2):
            store.prefill(layer, ids, q, k, v, valid, 0.25)
        plan = store.plan(ids)
        assert store.hot.kernel_decode == (use == "always") and plan.hot_ws["kernel"] == (use == "always")
        assert (plan.hot_ws.get("ref") is None) == (use == "always")
        outs[use] = [store.decode(layer, plan, *step, 0.25).clone() for layer in range(2)]
        if use == "always":
            with pytest.raises(RuntimeError, match="quantized decode kernel only"):
                store.hot.attend(0, ids, step[0][:, :, 0], 0.25, plan.num_pages, plan.hot_ws,
                                 ret_pages=torch.ones(2, 2, 1, dtype=torch.int32))
        store.release(ids)
    for a, b in zip(outs["never"], outs["always"]):
        assert _rel_rms(b, a) < 1e-5  # fp32 pages: fp32 dots, observed 1e-7


@pytest.mark.skipif(not torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                    reason="tensor-core dots over 16-bit pages: a GPU without the interpreter")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tpp,d,G", [(32, 128, 4), (16, 128, 8), (64, 64, 1), (9, 128, 4)])
def test_cuda_full_kernel_matches_reference(dtype, tpp, d, G):
    """On the GPU: bf16 and fp16 pages through tensor-core dots (P rounded to the pages' dtype) over
    launch variants, against the fp32 reference."""
    n = [[200, 37], [0, 95]]
    data, pages, counts, slot_pos = _full_layout(d, n, tpp, dtype, seed=tpp + d)
    dev = torch.device("cuda")
    data, pages, counts, slot_pos = (x.to(dev) for x in (data, pages, counts, slot_pos))
    q = torch.randn(2, 2 * G, d, generator=torch.Generator().manual_seed(3)).to(dtype).to(dev)
    for launch in (dict(), dict(num_warps=1, num_stages=3, block_tokens=32), dict(num_warps=4, num_stages=2,
                                                                                  block_tokens=128)):
        (out, lse), (r_out, r_lse) = _run_full(q, data, dtype, pages, counts, slot_pos, tpp, nsplit=3,
                                               out_dtype=torch.float32, **launch)
        assert _rel_rms(out, r_out) < _full_tol(dtype, dtype), launch
        torch.testing.assert_close(lse, r_lse, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                    reason="compiled CUDA paths (PTX code conversion, value-load hints): a GPU without the interpreter")
@pytest.mark.parametrize("asm_cvt", [False, True])
@pytest.mark.parametrize("tpp,d,n_high,n_low", [(32, 128, [200, 37], [40, 3]), (16, 64, [1, 95], [0, 70]), (9, 128, [45, 13], [19, 7])])
def test_cuda_kernel_matches_reference(asm_cvt, tpp, d, n_high, n_low):
    """On the GPU: the PTX conversions and the contiguous value loads (32- and 16-token pages) equal the reference."""
    data, pages, num_high, nlp, slot_pos, t_low = _layout(2, 2, d, n_high, n_low, tpp, 1, seed=tpp + d)
    dev = torch.device("cuda")
    data, pages, num_high, nlp, slot_pos = (x.to(dev) for x in (data, pages, num_high, nlp, slot_pos))
    q = torch.randn(2, 8, d, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).to(dev)
    for launch in (dict(num_warps=1, num_stages=3, block_tokens=32), dict(num_warps=4, num_stages=2, block_tokens=128)):
        C = pages.shape[-1]
        out = torch.full((2, 8, d), float("nan"), device=dev)
        lse = torch.full((2, 8), float("nan"), device=dev)
        po, pl = torch.empty(2, 8, 3, d, device=dev), torch.empty(2, 8, 3, device=dev)
        logits = torch.full((2, 8, C, max(tpp, t_low)), float("-inf"), device=dev)
        paged_decode_attention(q, data, pages, num_high, nlp, torch.arange(2, device=dev), 0, slot_pos, (8, 4, tpp),
                               (4, 2, t_low), 1, d ** -0.5, out, lse, po, pl, math.ceil(C / 3), logits,
                               asm_cvt=asm_cvt, **launch)
        r_out, r_lse, r_logits = reference.paged_decode_attention(q, data, pages[:, 0], num_high[:, 0], nlp[:, 0],
                                                                  slot_pos, (8, 4, tpp), (4, 2, t_low), 1, d ** -0.5)
        _assert_matches((out, lse, logits), (r_out, r_lse, r_logits), launch)


@pytest.mark.skipif(not torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                    reason="counts Triton compiles: a GPU without the interpreter")
def test_cuda_sizes_that_vary_compile_nothing_new():
    """Once warm, another layer, page-table width or split count compiles no new kernel variant.

    Triton compiles a variant for each int argument equal to 1 or divisible by 16 unless told not
    to; each compile costs seconds inside a decode step (seen as 0.3-2 s time-to-second-token spikes
    in kvstore-bench before the kernels said which arguments vary).
    """
    import triton

    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is None or not hasattr(runtime, "jit_cache_hook"):
        pytest.skip("this Triton has no triton.knobs.runtime.jit_cache_hook")
    dev = torch.device("cuda")
    compiled = []

    def run(n_high, layer, nsplit):
        data, pages, num_high, nlp, slot_pos, t_low = _layout(2, 2, 64, n_high, [40, 3], 16, 1, seed=7)
        pages, num_high, nlp = (x.repeat(1, 3, 1, *([1] if x.dim() == 4 else [])) for x in (pages, num_high, nlp))
        data, pages, num_high, nlp, slot_pos = (x.to(dev) for x in (data, pages, num_high, nlp, slot_pos))
        C = pages.shape[-1]
        q = torch.randn(2, 8, 64, device=dev).to(torch.bfloat16)
        out, lse = torch.empty(2, 8, 64, device=dev), torch.empty(2, 8, device=dev)
        po, pl = torch.empty(2, 8, nsplit, 64, device=dev), torch.empty(2, 8, nsplit, device=dev)
        paged_decode_attention(q, data, pages, num_high, nlp, torch.arange(2, device=dev), layer, slot_pos, (8, 4, 16),
                               (4, 2, t_low), 1, 0.125, out, lse, po, pl, math.ceil(C / nsplit))
        torch.cuda.synchronize()

    run([200, 37], 0, 5)  # warm: whatever compiles here is allowed
    previous = runtime.jit_cache_hook
    runtime.jit_cache_hook = lambda **kw: compiled.append(kw.get("repr", "?")) and False
    try:
        run([200, 37], 1, 5)  # layer 1 (an int equal to 1)
        run([200, 37], 2, 6)  # layer 2, another split count
        run([330, 37], 0, 7)  # a wider page table (16 -> 24 columns: no longer divisible by 16), 7 splits
        run([150, 37], 1, 8)  # a narrower one (13 columns), 8 splits
    finally:
        runtime.jit_cache_hook = previous
    assert compiled == [], compiled


@pytest.mark.skipif(not torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                    reason="counts Triton compiles: a GPU without the interpreter")
def test_cuda_full_kernel_sizes_that_vary_compile_nothing_new():
    """The kernel over bf16 pages, once warm: another layer, page-table width or split count compiles nothing."""
    import triton

    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is None or not hasattr(runtime, "jit_cache_hook"):
        pytest.skip("this Triton has no triton.knobs.runtime.jit_cache_hook")
    dev = torch.device("cuda")
    compiled = []

    def run(n, layer, nsplit):
        data, pages, counts, slot_pos = _full_layout(64, [[n, 37], [5, n // 2]], 16, torch.bfloat16, seed=7, layer=layer)
        data, pages, counts, slot_pos = (x.to(dev) for x in (data, pages, counts, slot_pos))
        q = torch.randn(2, 8, 64, device=dev).to(torch.bfloat16)
        _run_full(q, data, torch.bfloat16, pages, counts, slot_pos, 16, nsplit, layer=layer)
        torch.cuda.synchronize()

    run(200, 0, 5)  # warm: whatever compiles here is allowed
    previous = runtime.jit_cache_hook
    runtime.jit_cache_hook = lambda **kw: compiled.append(kw.get("repr", "?")) and False
    try:
        run(200, 1, 5)  # layer 1 (an int equal to 1)
        run(200, 2, 6)  # layer 2, another split count
        run(330, 0, 7)  # a wider page table, 7 splits
    finally:
        runtime.jit_cache_hook = previous
    assert compiled == [], compiled


def test_always_off_cuda_without_the_interpreter_is_refused_before_allocating(monkeypatch):
    """use_triton='always' on a CPU store with compiled Triton (no interpreter) would hand CPU tensors to
    a CUDA kernel mid-decode: the store refuses it when built, in one line."""
    from kvstore import KVStoreConfig
    from kvstore.geometry import ModelGeometry
    from kvstore.store import KVStore

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"use_triton='always' on a cpu store needs TRITON_INTERPRET=1"):
        KVStore(KVStoreConfig.preset("quant", use_triton="always"),
                ModelGeometry(1, 2, 1, 16, torch.float32, torch.device("cpu")))
