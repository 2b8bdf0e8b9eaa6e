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
