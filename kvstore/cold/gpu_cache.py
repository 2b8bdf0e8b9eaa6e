"""GPU cache of retrieved tokens: a fixed number of slots per (sequence, layer, KV head).

Each step's selected tokens are resolved against the cache on the GPU (`lookup`: a position
-> slot map, so a hit costs one gather), misses are fetched from the cold tier, and after the
step's attention the misses are admitted (`admit`) into the least valuable slots. Everything
is batched over (sequence, KV head) and sized up front: no host sync, no allocation (the step's
index and mask temporaries are plan-time buffers, `plan_workspace`), no Python loop over
sequences or heads.

Layout (per layer; slot `slots` is a trash slot that absorbs the writes of non-admitted rows,
so every scatter has a fixed size)::

    k, v:    [L, S, Hkv, slots + 1, d]  model dtype                        (16-bit cold tier)
    rows:    [L, S, Hkv, slots + 1, row_bytes]  uint8, replaces k and v    (quantized cold tier)
             row = the cold tier's row of the token, byte for byte (kvstore/cold/host_tier.py):
             [ K codes d*kb/8 | V codes d*vb/8 | fp16 k_scale, k_zero, v_scale, v_zero ]
    pos:     [L, S, Hkv, slots + 1]     int32 position held by each slot, -1 empty
    score:   [L, S, Hkv, slots + 1]     fp32 eviction score
    slot_of: [L, S, Hkv, cap + 1]       int16 (int32 beyond 32767 slots) slot holding each position,
                                        -1 none (column cap: trash); 2 bytes per token of context

Quantized (`row_format`, the cold tier's `QuantFormat`): `admit` copies the misses' rows from
the fetch's staging buffer (the bytes the fetch dequantized: no requantization) and `read`
dequantizes the hits from the cache's rows with the fetch's kernel, so a hit is bit for bit what a
fetch of the token gives. K8V4 at d = 128: 200 B a token and KV head against 512 B at bf16.

Eviction policies:
  lfu  (default) score decays by `decay` every step the layer runs and gains 1 per hit; a miss
       replaces the lowest score. PQCache used LFU over 128-token blocks; per-token LFU needs no
       block bookkeeping. Which policy wins depends on the model's selection traces: `stats()`
       reports the hit rate so the two can be compared on a real model (not measured yet).
  lru  score is the step of the last use.
The slots hit this step are protected from eviction. Victims are the slots of lowest protected score,
ties to the lowest slot (a stable sort), so the kernel and the torch path agree bit for bit.

Where Triton runs (`use_triton`, from the cold path) `lookup` and `admit` are one kernel each a layer
(gpu_kernels/gpu_cache.py); the torch ops below are the CPU path and their reference.
"""

from __future__ import annotations

import math

import torch

from kvstore.geometry import ModelGeometry
from kvstore.hot.quantization import QuantFormat
from kvstore.plan import Workspace

POLICIES = ("lfu", "lru")


