"""Hetero-KV quantization: error bounds, exact round trip, monotonicity, kernel == reference bit for bit."""

from __future__ import annotations

import pytest
import torch

from gpu_kernels import quant, reference
from kvstore.hot.quantization import QuantFormat


def _rows(n=64, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    # per-row offsets and spreads, with an outlier channel as real keys have
    x = torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g) * 4 + torch.randn(n, 1, generator=g)
    x[:, 3] *= 6
    return x


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_error_within_half_a_step(bits, groups):
    x = _rows()
    codes, scale, zero = reference.quantize(x, bits, groups)
    x_hat = reference.dequantize(codes, scale, zero)
    step = scale.float().repeat_interleave(x.shape[1] // groups, dim=1)
    ratio = ((x_hat - x).abs() / step).max().item()
    # fp16 scale/zero rounding can add up to ~2^-11 of the range at the ends: observed <= 0.5000
    assert ratio <= 0.5 + 2 ** -8, ratio
    assert codes.max().item() <= (1 << bits) - 1


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_exact_round_trip_on_representable_inputs(bits):
    g = torch.Generator().manual_seed(1)
    n, d, groups = 16, 64, 2
    qmax = (1 << bits) - 1
    codes = torch.randint(0, qmax + 1, (n, d), generator=g, dtype=torch.uint8)
    codes.view(n, groups, -1)[:, :, 0] = 0  # every group spans the full code range
    codes.view(n, groups, -1)[:, :, 1] = qmax
    scale = (torch.rand(n, groups, generator=g) + 0.5).to(torch.float16) / 64
    zero = torch.randn(n, groups, generator=g).to(torch.float16)
    x = reference.dequantize(codes, scale, zero)
    c2, s2, z2 = reference.quantize(x, bits, groups)
    assert torch.equal(c2, codes) and torch.equal(s2, scale) and torch.equal(z2, zero)
    assert torch.equal(reference.dequantize(c2, s2, z2), x)


@pytest.mark.parametrize("groups", [1, 4])
def test_more_bits_never_more_error(groups):
    x = _rows(seed=2)
    errs = []
    for bits in (2, 4, 8):
        c, s, z = reference.quantize(x, bits, groups)
        errs.append((reference.dequantize(c, s, z) - x).pow(2).mean(-1))  # per row
    assert (errs[1] <= errs[0]).all() and (errs[2] <= errs[1]).all()
    # more groups: never a larger step, so never a larger error bound
    s1 = reference.quantize(x, 4, 1)[1].float()
    s4 = reference.quantize(x, 4, 4)[1].float()
    assert (s4.amax(-1) <= s1[:, 0] * (1 + 2 ** -9)).all()


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (5, 3, 32), dtype=torch.uint8)
    packed = reference.pack_codes(codes, bits)
    assert packed.shape == (5, 3, 32 * bits // 8)
    assert torch.equal(reference.unpack_codes(packed, bits, 32), codes)


def test_unified_page_bytes_match_leankv():
    high = QuantFormat(8, 4, 128, torch.bfloat16)
    low = QuantFormat(4, 2, 128, torch.bfloat16)
    page_bytes = 32 * high.bytes_per_token
    assert high.bytes_per_token == 200 and low.bytes_per_token == 104  # + 4 B position (+ 4 B score) per slot
    assert page_bytes == 6400 and low.tokens_per_page(page_bytes) == 61  # LeanKV: 6,784 B, 32 / 60 tokens


@pytest.mark.parametrize(
    "kb,vb,groups,d,tpp",
    [(8, 4, 1, 128, 32), (4, 2, 2, 64, 61), (8, 4, 4, 16, 7), (2, 2, 1, 16, 33)],
    ids=["K8V4-d128", "K4V2-g2-d64", "K8V4-g4-d16", "K2V2-d16"],
)
def test_triton_quantize_and_dequantize_equal_reference_bit_for_bit(kb, vb, groups, d, tpp):
    fmt = QuantFormat(kb, vb, d, torch.bfloat16, groups)
    page_bytes = tpp * fmt.bytes_per_token
    g = torch.Generator().manual_seed(3)
    n = 2 * tpp + 3
    where = torch.randperm(4 * tpp, generator=g)[:n]
    pages, slots = (where // tpp + 1).to(torch.int32), (where % tpp).to(torch.int32)
    k = (torch.randn(n, d, generator=g) * 2 + 0.5).to(torch.bfloat16)
    v = torch.randn(n, d, generator=g).to(torch.bfloat16)
    ref_data = torch.zeros(5, page_bytes, dtype=torch.uint8)
    fmt.write(ref_data, pages, slots, k, v)
    data = torch.zeros_like(ref_data)
    quant.quantize_into_pages(data, pages, slots, k, v, kb, vb, groups, tpp)
    assert torch.equal(data, ref_data)
    ids = torch.tensor([1, 3, 4, 2])
    k_ref, v_ref = fmt.read(ref_data, ids)
    k_tri, v_tri = quant.dequantize_pages(data, ids, kb, vb, groups, tpp, d)
    assert torch.equal(k_tri, k_ref) and torch.equal(v_tri, v_ref)
    k16, v16 = quant.dequantize_pages(data, ids, kb, vb, groups, tpp, d, dtype=torch.bfloat16)  # a 16-bit reader
    assert k16.dtype == v16.dtype == torch.bfloat16
    # the fp32 values, rounded once to bf16 (the interpreter truncates where the GPU rounds to nearest: one step)
    torch.testing.assert_close(k16.float(), k_ref, rtol=2 ** -7, atol=0.0)
    torch.testing.assert_close(v16.float(), v_ref, rtol=2 ** -7, atol=0.0)
    # what was written comes back within half a step
    row_of_page = torch.zeros(5, dtype=torch.long)
    row_of_page[ids] = torch.arange(4)
    k_back = k_ref[row_of_page[pages.long()], slots.long()]
    _, ks, _ = reference.quantize(k, kb, groups)
    step = ks.float().repeat_interleave(d // groups, dim=1)
    assert ((k_back - k.float()).abs() / step).max().item() <= 0.5 + 2 ** -8


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="value_bits"):
        QuantFormat(4, 8, 128, torch.float16)
    with pytest.raises(ValueError, match="head_dim"):
        QuantFormat(8, 4, 100, torch.float16)
    with pytest.raises(ValueError, match="head_dim"):
        quant.quantize_into_pages(torch.zeros(2, 960, dtype=torch.uint8), torch.ones(1, dtype=torch.int32),
                                  torch.zeros(1, dtype=torch.int32), torch.zeros(1, 48), torch.zeros(1, 48), 8, 4, 1, 4)
    with pytest.raises(ValueError, match="shapes"):
        quant.quantize_into_pages(torch.zeros(2, 800, dtype=torch.uint8), torch.ones(2, dtype=torch.int32),
                                  torch.zeros(1, dtype=torch.int32), torch.zeros(1, 64), torch.zeros(1, 64), 8, 4, 1, 4)
