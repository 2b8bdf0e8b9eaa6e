"""The data path: per-layer prefill, and decode split into plan (once per step) and run (per layer).

    store = KVStore(config, geometry)
    seq_ids = store.add_sequences(batch)                      # sequence slots
    for layer: out = store.prefill(layer, seq_ids, q, k, v, valid, scale)
    for step:
        plan = store.plan(seq_ids)                            # host work, the step's buffers, host syncs
        for layer: out = store.decode(layer, plan, q, k, v, scale)   # no allocation, no host sync
    store.release(seq_ids)                                    # every page back to the pool

A layer's decode is four moves: write the new token into the hot tier (at the slot the plan
chose); begin the cold path (the token to the host tier; select, look up the GPU cache, start
the fetch of the misses); attend the hot tier (overlapping the fetch); finish the cold path
(attend what was retrieved, merge by log-sum-exp, admit the misses). The store owns the two
tiers (`hot`: kvstore/hot/, `cold`: the host tier) and the hot policy; everything retrieval
needs is the cold path's (`cold_path`, kvstore/cold/path.py), None for a store with neither
a cold tier nor a selector.

Everything is batched over sequences, layers and heads; there is no Python loop over any of
them on the data path.
"""

from __future__ import annotations

import logging
import weakref
from typing import Sequence

import numpy as np
import torch

from kvstore.cold.host_tier import ColdTier
from kvstore.cold.path import ColdPath
from kvstore.config import KVStoreConfig
from kvstore.geometry import ModelGeometry
from kvstore.hot.policies import PrefillKeep, make_policy
from kvstore.hot.tier import HotTier
from kvstore.plan import DecodePlan, Workspace, fill_at
from kvstore.prefill_attention import prefill_attention

