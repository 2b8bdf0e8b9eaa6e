"""gpu_kernels/fetch.py: the row gather equals the reference bit for bit (Triton interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

from gpu_kernels import reference
from gpu_kernels.fetch import gather_dequantize_rows, gather_rows


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


def _quantized_rows(n, d, key_bits, value_bits, groups, seed=0):
    """n quantized one-token rows (kvstore/hot/quantization.py layout) of random K/V."""
    from kvstore.hot.quantization import QuantFormat

    g = torch.Generator().manual_seed(seed)
    fmt = QuantFormat(key_bits, value_bits, d, torch.float32, groups)
    src = torch.zeros(n, fmt.bytes_per_token, dtype=torch.uint8)
    ids = torch.arange(n)
    fmt.write(src, ids, torch.zeros(n, dtype=torch.int64), torch.randn(n, d, generator=g), torch.randn(n, d, generator=g))
    return src


@pytest.mark.parametrize("key_bits,value_bits,groups,dtype", [(8, 4, 1, torch.float32), (8, 8, 2, torch.float32),
                                                              (4, 2, 1, torch.float32), (8, 4, 1, torch.bfloat16)])
def test_gather_dequantize_rows_matches_reference(key_bits, value_bits, groups, dtype):
    """fp32 out: bit for bit. A 16-bit out: the fp32 value rounded once (the interpreter truncates where
    the GPU and torch round to nearest: one step apart at most)."""
    d = 16
    src = _quantized_rows(61, d, key_bits, value_bits, groups)
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(-1, 61, (45,), generator=g)
    rows[:3] = torch.tensor([-1, 60, 0])
    k_a, v_a = torch.full((45, d), 5.0, dtype=dtype), torch.full((45, d), 6.0, dtype=dtype)
    k_b, v_b = k_a.clone(), v_a.clone()
    gather_dequantize_rows(src, rows, k_a, v_a, key_bits, value_bits, groups, block_r=8)
    reference.gather_dequantize_rows(src, rows, k_b, v_b, key_bits, value_bits, groups)
    if dtype == torch.float32:
        assert torch.equal(k_a, k_b) and torch.equal(v_a, v_b)
    else:
        torch.testing.assert_close(k_a.float(), k_b.float(), rtol=2 ** -7, atol=0.0)
        torch.testing.assert_close(v_a.float(), v_b.float(), rtol=2 ** -7, atol=0.0)
    assert (k_a[0] == 5.0).all() and (v_a[0] == 6.0).all()  # skipped rows untouched
    k_ref, v_ref = reference.dequantize_pages(src, torch.tensor([60]), key_bits, value_bits, groups, 1, d)
    assert torch.equal(k_b[1], k_ref[0, 0].to(dtype)) and torch.equal(v_b[1], v_ref[0, 0].to(dtype))


def test_gather_dequantize_rows_rejects_a_row_size_that_is_not_the_format():
    with pytest.raises(ValueError, match=r"uint8 \[R, 200\]"):
        gather_dequantize_rows(torch.zeros(4, 256, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64),
                               torch.zeros(2, 128), torch.zeros(2, 128), 8, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned host memory read by the GPU)")
def test_cuda_uva_gather_dequantize_from_pinned_host_memory():
    src = _quantized_rows(4096, 128, 8, 4, 1).pin_memory()
    rows = torch.randint(-1, 4096, (777,), generator=torch.Generator().manual_seed(2))
    k, v = torch.zeros(777, 128, device="cuda"), torch.zeros(777, 128, device="cuda")
    gather_dequantize_rows(src, rows.cuda(), k, v, 8, 4)
    k_ref, v_ref = torch.zeros(777, 128), torch.zeros(777, 128)
    reference.gather_dequantize_rows(src, rows, k_ref, v_ref, 8, 4, 1)
    # fp32: equal up to the GPU's fused multiply-add of code * scale + zero (one rounding fewer)
    torch.testing.assert_close(k.cpu(), k_ref, rtol=2 ** -22, atol=2 ** -22)
    torch.testing.assert_close(v.cpu(), v_ref, rtol=2 ** -22, atol=2 ** -22)
