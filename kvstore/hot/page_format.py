"""How one token's K and V are laid out in a page, per precision tier.

A page holds `tokens_per_page` tokens of one (sequence, layer, KV head, tier). Every format
writes and reads through the same interface, so the hot tier does not care which tier a page
belongs to:

    write(data, page_ids, slots, k, v)   k, v: [N, d] -> bytes at (page_ids[i], slots[i])
    read(data, page_ids) -> (k, v)       page_ids: [...] -> [..., tokens_per_page, d] each

`FullFormat` keeps the model's dtype (16 or 32 bits, no quantization):

    page bytes: [ K: tokens_per_page x d | V: tokens_per_page x d ]   (model dtype)

(the layout gpu_kernels/paged_attention.py's `paged_decode_attention_full` decodes on the GPU).
"""

from __future__ import annotations

import torch


class PageFormat:
    """Base of the per-tier formats. Subclasses set key_bits, value_bits and bytes_per_token."""

    key_bits: int
    value_bits: int
    bytes_per_token: int

    def __init__(self, head_dim: int, dtype: torch.dtype):
        self.head_dim = head_dim
        self.dtype = dtype

    def tokens_per_page(self, page_bytes: int) -> int:
        return page_bytes // self.bytes_per_token

    def write(self, data: torch.Tensor, page_ids: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              slot_meta: tuple | None = None) -> bool:
        """Store k, v [N, d] at (page_ids[i], slots[i]); True where it also wrote `slot_meta` (the pool's slot
        positions and scores: QuantFormat's kernel), else the caller writes them."""
        raise NotImplementedError

    def read(self, data: torch.Tensor, page_ids: torch.Tensor, dtype: torch.dtype | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [..., tokens_per_page, d] of the given pages, in `dtype` (None: as the format reads)."""
        raise NotImplementedError


class FullFormat(PageFormat):
    """The model's dtype, unquantized (`key_bits = value_bits = 16` in the config)."""

    key_bits = 16
    value_bits = 16

    def __init__(self, head_dim: int, dtype: torch.dtype):
        super().__init__(head_dim, dtype)
        self.elem = torch.empty((), dtype=dtype).element_size()
        self.bytes_per_token = 2 * head_dim * self.elem

    def _view(self, data: torch.Tensor) -> torch.Tensor:
        """[P, page_bytes] uint8 -> [P, 2, tokens_per_page, d] in the model dtype (no copy)."""
        tpp = self.tokens_per_page(data.shape[1])
        used = tpp * self.bytes_per_token
        return data[:, :used].view(self.dtype).view(data.shape[0], 2, tpp, self.head_dim)

    def write(self, data, page_ids, slots, k, v, slot_meta=None):
        view = self._view(data)
        view[page_ids.long(), 0, slots.long()] = k.to(self.dtype)
        view[page_ids.long(), 1, slots.long()] = v.to(self.dtype)
        return False

    def read(self, data, page_ids, dtype=None):
        pages = self._view(data)[page_ids.long()]  # [..., 2, tpp, d]
        if dtype is not None and dtype != self.dtype:
            pages = pages.to(dtype)
        return pages[..., 0, :, :], pages[..., 1, :, :]
