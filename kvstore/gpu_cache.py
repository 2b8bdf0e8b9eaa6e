"""GPU cache of retrieved tokens: a fixed number of slots per (sequence, layer, KV head).

Each step's selected tokens are resolved against the cache on the GPU (`lookup`: a position
-> slot map, so a hit costs one gather), misses are fetched from the cold tier, and after the
step's attention the misses are admitted (`admit`) into the least valuable slots. Everything
is batched over (sequence, KV head) and sized up front: no host sync, no allocation of cache
memory, no Python loop over sequences or heads.

Layout (per layer; slot `slots` is a trash slot that absorbs the writes of non-admitted rows,
so every scatter has a fixed size)::

    k, v:    [L, S, Hkv, slots + 1, d]  model dtype
    pos:     [L, S, Hkv, slots + 1]     int32 position held by each slot, -1 empty
    score:   [L, S, Hkv, slots + 1]     fp32 eviction score
    slot_of: [L, S, Hkv, cap + 1]       int16 (int32 beyond 32767 slots) slot holding each position,
                                        -1 none (column cap: trash); 2 bytes per token of context

Eviction policies:
  lfu  (default) score decays by `decay` every step the layer runs and gains 1 per hit; a miss
       replaces the lowest score. PQCache used LFU over 128-token blocks; per-token LFU needs no
       block bookkeeping. Which policy wins depends on the model's selection traces: `stats()`
       reports the hit rate so the two can be compared on a real model (not measured yet).
  lru  score is the step of the last use.
The slots hit this step are protected from eviction.
"""

from __future__ import annotations

import torch

from kvstore.hot_tier import ModelGeometry

POLICIES = ("lfu", "lru")


