"""Triton: RMSNorm in one launch, as the Llama / Mistral / Qwen2 / Qwen3 modules of transformers compute it.

Their `forward` is eight kernels on a GPU (the fp32 upcast, pow, mean, the epsilon, rsqrt, the scaling, the
downcast, the weight): a decoder layer has two of them (Qwen3 four: its per-head q/k norms), so a captured
decode step of the 32-layer Llama replayed ~450 launches of a few microseconds for its norms (the H200
profile counted ~49 small ops a layer beside the store: results/h200_graphs/call3). Here one program per row
does the same steps: fp32 mean of squares, x * rsqrt(mean + eps), rounded to the input's dtype, times the
weight, in the dtype torch promotes the two to. The reference is the module's own forward (tests/
test_rms_norm.py); the sums run in another order and rsqrt is the hardware's, so a 16-bit output can differ
from it by one unit in the last place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["N", "eps"])
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, N, eps, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    m = c < N
    x = tl.load(x_ptr + r * N + c, mask=m, other=0.0).to(tl.float32)
    var = tl.sum(x * x, axis=0) / N
    y = (x * tl.math.rsqrt(var + eps)).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + c, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + r * N + c, (w * y).to(out_ptr.dtype.element_ty), mask=m)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)) over x's last dim (weight [N]), as transformers' Llama RMSNorm."""
    N = x.shape[-1]
    if weight.shape != (N,):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} for rows of {N}")
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    rows = x.numel() // max(N, 1)
    if rows:
        block = triton.next_power_of_2(N)
        _rms_norm_kernel[(rows,)](x, weight, out, N, eps, BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return out
