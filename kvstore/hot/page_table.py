"""Page tables: per (sequence slot, layer, KV head), the page ids in order, on the store's device.

    pages       int32 [max_seqs, L, Hkv, max_pages]   0 (the null page) pads unused entries
    num_tokens  int32 [max_seqs, L, Hkv]              slots used by the high tier, filled from the left
    num_low     int32 [max_seqs, L, Hkv]              slots used by the low tier (LeanKV), its pages
                                                      fill the table from the right end

        page table of one head:  [ h0 h1 h2 . . . . l1 l0 ]
                                   high pages ->   <- low pages

Token i of the high tier lives in page pages[..., i // tokens_per_page] at slot
i % tokens_per_page. Tables grow (between steps, never inside a layer's decode run) when a
head needs more pages than `max_pages`.

A head's virtual pages are its pages in the order the decode kernel walks them: its high pages
(v < n_hp = ceil(num_tokens / tokens_per_page): column v), then its low pages (v = n_hp + j:
column max_pages - 1 - j). The kernel's per-token logits are laid out by virtual page, so their
buffer is as wide as the widest head's high + low pages, not as the table (`virtual_pages`).
"""

from __future__ import annotations

import torch

from kvstore.plan import fill_at


class PageTable:
    def __init__(self, max_seqs: int, num_layers: int, num_kv_heads: int, device: torch.device, max_pages: int = 4):
        self.device = torch.device(device)
        shape = (max_seqs, num_layers, num_kv_heads)
        self.pages = torch.zeros(*shape, max_pages, dtype=torch.int32, device=self.device)
        self.num_tokens = torch.zeros(shape, dtype=torch.int32, device=self.device)
        self.num_low = torch.zeros(shape, dtype=torch.int32, device=self.device)
        self.num_low_pages = torch.zeros(shape, dtype=torch.int32, device=self.device)

    @property
    def max_seqs(self) -> int:
        return self.pages.shape[0]

    @property
    def max_pages(self) -> int:
        return self.pages.shape[-1]

    def ensure_pages(self, max_pages: int) -> None:
        """Widen every head's table to at least `max_pages` entries (low pages stay at the right end)."""
        if max_pages <= self.max_pages:
            return
        new = max(max_pages, 2 * self.max_pages)
        grown = torch.zeros(*self.pages.shape[:-1], new, dtype=torch.int32, device=self.device)
        old = self.max_pages
        # High pages keep their index from the left; low pages keep their index from the right.
        grown[..., :old] = self.pages
        idx = torch.arange(old, device=self.device)
        is_low = idx.view(1, 1, 1, -1) >= (old - self.num_low_pages).unsqueeze(-1)
        low_vals = torch.where(is_low, self.pages, torch.zeros_like(self.pages))
        grown[..., :old] = torch.where(is_low, torch.zeros_like(self.pages), self.pages)
        grown[..., new - old :] += low_vals
        self.pages = grown

    def ensure_seqs(self, max_seqs: int) -> None:
        if max_seqs <= self.max_seqs:
            return
        new = max(max_seqs, 2 * self.max_seqs)

        def grow(t: torch.Tensor) -> torch.Tensor:
            g = torch.zeros(new, *t.shape[1:], dtype=t.dtype, device=self.device)
            g[: t.shape[0]] = t
            return g

        self.pages = grow(self.pages)
        self.num_tokens = grow(self.num_tokens)
        self.num_low = grow(self.num_low)
        self.num_low_pages = grow(self.num_low_pages)

    def clear(self, seq_ids: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Forget the given sequences (of one layer, or all); returns their page ids (0 padded)
        for the pool to free."""
        ids = seq_ids.to(self.device, torch.long)
        at = (ids,) if layer is None else (ids, layer)
        pages = self.pages[at].reshape(-1).clone()
        if layer is not None:
            at = (ids, torch.full_like(ids, layer))
        for t in (self.pages, self.num_tokens, self.num_low, self.num_low_pages):
            fill_at(t, at, 0)
        return pages

    def virtual_pages(self, seq_ids: torch.Tensor, width: int, tokens_per_page: int) -> torch.Tensor:
        """Page ids int64 [L, B, Hkv, width] of each head's virtual pages 0 .. width - 1 (0, the null
        page, past its high + low pages): where the decode kernel's emitted logits of column v live."""
        pages = self.pages[seq_ids].permute(1, 0, 2, 3)  # [L, B, H, C]
        n_hp = ((self.num_tokens[seq_ids].long() + tokens_per_page - 1) // tokens_per_page).permute(1, 0, 2)
        n_lp = self.num_low_pages[seq_ids].long().permute(1, 0, 2)
        v = torch.arange(width, device=self.device).view(1, 1, 1, width)
        n_hp, n_lp = n_hp.unsqueeze(-1), n_lp.unsqueeze(-1)
        C = self.max_pages
        col = torch.where(v < n_hp, v, C - 1 - (v - n_hp)).clamp_(0, C - 1)
        ids = torch.gather(pages, 3, col.expand(*pages.shape[:3], width)).long()
        return ids.masked_fill_(v >= n_hp + n_lp, 0)
