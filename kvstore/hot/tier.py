"""The GPU hot tier: paged K/V of the tokens kept on the device, per (sequence, layer, KV head).

The hot tier owns the page pool and the page tables. It writes tokens into pages (prefill:
many per head, decode: one per head at the slot the step's plan chose), gathers them for
attention, and gives every page back when a sequence ends.

Which tokens it keeps and at which precision is the hot-tier policy's business
(kvstore/hot/policies.py); the hot tier only stores what it is told, where it is told.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gpu_kernels import reference, torch_ops

from kvstore.config import KVStoreConfig
from kvstore.geometry import ModelGeometry, pow2, use_triton
from kvstore.hot.page_format import FullFormat, PageFormat
from kvstore.hot.page_pool import PagePool
from kvstore.hot.page_table import PageTable
from kvstore.hot.quantization import QuantFormat
from kvstore.plan import Workspace, fill_at, host_ints


@dataclass
class LowTierMoves:
    """LeanKV's page moves of one decode step, per (sequence, layer, KV head): at most one low token
    pruned and one high token demoted (`HotTier.apply` makes them).

    prune:               bool [B, L, Hkv] the low token at (low_page, low_slot) leaves the hot tier.
    low_page, low_slot:  int64 [B, L, Hkv] the low tier's lowest-mean token.
    demote:              bool [B, L, Hkv] the high token at (high_page, high_slot) is requantized
                         into the low tier: into the pruned low slot where `prune`, else the next
                         low slot (a new low page, from the right of the table, when the last is full).
    high_page, high_slot: int64 [B, L, Hkv] the high tier's lowest-mean non-immune token.
    """

    prune: torch.Tensor
    low_page: torch.Tensor
    low_slot: torch.Tensor
    demote: torch.Tensor
    high_page: torch.Tensor
    high_slot: torch.Tensor


@dataclass
class StepDecision:
    """A policy's decision for one decode step, for every (sequence, layer, KV head).

    reuse:       int64 [B, L, Hkv] high-tier index whose slot the new token takes; -1 = fresh slot.
    evicted_pos: int64 [B, L, Hkv] position of the token that leaves the hot tier; -1 = none.
    low_moves:   the low tier's moves before the new token is placed (LeanKV), else None.
    low_evicted: int64 [B, L, Hkv] position pruned from the low tier (-1 = none), else None.
    """

    reuse: torch.Tensor
    evicted_pos: torch.Tensor
    low_moves: LowTierMoves | None = None
    low_evicted: torch.Tensor | None = None


def make_format(key_bits: int, value_bits: int, head_dim: int, dtype: torch.dtype, groups: int = 1) -> PageFormat:
    """The page format of a tier of the given precision: the model's dtype at 16/16, else quantized."""
    if key_bits == 16 and value_bits == 16:
        return FullFormat(head_dim, dtype)
    return QuantFormat(key_bits, value_bits, head_dim, dtype, groups)


def check_hot_tier_bytes(config: KVStoreConfig, geometry: ModelGeometry, page_bytes: int) -> None:
    """Refuse (ValueError, before anything is allocated) a `hot_tier_bytes` cap that cannot hold one
    token of one sequence: the pool's null page plus one page per (layer, KV head), since every
    head of every layer stores a sequence's first token in a page of its own."""
    cap = config.hot_tier_bytes
    L, H = geometry.num_layers, geometry.num_kv_heads
    need = (1 + L * H) * page_bytes
    if cap is not None and cap < need:
        raise ValueError(
            f"KVStoreConfig.hot_tier_bytes={cap} is below this model's minimum of {need} bytes: the null page and one "
            f"page per (layer, KV head) ({L} x {H}), pages of {page_bytes} B (page_size={config.page_size} tokens, "
            f"K{config.key_bits}V{config.value_bits}, head_dim {geometry.head_dim}); raise it or set None (no cap)"
        )


