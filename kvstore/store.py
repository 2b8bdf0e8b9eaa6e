"""The data path: per-layer prefill, and decode split into plan (once per step) and run (per layer).

    store = KVStore(config, geometry)
    seq_ids = store.add_sequences(batch)                      # sequence slots
    for layer: out = store.prefill(layer, seq_ids, q, k, v, valid, scale)
    for step:
        plan = store.plan(seq_ids)                            # host work, the step's buffers, host syncs
        for layer: out = store.decode(layer, plan, q, k, v, scale)   # no allocation, no host sync
    store.release(seq_ids)                                    # every page back to the pool

Everything is batched over sequences, layers and heads; there is no Python loop over any of
them on the data path.
"""

from __future__ import annotations

import logging
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch

from gpu_kernels import torch_ops
from kvstore.config import KVStoreConfig
from kvstore.geometry import ModelGeometry
from kvstore.hot.tier import HotTier
from kvstore.hot.policies import PrefillKeep, make_policy
from kvstore.prefill_attention import prefill_attention
from kvstore.cold.host_tier import ColdTier
from kvstore.cold.gpu_cache import GPUCache
from kvstore.cold.selection import budgets, window_sizes
from kvstore.cold.selectors import make_selector
from kvstore.plan import DecodePlan, SelectionStep, Workspace

logger = logging.getLogger(__name__)

#: Every store alive in this process (tests check that each one's pages are all free again).
LIVE_STORES: "weakref.WeakSet[KVStore]" = weakref.WeakSet()