class GPUCache:
    def __init__(self, geometry: ModelGeometry, max_seqs: int, slots: int, cap: int, policy: str = "lfu",
                 decay: float = 0.9):
        if policy not in POLICIES:
            raise ValueError(f"GPUCache policy={policy!r}: must be one of {POLICIES}")
        if slots < 0:
            raise ValueError(f"GPUCache slots={slots}: must be >= 0")
        self.geometry = geometry
        self.policy, self.decay = policy, decay
        self.device = geometry.device
        self.slots = 0
        self.max_seqs = 0
        self.cap = 0
        self.k = self.v = self.pos = self.score = self.slot_of = None
        self.hits = torch.zeros((), dtype=torch.int64, device=self.device)
        self.lookups = torch.zeros((), dtype=torch.int64, device=self.device)
        self.step = torch.zeros((), dtype=torch.float32, device=self.device)
        self.ensure(max_seqs, slots, cap)

    def ensure(self, max_seqs: int, slots: int, cap: int) -> None:
        """Grow to at least these sizes (between steps; copies what is there)."""
        max_seqs, slots, cap = max(max_seqs, self.max_seqs), max(slots, self.slots), max(cap, self.cap)
        if (max_seqs, slots, cap) == (self.max_seqs, self.slots, self.cap):
            return
        g, dev = self.geometry, self.device
        L, H, d = g.num_layers, g.num_kv_heads, g.head_dim
        k = torch.zeros(L, max_seqs, H, slots + 1, d, dtype=g.dtype, device=dev)
        v = torch.zeros_like(k)
        pos = torch.full((L, max_seqs, H, slots + 1), -1, dtype=torch.int32, device=dev)
        score = torch.zeros(L, max_seqs, H, slots + 1, dtype=torch.float32, device=dev)
        index_dtype = torch.int16 if slots < 32767 else torch.int32
        slot_of = torch.full((L, max_seqs, H, cap + 1), -1, dtype=index_dtype, device=dev)
        if self.k is not None:
            S, n, c = self.max_seqs, self.slots, self.cap
            k[:, :S, :, :n], v[:, :S, :, :n] = self.k[..., :n, :], self.v[..., :n, :]
            pos[:, :S, :, :n], score[:, :S, :, :n] = self.pos[..., :n], self.score[..., :n]
            slot_of[:, :S, :, :c] = self.slot_of[..., :c]
        self.k, self.v, self.pos, self.score, self.slot_of = k, v, pos, score, slot_of
        self.max_seqs, self.slots, self.cap = max_seqs, slots, cap

    @property
    def bytes_per_seq(self) -> int:
        """Device bytes one sequence slot holds (all layers)."""
        per = [t[:, 0].numel() * t.element_size() for t in (self.k, self.v, self.pos, self.score, self.slot_of)]
        return sum(per)

    # ---- per layer, per step (no host sync, no allocation of cache memory) ------------------------
    def lookup(self, layer: int, seq_ids: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Slot of each selected position, -1 on a miss. pos int64 [B, H, k]; valid bool [B, H, k]."""
        B, H, k = pos.shape
        h = torch.arange(H, device=pos.device).view(1, H, 1)
        slot = self.slot_of[layer][seq_ids.view(B, 1, 1), h, pos.clamp(0, self.cap)].long()
        slot = torch.where(valid, slot, torch.full_like(slot, -1))
        self.hits += (slot >= 0).sum()
        self.lookups += valid.sum()
        return slot

    def read(self, layer: int, seq_ids: torch.Tensor, slot: torch.Tensor, out: torch.Tensor) -> None:
        """Copy the hits' K/V into out [2, B, H, k, d] (misses' rows untouched)."""
        B, H, k = slot.shape
        h = torch.arange(H, device=slot.device).view(1, H, 1)
        s = slot.clamp(min=0)
        hit = (slot >= 0).unsqueeze(-1)
        sb = seq_ids.view(B, 1, 1)
        out[0] = torch.where(hit, self.k[layer][sb, h, s], out[0])
        out[1] = torch.where(hit, self.v[layer][sb, h, s], out[1])

    def admit(self, layer: int, seq_ids: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, slot: torch.Tensor,
              kv: torch.Tensor) -> None:
        """Update scores and admit this step's misses into the least valuable unprotected slots.

        pos int64, valid bool, slot int64 (from `lookup`) [B, H, k]; kv [2, B, H, k, d] the
        step's selected K/V (hits and fetched misses).
        """
        if self.slots == 0:
            return
        B, H, k = pos.shape
        trash = self.slots
        dev = pos.device
        h = torch.arange(H, device=dev).view(1, H, 1)
        sb = seq_ids.view(B, 1, 1)
        hit = slot >= 0
        miss = valid & ~hit
        score = self.score[layer][seq_ids]  # [B, H, slots + 1] (a gathered copy)
        hit_slot = torch.where(hit, slot, torch.full_like(slot, trash))
        if self.policy == "lfu":
            score = score * self.decay
            score.scatter_add_(2, hit_slot, hit.float())
        else:
            score.scatter_(2, hit_slot, self.step.expand_as(hit_slot).clone())
        score[..., trash] = 0.0
        self.score[layer][seq_ids] = score
        prot = score.masked_fill(self.pos[layer][seq_ids] < 0, float("-inf"))  # empty slots go first
        prot = prot.scatter(2, hit_slot, torch.full_like(hit_slot, float("inf"), dtype=prot.dtype))
        prot[..., trash] = float("inf")
        nv = min(k, self.slots)
        vals, victims = torch.topk(prot, nv, dim=-1, largest=False, sorted=True)  # [B, H, nv]
        rank = (torch.cumsum(miss.long(), -1) - 1).clamp(0, nv - 1)
        ok = miss & (torch.cumsum(miss.long(), -1) <= nv)
        ok &= torch.gather(vals, 2, rank) < float("inf")
        tslot = torch.where(ok, torch.gather(victims, 2, rank), torch.full_like(rank, trash))
        old = torch.gather(self.pos[layer][seq_ids], 2, tslot).long()
        old_col = torch.where(ok & (old >= 0), old, torch.full_like(old, self.cap))
        self.slot_of[layer][sb, h, old_col] = -1
        new_col = torch.where(ok, pos.clamp(0, self.cap), torch.full_like(pos, self.cap))
        self.slot_of[layer][sb, h, new_col] = tslot.to(self.slot_of.dtype)
        self.k[layer][sb, h, tslot] = kv[0]
        self.v[layer][sb, h, tslot] = kv[1]
        self.pos[layer][sb, h, tslot] = torch.where(ok, pos, torch.full_like(pos, -1)).to(torch.int32)
        fresh = torch.ones_like(tslot, dtype=torch.float32) if self.policy == "lfu" else self.step.expand_as(tslot).clone()
        self.score[layer][sb, h, tslot] = fresh
        self.pos[layer][:, :, trash] = -1
        self.slot_of[layer][..., self.cap] = -1

    def end_step(self) -> None:
        self.step += 1

    def release(self, seq_ids: torch.Tensor) -> None:
        self.pos[:, seq_ids] = -1
        self.score[:, seq_ids] = 0
        self.slot_of[:, seq_ids] = -1

    def hit_rate(self) -> float:
        n = int(self.lookups.item())
        return float(self.hits.item()) / n if n else float("nan")