logger = logging.getLogger(__name__)
_range = torch.profiler.record_function  # a named range in a torch.profiler trace (~1 us when none records)

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
        #: buffers of the decode step, carved by `plan`, written by every layer's `decode` (kvstore/plan.py)
        self.workspace = Workspace(self.device)
        #: the host tier's writes and retrieval (kvstore/cold/path.py); None without a cold tier or selector
        self.cold_path = (ColdPath(config, geometry, self.cold, self.max_seqs, self.workspace)
                          if self.cold is not None or config.retrieves else None)
        #: the pool pages of the last plan's retrieved tokens (retrieval_attention="kernel"), freed by the next
        self._ret_pages: torch.Tensor | None = None
        self._check_kernel_retrieval()
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
        self.seq_len.index_fill_(0, t, 0)
        self.prompt_len[t] = 0 if prompt_lengths is None else prompt_lengths.to(self.device, torch.int64)
        return t

    def _grow_seqs(self, max_seqs: int) -> None:
        old = self.max_seqs
        self.hot.table.ensure_seqs(max_seqs)
        self.policy.ensure_seqs(max_seqs)
        if self.cold_path is not None:
            self.cold_path.ensure_seqs(max_seqs)
        for name in ("seq_len", "prompt_len"):
            grown = torch.zeros(max_seqs, dtype=torch.int64, device=self.device)
            grown[:old] = getattr(self, name)
            setattr(self, name, grown)
        self._free_seqs = list(range(max_seqs - 1, old - 1, -1)) + self._free_seqs
        self.max_seqs = max_seqs

    def reserve(self, batch: int, prompt_tokens: int | Sequence[int], new_tokens: int | Sequence[int] = 0,
                chunked: bool = False) -> None:
        """Before a generation of `batch` prompts of up to `prompt_tokens` tokens and `new_tokens`
        decode steps: size the hot tier's pool once, so it does not grow (and copy) step by step.
        hot_policy="all" knows its need now (every token takes a slot), and so does a chunked
        prefill of any policy (it holds the whole prompt until its last chunk). Otherwise the
        policy keeps what its prefill decides: the pool is sized at the first layer's prefill,
        from that layer's need times the layers (`_reserve_from_first_layer`). `prompt_tokens`
        and `new_tokens` may also give each sequence's own figure (lists of `batch` ints)."""
        prompts = [prompt_tokens] * batch if isinstance(prompt_tokens, int) else list(prompt_tokens)
        news = [new_tokens] * batch if isinstance(new_tokens, int) else list(new_tokens)
        if len(prompts) != batch or len(news) != batch:
            raise ValueError(f"reserve: {len(prompts)} prompt lengths and {len(news)} new-token counts for {batch} sequences")
        self._expected_new = max([0, *news])
        if (self.config.hot_policy != "all" and not chunked) or batch <= 0:
            return
        geo, tpp = self.geometry, self.hot.tokens_per_page
        pages = sum(-(-(t + max(0, n)) // tpp) for t, n in zip(prompts, news))
        self.hot.pool.reserve(geo.num_layers * geo.num_kv_heads * pages)

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
        self.hot.pool.data.index_fill_(0, pages[pages > 0].long(), 0)
        self.hot.release(t)
        self._free_ret_pages()
        self.policy.release(t)
        if self.cold_path is not None:
            self.cold_path.release(t)
        self.seq_len.index_fill_(0, t, 0)
        self.prompt_len.index_fill_(0, t, 0)
        for i in ids:
            self.active.discard(i)
            self._free_seqs.append(i)

    def _check_kernel_retrieval(self) -> None:
        """retrieval_attention="kernel": the retrieved tokens become pages of the hot tier's high format,
        attended in its kernel launch. Where that cannot run, say why once and merge instead."""
        if self.config.retrieval_attention != "kernel" or self.cold_path is None:
            return
        high, fmt = self.hot.high, self.cold.fmt if self.cold is not None else None
        why = None
        if high.key_bits == 16:
            why = "the hot tier's pages are in the model's dtype (only the quantized decode kernel attends retrieved pages)"
        elif not self.hot.kernel_decode:
            why = "the hot tier's decode attention is not the Triton kernel (Triton off, or a head dim not a power of two >= 16)"
        elif fmt is None or (fmt.key_bits, fmt.value_bits) != (high.key_bits, high.value_bits):
            why = (f"the cold tier's rows (cold_key_bits/cold_value_bits {self.config.cold_key_bits}/"
                   f"{self.config.cold_value_bits}) are not the hot tier's high format K{high.key_bits}V{high.value_bits}")
        elif self.config.quant_groups != 1:
            why = "quant_groups > 1 (the cold tier's rows have one scale group)"
        if why is not None:
            logger.warning("retrieval_attention='kernel' runs as 'merge': %s", why)
            return
        self.cold_path.ret_tokens_per_page = self.hot.tokens_per_page

    def _take_ret_pages(self, plan: DecodePlan) -> int:
        """Plan time: pool pages for the step's selected tokens, NRP = ceil(kmax / T) per (sequence,
        KV head), one layer's worth (each layer rewrites them before its attention). Returns NRP."""
        T, sel = self.cold_path.ret_tokens_per_page, plan.selection
        if not T or sel is None or sel.kmax == 0:
            return 0
        B, H = plan.seq_ids.numel(), self.geometry.num_kv_heads
        nrp = -(-sel.kmax // T)
        taken, _ = self.hot.pool.allocate(torch.full((B * H,), nrp, dtype=torch.int64, device=self.device),
                                          total=B * H * nrp)
        self._ret_pages = taken
        # the kernel reads them from a workspace buffer (a fixed address step after step: kvstore/cuda_graph.py)
        plan.ret_pages = self.workspace.take("ret.pages", (B, H, nrp), taken.dtype).copy_(taken.view(B, H, nrp))
        self.cold_path.plan_ret_pages(plan)
        return nrp

    def _free_ret_pages(self) -> None:
        """Give the last plan's retrieved-token pages back, zeroed (see `release`)."""
        if self._ret_pages is not None:
            self.hot.pool.data.index_fill_(0, self._ret_pages.long(), 0)
            self.hot.pool.free(self._ret_pages, all_pages=True)
            self._ret_pages = None

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
        if self.cold_path is not None:  # the prompt to the host tier, the selector's index
            self.cold_path.prefill(layer, seq_ids, q, k, v, keep, positions, valid, scale)
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
    def plan(self, seq_ids: torch.Tensor, pages_hint: int | None = None, select_hint: int | None = None,
             host_positions: Sequence[int] | None = None, host_seq_ids: Sequence[int] | None = None) -> DecodePlan:
        """Prepare one decode step for every layer: where each head's new token goes.

        Allocates the pages that fill up this step for all (sequence, layer, KV head) at once,
        and takes every buffer the layers' decode runs write from the store's workspace (all
        allocation of the step happens here, with the step's host syncs). Nothing later in the
        step allocates or syncs. The hot policy decides per head whether the new token takes a
        fresh slot (high-tier index n, the next one) or reuses the slot of a token that leaves
        the hot tier. One step is in flight per store: a new plan makes the last one stale (and
        undoes the fresh slots of layers that step did not decode: the high tier stays dense,
        `_undo_unwritten_slots`).

        pages_hint: size the step's attention buffers (the kernel's splits) for this many pages
        (high + low tier + retrieved) even if the batch's are fewer now, so that steps after steps
        get the same buffers and the same launch (a CUDA graph captured once replays them;
        kvstore/cuda_graph.py). `plan.hot_ws["width"]`: the width sized for, in 1/8 steps.
        select_hint: with a selector, the selection at least this wide (within the retrieval
        buffers' capacity) even where the budget or the candidates are fewer (picks past them are
        invalid): a shorter prompt then selects into the same buffers (`Engine.warmup`).
        host_positions, host_seq_ids: the positions of the tokens being decoded (each sequence's length
        before the step) and the slots `seq_ids` holds, where the caller knows them on the host (the
        engine does). Where the hot policy can tell from them what every head holds (`HotPolicy.
        host_sizes`: 'all' from the positions alone, 'window' with the slots too; not LeanKV), the hot
        tier's sizes are not read back from the device; with both, neither are the cold path's
        bookkeeping nor (without LeanKV's residency map) the selection's sizes (`ColdPath.plan`). So
        quant and full plan reading nothing back, pqcache too: such a plan does not wait for the steps
        still queued on the device (the engine plans step t+1 while step t runs, `Engine(overlap=...)`).
        """
        self._undo_unwritten_slots()
        self._free_ret_pages()
        positions = self.seq_len[seq_ids].clone()
        # (profiler ranges, kvstore.plan.*: where a plan's host time goes, benchmarks/perf/profile_step.py)
        with _range("kvstore.plan.policy"):
            decision = self.policy.plan(self, seq_ids, positions, last_step=self.hot.take_last_step())  # decides
        with _range("kvstore.plan.apply"):
            # moves pages, places the new tokens; the widest high and low tables after it
            for name, given in (("host_positions", host_positions), ("host_seq_ids", host_seq_ids)):
                if given is not None and len(given) != seq_ids.numel():
                    raise ValueError(f"plan: {len(given)} {name} for {seq_ids.numel()} sequences")
            sizes = None if host_positions is None else self.policy.host_sizes(host_seq_ids, host_positions)
            page, slot, fresh, needs, (num_pages, low_pages) = self.hot.apply(seq_ids, decision, host_sizes=sizes)
        self.seq_len[seq_ids] += 1
        plan = DecodePlan(seq_ids, positions, page, slot, num_pages, decision.evicted_pos, decision.low_evicted)
        nrp = 0
        if self.cold_path is not None:  # the last step's host writes flushed; the step's selection
            with _range("kvstore.plan.cold"):
                host = None
                if host_positions is not None and host_seq_ids is not None:
                    host = (np.asarray(host_seq_ids, dtype=np.int64), np.asarray(host_positions, dtype=np.int64))
                self.cold_path.plan(plan, select_hint, host)
                nrp = self._take_ret_pages(plan)
        # the kernel's splits cover the retrieved pages too where it attends them
        with _range("kvstore.plan.workspace"):
            plan.hot_ws = self.hot.plan_workspace(seq_ids, plan.num_pages + nrp, workspace=self.workspace,
                                                  page=page, slot=slot, positions=positions,
                                                  min_pages=pages_hint or 0, low_pages=low_pages)
        geo = self.geometry
        B, L = seq_ids.numel(), geo.num_layers
        plan.out = self.workspace.take("store.out", (L, B, geo.num_q_heads, 1, geo.head_dim), geo.dtype)
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
        ws, cold = plan.hot_ws, self.cold_path
        self.hot.write_slots(layer, plan.page[:, layer], plan.slot[:, layer], k[:, :, 0], v[:, :, 0], plan.positions,
                             ws)
        plan.written[layer] = True
        # the new token to the host tier; select, look up the GPU cache, start the fetch of the misses
        started = cold.begin(layer, plan, q, k, v, scale) if cold is not None else None
        if plan.ret_pages is not None:  # wait for the fetch, write the selected tokens into their pages
            cold.stage(layer, plan, started, self.hot.pool)
        # the hot tier's attention (overlapping the fetch) writes the layer's output unless a selection merges with it
        direct = (plan.selection is None or plan.ret_pages is not None) and q.dtype == plan.out.dtype
        out, lse = self.hot.attend(layer, plan.seq_ids, q[:, :, 0], scale, plan.num_pages, ws,
                                   out=plan.out[layer, :, :, 0] if direct else None, ret_pages=plan.ret_pages)
        if cold is not None:  # wait for the fetch, attend the retrieved tokens, merge by LSE, admit the misses
            out = cold.finish(layer, plan, q, scale, out, lse, started,
                              out=plan.out[layer, :, :, 0] if q.dtype == plan.out.dtype else None)
        if q.dtype != plan.out.dtype:
            return out.to(q.dtype, copy=True).unsqueeze(2)
        if out.data_ptr() != plan.out[layer].data_ptr():  # fp32 merge result (retrieval)
            plan.out[layer, :, :, 0].copy_(out)
        return plan.out[layer]

    @property
    def plans_ahead(self) -> bool:
        """Whether a plan given the step's positions and slots on the host (`plan(host_positions=,
        host_seq_ids=)`) reads nothing back from the device, so that step t+1 can be planned while
        step t still runs (`Engine(overlap=...)`): a hot policy whose sizes the host can tell
        (`HotPolicy.host_sizes`: every token, a window; not LeanKV's scores), no low tier, and no
        residency map in the cold path (tiered's candidates are what LeanKV pruned: a device count)."""
        return (self.policy.sizes_on_host and self.hot.low is None
                and (self.cold_path is None or self.cold_path.resident is None))

    @property
    def cancellable(self) -> bool:
        """Whether a decode step can be taken back (`cancel`): the hot policy keeps every token (a step
        only appends; no low tier) and there is no cold path (no host writes, no selection state)."""
        return self.config.hot_policy == "all" and self.cold_path is None

    def cancel(self, plan: DecodePlan) -> None:
        """Take back the latest decode step, run or not, as if it had never been planned: every head's
        new slot is emptied (the page it opened, if any, goes back to the pool) and each sequence's
        length loses the token. The engine cancels a step it planned and ran ahead of its tokens
        when the batch it was planned for changed (a request finished at the step before).
        Only where `cancellable` (NotImplementedError elsewhere: a LeanKV or window step moves
        tokens that cannot be put back). A few host syncs: it runs only when a guess was wrong."""
        if not self.cancellable:
            raise NotImplementedError(f"a {self.config.hot_policy!r} hot tier with a cold path or a low tier "
                                      "cannot take back a decode step")
        if plan.step_id != self._plan_id or (self._last_plan is not None and self._last_plan is not plan):
            raise RuntimeError(f"cancel: step {plan.step_id} is not the store's latest ({self._plan_id})")
        self._last_plan = None
        self._take_back_slots(plan, [True] * len(plan.written))
        self.seq_len[plan.seq_ids] -= 1

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
        self.hot.take_last_step()  # its logits are not all written: the policy does not observe this step
        n = self._take_back_slots(plan, [not w for w in plan.written])
        logger.debug("a decode step stopped after %d of %d layers: undid %d unwritten slots",
                     sum(plan.written), len(plan.written), n)

    def _take_back_slots(self, plan: DecodePlan, layers: list[bool]) -> int:
        """Give back the fresh high-tier index the plan gave each head of the chosen layers (n_high = n,
        the slot emptied, the page that index opened back to the pool); how many (a few host syncs)."""
        skip = torch.tensor(layers, device=self.device).view(1, -1, 1)
        undo = plan.fresh & skip
        drop = plan.new_page.bool() & skip
        count = int(undo.sum().item())
        if not count:
            return 0
        t, pool, sid = self.hot.table, self.hot.pool, plan.seq_ids
        t.num_tokens[sid] -= undo.to(torch.int32)
        b, l, h = undo.nonzero(as_tuple=True)  # the emptied slots: a written one held the taken-back token
        fill_at(pool.slot_pos, (plan.page[b, l, h].long(), plan.slot[b, l, h].long()), -1)
        b, l, h = drop.nonzero(as_tuple=True)
        if b.numel():
            col = t.num_tokens[sid[b], l, h].long() // self.hot.tokens_per_page  # index n opened page n // tpp
            ids = t.pages[sid[b], l, h, col]
            fill_at(t.pages, (sid[b], l, h, col), 0)
            pool.data.index_fill_(0, ids.long(), 0)  # as release does: a page may come back in the other tier
            pool.free(ids)
        return count

    # ---- accounting -------------------------------------------------------------------------
    def stats(self) -> dict:
        ids = torch.tensor(sorted(self.active), dtype=torch.int64, device=self.device)
        tokens = int(self.seq_len[ids].sum().item()) if ids.numel() else 0
        counts = self.hot.token_counts(ids) if ids.numel() else {"hot_high_tokens": 0, "hot_low_tokens": 0}
        cold = self.cold_path
        retrieval_bytes = cold.gpu_bytes(len(self.active)) if cold is not None else 0
        extra = cold.stats(len(self.active)) if cold is not None else {}
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
