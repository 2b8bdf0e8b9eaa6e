"""Prefill attention (kvstore/prefill_attention.py) against the masked reference, and its memory:
no N x N tensor during a prefill of N tokens."""

from __future__ import annotations

import pytest
import torch

from alloc_probe import AllocProbe
from gpu_kernels import reference
from kvstore import prefill_attention as pa


def _qkv(B=3, Hq=8, Hkv=2, T=40, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, T, d, generator=g), torch.randn(B, Hkv, T, d, generator=g),
            torch.randn(B, Hkv, T, d, generator=g))


def _left_padded(B, T):
    valid = torch.ones(B, T, dtype=torch.bool)
    for b in range(B):
        valid[b, : 5 * b] = False
    return valid


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("small_mask", [True, False])
def test_matches_reference(padded, small_mask, monkeypatch):
    if not small_mask:  # force the compaction path on a short batch
        monkeypatch.setattr(pa, "_SMALL_MASK_ELEMENTS", 0)
    q, k, v = _qkv()
    valid = _left_padded(3, 40) if padded else torch.ones(3, 40, dtype=torch.bool)
    got = pa.prefill_attention(q, k, v, valid, 0.25)
    ref = reference.prefill_attention(q, k, v, valid.view(3, 1, 40), 0.25)
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)
    assert not got.masked_select(~valid.view(3, 1, 40, 1)).any()  # padding rows are zero


def test_holes_in_the_mask_match_reference(monkeypatch):
    """Any valid mask, not only left padding: each row's valid tokens attend causally among themselves."""
    monkeypatch.setattr(pa, "_SMALL_MASK_ELEMENTS", 0)
    q, k, v = _qkv(seed=1)
    valid = torch.rand(3, 40, generator=torch.Generator().manual_seed(2)) > 0.3
    got = pa.prefill_attention(q, k, v, valid, 0.3)
    ref = reference.prefill_attention(q, k, v, valid.view(3, 1, 40), 0.3).masked_fill(~valid.view(3, 1, 40, 1), 0.0)
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_with_past_matches_reference(padded, monkeypatch):
    """A later chunk: every valid past slot (per sequence and KV head) plus the chunk, causally."""
    monkeypatch.setattr(pa, "_CPU_MASK_ELEMENTS", 3 * 8 * 7 * 70)  # several query blocks
    q, k, v = _qkv(T=30, seed=3)
    _, kp, vp = _qkv(T=40, seed=4)
    past_valid = torch.rand(3, 2, 40, generator=torch.Generator().manual_seed(5)) > 0.25
    valid = _left_padded(3, 30) if padded else torch.ones(3, 30, dtype=torch.bool)
    got = pa.prefill_attention(q, k, v, valid, 0.2, past=(kp, vp, past_valid))
    key_valid = torch.cat([past_valid, valid.view(3, 1, 30).expand(3, 2, 30)], dim=2)
    ref = reference.prefill_attention(q, torch.cat([kp, k], 2), torch.cat([vp, v], 2), key_valid, 0.2, past=40)
    ref = ref.masked_fill(~valid.view(3, 1, 30, 1), 0.0)
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_no_n_by_n_tensor(padded):
    """A prefill of N tokens allocates nothing of N x N elements (one 4096 x 4096 fp32 matrix is 64 MiB)."""
    N, B = 4096, 2
    q, k, v = _qkv(B=B, Hq=4, Hkv=2, T=N, d=16, seed=6)
    valid = torch.ones(B, N, dtype=torch.bool)
    if padded:
        valid[1, :1000] = False
    with AllocProbe() as probe:
        pa.prefill_attention(q, k, v, valid, 0.25)
    assert probe.allocations
    biggest = max(_numel(r.shape) for r in probe.allocations)
    assert biggest < N * N, [(r.op, r.shape) for r in probe.allocations if _numel(r.shape) >= N * N]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's compiled path runs on CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_with_past_on_cuda(dtype, monkeypatch):
    """CUDA, a later chunk: FlexAttention (compiled) against the masked reference, two past lengths
    (the compiled kernel takes dynamic shapes)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # conftest sets 1 for the CPU kernels; inductor's kernels compile
    for P, T in ((300, 200), (1000, 129)):
        q, k, v = (x.cuda().to(dtype) for x in _qkv(B=2, Hq=8, Hkv=2, T=T, d=64, seed=P))
        _, kp, vp = (x.cuda().to(dtype) for x in _qkv(B=2, Hq=8, Hkv=2, T=P, d=64, seed=P + 1))
        past_valid = (torch.rand(2, 2, P, generator=torch.Generator().manual_seed(P)) > 0.2).cuda()
        valid = _left_padded(2, T).cuda()
        got = pa.prefill_attention(q, k, v, valid, 0.125, past=(kp, vp, past_valid))
        key_valid = torch.cat([past_valid, valid.view(2, 1, T).expand(2, 2, T)], dim=2)
        ref = reference.prefill_attention(q.float(), torch.cat([kp, k], 2).float(), torch.cat([vp, v], 2).float(),
                                          key_valid, 0.125, past=P).masked_fill(~valid.view(2, 1, T, 1), 0.0)
        tol = 2e-2 if dtype == torch.bfloat16 else 2e-4
        torch.testing.assert_close(got.float(), ref, atol=tol, rtol=tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the flash kernel runs on CUDA")
@pytest.mark.parametrize("padded", [False, True])
def test_flash_dense_past_on_cuda(padded, monkeypatch):
    """CUDA, 16 bits, a later chunk over a past with no holes (empty slots only at the end): SDPA's
    flash kernel with the lower-right causal bias (GQA, no mask tensor) against the masked reference."""
    calls = []
    real = pa._flash_dense_past
    monkeypatch.setattr(pa, "_flash_dense_past", lambda *a: calls.append(1) or real(*a))
    B, Hq, Hkv, d = 2, 8, 2, 64
    for P, T in ((300, 200), (1000, 129)):
        q, k, v = (x.cuda().bfloat16() for x in _qkv(B=B, Hq=Hq, Hkv=Hkv, T=T, d=d, seed=P))
        _, kp, vp = (x.cuda().bfloat16() for x in _qkv(B=B, Hq=Hq, Hkv=Hkv, T=P, d=d, seed=P + 1))
        past_valid = torch.ones(B, Hkv, P, dtype=torch.bool, device="cuda")
        past_valid[..., P - 7:] = False  # the last page's unused slots
        valid = (_left_padded(B, T) if padded else torch.ones(B, T, dtype=torch.bool)).cuda()
        got = pa.prefill_attention(q, k, v, valid, 0.125, past=(kp, vp, past_valid))
        key_valid = torch.cat([past_valid, valid.view(B, 1, T).expand(B, Hkv, T)], dim=2)
        ref = reference.prefill_attention(q.float(), torch.cat([kp, k], 2).float(), torch.cat([vp, v], 2).float(),
                                          key_valid, 0.125, past=P).masked_fill(~valid.view(B, 1, T, 1), 0.0)
        torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=2e-2)
    assert len(calls) == 2  # the flash path ran, not FlexAttention
