"""LeanKV's victim search kernel (gpu_kernels/policy_scan.py) against its torch reference, bit for bit,
on the Triton interpreter: both tiers' directions, empty rows, ties, widths over several blocks."""

from __future__ import annotations

import os

import pytest
import torch

from gpu_kernels import reference
from gpu_kernels.policy_scan import lowest_mean_token


def _case(seed: int, B=2, L=3, H=2, C=40, tpp=4, P=300, ties=False):
    g = torch.Generator().manual_seed(seed)
    pages = torch.randint(0, P, (B, L, H, C), generator=g, dtype=torch.int32)
    pages[0, 0, 0] = 0  # a row of null pages only: no candidate
    slot_pos = torch.randint(-1, 700, (P, 8), generator=g, dtype=torch.int32)
    score = torch.rand(P, 8, generator=g)
    if ties:  # few distinct means: the first minimum must win
        score = (score * 3).floor()
    limit = torch.randint(0, C * tpp + 1, (B, L, H), generator=g)
    prompt_len = torch.tensor([500, 300])[:B]
    now = torch.tensor([650, 690])[:B]
    return pages, limit, slot_pos, score, prompt_len, now


@pytest.mark.parametrize("from_end", [False, True])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("width", [1, 37, 160, 1500])  # 1500: beyond the columns (clamped) and two blocks
def test_the_kernel_equals_the_reference_bit_for_bit(from_end, ties, width):
    # CPU tensors in the interpreter (CI); on a GPU machine without it, CUDA tensors through the compiled kernel
    dev = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available() else "cuda"
    pages, limit, slot_pos, score, n, now = (t.to(dev) for t in _case(width + ties, ties=ties))
    limit.clamp_(max=width)
    args = (pages, limit, slot_pos, score, n, now, width, 4, 32, 4, 16, from_end)
    want = reference.lowest_mean_token(*args)
    got = lowest_mean_token(*args)
    for a, b, name in zip(got, want, ("min", "arg", "page", "slot", "pos")):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert torch.isinf(want[0][0, 0, 0]) and want[1][0, 0, 0] == 0  # the null row: none, index 0
    assert torch.isfinite(want[0]).any()


@pytest.mark.parametrize("G,SL,max_slots", [(4, 16, 16), (1, 32, 16), (2, 8, 12)])
def test_the_score_update_kernel_equals_the_reference(G, SL, max_slots):
    """LeanKV's score update (`observe_scores`): one pass over the emitted logits against the torch ops, each
    virtual page's pool page found in the page table by the kernel (high pages from the left, low pages from the
    right end, the null page past them and where a table entry is 0) as `PageTable.virtual_pages` finds it."""
    from gpu_kernels.policy_scan import observe_scores
    from kvstore.hot.page_table import PageTable

    dev = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available() else "cuda"
    g = torch.Generator().manual_seed(G * 100 + SL)
    S, L, Hkv, W, tpp = 5, 2, 2, 5, 4
    Hq = Hkv * G
    table = PageTable(S, L, Hkv, torch.device(dev))
    table.ensure_pages(9)
    C = table.max_pages
    P = S * L * Hkv * C + 1  # distinct pool pages for every table entry
    ids = torch.randperm(P - 1, generator=g)[: S * L * Hkv * C].add_(1).to(torch.int32).view(S, L, Hkv, C)
    ids[torch.rand(ids.shape, generator=g) < 0.1] = 0  # null entries inside a head's pages too
    table.pages.copy_(ids.to(dev))
    table.num_tokens.copy_(torch.randint(0, 4 * tpp, (S, L, Hkv), generator=g, dtype=torch.int32).to(dev))
    table.num_low_pages.copy_(torch.randint(0, 3, (S, L, Hkv), generator=g, dtype=torch.int32).to(dev))
    seq_ids = torch.tensor([4, 1, 2], device=dev)
    B = seq_ids.numel()
    logits = torch.randn(L, B, Hq, W, SL, generator=g) * 3
    logits[torch.rand(logits.shape, generator=g) < 0.3] = float("-inf")  # empty slots
    lse = torch.logsumexp(logits.flatten(3), -1)
    lse[0, 0, 0] = float("-inf")  # a head with no token: -inf - -inf is NaN, which scores 0
    logits[0, 0, 0] = float("-inf")
    score = torch.rand(P, max_slots, generator=g)
    logits, lse, score = (t.to(dev) for t in (logits, lse, score))
    want = score.clone()
    reference.observe_scores(logits.clone(), lse, table.virtual_pages(seq_ids, W, tpp), want)
    got = score.clone()
    observe_scores(logits, lse, (table.pages, table.num_tokens, table.num_low_pages, seq_ids, tpp), got)
    # the interpreter's exp and torch's differ by at most an ulp; the GPU's tl.exp (ex2.approx) by a few
    torch.testing.assert_close(got, want, rtol=2e-7 if dev == "cpu" else 1e-5, atol=0)
    assert torch.equal(got[0], score[0])  # the null page never changes
    assert not torch.equal(got, score)