class KVStore:
    def __init__(self, config: KVStoreConfig, geometry: ModelGeometry):
        config.warn_ignored(torch.device(geometry.device).type)  # once per config: fields it ignores
        self.config = config
        self.geometry = geometry
        self.device = geometry.device
        self.max_seqs = config.max_batch_size
        # the cold tier first: it allocates nothing until a prefill, and refuses a host_tier_bytes
        # below one chunk before the hot tier allocates its pool
        self.cold = ColdTier(config, geometry, self.max_seqs) if config.cold_tier else None
        self.hot = HotTier(config, geometry)
        self.seq_len = torch.zeros(self.max_seqs, dtype=torch.int64, device=self.device)
        #: each sequence's whole prompt length when its caller said it (add_sequences), else 0
        self.prompt_len = torch.zeros(self.max_seqs, dtype=torch.int64, device=self.device)
        self._free_seqs = list(range(self.max_seqs - 1, -1, -1))
        self.active: set[int] = set()
        self.policy = make_policy(config, self.max_seqs, self.device)
        # retrieval (kvstore/cold/: selection.py, gpu_cache.py)
        self.selector = None
        self.gpu_cache: GPUCache | None = None
        #: bool [L, S, Hkv, cap + 1] under hot_policy='leankv' with retrieval (`tiered`): which
        #: positions each (layer, sequence, KV head) holds in the hot tier; the others (pruned)
        #: are the selector's candidates. Column cap is a trash column for "no position".
        self.resident: torch.Tensor | None = None
        if config.retrieves:
            if config.hot_policy not in ("window", "leankv"):
                raise NotImplementedError(
                    f"selector={config.selector!r} with hot_policy={config.hot_policy!r}: retrieval is wired for the "
                    "'window' hot policy (candidates: outside sinks + window) and 'leankv' (candidates: the tokens "
                    "it pruned)"
                )
            self.selector = make_selector(config, geometry, self.cold)
            self.window = torch.ones(self.max_seqs, dtype=torch.int64, device=self.device)
            self.topk = torch.ones(self.max_seqs, dtype=torch.int64, device=self.device)
            self._cap = 0
            if config.hot_policy == "leankv":
                L, H = geometry.num_layers, geometry.num_kv_heads
                self.resident = torch.zeros(L, self.max_seqs, H, 1, dtype=torch.bool, device=self.device)
        #: overlap the fetch of misses with attention over resident tokens (False: fully synchronous)
        self.async_fetch = True
        self._fetch_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" and config.retrieves else None
        # one completion event per layer, re-recorded every step (nothing created on the decode path)
        self._fetch_events = [torch.cuda.Event() for _ in range(geometry.num_layers)] if self._fetch_stream is not None else []
        self._fetch_pool = ThreadPoolExecutor(1, thread_name_prefix="kvstore-fetch") if config.retrieves else None
        #: buffers of the decode step, carved by `plan`, written by every layer's `decode` (kvstore/plan.py)
        self.workspace = Workspace(self.device)
        self._plan_id = 0
        #: the latest plan, until the next plan / prefill / release checks that every layer decoded it
        self._last_plan: DecodePlan | None = None
        #: `stats()` as it stood before the last release (the figures of the last generation)
        self.last_stats: dict | None = None
        self._expected_new = 0  # decode steps announced by `reserve`, for the first layer's prefill
        LIVE_STORES.add(self)

    # ---- sequences --------------------------------------------------------------------------
    def add_sequences(self, n: int, prompt_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Reserve `n` sequence slots; returns their ids (int64 [n] on the store's device).

        `prompt_lengths` (int [n], valid tokens of each prompt) lets a prefill in chunks serve the
        policies that decide from the whole prompt (window, LeanKV); without it such a policy
        takes its first prefill call as the whole prompt."""
        if n > len(self._free_seqs):
            grow_to = max(self.max_seqs * 2, len(self.active) + n)
            self._grow_seqs(grow_to)
        ids = [self._free_seqs.pop() for _ in range(n)]
        self.active.update(ids)
        t = torch.tensor(ids, dtype=torch.int64, device=self.device)
        self.seq_len[t] = 0
        self.prompt_len[t] = 0 if prompt_lengths is None else prompt_lengths.to(self.device, torch.int64)
        return t

    def _grow_seqs(self, max_seqs: int) -> None:
        old = self.max_seqs
        self.hot.table.ensure_seqs(max_seqs)
        self.policy.ensure_seqs(max_seqs)
        if self.cold is not None:
            self.cold.ensure_seqs(max_seqs)
        if self.selector is not None:
            for name in ("window", "topk"):
                t = torch.ones(max_seqs, dtype=torch.int64, device=self.device)
                t[:old] = getattr(self, name)
                setattr(self, name, t)
            self._ensure_retrieval(max_seqs, self._cap)
        for name in ("seq_len", "prompt_len"):
            grown = torch.zeros(max_seqs, dtype=torch.int64, device=self.device)
            grown[:old] = getattr(self, name)
            setattr(self, name, grown)
        self._free_seqs = list(range(max_seqs - 1, old - 1, -1)) + self._free_seqs
        self.max_seqs = max_seqs

    def reserve(self, batch: int, prompt_tokens: int, new_tokens: int = 0, chunked: bool = False) -> None:
        """Before a generation of `batch` prompts of up to `prompt_tokens` tokens and `new_tokens`
        decode steps: size the hot tier's pool once, so it does not grow (and copy) step by step.
        hot_policy="all" knows its need now (every token takes a slot), and so does a chunked
        prefill of any policy (it holds the whole prompt until its last chunk). Otherwise the
        policy keeps what its prefill decides: the pool is sized at the first layer's prefill,
        from that layer's need times the layers (`_reserve_from_first_layer`)."""
        self._expected_new = max(0, new_tokens)
        if (self.config.hot_policy != "all" and not chunked) or batch <= 0:
            return
        geo, tpp = self.geometry, self.hot.tokens_per_page
        self.hot.pool.reserve(batch * geo.num_layers * geo.num_kv_heads * -(-(prompt_tokens + new_tokens) // tpp))

    def _reserve_from_first_layer(self, keep) -> None:
        """Layer 0 of a prefill (policies that keep a subset): reserve the pages layer 0 takes times
        the layers, plus the decode steps `reserve` announced (one host sync)."""
        hot, geo = self.hot, self.geometry
        pages = torch.div(keep.high.sum(-1) + hot.tokens_per_page - 1, hot.tokens_per_page, rounding_mode="floor").sum()
        if keep.low is not None:
            low_tpp = hot.low_tokens_per_page
            pages = pages + torch.div(keep.low.sum(-1) + low_tpp - 1, low_tpp, rounding_mode="floor").sum()
        B, H = keep.high.shape[:2]
        decode = B * H * -(-self._expected_new // hot.tokens_per_page)
        hot.pool.reserve(geo.num_layers * (int(pages.item()) + decode))  # no-op when `reserve` did it
        self._expected_new = 0  # announced for this generation only

    def release(self, seq_ids: torch.Tensor) -> None:
        """End sequences: every page they held goes back to the pool. The figures of the store
        just before (`stats()`) stay in `last_stats`, so a caller can read them after a generation."""
        ids = [int(i) for i in seq_ids.tolist() if int(i) in self.active]
        if not ids:
            return
        self.last_stats = self.stats()
        self._undo_unwritten_slots()  # before the tables are cleared: the last plan's rows are still these sequences'
        t = torch.tensor(ids, dtype=torch.int64, device=self.device)
        # Freed pages are zeroed: high (K8V4) and low (K4V2) pages share the pool with different
        # layouts, so a page reused in the other tier would read stale bytes as scales in its
        # not-yet-written slots; those slots are masked, but 0 * NaN/inf in P @ V is NaN (this
        # made `tiered` emit NaN logits on every batch after the first one of a store).
        pages = self.hot.table.pages[t]
        self.hot.pool.data[pages[pages > 0].long()] = 0
        self.hot.release(t)
        self.policy.release(t)
        if self.selector is not None:
            self.selector.release(t)
            if self.gpu_cache is not None:
                self.gpu_cache.release(t)
            if self.resident is not None:
                self.resident[:, t] = False
        if self.cold is not None:
            self.cold.release(t)
        self.seq_len[t] = 0
        self.prompt_len[t] = 0
        for i in ids:
            self.active.discard(i)
            self._free_seqs.append(i)

    def release_all(self) -> None:
        if self.active:
            self.release(torch.tensor(sorted(self.active), dtype=torch.int64))

    # ---- prefill ----------------------------------------------------------------------------
    def prefill(self, layer: int, seq_ids: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                valid: torch.Tensor, scale: float) -> torch.Tensor:
        """Attend a chunk of T new tokens per sequence and store their K/V.

        Args:
            layer: layer index.
            seq_ids: int64 [B] sequence slots.
            q: [B, Hq, T, d]; k, v: [B, Hkv, T, d] post-RoPE, the model's dtype.
            valid: bool [B, T], False for padding (never stored, never attended).
            scale: softmax scale.
        Returns:
            [B, Hq, T, d] attention output in q's dtype. With no earlier tokens this is exactly
            the model's own causal attention; after earlier chunks it attends the hot tier.
        """
        B, Hkv, T, d = k.shape
        self._undo_unwritten_slots()
        past_len = self.seq_len[seq_ids]  # [B]
        has_past = bool((past_len > 0).any().item())
        past = past_pos = None
        if has_past:  # a later chunk: attend what the hot tier holds, read in the model's dtype
            if self.cold is not None:
                raise NotImplementedError("the cold tier takes a whole prompt in one prefill chunk (no chunked prefill)")
            k_past, v_past, past_pos = self.hot.gather(layer, seq_ids, self.hot.pages_in_use(seq_ids), dtype=k.dtype)
            past = (k_past, v_past, past_pos >= 0)
        out = prefill_attention(q, k, v, valid, scale, past=past)
        positions = past_len.view(B, 1) + torch.cumsum(valid.long(), dim=1) - 1
        new_tokens = valid.sum(dim=1)
        if self.policy.whole_prompt and (has_past or not self._prompt_complete(seq_ids, past_len, valid)):
            keep, k, v, positions, valid = self._whole_prompt_keep(layer, seq_ids, q, k, v, positions, valid, past,
                                                                   past_pos, past_len, scale)
        else:
            keep = self.policy.prefill(self, layer, seq_ids, q, k, positions, valid, scale)
        del past, past_pos
        if layer == 0 and not has_past and self.config.hot_policy != "all":
            self._reserve_from_first_layer(keep)
        self.hot.append(layer, seq_ids, k, v, keep.high, positions, keep.scores)
        if keep.low is not None:
            self.hot.append(layer, seq_ids, k, v, keep.low, positions, keep.scores, low=True)
        if self.cold is not None:
            self._cold_prefill(layer, seq_ids, k, v, positions, valid)
            if self.resident is not None:  # tiered: the prompt tokens LeanKV kept are not candidates
                self._mark_resident_prefill(layer, seq_ids, keep, positions, valid)
            if self.selector is not None:  # selectors that score with the prompt's queries (H2O, SnapKV)
                self.selector.prefill_queries(layer, seq_ids, q, k, positions, valid, scale)
        if layer == self.geometry.num_layers - 1:
            self.seq_len[seq_ids] += new_tokens
        return out

    def _prompt_complete(self, seq_ids: torch.Tensor, past_len: torch.Tensor, valid: torch.Tensor) -> bool:
        """Whether this chunk ends every sequence's prompt: its length is unknown (`add_sequences`
        without prompt lengths: the chunk is taken as the whole prompt) or reached."""
        n = self.prompt_len[seq_ids]
        return bool(((n == 0) | (past_len + valid.sum(1) >= n)).all().item())

    def _whole_prompt_keep(self, layer, seq_ids, q, k, v, positions, valid, past, past_pos, past_len, scale):
        """Chunked prefill under a policy that decides from the whole prompt (window, LeanKV).

        Before the last chunk every token is kept (high tier): the hot tier holds the prompt so
        far in full, in the same order for every head. At the last chunk this layer's earlier
        chunks are read back (`past`, as attention read them), their pages freed, and the policy
        decides over the whole prompt with the last chunk's queries, as a one-pass prefill would
        (LeanKV: the last `score_queries` queries, all in the last chunk when it is at least that
        long, as the generate() wrapper's even chunks make it). The earlier tokens go back
        quantized from their dequantized values: K8V4 codes come back the same up to rounding of
        the scales; a token demoted to K4V2 is quantized from its K8V4 values, not the model's.
        Returns (keep, k, v, positions, valid) of what to append.
        """
        B, Hkv, T = k.shape[0], k.shape[1], k.shape[2]
        if past is not None and not bool((self.prompt_len[seq_ids] > 0).all().item()):
            raise NotImplementedError(
                f"hot_policy={self.config.hot_policy!r} decides from the whole prompt: a chunked prefill must say the "
                "prompt lengths first (generate() does; a forward loop passes them to add_sequences)")
        if not self._prompt_complete(seq_ids, past_len, valid):  # an earlier chunk: keep it all for now
            return PrefillKeep(high=valid.view(B, 1, T).expand(B, Hkv, T)), k, v, positions, valid
        k_past, v_past, held = past
        self.hot.release_layer(layer, seq_ids)
        k = torch.cat([k_past, k], dim=2)
        v = torch.cat([v_past, v], dim=2)
        positions = torch.cat([past_pos[:, 0].long(), positions], dim=1)  # head 0's: every head holds the same
        valid = torch.cat([held[:, 0], valid], dim=1)
        return self.policy.prefill(self, layer, seq_ids, q, k, positions, valid, scale), k, v, positions, valid

    # ---- decode -----------------------------------------------------------------------------
    def plan(self, seq_ids: torch.Tensor) -> DecodePlan:
        """Prepare one decode step for every layer: where each head's new token goes.

        Allocates the pages that fill up this step for all (sequence, layer, KV head) at once,
        and takes every buffer the layers' decode runs write from the store's workspace (all
        allocation of the step happens here, with the step's host syncs). Nothing later in the
        step allocates or syncs. The hot policy decides per head whether the new token takes a
        fresh slot (high-tier index n, the next one) or reuses the slot of a token that leaves
        the hot tier. One step is in flight per store: a new plan makes the last one stale (and
        undoes the fresh slots of layers that step did not decode: the high tier stays dense,
        `_undo_unwritten_slots`).
        """
        self._undo_unwritten_slots()
        hot, tpp = self.hot, self.hot.tokens_per_page
        n = hot.table.num_tokens[seq_ids].long()  # [B, L, H]
        B, L, H = n.shape
        positions = self.seq_len[seq_ids].clone()
        decision = self.policy.plan(self, seq_ids, positions, last_step=self.hot.take_last_step())
        fresh = decision.reuse < 0
        index = torch.where(fresh, n, decision.reuse)  # high-tier index the new token takes
        needs = (fresh & (n % tpp == 0)).long()
        hot.table.ensure_pages(self.hot.pages_in_use(seq_ids) + 1 + int(hot.table.num_low_pages.max().item()))
        ids, offsets = hot.pool.allocate(needs.reshape(-1))
        if ids.numel():
            flat = needs.reshape(-1).nonzero(as_tuple=True)[0]
            b, rest = flat // (L * H), flat % (L * H)
            l, h = rest // H, rest % H
            hot.table.pages[seq_ids[b], l, h, (n.reshape(-1)[flat] // tpp)] = ids[offsets[flat]]
        page = torch.gather(hot.table.pages[seq_ids], 3, (index // tpp).unsqueeze(-1)).squeeze(-1)
        slot = (index % tpp).to(torch.int32)
        hot.table.num_tokens[seq_ids] += fresh.to(torch.int32)
        self.seq_len[seq_ids] += 1
        plan = DecodePlan(seq_ids, positions, page, slot, self.hot.pages_in_use(seq_ids), decision.evicted_pos)
        plan.hot_ws = self.hot.plan_workspace(seq_ids, plan.num_pages, workspace=self.workspace, page=page, slot=slot,
                                              positions=positions)
        geo = self.geometry
        plan.out = self.workspace.take("store.out", (L, B, geo.num_q_heads, 1, geo.head_dim), geo.dtype)
        if self.cold is not None:
            self.cold.plan_step(seq_ids, positions)
        if self.selector is not None:
            self._plan_retrieval(plan)
        self._plan_id += 1
        plan.step_id = self._plan_id
        plan.fresh, plan.new_page, plan.written = fresh, needs, [False] * L
        self._last_plan = plan
        return plan

    @torch.no_grad()
    def decode(self, layer: int, plan: DecodePlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float) -> torch.Tensor:
        """One layer of one decode step: no allocation and no host sync (but on the first step after
        a prefill, where a PQ selector waits for this layer's codebook and loads it). Inference
        only: the output carries no autograd history (out= ops into the step's buffers).

        Args:
            plan: this step's plan (the latest `plan` of this store).
            q: [B, Hq, 1, d]; k, v: [B, Hkv, 1, d] post-RoPE K/V of the new token, the model's dtype.
        Returns:
            [B, Hq, 1, d] in q's dtype: `plan.out[layer]`, a view of the step's workspace. Each
            layer has its own: layer i's output stays valid while later layers of the step run,
            until the next `plan` (which reuses the buffer). A caller that keeps outputs across
            steps copies them (the HF adapter's o_proj consumes each one within its layer).
            (q in another dtype than the store's gets a fresh tensor.)
        """
        if plan.step_id != self._plan_id:
            raise RuntimeError(
                f"decode got a stale plan (step {plan.step_id}, the store's latest is {self._plan_id}): plan() "
                "reuses the step's buffers, so plan once per step and decode every layer before the next plan"
            )
        ws = plan.hot_ws
        self.hot.write_slots(layer, plan.page[:, layer], plan.slot[:, layer], k[:, :, 0], v[:, :, 0], plan.positions,
                             ws)
        plan.written[layer] = True
        if self.cold is not None:
            self.cold.write_decode(layer, k[:, :, 0].detach(), v[:, :, 0].detach())
        if self.selector is not None:
            out = self._decode_retrieval(layer, plan, q, k, scale)
        else:
            out, _ = self.hot.attend(layer, plan.seq_ids, q[:, :, 0], scale, plan.num_pages, ws,
                                     out=plan.out[layer, :, :, 0] if q.dtype == plan.out.dtype else None)
        if q.dtype != plan.out.dtype:
            return out.to(q.dtype, copy=True).unsqueeze(2)
        if out.data_ptr() != plan.out[layer].data_ptr():  # fp32 merge result (retrieval)
            plan.out[layer, :, :, 0].copy_(out)
        return plan.out[layer]

    def _undo_unwritten_slots(self) -> None:
        """Keep every head's high tier dense after a step that did not decode every layer.

        The decode kernel attends high-tier indices [0, n_high) without reading their positions
        (`HIGH_DENSE`, gpu_kernels/paged_attention.py), so every index below n_high must hold a
        token whenever it runs. The store keeps it so: prefill packs the kept tokens from index 0;
        a plan gives each head's new token either the next index n (n_high becomes n + 1) or the
        index of a token that leaves the high tier this step (demoted or pruned: the slot keeps that
        token until the new one overwrites it); the low tier's prunes empty low slots only; and
        each layer's `decode` writes its new tokens before its attention runs. The one gap is a plan
        whose step stops before every layer's `decode` (an exception inside the model's forward, a
        caller that plans and drops the step): the fresh index n of the layers not written would be
        an empty slot below n_high. Called before the next plan, prefill or release, this gives
        those layers their index back (n_high = n, and the page that index opened, if any, back to
        the pool). Costs nothing unless a step was abandoned (then a few indexing ops, one host
        sync). The step's other effects stay as they were: the sequence's length counts the token,
        and a high token the plan demoted or pruned in an unwritten layer stays in its slot.
        """
        plan, self._last_plan = self._last_plan, None
        if plan is None or plan.fresh is None or all(plan.written):
            return
        skip = torch.tensor([not w for w in plan.written], device=self.device).view(1, -1, 1)
        undo = plan.fresh & skip
        drop = plan.new_page.bool() & skip
        if not bool(undo.any().item()):
            return
        t, pool, sid = self.hot.table, self.hot.pool, plan.seq_ids
        t.num_tokens[sid] -= undo.to(torch.int32)
        b, l, h = drop.nonzero(as_tuple=True)
        if b.numel():
            col = t.num_tokens[sid[b], l, h].long() // self.hot.tokens_per_page  # index n opened page n // tpp
            ids = t.pages[sid[b], l, h, col]
            t.pages[sid[b], l, h, col] = 0
            pool.data[ids.long()] = 0  # as release does: a page may come back in the other tier
            pool.free(ids)
        logger.debug("a decode step stopped after %d of %d layers: undid %d unwritten slots",
                     sum(plan.written), len(plan.written), int(undo.sum().item()))

    # ---- accounting -------------------------------------------------------------------------
    def stats(self) -> dict:
        ids = torch.tensor(sorted(self.active), dtype=torch.int64, device=self.device)
        tokens = int(self.seq_len[ids].sum().item()) if ids.numel() else 0
        counts = self.hot.token_counts(ids) if ids.numel() else {"hot_high_tokens": 0, "hot_low_tokens": 0}
        retrieval_bytes = 0
        if self.selector is not None:
            retrieval_bytes = len(self.active) * self._retrieval_bytes_per_seq()
        extra = self._retrieval_stats() if self.cold is not None else {}
        return {
            "sequences": len(self.active),
            "tokens": tokens,
            "gpu_kv_bytes": self.hot.used_bytes + retrieval_bytes,
            "host_kv_bytes": self.cold.used_bytes if self.cold is not None else 0,
            **extra,
            "dense_kv_bytes": tokens * self.geometry.dense_bytes_per_token,
            "decode_workspace_bytes": self.workspace.nbytes,  # the step's buffers (kvstore/plan.py), not KV
            "hot_pages_used": self.hot.pool.num_used,
            "hot_pages_reserved": self.hot.pool.num_pages,
            "hot_pages_peak": self.hot.pool.peak_used,
            "hot_reserved_bytes": self.hot.pool.reserved_bytes,
            "page_bytes": self.hot.page_bytes,
            **counts,
        }

    # ---- cold tier and retrieval (kvstore/cold/: host_tier.py, selection.py, gpu_cache.py) --------------
    def _ensure_retrieval(self, max_seqs: int, needed: int) -> None:
        """Grow the position-indexed retrieval buffers (between steps; doubling)."""
        cap = self._cap if needed <= self._cap else max(needed, 2 * self._cap, 64)
        self._cap = cap
        self.selector.ensure(max_seqs, cap)
        if self.gpu_cache is not None:
            self.gpu_cache.ensure(max_seqs, 0, cap)
        if self.resident is not None:
            L, S, H, C = self.resident.shape
            if max_seqs > S or cap + 1 > C:
                grown = torch.zeros(L, max(S, max_seqs), H, max(C, cap + 1), dtype=torch.bool, device=self.device)
                grown[:, :S, :, : C - 1] = self.resident[..., : C - 1]
                self.resident = grown

    def _retrieval_bytes_per_seq(self) -> int:
        """Device bytes of retrieval state per sequence slot: index, GPU cache, residency map."""
        per_seq = self.selector.device_bytes_per_seq() + (self.gpu_cache.bytes_per_seq if self.gpu_cache else 0)
        if self.resident is not None:
            per_seq += self.resident[:, 0].numel() * self.resident.element_size()
        return per_seq

    def _candidate_window(self, n: torch.Tensor) -> torch.Tensor:
        """Recent tokens per sequence that are never candidates (int64 [B] for prompt lengths n).

        'window': PQCache's window. 'leankv' (tiered): the recent tokens LeanKV never prunes, so
        min(window, immune_tokens) >= 1: a larger window would leave tokens pruned between the
        immune region and the window's start out of both the hot tier and the candidates.
        """
        w = window_sizes(self.config, n)
        if self.resident is not None:
            w = w.clamp(max=max(1, self.config.immune_tokens))
        return w

    @torch.no_grad()
    def _mark_resident_prefill(self, layer: int, seq_ids: torch.Tensor, keep, positions: torch.Tensor,
                               valid: torch.Tensor) -> None:
        """Record which prompt tokens of one layer the hot tier holds (either precision tier)."""
        B, H, T = keep.high.shape
        held = keep.high if keep.low is None else keep.high | keep.low
        cap = self.resident.shape[-1] - 1
        self.resident[layer, seq_ids] = False
        col = torch.where(valid, positions.long(), torch.full_like(positions, cap, dtype=torch.int64))
        h = torch.arange(H, device=self.device).view(1, H, 1)
        self.resident[layer, seq_ids.view(B, 1, 1), h, col.view(B, 1, T)] = held & valid.view(B, 1, T)
        self.resident[layer, :, :, cap] = False

    @torch.no_grad()
    def _mark_pruned_step(self, plan: "DecodePlan", hi: torch.Tensor) -> torch.Tensor:
        """Plan time: what the policy pruned this step leaves the residency map. Returns the number
        of candidates (pruned tokens in [S, hi)) per (layer, sequence, KV head), int64 [L, B, Hkv]."""
        B, L, H = plan.page.shape
        cap = self.resident.shape[-1] - 1
        sb = plan.seq_ids.view(B, 1, 1)
        l_ = torch.arange(L, device=self.device).view(1, L, 1)
        h = torch.arange(H, device=self.device).view(1, 1, H)
        for gone in (plan.evicted_pos, getattr(self.policy, "last_low_evicted", None)):  # two tensors
            if gone is not None:
                col = torch.where(gone >= 0, gone, torch.full_like(gone, cap))
                self.resident[l_, sb, h, col] = False
        self.resident[:, :, :, cap] = False
        S = self.config.sink_tokens
        t = torch.arange(cap, device=self.device).view(1, 1, 1, cap)
        in_range = (t >= S) & (t < hi.view(1, B, 1, 1))
        held = (self.resident[:, plan.seq_ids, :, :cap] & in_range).sum(-1)  # [L, B, H]
        return (hi - S).clamp(min=0).view(1, B, 1) - held

    @torch.no_grad()
    def _cold_prefill(self, layer: int, seq_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      positions: torch.Tensor, valid: torch.Tensor) -> None:
        """Prompt K/V to the cold tier (copy stream) and the selector's index (background build)."""
        n = valid.sum(dim=1)
        if layer == 0:
            self.cold.allocate_prefill(seq_ids, n)
            if self.selector is not None:
                self.window[seq_ids] = self._candidate_window(n)
                self.topk[seq_ids] = budgets(self.config, n)
                kmax, nmax = (int(x) for x in torch.stack([self.topk[seq_ids].max(), n.max()]).tolist())
                self._ensure_retrieval(self.max_seqs, nmax + 1)
                # tiered: no candidate before LeanKV prunes; the cache grows at plan time with them
                slots = 0 if self.resident is not None else min(self.config.gpu_cache_tokens, kmax)
                if self.gpu_cache is None:
                    self.gpu_cache = GPUCache(self.geometry, self.max_seqs, slots, self._cap)
                else:
                    self.gpu_cache.ensure(self.max_seqs, slots, self._cap)
        self.cold.write_prefill(layer, k, v, positions, valid)
        if self.selector is not None:
            S = self.config.sink_tokens
            hi = torch.clamp(n - self.window[seq_ids], min=S)
            self.selector.prefill(layer, seq_ids, k, positions, valid, n, hi)

    def _plan_retrieval(self, plan: DecodePlan) -> None:
        """Selection metadata and buffers of one step (host work, one host sync)."""
        seq_ids, positions = plan.seq_ids, plan.positions
        S = self.config.sink_tokens
        hi = torch.clamp(positions + 1 - self.window[seq_ids], min=S)
        k = self.topk[seq_ids]
        # tiered: the selection is never wider than the most candidates any (layer, sequence, head)
        # has (nothing pruned yet: nothing to select, no fetch, no GPU cache slots)
        cand = self._mark_pruned_step(plan, hi).max() if self.resident is not None else hi.max()
        num_tokens, kmax, kmin, pmax, cmax = (
            int(x) for x in torch.stack([hi.max(), k.max(), k.min(), positions.max(), cand]).tolist())
        self._ensure_retrieval(self.max_seqs, pmax + 1)
        self.cold.device_maps()  # refresh the device chunk maps now, not inside a layer
        ktop, kmax = kmax, max(0, min(kmax, num_tokens - S, cmax))
        if self.resident is not None:
            self.resident[:, seq_ids, :, positions] = True  # the new token is hot in every (layer, head)
            want = min(self.config.gpu_cache_tokens, kmax)
            if self.gpu_cache is not None and want > self.gpu_cache.slots:  # grows with the candidates
                cap_slots = min(self.config.gpu_cache_tokens, ktop)
                self.gpu_cache.ensure(self.max_seqs, min(cap_slots, max(want, 2 * self.gpu_cache.slots)), self._cap)
        geo, wsp = self.geometry, self.workspace
        B, H, Hq, d = seq_ids.numel(), geo.num_kv_heads, geo.num_q_heads, geo.head_dim
        step = SelectionStep(seq_ids, positions, torch.full_like(hi, S), hi, k, num_tokens, kmax, kmin == kmax,
                             exclude=self.resident)
        ws = self.selector.plan_workspace(step, wsp)
        ws["cache"] = self.gpu_cache.plan_workspace(seq_ids, kmax, wsp)
        ws["fetch"] = self.cold.fetch_workspace(seq_ids, kmax, wsp)
        ws["miss"] = wsp.take("ret.miss", (B, H, kmax), torch.bool)
        ws["invalid"] = wsp.take("ret.invalid", (B, H, kmax), torch.bool)
        ws["attn"] = torch_ops.decode_attention_buffers(lambda n, sh, t: wsp.take("ret." + n, sh, t), B, Hq, H, kmax, d,
                                                        kv_fp32=geo.dtype == torch.float32)
        ws["merge"] = torch_ops.merge_attention_buffers(lambda n, sh, t: wsp.take("merge." + n, sh, t), B, Hq, d)
        step.ws = ws
        plan.selection = step
        plan.retrieved = wsp.take("ret.kv", (2, B, H, kmax, d), geo.dtype).zero_()

    @torch.no_grad()
    def _decode_retrieval(self, layer: int, plan: DecodePlan, q: torch.Tensor, k: torch.Tensor,
                          scale: float) -> torch.Tensor:
        """Select, resolve hits, fetch misses (overlapped with attention over the hot tier), merge by
        LSE. Returns fp32 [B, Hq, d], a view of the step's buffers."""
        step, buf, q0 = plan.selection, plan.retrieved, q[:, :, 0]
        ws = step.ws
        self.selector.before_decode(layer)  # first step after prefill: this layer's build only
        self.selector.append(layer, step, k[:, :, 0])
        pos, valid = self.selector.select(layer, step, q0, scale)
        slot = self.gpu_cache.lookup(layer, step.seq_ids, pos, valid, ws["cache"])
        miss = torch.lt(slot, 0, out=ws["miss"]).bitwise_and_(valid)
        pending = self._start_fetch(layer, step.seq_ids, pos, miss, buf, ws["fetch"])
        out_h, lse_h = self.hot.attend(layer, plan.seq_ids, q0, scale, plan.num_pages, plan.hot_ws)
        self._wait_fetch(pending)
        self.gpu_cache.read(layer, step.seq_ids, slot, buf, ws["cache"])
        invalid = torch.logical_not(valid, out=ws["invalid"])
        out_r, lse_r = torch_ops.decode_attention_out(q0, buf[0], buf[1], invalid, scale, ws["attn"])
        out, lse = torch_ops.merge_attention_out(out_h, lse_h, out_r, lse_r, ws["merge"])
        hws = plan.hot_ws
        if hws is not None and hws.get("lse_all") is not None:
            # LeanKV's score update reads exp(logit - lse_all): with the merged lse, a hot token's
            # probability is its share of the softmax over hot + retrieved tokens (kvstore/hot/policies.py)
            hws["lse_all"][layer].copy_(lse)
        self.gpu_cache.admit(layer, step.seq_ids, pos, valid, slot, buf, ws["cache"])
        if layer == self.geometry.num_layers - 1:
            self.gpu_cache.end_step()
        return out

    def _start_fetch(self, layer, seq_ids, pos, miss, buf, ws=None):
        if not self.async_fetch:
            self.cold.fetch(layer, seq_ids, pos, miss, buf, ws)
            return None
        if self._fetch_stream is not None:  # CUDA: side stream, ordered after what produced pos/miss
            self._fetch_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._fetch_stream):
                self.cold.fetch(layer, seq_ids, pos, miss, buf, ws)
                ev = self._fetch_events[layer]
                ev.record(self._fetch_stream)
            return ev
        return self._fetch_pool.submit(self.cold.fetch, layer, seq_ids, pos, miss, buf, ws)  # CPU: a host thread

    def _wait_fetch(self, pending) -> None:
        if pending is None:
            return
        if isinstance(pending, torch.cuda.Event):
            torch.cuda.current_stream(self.device).wait_event(pending)
        else:
            pending.result()

    def _retrieval_stats(self) -> dict:
        out = {"host_reserved_bytes": self.cold.reserved_bytes}
        if self.selector is not None:
            out["retrieval_gpu_bytes"] = len(self.active) * self._retrieval_bytes_per_seq()
            out["gpu_cache_hit_rate"] = self.gpu_cache.hit_rate() if self.gpu_cache else float("nan")
            out["gpu_cache_slots"] = self.gpu_cache.slots if self.gpu_cache else 0
            out["pq_build_seconds"] = getattr(self.selector, "build_seconds", 0.0)
            out["pq_wait_seconds"] = getattr(self.selector, "wait_seconds", 0.0)
        return out
