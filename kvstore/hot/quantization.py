"""Quantized page format (Hetero-KV): keys and values at their own bit widths, per token per KV head.

Asymmetric min-max per token and KV head over `groups` equal slices of the head dim, with an
fp16 scale and zero per group, round to nearest (the formulas are in gpu_kernels/reference.py).
High tier K8V4, low tier K4V2; keys never get fewer bits than values.

One page of `tokens_per_page` = T tokens (structure of arrays, so a kernel loads each part of a
page with one contiguous load)::

    byte 0          T*kB             T*(kB+vB)                         T*(kB+vB) + T*8*groups
    [ K codes T x kB | V codes vB x T | meta fp16 T x (k_scale[g], k_zero[g], v_scale[g], v_zero[g]) ]

    kB = d * key_bits / 8, vB = d * value_bits / 8, codes packed planar (reference.pack_codes).
    Keys are token-major (a token's kB bytes contiguous: the q.k dot reduces over the head dim) and
    values byte-major (one value byte of the T tokens contiguous: p @ v reduces over tokens, so the
    tensor-core operand wants consecutive tokens of one element in a register; H100, B=8, N=128K:
    0.638 -> 0.607 ms for the decode kernel). `torch_ops.page_views` gives both as [P, T, bytes].

`bytes_per_token` = kB + vB + 8 * groups: at d = 128, groups = 1, K8V4 = 200 B (LeanKV: 208 with
its fp32 score and int32 position, which kvstore keeps in the pool's slot arrays, 8 B more per
slot) and K4V2 = 104 B. The page byte size is fixed by the high tier (`page_size` tokens); the
low tier fits `page_bytes // 104` tokens in the same bytes (61 for a 32-token K8V4 page).
"""

from __future__ import annotations

import logging

import torch

from gpu_kernels import reference, torch_ops
from kvstore.hot.page_format import PageFormat

logger = logging.getLogger(__name__)

QUANT_BITS = (8, 4, 2)


class QuantFormat(PageFormat):
    """Quantized tier: `key_bits` / `value_bits` in (8, 4, 2), fp16 scale and zero per group."""

    def __init__(self, key_bits: int, value_bits: int, head_dim: int, dtype: torch.dtype, groups: int = 1):
        super().__init__(head_dim, dtype)
        if key_bits not in QUANT_BITS or value_bits not in QUANT_BITS:
            raise ValueError(f"QuantFormat bits must be in {QUANT_BITS}, got key_bits={key_bits} value_bits={value_bits}")
        if value_bits > key_bits:
            raise ValueError(f"value_bits={value_bits} > key_bits={key_bits}: keys never get fewer bits than values")
        if head_dim % 8 or head_dim % groups:
            raise ValueError(f"head_dim={head_dim} must be a multiple of 8 and of groups={groups} for quantized pages")
        self.key_bits, self.value_bits, self.groups = key_bits, value_bits, groups
        self.key_bytes = head_dim * key_bits // 8
        self.value_bytes = head_dim * value_bits // 8
        self.meta_bytes = 8 * groups
        self.bytes_per_token = self.key_bytes + self.value_bytes + self.meta_bytes
        #: Use the Triton kernels of gpu_kernels/quant.py (set by the hot tier from config.use_triton).
        self.use_triton = False

    def offsets(self, page_bytes: int) -> tuple[int, int, int, int]:
        """(tokens_per_page, K codes offset, V codes offset, meta offset) in bytes within a page."""
        tpp = self.tokens_per_page(page_bytes)
        return tpp, 0, tpp * self.key_bytes, tpp * (self.key_bytes + self.value_bytes)

    def _views(self, data: torch.Tensor):
        """No-copy views of a pool [P, page_bytes]: K codes [P,T,kB], V codes [P,T,vB] (transposed view), meta [P,T,4,g]."""
        return torch_ops.page_views(data, self.tokens_per_page(data.shape[1]), self.key_bytes, self.value_bytes,
                                    self.groups)

    def write(self, data, page_ids, slots, k, v, slot_meta=None) -> bool:
        """Quantize k, v [N, d] and store them at (page_ids[i], slots[i]). slot_meta (slot_pos, positions,
        slot_score or None; `quant.quantize_into_pages`): the pool's bookkeeping too, in the kernel's launch;
        returns whether it was written (the torch path leaves it to the caller)."""
        if k.numel() == 0:
            return slot_meta is not None
        if self.use_triton:
            from gpu_kernels import quant

            quant.quantize_into_pages(data, page_ids, slots, k, v, self.key_bits, self.value_bits, self.groups,
                                      self.tokens_per_page(data.shape[1]), slot_meta=slot_meta)
            return slot_meta is not None
        kc, vc, meta = self._views(data)
        ck, sk, zk = reference.quantize(k, self.key_bits, self.groups)
        cv, sv, zv = reference.quantize(v, self.value_bits, self.groups)
        p, s = page_ids.long(), slots.long()
        kc[p, s] = reference.pack_codes(ck, self.key_bits)
        vc[p, s] = reference.pack_codes(cv, self.value_bits)
        meta[p, s] = torch.stack([sk, zk, sv, zv], dim=1)
        return False

    def gather_rows(self, src: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> None:
        """Dequantize one-token pages (the cold tier's and the GPU cache's rows): out[0] (K), out[1] (V)
        [2, ..., d], flattened to M rows, get src[rows[i]] (uint8 [R, bytes_per_token], host or device;
        rows int [M], -1 = leave that row untouched), in out's dtype."""
        d = self.head_dim
        k_out, v_out = out[0].view(-1, d), out[1].view(-1, d)
        if self.use_triton:
            from gpu_kernels.fetch import gather_dequantize_rows

            gather_dequantize_rows(src, rows, k_out, v_out, self.key_bits, self.value_bits, self.groups)
        else:
            reference.gather_dequantize_rows(src, rows, k_out, v_out, self.key_bits, self.value_bits, self.groups)

    def copy_rows(self, src: torch.Tensor, rows: torch.Tensor, dst: torch.Tensor) -> None:
        """dst[i] = src[rows[i]] for one-token pages as stored (uint8 [R, bytes_per_token] -> [M, ...];
        rows int [M], -1 = leave dst[i] alone): the Triton gather whenever the format runs its kernels,
        so a quantized fetch or cache read is all kernels or all torch ops."""
        if self.use_triton:
            from gpu_kernels.fetch import gather_rows

            gather_rows(src, rows, dst)
        else:
            reference.gather_rows(src, rows, dst)

    def read(self, data, page_ids, dtype=torch.float32):
        """Dequantized k, v `dtype` [..., tokens_per_page, d] of the given pages (computed in fp32)."""
        if self.use_triton:
            from gpu_kernels import quant

            shape = page_ids.shape
            k, v = quant.dequantize_pages(data, page_ids.reshape(-1), self.key_bits, self.value_bits, self.groups,
                                          self.tokens_per_page(data.shape[1]), self.head_dim, dtype)
            return k.view(*shape, *k.shape[1:]), v.view(*shape, *v.shape[1:])
        kc, vc, meta = self._views(data)
        p = page_ids.long()
        m = meta[p]  # [..., T, 4, g]
        d = self.head_dim
        k = reference.dequantize(reference.unpack_codes(kc[p], self.key_bits, d), m[..., 0, :], m[..., 1, :])
        v = reference.dequantize(reference.unpack_codes(vc[p], self.value_bits, d), m[..., 2, :], m[..., 3, :])
        return k.to(dtype), v.to(dtype)