class GPUCache:
    def __init__(self, geometry: ModelGeometry, max_seqs: int, slots: int, cap: int, policy: str = "lfu",
                 decay: float = 0.9, row_format: QuantFormat | None = None, use_triton: bool = False):
        if policy not in POLICIES:
            raise ValueError(f"GPUCache policy={policy!r}: must be one of {POLICIES}")
        if slots < 0:
            raise ValueError(f"GPUCache slots={slots}: must be >= 0")
        self.geometry = geometry
        self.policy, self.decay = policy, decay
        #: the cold tier's row format when it is quantized (slots hold its rows), None: model dtype
        self.fmt = row_format
        self.device = geometry.device
        #: `lookup` and `admit` run gpu_kernels/gpu_cache.py (one launch each a layer) rather than their torch
        #: ops (the cold path passes whether Triton runs; the torch path is the CPU's and the reference)
        self.use_triton = use_triton
        self.slots = 0
        self.max_seqs = 0
        self.cap = 0
        self.k = self.v = self.rows = self.pos = self.score = self.slot_of = None
        self.hits = torch.zeros((), dtype=torch.int64, device=self.device)
        self.lookups = torch.zeros((), dtype=torch.int64, device=self.device)
        self.step = torch.zeros((), dtype=torch.float32, device=self.device)
        # 0-dim device values the per-step scatters write: `t[index] = 1.0` would copy a host scalar to the
        # device (pageable), which CUDA graph capture refuses
        self.one = torch.ones((), dtype=torch.float32, device=self.device)
        self.none = {dt: torch.full((), -1, dtype=dt, device=self.device) for dt in (torch.int16, torch.int32)}
        self.ensure(max_seqs, slots, cap)

    def ensure(self, max_seqs: int, slots: int, cap: int) -> None:
        """Grow to at least these sizes (between steps; copies what is there)."""
        max_seqs, slots, cap = max(max_seqs, self.max_seqs), max(slots, self.slots), max(cap, self.cap)
        if (max_seqs, slots, cap) == (self.max_seqs, self.slots, self.cap):
            return
        g, dev = self.geometry, self.device
        L, H = g.num_layers, g.num_kv_heads
        kv = self._kv(max_seqs, slots)
        pos = torch.full((L, max_seqs, H, slots + 1), -1, dtype=torch.int32, device=dev)
        score = torch.zeros(L, max_seqs, H, slots + 1, dtype=torch.float32, device=dev)
        index_dtype = torch.int16 if slots < 32767 else torch.int32
        slot_of = torch.full((L, max_seqs, H, cap + 1), -1, dtype=index_dtype, device=dev)
        if self.pos is not None:
            S, n, c = self.max_seqs, self.slots, self.cap
            for new, old in zip(kv, self._data()):
                new[:, :S, :, :n] = old[..., :n, :]
            pos[:, :S, :, :n], score[:, :S, :, :n] = self.pos[..., :n], self.score[..., :n]
            slot_of[:, :S, :, :c] = self.slot_of[..., :c]
        if self.fmt is None:
            self.k, self.v = kv
        else:
            (self.rows,) = kv
        self.pos, self.score, self.slot_of = pos, score, slot_of
        self.max_seqs, self.slots, self.cap = max_seqs, slots, cap

    def _kv(self, max_seqs: int, slots: int) -> tuple[torch.Tensor, ...]:
        """Zeroed token storage: (k, v) at the model's dtype, or (rows,) of the quantized format."""
        g = self.geometry
        shape = (g.num_layers, max_seqs, g.num_kv_heads, slots + 1)
        if self.fmt is not None:
            return (torch.zeros(*shape, self.fmt.bytes_per_token, dtype=torch.uint8, device=self.device),)
        return tuple(torch.zeros(*shape, g.head_dim, dtype=g.dtype, device=self.device) for _ in range(2))

    def _data(self) -> tuple[torch.Tensor, ...]:
        """The token storage `_kv` made: (k, v) or (rows,)."""
        return (self.k, self.v) if self.fmt is None else (self.rows,)

    def _data_of(self, layer: int) -> tuple[torch.Tensor, ...]:
        """One layer's token storage: (k, v) [S, H, slots + 1, d] or (rows,) [S, H, slots + 1, row_bytes]."""
        return tuple(t[layer] for t in self._data())

    @property
    def bytes_per_seq(self) -> int:
        """Device bytes one sequence slot holds (all layers)."""
        per = [math.prod(t.shape[:1] + t.shape[2:]) * t.element_size()  # also before any slot exists
               for t in (*self._data(), self.pos, self.score, self.slot_of)]
        return sum(per)

    # ---- plan time: the step's buffers --------------------------------------------------------
    def plan_workspace(self, seq_ids: torch.Tensor, k: int, wsp: Workspace) -> dict:
        """Buffers `lookup`, `read` and `admit` write at every layer of a step of width k (plan
        time, after the last `ensure`: the flat row bases depend on slots and cap)."""
        g, B, H = self.geometry, seq_ids.numel(), self.geometry.num_kv_heads
        i64, f32, b8 = torch.int64, torch.float32, torch.bool
        n = self.slots + 1
        nv = min(k, self.slots)
        h = wsp.arange("cache.h", H).view(1, H, 1)
        ws = {"h": h, "count": wsp.take("cache.count", (), i64)}
        row = (seq_ids.view(B, 1, 1) * H + h)  # (sequence, head) row of the [L][S, H, ...] buffers
        ws["base_of"] = torch.mul(row, self.cap + 1, out=wsp.take("cache.base_of", (B, H, 1), i64))
        ws["base_kv"] = torch.mul(row, n, out=wsp.take("cache.base_kv", (B, H, 1), i64))
        for name in ("hit", "nohit", "invalid", "miss", "ok", "notok", "b"):
            ws[name] = wsp.take("cache." + name, (B, H, k), b8)
        for name in ("i1", "slot", "hit_slot", "missl", "cs", "rank", "tslot", "old", "old_col", "new_col"):
            ws[name] = wsp.take("cache." + name, (B, H, k), i64)
        if self.use_triton:  # the lookup kernel's other outputs: the misses, the hits' rows (`miss_mask`, `_hit_rows`)
            ws["lookup_miss"] = wsp.take("cache.lookup_miss", (B, H, k), b8)
            ws["hit_rows"] = wsp.take("cache.hit_rows", (B * H * k,), i64)
        for name in ("hitf", "stepf", "gv"):
            ws[name] = wsp.take("cache." + name, (B, H, k), f32)
        ws["slot16"] = wsp.take("cache.slot16", (B, H, k), self.slot_of.dtype)
        ws["tslot16"] = wsp.take("cache.tslot16", (B, H, k), self.slot_of.dtype)
        ws["old32"] = wsp.take("cache.old32", (B, H, k), torch.int32)
        ws["p32"] = wsp.take("cache.p32", (B, H, k), torch.int32)
        if self.fmt is None:  # the hits' K or V before the merge into out (quantized: dequantized in place)
            ws["kv"] = wsp.take("cache.kv", (B, H, k, g.head_dim), g.dtype)
        ws["score"] = wsp.take("cache.score", (B, H, n), f32)
        ws["prot"] = wsp.take("cache.prot", (B, H, n), f32)
        ws["posg"] = wsp.take("cache.posg", (B, H, n), torch.int32)
        ws["empty"] = wsp.take("cache.empty", (B, H, n), b8)
        if self.use_triton:  # one kernel a layer (gpu_kernels/gpu_cache.py): its scratch rows
            from gpu_kernels.gpu_cache import admit_buffers

            ws["admit"] = admit_buffers(lambda name, shape, dt: wsp.take("cache.admit." + name, shape, dt), B, H,
                                        self.slots)
        else:  # the slots by protected score (a stable sort: ties to the lowest slot, as the kernel)
            ws["sorted"] = wsp.take("cache.sorted", (B, H, n), f32)
            ws["order"] = wsp.take("cache.order", (B, H, n), i64)
        return ws

    def _ws(self, seq_ids: torch.Tensor, k: int, ws: dict | None) -> dict:
        return ws if ws is not None else self.plan_workspace(seq_ids, k, Workspace(self.device))

    # ---- per layer, per step (no host sync, no allocation) ---------------------------------------
    def lookup(self, layer: int, seq_ids: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor,
               ws: dict | None = None, count: bool = True) -> torch.Tensor:
        """Slot of each selected position, -1 on a miss. pos int64 [B, H, k]; valid bool [B, H, k].
        count=False: not a selection's lookup (a speculative prefetch's): not in the hit rate.

        Returns int64 [B, H, k], a view of ws (the step's buffers, `plan_workspace`).
        """
        B, H, k = pos.shape
        ws = self._ws(seq_ids, k, ws)
        if self.use_triton:
            from gpu_kernels.gpu_cache import lookup

            return lookup(seq_ids, pos, valid, self.slot_of[layer], ws["slot"], self.hits, self.lookups, count,
                          outs=(ws["lookup_miss"], ws["hit_rows"], self.slots + 1))
        flat = torch.clamp(pos, 0, self.cap, out=ws["i1"]).add_(ws["base_of"])
        torch.index_select(self.slot_of[layer].view(-1), 0, flat.view(-1), out=ws["slot16"].view(-1))
        slot = ws["slot"].copy_(ws["slot16"])
        slot.masked_fill_(torch.logical_not(valid, out=ws["invalid"]), -1)
        if count:
            self.hits += torch.sum(torch.ge(slot, 0, out=ws["hit"]), (0, 1, 2), out=ws["count"])
            self.lookups += torch.sum(valid, (0, 1, 2), out=ws["count"])
        return slot

    def read(self, layer: int, seq_ids: torch.Tensor, slot: torch.Tensor, out: torch.Tensor,
             ws: dict | None = None) -> None:
        """Copy the hits' K/V into out [2, B, H, k, d] (misses' rows untouched; quantized: dequantized)."""
        B, H, k = slot.shape
        ws = self._ws(seq_ids, k, ws)
        if self.fmt is not None:  # -1: not a hit, the kernel leaves that row of out alone
            self.fmt.gather_rows(self._rows_of(layer), self._hit_rows(slot, ws), out)
            return
        rows = torch.clamp(slot, min=0, out=ws["i1"]).add_(ws["base_kv"]).view(-1)
        hit = torch.ge(slot, 0, out=ws["hit"]).unsqueeze(-1)
        d = self.geometry.head_dim
        for i, src in enumerate((self.k, self.v)):
            torch.index_select(src[layer].view(-1, d), 0, rows, out=ws["kv"].view(-1, d))
            torch.where(hit, ws["kv"], out[i], out=out[i])

    def read_rows(self, layer: int, seq_ids: torch.Tensor, slot: torch.Tensor, raw: torch.Tensor,
                  ws: dict | None = None) -> None:
        """Quantized cache: copy the hits' rows as stored into raw uint8 [B * H * k, row_bytes] (the fetch's
        staging, which holds the misses' rows), so the step's selected tokens are all rows in one buffer."""
        ws = self._ws(seq_ids, slot.shape[2], ws)
        self.fmt.copy_rows(self._rows_of(layer), self._hit_rows(slot, ws), raw)

    def _rows_of(self, layer: int) -> torch.Tensor:
        """One layer's slots as rows, uint8 [S * Hkv * (slots + 1), row_bytes] (quantized cache)."""
        return self.rows[layer].view(-1, self.fmt.bytes_per_token)

    def miss_mask(self, slot: torch.Tensor, valid: torch.Tensor, ws: dict, out: torch.Tensor) -> torch.Tensor:
        """bool [B, H, k]: the valid picks that missed, for `slot` as the last `lookup` with `ws` returned it
        (the kernel wrote them then; the torch path computes them into `out`)."""
        if self.use_triton:
            return ws["lookup_miss"]
        return torch.lt(slot, 0, out=out).bitwise_and_(valid)

    def _hit_rows(self, slot: torch.Tensor, ws: dict) -> torch.Tensor:
        """Row of `_rows_of` holding each hit, -1 for the rest; int64 [B * H * k], a view of ws (`slot` as
        the last `lookup` with `ws` returned it: the kernel wrote the rows then)."""
        if self.use_triton:
            return ws["hit_rows"]
        rows = torch.clamp(slot, min=0, out=ws["i1"]).add_(ws["base_kv"]).view(-1)
        return rows.masked_fill_(torch.lt(slot, 0, out=ws["nohit"]).view(-1), -1)

    def admit(self, layer: int, seq_ids: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, slot: torch.Tensor,
              kv: torch.Tensor, ws: dict | None = None, raw: torch.Tensor | None = None, touch: bool = True) -> None:
        """Update scores and admit this step's misses into the least valuable unprotected slots.
        touch=False (a speculative prefetch's rows): admit only, the scores stay as they are (the
        layer's own selection scores its hits once, after its attention).

        pos int64, valid bool, slot int64 (from `lookup`) [B, H, k]; kv [2, B, H, k, d] the
        step's selected K/V (hits and fetched misses). Quantized: raw uint8 [B * H * k, row_bytes],
        the fetch's staging of the misses' rows (`ColdTier.fetch`), is what is admitted (kv is not).
        """
        if self.fmt is not None and raw is None:
            raise ValueError("GPUCache.admit: a quantized cache admits the fetch's raw rows; pass raw=")
        if self.slots == 0:
            return
        B, H, k = pos.shape
        ws = self._ws(seq_ids, k, ws)
        if self.use_triton:
            from gpu_kernels.gpu_cache import admit

            src = (raw,) if self.fmt is not None else (kv[0], kv[1])
            admit(seq_ids, pos, valid, slot, self.score[layer], self.pos[layer], self.slot_of[layer],
                  self._data_of(layer), src, self.step, ws["admit"], self.policy == "lfu", self.decay, touch)
            return
        trash, cap, inf = self.slots, self.cap, float("inf")
        h, sb = ws["h"], seq_ids.view(B, 1, 1)
        nohit = torch.lt(slot, 0, out=ws["nohit"])
        hit = torch.ge(slot, 0, out=ws["hit"])
        miss = torch.bitwise_and(valid, nohit, out=ws["miss"])
        score = torch.index_select(self.score[layer], 0, seq_ids, out=ws["score"])  # [B, H, slots + 1]
        hit_slot = ws["hit_slot"].copy_(slot).masked_fill_(nohit, trash)
        if touch:
            if self.policy == "lfu":
                score.mul_(self.decay)
                score.scatter_add_(2, hit_slot, ws["hitf"].copy_(hit))
            else:
                score.scatter_(2, hit_slot, ws["stepf"].copy_(self.step.expand(B, H, k)))
            score[..., trash].fill_(0.0)
            self.score[layer][seq_ids] = score
        posg = torch.index_select(self.pos[layer], 0, seq_ids, out=ws["posg"])  # [B, H, slots + 1]
        prot = ws["prot"].copy_(score).masked_fill_(torch.lt(posg, 0, out=ws["empty"]), -inf)  # empty slots first
        prot.scatter_(2, hit_slot, inf)
        prot[..., trash].fill_(inf)
        nv = min(k, self.slots)
        torch.sort(prot, dim=-1, stable=True, out=(ws["sorted"], ws["order"]))
        vals, victims = ws["sorted"][..., :nv], ws["order"][..., :nv]  # the nv least valuable slots
        cs = torch.cumsum(ws["missl"].copy_(miss), -1, out=ws["cs"])
        rank = torch.sub(cs, 1, out=ws["rank"]).clamp_(0, nv - 1)
        ok = torch.le(cs, nv, out=ws["ok"]).bitwise_and_(miss)
        ok.bitwise_and_(torch.lt(torch.gather(vals, 2, rank, out=ws["gv"]), inf, out=ws["b"]))
        notok = torch.logical_not(ok, out=ws["notok"])
        tslot = torch.gather(victims, 2, rank, out=ws["tslot"]).masked_fill_(notok, trash)
        old = ws["old"].copy_(torch.gather(posg, 2, tslot, out=ws["old32"]))
        keep_old = torch.ge(old, 0, out=ws["b"]).bitwise_and_(ok)
        old_col = ws["old_col"].copy_(old).masked_fill_(torch.logical_not(keep_old, out=ws["b"]), cap)
        self.slot_of[layer].index_put_((sb, h, old_col), self.none[self.slot_of.dtype])
        new_col = torch.clamp(pos, 0, cap, out=ws["new_col"]).masked_fill_(notok, cap)
        self.slot_of[layer][sb, h, new_col] = ws["tslot16"].copy_(tslot)
        if self.fmt is None:
            self.k[layer][sb, h, tslot] = kv[0]
            self.v[layer][sb, h, tslot] = kv[1]
        else:  # the rows as fetched; a non-miss's row holds stale bytes and goes to the trash slot
            self.rows[layer][sb, h, tslot] = raw.view(B, H, k, raw.shape[-1])  # k may be 0 (nothing to select)
        self.pos[layer][sb, h, tslot] = ws["p32"].copy_(pos).masked_fill_(notok, -1)
        self.score[layer].index_put_((sb, h, tslot), self.one if self.policy == "lfu" else self.step)
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
