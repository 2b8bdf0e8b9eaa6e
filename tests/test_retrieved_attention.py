"""The retrieved tokens' attention + LSE merge kernel (gpu_kernels/retrieved_attention.py) against the
torch reference (reference.decode_attention then reference.merge_attention), on the Triton interpreter:
GQA groups, dtypes, selections over several splits and loop steps, invalid rows holding NaN, heads with
no valid retrieved row, a hot side with no token, and outputs written in the model's dtype."""

from __future__ import annotations

import os

import pytest
import torch

from gpu_kernels import reference
from gpu_kernels.retrieved_attention import choose_splits, retrieved_attention_merge, retrieved_buffers


def _device() -> str:
    # CPU tensors in the interpreter (CI); on a GPU machine without it, CUDA tensors through the compiled kernel
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available() else "cuda"


def _case(seed, B, Hq, Hkv, N, d, dtype, dev):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, d, generator=g).to(dtype)
    k = torch.randn(B, Hkv, N, d, generator=g).to(dtype)
    v = torch.randn(B, Hkv, N, d, generator=g).to(dtype)
    valid = torch.rand(B, Hkv, N, generator=g) < 0.7
    valid[0, 0] = False  # a head with no retrieved token: the hot side alone
    k[~valid] = float("nan")  # stale rows: never reach the result
    v[~valid] = float("inf")
    hot_out = torch.randn(B, Hq, d, generator=g)
    hot_lse = torch.randn(B, Hq, generator=g) * 3
    return [t.to(dev) for t in (q, k, v, valid, hot_out, hot_lse)]


def _reference(q, k, v, valid, scale, hot_out, hot_lse):
    """merge(hot, attention over the valid rows): the reference reads invalid rows as zeros (0 x NaN is NaN)."""
    keep = valid.unsqueeze(-1)
    out_r, lse_r, _ = reference.decode_attention(q, k.where(keep, 0), v.where(keep, 0), valid, scale)
    return reference.merge_attention(hot_out, hot_lse, out_r, lse_r)


def _take(dev):
    return lambda name, shape, dtype: torch.full(shape, float("nan"), dtype=dtype, device=dev) if dtype.is_floating_point \
        else torch.empty(shape, dtype=dtype, device=dev)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,N", [(2, 8, 2, 100), (1, 4, 4, 7), (3, 6, 2, 300)])
def test_the_kernel_equals_the_reference(dtype, B, Hq, Hkv, N):
    dev, d = _device(), 32
    q, k, v, valid, hot_out, hot_lse = _case(N + B, B, Hq, Hkv, N, d, dtype, dev)
    scale = d ** -0.5
    ws = retrieved_buffers(_take(dev), B, Hq, Hkv, N, d, dev)
    got_out, got_lse = retrieved_attention_merge(q, k, v, valid, scale, hot_out, hot_lse, ws)
    want_out, want_lse = _reference(q, k, v, valid, scale, hot_out, hot_lse)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # 16-bit: P rounded to the rows' dtype for P @ V
    assert torch.isfinite(got_out).all()
    torch.testing.assert_close(got_out, want_out, rtol=tol, atol=tol)
    torch.testing.assert_close(got_lse, want_lse, rtol=1e-5, atol=1e-5)


def test_several_splits_and_the_models_dtype_out():
    dev, B, Hq, Hkv, N, d = _device(), 2, 4, 2, 257, 16
    q, k, v, valid, hot_out, hot_lse = _case(3, B, Hq, Hkv, N, d, torch.float32, dev)
    ws = retrieved_buffers(_take(dev), B, Hq, Hkv, N, d, dev)
    assert ws["part_out"].shape[2] == choose_splits(B, Hkv, N, dev) > 1  # the merge sees several partials
    out = torch.empty(B, Hq, 1, d, dtype=torch.bfloat16, device=dev)[:, :, 0]  # the store's [L, B, Hq, 1, d] view
    lse = torch.empty(B, Hq, device=dev)
    got, got_lse = retrieved_attention_merge(q, k, v, valid, d ** -0.5, hot_out, hot_lse, ws, out=out, lse=lse)
    assert got.data_ptr() == out.data_ptr() and got_lse.data_ptr() == lse.data_ptr()
    want, want_lse = _reference(q, k, v, valid, d ** -0.5, hot_out, hot_lse)
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got_lse, want_lse)


def test_empty_sides():
    """No valid retrieved row and a hot side with no token: out 0 and lse -inf, as the reference;
    a hot side with no token and retrieved rows: the retrieved attention alone."""
    dev, B, Hq, Hkv, N, d = _device(), 2, 4, 2, 40, 16
    q, k, v, valid, hot_out, hot_lse = _case(5, B, Hq, Hkv, N, d, torch.float32, dev)
    valid[0] = False
    hot_lse[0] = float("-inf")
    hot_lse[1] = float("-inf")
    ws = retrieved_buffers(_take(dev), B, Hq, Hkv, N, d, dev)
    out, lse = retrieved_attention_merge(q, k, v, valid, d ** -0.5, hot_out, hot_lse, ws)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()
    keep = valid.unsqueeze(-1)
    out_r, lse_r, _ = reference.decode_attention(q, k.where(keep, 0), v.where(keep, 0), valid, d ** -0.5)
    torch.testing.assert_close(out[1], out_r[1])
    torch.testing.assert_close(lse[1], lse_r[1])


def test_bad_shapes_are_refused_before_a_launch():
    dev = _device()
    q, k, v, valid, hot_out, hot_lse = _case(1, 1, 4, 2, 16, 16, torch.float32, dev)
    ws = retrieved_buffers(_take(dev), 1, 4, 2, 16, 16, dev)
    with pytest.raises(ValueError, match="power of two"):
        retrieved_attention_merge(q[..., :12], k[..., :12].contiguous(), v[..., :12].contiguous(), valid, 1.0,
                                  hot_out[..., :12], hot_lse, ws)
    with pytest.raises(ValueError, match="want"):
        retrieved_attention_merge(q, k[:, :1].contiguous(), v, valid, 1.0, hot_out, hot_lse, ws)
    with pytest.raises(ValueError, match="multiple"):
        retrieved_attention_merge(q[:, :3], k, v, valid, 1.0, hot_out[:, :3], hot_lse[:, :3], ws)
