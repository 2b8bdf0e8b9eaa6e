"""gpu_kernels/fetch.py: the row gather equals the reference bit for bit (Triton interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

from gpu_kernels import reference
from gpu_kernels.fetch import gather_rows


@pytest.mark.parametrize("dtype,D", [(torch.float32, 16), (torch.bfloat16, 24), (torch.float16, 8)])
def test_gather_rows_matches_reference(dtype, D):
    g = torch.Generator().manual_seed(0)
    src = torch.randn(97, D, generator=g).to(dtype)
    rows = torch.randint(-1, 97, (37,), generator=g)
    rows[:3] = torch.tensor([-1, 96, 0])
    a = torch.full((37, D), 5.0, dtype=dtype)
    b = a.clone()
    gather_rows(src, rows, a, block_r=8)
    reference.gather_rows(src, rows, b)
    assert torch.equal(a, b)
    assert torch.equal(a[1], src[96]) and (a[0] == 5.0).all()


def test_gather_rows_rejects_bad_shapes():
    with pytest.raises(ValueError, match="rows"):
        gather_rows(torch.zeros(4, 8), torch.zeros(3, dtype=torch.int64), torch.zeros(2, 8))
    with pytest.raises(ValueError, match="dtype"):
        gather_rows(torch.zeros(4, 8), torch.zeros(2, dtype=torch.int64), torch.zeros(2, 8, dtype=torch.float16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned host memory read by the GPU)")
def test_cuda_uva_gather_from_pinned_host_memory():
    g = torch.Generator().manual_seed(1)
    src = torch.randn(4096, 128, generator=g).to(torch.bfloat16).pin_memory()
    rows = torch.randint(-1, 4096, (777,), generator=g).cuda()
    dst = torch.zeros(777, 128, dtype=torch.bfloat16, device="cuda")
    gather_rows(src, rows, dst)
    want = torch.zeros(777, 128, dtype=torch.bfloat16)
    reference.gather_rows(src, rows.cpu(), want)
    assert torch.equal(dst.cpu(), want)
    with pytest.raises(ValueError, match="pinned"):
        gather_rows(torch.zeros(4, 128, dtype=torch.bfloat16), rows[:2], dst[:2])
