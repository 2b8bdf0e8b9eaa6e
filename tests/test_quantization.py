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
    # a decode write's pool bookkeeping in the same launch: each row's position at its slot, its score zeroed
    slot_pos = torch.full((5, tpp + 2), -1, dtype=torch.int32)
    slot_score = torch.ones(5, tpp + 2)
    pos = torch.arange(100, 100 + n, dtype=torch.int32)
    quant.quantize_into_pages(data, pages, slots, k, v, kb, vb, groups, tpp, slot_meta=(slot_pos, pos, slot_score))
    assert torch.equal(data, ref_data)
    want_pos, want_score = torch.full_like(slot_pos, -1), torch.ones_like(slot_score)
    want_pos[pages.long(), slots.long()] = pos
    want_score[pages.long(), slots.long()] = 0.0
    assert torch.equal(slot_pos, want_pos) and torch.equal(slot_score, want_score)
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


def _scatter_targets(m, pages, tpp, g):
    """page_ids, slots int64 [m] (distinct (page, slot) among rows written; page 0 gets none), positions int32 [m];
    rows 1 and 4 are skipped (page -1, the slots of rows 0 and 3), rows 2 and 5 not tokens (position -1)."""
    where = torch.randperm((pages - 1) * tpp, generator=g)[:m]
    page_ids, slots = where // tpp + 1, where % tpp
    positions = torch.randint(0, 1000, (m,), generator=g, dtype=torch.int32)
    page_ids[[1, 4]] = -1
    slots[[1, 4]] = slots[[0, 3]]
    positions[[2, 5]] = -1
    return page_ids, slots, positions


@pytest.mark.parametrize("kb,vb", [(8, 4), (4, 2), (8, 8)])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("tpp", [8, 9])
def test_triton_scatter_rows_to_pages_equals_reference_byte_for_byte(kb, vb, groups, tpp):
    d, pages, m = 16, 5, 23  # two programs of 16 rows, the second partly masked
    row_bytes = QuantFormat(kb, vb, d, torch.float32, groups).bytes_per_token
    g = torch.Generator().manual_seed(4)
    rows = torch.randint(0, 256, (m, row_bytes), generator=g, dtype=torch.uint8)
    page_ids, slots, positions = _scatter_targets(m, pages, tpp, g)
    data = torch.randint(0, 256, (pages, tpp * row_bytes + 6), generator=g, dtype=torch.uint8)  # 6 B of page padding
    slot_pos = torch.randint(-1, 1000, (pages, tpp + 3), generator=g, dtype=torch.int32)
    data_ref, slot_pos_ref, data0, slot_pos0 = data.clone(), slot_pos.clone(), data.clone(), slot_pos.clone()
    quant.scatter_rows_to_pages(rows, page_ids.to(torch.int32), slots, positions, data, slot_pos, kb, vb, groups, tpp)
    reference.scatter_rows_to_pages(rows, page_ids, slots, positions, data_ref, slot_pos_ref, kb, vb, groups, tpp)
    assert torch.equal(data, data_ref) and torch.equal(slot_pos, slot_pos_ref)
    assert torch.equal(data[0], data0[0]) and torch.equal(slot_pos[0], slot_pos0[0])  # no row for page 0
    assert torch.equal(data[:, -6:], data0[:, -6:]) and torch.equal(slot_pos[:, tpp:], slot_pos0[:, tpp:])
    p, s, kB = page_ids[0], slots[0], d * kb // 8
    assert torch.equal(data[p, s * kB: (s + 1) * kB], rows[0, :kB])  # K codes token-major
    assert slot_pos[p, s] == positions[0] and slot_pos[page_ids[2], slots[2]] == -1


def test_scatter_rows_to_pages_rejects_a_row_size_that_is_not_the_format():
    with pytest.raises(ValueError, match=r"rows must be contiguous uint8 \[M, d \* 12 / 8 \+ 8\]"):
        quant.scatter_rows_to_pages(torch.zeros(2, 33, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64),
                                    torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64),
                                    torch.zeros(2, 400, dtype=torch.uint8), torch.zeros(2, 8, dtype=torch.int32),
                                    8, 4, 1, 8)


@pytest.mark.parametrize("kb,vb,groups,tpp", [(8, 4, 1, 8), (4, 2, 2, 9), (8, 8, 2, 9)])
def test_scattered_rows_read_back_as_the_rows_dequantized(kb, vb, groups, tpp):
    d, pages, m = 16, 5, 23
    fmt = QuantFormat(kb, vb, d, torch.float32, groups)
    g = torch.Generator().manual_seed(5)
    rows = torch.zeros(m, fmt.bytes_per_token, dtype=torch.uint8)  # quantized one-token pages
    fmt.write(rows, torch.arange(m), torch.zeros(m, dtype=torch.int64), torch.randn(m, d, generator=g) * 3,
              torch.randn(m, d, generator=g))
    page_ids, slots, positions = _scatter_targets(m, pages, tpp, g)
    data = torch.zeros(pages, tpp * fmt.bytes_per_token, dtype=torch.uint8)
    slot_pos = torch.full((pages, tpp), -1, dtype=torch.int32)
    quant.scatter_rows_to_pages(rows, page_ids, slots, positions, data, slot_pos, kb, vb, groups, tpp)
    k_rows, v_rows = reference.dequantize_pages(rows, torch.arange(m), kb, vb, groups, 1, d)  # [m, 1, d]
    ids = torch.arange(pages)
    k_pages, v_pages = fmt.read(data, ids)
    k_ref, v_ref = reference.dequantize_pages(data, ids, kb, vb, groups, tpp, d)
    assert torch.equal(k_pages, k_ref) and torch.equal(v_pages, v_ref)
    ok = page_ids >= 0
    p, s = page_ids[ok], slots[ok]
    assert torch.equal(k_pages[p, s], k_rows[ok, 0]) and torch.equal(v_pages[p, s], v_rows[ok, 0])
    assert torch.equal(slot_pos[p, s], positions[ok])