class HotTier:
    """Page pool, page tables and decode attention of the tokens kept on the device.

    Decode attention (`attend`, over the buffers of `plan_workspace`) runs a Triton kernel wherever
    `kernel_decode` says so: Triton on (`use_triton`) and a head dim that is a power of two >= 16,
    over quantized pages (quant, leankv, tiered: gpu_kernels/paged_attention.py's
    `paged_decode_attention`, both precision tiers, retrieved pages, emitted logits) or pages in
    the model's dtype (full, pqcache, oracle: `paged_decode_attention_full`, one tier, no retrieved
    pages nor emitted logits). Elsewhere the pure-torch paths run (the CPU with use_triton='auto').
    """

    def __init__(self, config: KVStoreConfig, geometry: ModelGeometry):
        self.config = config
        self.geometry = geometry
        d, dtype = geometry.head_dim, geometry.dtype
        self.high = make_format(config.key_bits, config.value_bits, d, dtype, config.quant_groups)
        self.low: PageFormat | None = (
            make_format(config.low_key_bits, config.low_value_bits, d, dtype, config.quant_groups)
            if config.has_low_tier
            else None
        )
        self.use_triton = use_triton(config, geometry.device)
        for fmt in (self.high, self.low):
            if fmt is not None and hasattr(fmt, "use_triton"):
                fmt.use_triton = self.use_triton and pow2(d) and pow2(config.quant_groups)
        self.page_bytes = self.high.bytes_per_token * config.page_size
        self.tokens_per_page = config.page_size
        self.low_tokens_per_page = self.low.tokens_per_page(self.page_bytes) if self.low else 0
        max_slots = max(self.tokens_per_page, self.low_tokens_per_page)
        check_hot_tier_bytes(config, geometry, self.page_bytes)
        self.pool = PagePool(self.page_bytes, max_slots, geometry.device, max_bytes=config.hot_tier_bytes,
                             slot_scores=config.hot_policy == "leankv")
        self.table = PageTable(config.max_batch_size, geometry.num_layers, geometry.num_kv_heads, geometry.device)
        self.last_ws: tuple[torch.Tensor, dict] | None = None

    # ---- writing ---------------------------------------------------------------------------
    def append(self, layer: int, seq_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               keep: torch.Tensor, positions: torch.Tensor, scores: torch.Tensor | None = None,
               low: bool = False) -> None:
        """Append the kept tokens of a chunk to the high tier (or, `low=True`, the low tier) of one layer.

        Args:
            layer: layer index.
            seq_ids: int64 [B] sequence slots.
            k, v: [B, Hkv, T, d] post-RoPE keys and values of the chunk.
            keep: bool [B, Hkv, T], which tokens each head stores (padding is never kept).
            positions: int [B, T] token positions (written to the slots' metadata).
            scores: fp32 [B, Hkv, T] policy scores written to the slots (LeanKV), or None.
            low: append to the low tier, whose pages fill the table from the right.
        Allocates the pages it needs in one batched call (one host sync), so it is a prefill
        operation; decode appends go through `write_slots` at slots chosen by the plan.
        """
        B, H, T, d = k.shape
        fmt = self.low if low else self.high
        tpp = self.low_tokens_per_page if low else self.tokens_per_page
        count = self.table.num_low if low else self.table.num_tokens
        old = count[seq_ids, layer].long()  # [B, H]
        add = keep.sum(-1)  # [B, H]
        new = old + add
        old_pages = (old + tpp - 1) // tpp
        new_pages = (new + tpp - 1) // tpp
        if low:
            high_pages = (self.table.num_tokens.long() + self.tokens_per_page - 1) // self.tokens_per_page
            self.table.ensure_pages(int(high_pages.max().item()) + int(new_pages.max().item()) + 1)
        else:
            self.table.ensure_pages(int(new_pages.max().item()) + int(self.table.num_low_pages.max().item()))
        C = self.table.max_pages
        ids, offsets = self.pool.allocate((new_pages - old_pages).reshape(-1))
        if ids.numel():
            need = (new_pages - old_pages).reshape(-1)
            req = torch.repeat_interleave(torch.arange(need.numel(), device=need.device), need)
            rank = torch.arange(ids.numel(), device=ids.device) - offsets[req]
            col = old_pages.reshape(-1)[req] + rank
            b_idx, h_idx = req // H, req % H
            self.table.pages[seq_ids[b_idx], layer, h_idx, C - 1 - col if low else col] = ids
        if low:
            self.table.num_low_pages[seq_ids, layer] = new_pages.to(torch.int32)
        # token -> (page, slot)
        idx = old.unsqueeze(-1) + torch.cumsum(keep.long(), -1) - 1  # [B, H, T] slot index if kept
        b, h, t = keep.nonzero(as_tuple=True)
        tok = idx[b, h, t]
        page = self.table.pages[seq_ids[b], layer, h, C - 1 - tok // tpp if low else tok // tpp]
        slot = tok % tpp
        fmt.write(self.pool.data, page, slot, k[b, h, t], v[b, h, t])
        self.pool.slot_pos[page.long(), slot] = positions[b, t].to(torch.int32)
        if scores is not None and self.pool.score_slots:
            self.pool.slot_score[page.long(), slot] = scores[b, h, t].float()
        count[seq_ids, layer] = new.to(torch.int32)

    def write_slots(self, layer: int, page: torch.Tensor, slot: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    positions: torch.Tensor, ws: dict | None = None) -> None:
        """Decode write of one token per (sequence, KV head) at slots chosen by the plan.

        Args:
            page, slot: int [B, Hkv] where each head's new token goes.
            k, v: [B, Hkv, d]; positions: int [B].
            ws: `plan_workspace`'s buffers, whose "write" entry holds page and slot of every layer
                as contiguous int32 / int64 rows (then `page`, `slot`, `positions` are not read).
        Allocates nothing (given ws) and never syncs the host.
        """
        B, H = page.shape
        w = ws.get("write") if ws is not None else None
        if w is None:  # outside a plan: the same indices, built here
            w, layer = self._write_indices(page.view(B, 1, H), slot.view(B, 1, H), positions, Workspace(page.device)), 0
        p64, s64 = w["page64"][layer], w["slot64"][layer]
        p, s = (w["page"][layer], w["slot"][layer]) if getattr(self.high, "use_triton", False) else (p64, s64)
        pool = self.pool
        meta = (pool.slot_pos, w["pos"], pool.slot_score if pool.score_slots else None)
        if self.high.write(pool.data, p, s, k.reshape(B * H, -1), v.reshape(B * H, -1), slot_meta=meta):
            return  # the quantization kernel wrote the positions and scores too
        pool.slot_pos[p64, s64] = w["pos"]
        if pool.score_slots:  # the new token starts with no attention mass (a device zero: a Python
            # number here would be a pageable host-to-device copy, which CUDA graph capture refuses)
            pool.slot_score.index_put_((p64, s64), pool.zero)

    def apply(self, seq_ids: torch.Tensor, decision: StepDecision,
              host_sizes: tuple[list[int], list[bool]] | None = None) -> tuple[torch.Tensor, ...]:
        """Plan time: carry out a policy's decision for one decode step (the policy decides, the
        hot tier moves pages). First the low tier's moves (LeanKV: empty the pruned low slots,
        requantize the demoted high tokens into the low tier), then each head's new token gets
        its high-tier index: the slot of the token that leaves (`decision.reuse`) or the next
        index n, the pages that fill up allocated for every (sequence, layer, KV head) at once
        (one host read here, and one in the low tier's moves; none later in the step).

        Returns page, slot [B, L, Hkv] (int32 page id and slot of each head's new token), fresh
        bool [B, L, Hkv] (the new token took index n: n_high grew), new_page int64 [B, L, Hkv]
        (1 where that index opened a page) and (num_pages, low_pages): the widest high-tier table
        among `seq_ids` after the step's token (`pages_in_use`) and their widest low-tier table.
        host_sizes: (the high-tier tokens every head of each sequence holds, whether each sequence's new
        token takes a fresh index), where the policy knows them on the host (`HotPolicy.host_sizes`: every
        head of a sequence alike; no low tier): then the sizes are worked out on the host and nothing is
        read back from the device.
        """
        if decision.low_moves is not None:
            self._move_low(seq_ids, decision.low_moves)
        tpp = self.tokens_per_page
        n = self.table.num_tokens[seq_ids].long()  # [B, L, H]
        B, L, H = n.shape
        fresh = decision.reuse < 0
        index = torch.where(fresh, n, decision.reuse)  # high-tier index the new token takes
        needs = (fresh & (n % tpp == 0)).long()
        if B and host_sizes is not None and self.low is None:  # (no low tier: no low moves either)
            counts, new = host_sizes  # each head holds its sequence's count: the sizes without a host read
            top, top_after = max(counts), max(c + f for c, f in zip(counts, new))
            widest, widest_after, low_pages = -(-top // tpp), -(-top_after // tpp), 0
            total = sum(f and c % tpp == 0 for c, f in zip(counts, new)) * L * H
        elif B:  # the one host read: the widest high table before and after the new tokens, the widest low one
            widest, widest_after, low_pages, total = host_ints(
                (n.max() + tpp - 1) // tpp, ((n + fresh).max() + tpp - 1) // tpp,
                self.table.num_low_pages[seq_ids].max(), needs.sum())
        else:
            widest = widest_after = low_pages = total = 0
        self.table.ensure_pages(widest + 1 + low_pages)
        ids, offsets = self.pool.allocate(needs.reshape(-1), total=total)
        if total:
            flat = torch.nonzero_static(needs.reshape(-1), size=total).squeeze(1)
            b, rest = flat // (L * H), flat % (L * H)
            l, h = rest // H, rest % H
            self.table.pages[seq_ids[b], l, h, (n.reshape(-1)[flat] // tpp)] = ids[offsets[flat]]
        page = torch.gather(self.table.pages[seq_ids], 3, (index // tpp).unsqueeze(-1)).squeeze(-1)
        slot = (index % tpp).to(torch.int32)
        self.table.num_tokens[seq_ids] += fresh.to(torch.int32)
        return page, slot, fresh, needs, (widest_after, low_pages if self.low is not None else 0)

    def _move_low(self, seq_ids: torch.Tensor, m: LowTierMoves) -> None:
        """LeanKV's moves of one step (`LowTierMoves`), batched over (sequence, layer, KV head), with one
        host read (how many heads prune, demote and open a low page); the moving heads' rows are picked by
        `nonzero_static`, whose size is that read (a boolean mask would read each count again)."""
        pool, table = self.pool, self.table
        th, tl_ = self.tokens_per_page, self.low_tokens_per_page
        B, L, H = m.demote.shape
        dev = m.demote.device
        l_prune, l_page, l_slot = m.prune, m.low_page, m.low_slot
        h_demote, h_page, h_slot = m.demote, m.high_page, m.high_slot
        append = h_demote & ~l_prune  # demotions: into the pruned low slot, else the next one (maybe a new page)
        nlp = table.num_low_pages[seq_ids].long()
        n_low = table.num_low[seq_ids].long()
        needs = (append & (n_low % tl_ == 0)).reshape(-1).long()
        pm, dm = l_prune.reshape(-1), h_demote.reshape(-1)
        n_prune, n_demote, n_new, high_pages, low_pages = host_ints(  # the one host read
            pm.sum(), dm.sum(), needs.sum(), (table.num_tokens.max() + th - 1) // th, table.num_low_pages.max())

        # prune low tokens first (a demotion of the same head may take the slot right after)
        if n_prune:
            rows = torch.nonzero_static(pm, size=n_prune).squeeze(1)
            pp, ps = l_page.reshape(-1)[rows], l_slot.reshape(-1)[rows]
            fill_at(pool.slot_pos, (pp, ps), -1)
            fill_at(pool.slot_score, (pp, ps), 0.0)
        if n_new:
            table.ensure_pages(high_pages + low_pages + 2)
            pages_full = table.pages
            C = pages_full.shape[-1]
            ids, offsets = pool.allocate(needs, total=n_new)
            flat = torch.nonzero_static(needs, size=n_new).squeeze(1)
            b, rest = flat // (L * H), flat % (L * H)
            l, h = rest // H, rest % H
            pages_full[seq_ids[b], l, h, C - 1 - nlp.reshape(-1)[flat]] = ids[offsets[flat]]
            table.num_low_pages[seq_ids] += needs.view(B, L, H).to(torch.int32)
        if not n_demote:  # (then no head appends either)
            return
        pages = table.pages[seq_ids]
        C = pages.shape[-1]
        app_col = (C - 1 - n_low // tl_).clamp(min=0)
        app_page = torch.gather(pages, 3, app_col.unsqueeze(-1)).squeeze(-1).long()
        dst_page = torch.where(l_prune, l_page, app_page)
        dst_slot = torch.where(l_prune, l_slot, n_low % tl_)
        table.num_low[seq_ids] += append.to(torch.int32)
        rows = torch.nonzero_static(dm, size=n_demote).squeeze(1)
        src_page, src_slot = h_page.reshape(-1)[rows], h_slot.reshape(-1)[rows]
        k_pages, v_pages = self.high.read(pool.data, src_page)  # [M, th, d]
        ar = torch.arange(n_demote, device=dev)
        kk, vv = k_pages[ar, src_slot], v_pages[ar, src_slot]
        dp, ds = dst_page.reshape(-1)[rows], dst_slot.reshape(-1)[rows]
        self.low.write(pool.data, dp, ds, kk.to(self.geometry.dtype), vv.to(self.geometry.dtype))
        pool.slot_pos[dp, ds] = pool.slot_pos[src_page, src_slot]
        pool.slot_score[dp, ds] = pool.slot_score[src_page, src_slot]

    @staticmethod
    def _write_indices(page: torch.Tensor, slot: torch.Tensor, positions: torch.Tensor, wsp: Workspace) -> dict:
        """Plan time: page/slot [B, L, Hkv] -> per-layer rows [L, B * Hkv] (int32 for the kernels, int64
        for indexing) and the positions int32 [B * Hkv] that `write_slots` stores."""
        B, L, H = page.shape
        w = {}
        for name, src in (("page", page), ("slot", slot)):
            for key, dtype in ((name, torch.int32), (name + "64", torch.int64)):
                w[key] = wsp.take(f"hot.write.{key}", (L, B, H), dtype).copy_(src.permute(1, 0, 2)).view(L, B * H)
        w["pos"] = wsp.take("hot.write.pos", (B, H), torch.int32).copy_(positions.view(B, 1).expand(B, H)).view(B * H)
        return w

    # ---- reading ---------------------------------------------------------------------------
    def take_last_step(self) -> tuple[torch.Tensor, dict] | None:
        """(seq_ids, workspace) of the last decode step that kept every hot token's logits (the
        LeanKV policy reads them at the next plan), once; None otherwise."""
        last, self.last_ws = self.last_ws, None
        return last

    def gather(self, layer: int, seq_ids: torch.Tensor, num_pages: int | None = None, dtype: torch.dtype | None = None,
               block_bytes: int = 1 << 30) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dequantized K, V and positions of every high-tier slot of one layer.

        Returns k, v [B, Hkv, P * tokens_per_page, d] (`dtype`; by default as the page format
        reads: fp32 dequantized, the model's dtype unquantized) and pos int32
        [B, Hkv, P * tokens_per_page] (-1 for empty slots). `num_pages` limits P to the first
        pages of each table. The Triton dequantization writes `dtype` straight into the result;
        elsewhere pages are read in blocks so that the dequantization's fp32 temporaries stay
        near `block_bytes` (a long context's past is read chunk after chunk of a chunked prefill).
        """
        pages = self.table.pages[seq_ids, layer]  # [B, H, P]
        if num_pages is not None:
            pages = pages[..., :num_pages]
        B, H, P = pages.shape
        tpp, d = self.tokens_per_page, self.geometry.head_dim
        if dtype is None:  # as the format reads: the model's dtype unquantized, fp32 dequantized
            dtype = self.geometry.dtype if self.high.key_bits == 16 else torch.float32
        pos = self.pool.slot_pos[pages.long()][..., :tpp].reshape(B, H, -1)
        if getattr(self.high, "use_triton", False):  # the kernel writes `dtype` directly: no temporaries
            k, v = self.high.read(self.pool.data, pages, dtype)  # [B, H, P, tpp, d]
            return k.reshape(B, H, -1, d), v.reshape(B, H, -1, d), pos
        k = torch.empty(B, H, P, tpp, d, dtype=dtype, device=pages.device)
        v = torch.empty_like(k)
        step = max(1, block_bytes // max(1, B * H * tpp * d * 16))
        for s in range(0, P, step):  # blocks of pages, not a loop over sequences or heads
            kb, vb = self.high.read(self.pool.data, pages[..., s:s + step])  # [B, H, p, tpp, d]
            k[:, :, s:s + step].copy_(kb)
            v[:, :, s:s + step].copy_(vb)
        return k.reshape(B, H, -1, d), v.reshape(B, H, -1, d), pos

    def pages_in_use(self, seq_ids: torch.Tensor) -> int:
        """Widest page table among the given sequences (one host sync)."""
        n = self.table.num_tokens[seq_ids]
        return int(((n.max() + self.tokens_per_page - 1) // self.tokens_per_page).item()) if n.numel() else 0

    # ---- decode attention ------------------------------------------------------------------
    @property
    def kernel_decode(self) -> bool:
        """Whether decode attention runs a Triton kernel: Triton enabled and a head dim that is a power
        of two >= 16, over quantized pages (`paged_decode_attention`) or pages in the model's dtype
        (fp16/bf16/fp32: `paged_decode_attention_full`)."""
        if isinstance(self.high, FullFormat):
            return self.full_kernel
        return bool(getattr(self.high, "use_triton", False)) and self.geometry.head_dim >= 16

    @property
    def full_kernel(self) -> bool:
        """Decode over pages in the model's dtype runs `paged_decode_attention_full` (no low tier: LeanKV,
        the only policy with one, is quantized-only)."""
        d = self.geometry.head_dim
        if not (isinstance(self.high, FullFormat) and self.use_triton and pow2(d) and d >= 16 and self.low is None):
            return False
        from gpu_kernels.paged_attention import FULL_DTYPES  # Triton is on: imported only then

        return self.high.dtype in FULL_DTYPES

    def plan_workspace(self, seq_ids: torch.Tensor, num_pages: int, emit_logits: bool | None = None,
                       workspace: Workspace | None = None, page: torch.Tensor | None = None,
                       slot: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                       min_pages: int = 0, low_pages: int | None = None) -> dict:
        """Buffers of one decode step for `write_slots` and `attend` (plan time: allocation and host syncs here).

        workspace: where the buffers come from (the store's, reused step after step; None: fresh).
        num_pages: the widest high-tier table (+ the retrieved tokens' pages); min_pages: the least
        width, low tier included (`KVStore.plan`'s pages_hint). ws["width"]: the width sized for.
        low_pages: the widest low-tier table among `seq_ids` (None: read here, a host sync).
        page, slot int [B, L, Hkv], positions int [B]: the step's decode writes ("write", per layer).
        Kernel path (quantized pages, or pages in the model's dtype: `kernel_decode`): split buffers
        (`choose_splits` over B x Hkv heads) and the fp32 output / lse scratch a layer's LSE merge
        reads. Reference path over 16-bit pages (where the kernel cannot run: Triton off, a head dim
        that is not a power of two >= 16): every layer's page ids, the gathered pages, their fp32 K/V
        and the attention buffers ("ref"). With emit_logits (the
        LeanKV policy reads every hot token's probability) the per-token logits of every layer,
        read by the policy at the next plan. Other reference paths (quantized pages without the
        kernel, the low tier on the CPU) allocate in `attend`: the GPU runs the kernel there.
        """
        if emit_logits is None:  # the LeanKV policy reads every hot token's probability
            emit_logits = self.config.hot_policy == "leankv"
        geo = self.geometry
        wsp = workspace if workspace is not None else Workspace(geo.device)
        B, Hq, d, L = seq_ids.numel(), geo.num_q_heads, geo.head_dim, geo.num_layers
        f32 = torch.float32
        ws: dict = {"kernel": self.kernel_decode, "logits_all": None}
        if page is not None:
            ws["write"] = self._write_indices(page, slot, positions, wsp)
        if low_pages is None:  # the widest low-tier table (`apply` returns it: read once a step)
            low_pages = int(self.table.num_low_pages[seq_ids].max().item()) if self.low is not None and B else 0
        # pages a head may walk, rounded up to 1/8 steps (8 pages at least): tables grow during decode, and
        # the launch (splits, pages per split) should change only now and then (a CUDA graph replays it)
        vmax = max(1, num_pages + low_pages, min_pages)
        vmax = -(-vmax // (q := 1 << max(3, vmax.bit_length() - 4))) * q
        ws["width"] = vmax
        if emit_logits:  # per-token logits of every layer by virtual page, read by the policy at the next plan
            slots = max(self.tokens_per_page, self.low_tokens_per_page)
            # not filled here: each layer's attend fills its slice before the kernel writes its tokens (or the
            # reference path copies it whole); a step abandoned before its last layer is not observed
            # (`KVStore._undo_unwritten_slots` drops it): one fill of every layer's logits a step less
            ws["logits_all"] = wsp.take("hot.logits_all", (L, B, Hq, vmax, slots), f32)
            ws["lse_all"] = wsp.full("hot.lse_all", (L, B, Hq), f32, float("-inf"))
        # the policy reads it at the next plan; the ids copied (into the workspace: the same address step after
        # step, as a captured step's state must keep): a caller may refill its tensor before then (the engine's
        # static batch rows, rewritten before each plan)
        last_ids = wsp.take("hot.last_seq_ids", (B,), torch.int64).copy_(seq_ids) if emit_logits else None
        self.last_ws = (last_ids, ws) if emit_logits else None
        if not self.kernel_decode:
            if self.low is None and not emit_logits and isinstance(self.high, FullFormat):
                ws["ref"] = self._reference_buffers(seq_ids, num_pages, wsp)
            return ws
        from gpu_kernels.paged_attention import choose_splits

        if not hasattr(self, "_num_sms"):
            dev = torch.device(geo.device)
            self._num_sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4
        nsplit = choose_splits(B, geo.num_kv_heads, vmax, self._num_sms)
        pps = math.ceil(vmax / nsplit)
        nsplit = math.ceil(vmax / pps)
        ws.update(
            pages_per_split=pps,
            part_out=wsp.take("hot.part_out", (B, Hq, nsplit, d), f32),
            part_lse=wsp.take("hot.part_lse", (B, Hq, nsplit), f32),
            out=wsp.take("hot.out", (B, Hq, d), f32),
            lse=wsp.take("hot.lse", (B, Hq), f32),
        )
        return ws

    def _reference_buffers(self, seq_ids: torch.Tensor, num_pages: int, wsp: Workspace) -> dict:
        """Plan time, 16-bit pages: page ids int64 [L, B, Hkv, P] of every layer and the buffers of
        `attend`'s gather + attention (P = num_pages, N = P * tokens_per_page)."""
        geo = self.geometry
        B, Hq, Hkv, d, L = seq_ids.numel(), geo.num_q_heads, geo.num_kv_heads, geo.head_dim, geo.num_layers
        P, tpp = num_pages, self.tokens_per_page
        N = P * tpp
        pages = wsp.take("hot.ref.pages", (L, B, Hkv, P), torch.int64)
        pages.copy_(self.table.pages[seq_ids][..., :P].permute(1, 0, 2, 3))
        return dict(
            pages=pages,
            raw=wsp.take("hot.ref.raw", (B * Hkv * P, 2 * tpp * d), geo.dtype),
            pos=wsp.take("hot.ref.pos", (B * Hkv * P, self.pool.max_slots), torch.int32),
            invalid=wsp.take("hot.ref.invalid", (B, Hkv, N), torch.bool),
            kf=wsp.take("hot.ref.kf", (B, Hkv, N, d), torch.float32),
            vf=wsp.take("hot.ref.vf", (B, Hkv, N, d), torch.float32),
            attn=torch_ops.decode_attention_buffers(lambda n, s, t: wsp.take("hot.ref." + n, s, t),
                                                    B, Hq, Hkv, N, d, kv_fp32=True),
        )

    def _attend_16bit(self, layer: int, q: torch.Tensor, scale: float, r: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference decode attention over 16-bit pages into the plan's buffers `r` (no allocation):
        `gather` + `reference.decode_attention`, bit for bit."""
        B, Hkv, N, d = r["kf"].shape
        tpp = self.tokens_per_page
        P = N // tpp
        pages = r["pages"][layer].view(-1)
        src = self.high._view(self.pool.data)  # [pool pages, 2, tpp, d] model dtype, no copy
        raw = torch.index_select(src.view(src.shape[0], -1), 0, pages, out=r["raw"]).view(B, Hkv, P, 2, tpp, d)
        r["kf"].view(B, Hkv, P, tpp, d).copy_(raw[:, :, :, 0])
        r["vf"].view(B, Hkv, P, tpp, d).copy_(raw[:, :, :, 1])
        pos = torch.index_select(self.pool.slot_pos, 0, pages, out=r["pos"]).view(B, Hkv, P, -1)[..., :tpp]
        torch.lt(pos, 0, out=r["invalid"].view(B, Hkv, P, tpp))
        return torch_ops.decode_attention_out(q, r["kf"], r["vf"], r["invalid"], scale, r["attn"])

    def attend(self, layer: int, seq_ids: torch.Tensor, q: torch.Tensor, scale: float, num_pages: int,
               ws: dict | None, out: torch.Tensor | None = None, ret_pages: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode attention of one layer over the hot tier.

        Args:
            q: [B, Hq, d]; num_pages: widest high-tier table (the plan's); ws: `plan_workspace`'s buffers.
            out: optional [B, Hq, d] contiguous buffer (any float dtype) that receives the output.
            ret_pages: int32 [B, Hkv, NRP] pool pages of the step's retrieved tokens (high format; empty
                slots' positions -1), attended in the same kernel launch: out and lse then cover them
                too (the quantized kernel only; `KVStore._check_kernel_retrieval`).
        Returns:
            out [B, Hq, d] (`out`, else fp32), lse fp32 [B, Hq] (-inf where a head holds no token).
            Without `out` they are views of ws, overwritten by the next layer's `attend`. The kernel
            paths (quantized pages: `paged_decode_attention`; pages in the model's dtype:
            `paged_decode_attention_full`) and the 16-bit reference path never sync the host and
            allocate nothing; the other reference paths (CPU only, for supported geometries) allocate.
        """
        high = (getattr(self.high, "key_bits", 16), getattr(self.high, "value_bits", 16), self.tokens_per_page)
        low = (self.low.key_bits, self.low.value_bits, self.low_tokens_per_page) if self.low is not None else None
        emit = ws is not None and ws.get("logits_all") is not None
        if ret_pages is not None and (ws is None or not ws["kernel"]):
            raise RuntimeError("retrieved pages are attended by the decode kernel only")
        if ws is not None and ws["kernel"] and isinstance(self.high, FullFormat):
            return self._attend_full(layer, seq_ids, q, scale, ws, out, emit, ret_pages)
        if ws is None or not ws["kernel"]:
            if ws is not None and ws.get("ref") is not None:
                res, lse = self._attend_16bit(layer, q, scale, ws["ref"])
            elif low is None and not emit:
                k_all, v_all, pos = self.gather(layer, seq_ids, num_pages)
                res, lse, _ = reference.decode_attention(q, k_all, v_all, pos >= 0, scale)
            else:
                t = self.table
                res, lse, logits = reference.paged_decode_attention(
                    q, self.pool.data, t.pages[seq_ids, layer], t.num_tokens[seq_ids, layer],
                    t.num_low_pages[seq_ids, layer], self.pool.slot_pos, high, low, self.config.quant_groups, scale,
                    emit_cols=ws["logits_all"].shape[3] if emit else None)
                if emit:
                    ws["logits_all"][layer].copy_(logits)
                    ws["lse_all"][layer].copy_(lse)
            return (out.copy_(res) if out is not None else res), lse
        from gpu_kernels.paged_attention import paged_decode_attention

        logits, lse_buf = (ws["logits_all"][layer], ws["lse_all"][layer]) if emit else (None, ws["lse"])
        out = ws["out"] if out is None else out
        if logits is not None:
            logits.fill_(float("-inf"))
        paged_decode_attention(
            q, self.pool.data, self.table.pages, self.table.num_tokens,
            self.table.num_low_pages if low is not None else None, seq_ids, layer, self.pool.slot_pos,
            high, low, self.config.quant_groups, scale, out, lse_buf, ws["part_out"], ws["part_lse"],
            ws["pages_per_split"], logits, ret_pages=ret_pages,
        )
        return out, lse_buf

    def _attend_full(self, layer: int, seq_ids: torch.Tensor, q: torch.Tensor, scale: float, ws: dict,
                     out: torch.Tensor | None, emit: bool, ret_pages: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """`attend`'s kernel path over pages in the model's dtype: `paged_decode_attention_full` into
        ws's split buffers and `out` (else ws["out"], fp32). Allocates nothing, never syncs the host."""
        if ret_pages is not None:
            raise RuntimeError("retrieved pages are attended by the quantized decode kernel only; "
                               "this hot tier's pages are in the model's dtype (retrieval_attention='merge')")
        if emit:
            raise RuntimeError("per-token logits are emitted by the quantized decode kernel only (LeanKV, "
                               "which needs key_bits < 16)")
        from gpu_kernels.paged_attention import paged_decode_attention_full

        out = ws["out"] if out is None else out
        paged_decode_attention_full(
            q, self.pool.data, self.high.dtype, self.table.pages, self.table.num_tokens, seq_ids, layer,
            self.pool.slot_pos, self.tokens_per_page, scale, out, ws["lse"], ws["part_out"], ws["part_lse"],
            ws["pages_per_split"],
        )
        return out, ws["lse"]

    # ---- release ---------------------------------------------------------------------------
    def release(self, seq_ids: torch.Tensor) -> None:
        self.pool.free(self.table.clear(seq_ids))

    def release_layer(self, layer: int, seq_ids: torch.Tensor) -> None:
        """Free one layer's pages of the given sequences (zeroed, as `KVStore.release` does: a page
        may come back in the other precision tier)."""
        pages = self.table.clear(seq_ids, layer)
        pages = pages[pages > 0]
        self.pool.data.index_fill_(0, pages.long(), 0)
        self.pool.free(pages)

    @property
    def used_bytes(self) -> int:
        return self.pool.used_bytes

    def token_counts(self, seq_ids: torch.Tensor) -> dict[str, int]:
        return {
            "hot_high_tokens": int(self.table.num_tokens[seq_ids].sum().item()),
            "hot_low_tokens": int(self.table.num_low[seq_ids].sum().item()),
        }
