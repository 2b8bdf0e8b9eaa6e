"""The cold path: what a store does with the cold tier and retrieval, per prefill layer and per
decode layer. `KVStore` owns one (`store.cold_path`) when its config has a cold tier or a
selector, and calls it at fixed points of its data path::

    prefill (per layer):  cold_path.prefill(...)    prompt K/V to the host tier (copy stream), the
                                                    selector's index (PQ codebooks, exact keys ...),
                                                    which prompt tokens the hot tier kept (tiered)
    plan (once a step):   cold_path.plan(plan, ...) flush the last step's host writes; the step's
                                                    selection metadata and buffers (host syncs here)
    decode (per layer):   started = cold_path.begin(layer, plan, q, k, v, scale)
                              new K/V to the host tier's staging buffer; select, look up the GPU
                              cache, start the fetch of the misses
                          out, lse = hot tier's attention (the fetch overlaps it)
                          out = cold_path.finish(layer, plan, q, scale, out, lse, started)
                              wait for the fetch, attend the retrieved tokens, merge by LSE, admit
                              the misses into the GPU cache
    release:              cold_path.release(seq_ids)

`begin` and `finish` allocate nothing and never sync the host (tests/test_decode_allocations.py):
every buffer they write was taken from the store's `Workspace` by `plan`.

It holds the parts of retrieval (kvstore/cold/): the selector built from the registry
(`selectors.make_selector`), the `GPUCache` of retrieved tokens, the residency map of the `tiered`
preset (which positions the LeanKV hot tier still holds: the others are the candidates) and the
fetch's side stream (CUDA) or thread (CPU). The host tier itself (`ColdTier`) is the store's
(`store.cold`), built before the hot tier; the cold path reads and writes it.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from gpu_kernels import torch_ops
from kvstore.cold.gpu_cache import GPUCache
from kvstore.cold.host_tier import ColdTier
from kvstore.cold.selection import budgets, window_sizes
from kvstore.cold.selectors import make_selector
from kvstore.config import KVStoreConfig
from kvstore.geometry import ModelGeometry, use_triton
from kvstore.plan import DecodePlan, SelectionStep, Workspace, fill_at, host_ints

logger = logging.getLogger(__name__)


class ColdPath:
    def __init__(self, config: KVStoreConfig, geometry: ModelGeometry, cold: ColdTier | None, max_seqs: int,
                 workspace: Workspace):
        self.config = config
        self.geometry = geometry
        self.device = geometry.device
        #: the host tier (the store's; None for a selector without a cold tier)
        self.cold = cold
        #: sequence slots of the store (grown with it, `ensure_seqs`)
        self.max_seqs = max_seqs
        #: the store's step buffers: `plan` takes the selection's, the GPU cache's, the fetch's and the merge's
        self.workspace = workspace
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
            # host copies of both (read with the prefill's one host read): a plan given the step's
            # sequences and positions on the host sizes its selection without reading the device
            self.host_window = np.ones(self.max_seqs, dtype=np.int64)
            self.host_topk = np.ones(self.max_seqs, dtype=np.int64)
            self._cap = 0
            if config.hot_policy == "leankv":
                L, H = geometry.num_layers, geometry.num_kv_heads
                self.resident = torch.zeros(L, self.max_seqs, H, 1, dtype=torch.bool, device=self.device)
        #: overlap the fetch of misses with attention over resident tokens (False: fully synchronous).
        #: Not with Triton kernels on a CPU: they run in Triton's interpreter, which is not thread-safe
        #: (two kernels interpreted at once in two threads clobber its grid state: "x >= grid_dim[0]")
        self.async_fetch = not (self.device.type != "cuda" and use_triton(config, self.device))
        self._fetch_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" and config.retrieves else None
        # one completion event per layer, re-recorded every step (nothing created on the decode path)
        self._fetch_events = [torch.cuda.Event() for _ in range(geometry.num_layers)] if self._fetch_stream is not None else []
        self._fetch_pool = ThreadPoolExecutor(1, thread_name_prefix="kvstore-fetch") if config.retrieves else None
        #: tokens a page of the hot tier's high format holds when the retrieved tokens are attended in its
        #: kernel launch (retrieval_attention="kernel", set by the store once it checked it can); 0: merge
        self.ret_tokens_per_page = 0
        #: prefetch_next_layer: the pending prefetch of each layer (started by the layer before), and its events
        self.prefetch = bool(config.prefetch_next_layer) and geometry.num_layers > 1
        #: the retrieved tokens' attention and its LSE merge with the hot tier's as Triton kernels
        #: (gpu_kernels/retrieved_attention.py: 2 launches a layer for the torch path's 31 ops) where Triton
        #: runs and the head dim suits it; else torch_ops' allocation-free ops (the CPU path)
        d = geometry.head_dim
        self.kernel_merge = use_triton(config, self.device) and d >= 16 and not d & (d - 1)
        self._prefetched: dict[int, object] = {}
        self._prefetch_events = ([torch.cuda.Event() for _ in range(geometry.num_layers)]
                                 if self._fetch_stream is not None and self.prefetch else [])

    # ---- sequences --------------------------------------------------------------------------
    def ensure_seqs(self, max_seqs: int) -> None:
        """Grow per-sequence state to `max_seqs` slots (the store's `_grow_seqs`, between steps)."""
        old = self.max_seqs
        if self.cold is not None:
            self.cold.ensure_seqs(max_seqs)
        if self.selector is not None:
            for name in ("window", "topk"):
                t = torch.ones(max_seqs, dtype=torch.int64, device=self.device)
                t[:old] = getattr(self, name)
                setattr(self, name, t)
                h = np.ones(max_seqs, dtype=np.int64)
                h[:old] = getattr(self, "host_" + name)
                setattr(self, "host_" + name, h)
            self._ensure_retrieval(max_seqs, self._cap)
        self.max_seqs = max_seqs

    def release(self, seq_ids: torch.Tensor) -> None:
        """Forget ended sequences: selector, GPU cache and residency rows, then their host chunks."""
        t = seq_ids
        if self.selector is not None:
            self.selector.release(t)
            if self.gpu_cache is not None:
                self.gpu_cache.release(t)
            if self.resident is not None:
                self.resident[:, t] = False
        if self.cold is not None:
            self.cold.release(t)

    def reserve_positions(self, positions: int) -> None:
        """Size the position-indexed retrieval buffers for sequences of `positions` tokens now, not
        step by step while they grow (between steps: `Engine.warmup`)."""
        if self.selector is not None:
            self._ensure_retrieval(self.max_seqs, positions)

    def _ensure_retrieval(self, max_seqs: int, needed: int) -> None:
        """Grow the position-indexed retrieval buffers (between steps) to `needed` positions and 1/8 more,
        in multiples of 64: they cost bytes per position of every sequence slot (PQ codes, the GPU
        cache's position map, the residency map), so doubling left up to half of them unused (a 4K
        prompt held 8K positions from its first decode step: 2% of dense KV on the probe)."""
        cap = self._cap if needed <= self._cap else -(-max(needed + needed // 8, 64) // 64) * 64
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

    # ---- prefill ----------------------------------------------------------------------------
    def prefill(self, layer: int, seq_ids: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep,
                positions: torch.Tensor, valid: torch.Tensor, scale: float) -> None:
        """One layer of a prefill, after the hot tier stored what `keep` (the policy's `PrefillKeep`)
        says: the prompt to the host tier and the selector's index, the kept tokens out of the
        candidates (tiered), the prompt's queries to the selectors that score with them. Nothing
        without a host tier (a selector needs one to have candidates)."""
        if self.cold is None:
            return
        self._cold_prefill(layer, seq_ids, k, v, positions, valid)
        if self.resident is not None:  # tiered: the prompt tokens LeanKV kept are not candidates
            self._mark_resident_prefill(layer, seq_ids, keep, positions, valid)
        if self.selector is not None:  # selectors that score with the prompt's queries (H2O, SnapKV)
            self.selector.prefill_queries(layer, seq_ids, q, k, positions, valid, scale)

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
                B = seq_ids.numel()  # the one host read: the sizes, and each sequence's window and budget
                got = torch.cat([n.max().view(1).long(), seq_ids.long(), self.window[seq_ids], self.topk[seq_ids]]).tolist()
                nmax, ids = got[0], got[1:1 + B]
                self.host_window[ids], self.host_topk[ids] = got[1 + B:1 + 2 * B], got[1 + 2 * B:]
                kmax = max(got[1 + 2 * B:], default=1)
                self._ensure_retrieval(self.max_seqs, nmax + 1)
                # tiered: no candidate before LeanKV prunes; the cache grows at plan time with them
                slots = 0 if self.resident is not None else min(self.config.gpu_cache_tokens, kmax)
                if self.gpu_cache is None:
                    # slots of the cold tier's rows when it is quantized: admitted as fetched, byte for byte
                    self.gpu_cache = GPUCache(self.geometry, self.max_seqs, slots, self._cap, row_format=self.cold.fmt,
                                              use_triton=use_triton(self.config, self.device))
                else:
                    self.gpu_cache.ensure(self.max_seqs, slots, self._cap)
        self.cold.write_prefill(layer, k, v, positions, valid)
        if self.selector is not None:
            S = self.config.sink_tokens
            hi = torch.clamp(n - self.window[seq_ids], min=S)
            self.selector.prefill(layer, seq_ids, k, positions, valid, n, hi)

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

    # ---- decode: plan -----------------------------------------------------------------------
    def plan(self, plan: DecodePlan, select_hint: int | None = None,
             host: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Plan time (`KVStore.plan`, after the hot tier's plan): flush the last step's host writes,
        and with a selector fill `plan.selection` and `plan.retrieved` (host work, one host sync).
        The tokens that left the hot tier this step (`plan.evicted_pos`, and `plan.low_evicted`
        under LeanKV) leave the residency map. select_hint: the selection's least width (`KVStore.plan`).
        host: the step's sequence slots and positions (int64 [B] each) where the caller knows them on
        the host: the host tier's bookkeeping and, without a residency map (tiered has one: its
        candidates are what LeanKV pruned, a device count), the selection's sizes then read nothing
        back from the device; and the last step's tokens reach the host tier a step late, unread
        (`ColdTier.flush(wait=False)`) where every candidate ends two tokens or more before the
        newest (a window of 2 or more: the tokens in flight are never selected)."""
        if self.cold is not None:
            lag = host is not None and (self.selector is None or int(self.host_window[host[0]].min(initial=2)) >= 2)
            with torch.profiler.record_function("kvstore.plan.cold.host_writes"):
                self.cold.plan_step(plan.seq_ids, plan.positions, host=host, lag=lag)
        if self.selector is not None:
            with torch.profiler.record_function("kvstore.plan.cold.selection"):
                self._plan_retrieval(plan, select_hint or 0, host)

    @torch.no_grad()
    def _mark_pruned_step(self, plan: DecodePlan, hi: torch.Tensor) -> torch.Tensor:
        """Plan time: what the policy pruned this step leaves the residency map. Returns the number
        of candidates (pruned tokens in [S, hi)) per (layer, sequence, KV head), int64 [L, B, Hkv]."""
        B, L, H = plan.page.shape
        cap = self.resident.shape[-1] - 1
        sb = plan.seq_ids.view(B, 1, 1)
        l_ = torch.arange(L, device=self.device).view(1, L, 1)
        h = torch.arange(H, device=self.device).view(1, 1, H)
        for gone in (plan.evicted_pos, plan.low_evicted):  # two tensors
            if gone is not None:
                col = torch.where(gone >= 0, gone, torch.full_like(gone, cap))
                fill_at(self.resident, (l_, sb, h, col), False)
        self.resident[:, :, :, cap] = False
        S = self.config.sink_tokens
        t = torch.arange(cap, device=self.device).view(1, 1, 1, cap)
        in_range = (t >= S) & (t < hi.view(1, B, 1, 1))
        held = (self.resident[:, plan.seq_ids, :, :cap] & in_range).sum(-1)  # [L, B, H]
        return (hi - S).clamp(min=0).view(1, B, 1) - held

    def _plan_retrieval(self, plan: DecodePlan, select_hint: int = 0,
                        host: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Selection metadata and buffers of one step (host work; one host sync, none given `host`
        without a residency map: `plan`)."""
        seq_ids, positions = plan.seq_ids, plan.positions
        S = self.config.sink_tokens
        hi = torch.clamp(positions + 1 - self.window[seq_ids], min=S)
        k = self.topk[seq_ids]
        # tiered: the selection is never much wider than the most candidates any (layer, sequence, head)
        # has (nothing pruned yet: nothing to select, no fetch, no GPU cache slots)
        if host is not None and self.resident is None:  # the same sizes from the host's copies
            ids, pos = host
            hi_host, k_host = np.maximum(pos + 1 - self.host_window[ids], S), self.host_topk[ids]
            num_tokens, kmax, kmin, pmax = int(hi_host.max()), int(k_host.max()), int(k_host.min()), int(pos.max())
            cmax = num_tokens
        else:  # one host read
            cand = [self._mark_pruned_step(plan, hi).max()] if self.resident is not None else []
            num_tokens, kmax, kmin, pmax, *cand = host_ints(hi.max(), k.max(), k.min(), positions.max(), *cand)
            cmax = cand[0] if cand else num_tokens
        self._ensure_retrieval(self.max_seqs, pmax + 1)
        self.cold.device_maps()  # refresh the device chunk maps now, not inside a layer
        # the selection's width changes only at powers of two while the candidates grow (a captured
        # step replays while it holds: kvstore/cuda_graph.py); picks past a head's candidates are invalid
        wide = min(num_tokens - S, cmax)
        ktop, kmax = kmax, min(kmax, 1 << (wide - 1).bit_length(), self._cap) if wide > 0 else 0
        kmax = max(kmax, min(select_hint, self._cap))  # a floor (`Engine.warmup`): the extra picks are invalid
        if self.resident is not None:
            fill_at(self.resident, (None, seq_ids, None, positions), True)  # the new token is hot in every (layer, head)
            want = min(self.config.gpu_cache_tokens, kmax)
            if self.gpu_cache is not None and want > self.gpu_cache.slots:  # grows with the candidates
                cap_slots = min(self.config.gpu_cache_tokens, ktop)
                self.gpu_cache.ensure(self.max_seqs, min(cap_slots, max(want, 2 * self.gpu_cache.slots)), self._cap)
        geo, wsp = self.geometry, self.workspace
        B, H, Hq, d = seq_ids.numel(), geo.num_kv_heads, geo.num_q_heads, geo.head_dim
        # What a layer reads is a workspace buffer refreshed here (a CUDA graph captured on an earlier
        # step reads the same addresses), and the scored width is the position capacity, not max(hi):
        # it changes only when the retrieval buffers grow, so the step's shapes repeat (positions past
        # a sequence's hi are outside its candidates and score -1 either way)
        pinned = {name: wsp.take("sel.step." + name, (B,), torch.int64).copy_(t)
                  for name, t in (("positions", positions), ("lo", torch.full_like(hi, S)), ("hi", hi), ("k", k))}
        step = SelectionStep(seq_ids, pinned["positions"], pinned["lo"], pinned["hi"], pinned["k"], self._cap, kmax,
                             kmin == kmax and not select_hint, exclude=self.resident)
        ws = self._selection_workspace(step, wsp)
        ws["invalid"] = wsp.take("ret.invalid", (B, H, kmax), torch.bool)
        if self.kernel_merge:  # the retrieved tokens' attention and the merge: two Triton launches
            from gpu_kernels.retrieved_attention import retrieved_buffers

            ws["fused"] = retrieved_buffers(lambda n, sh, t: wsp.take("ret.fused." + n, sh, t), B, Hq, H, kmax, d,
                                            self.device)
        else:
            ws["attn"] = torch_ops.decode_attention_buffers(lambda n, sh, t: wsp.take("ret." + n, sh, t), B, Hq, H,
                                                            kmax, d, kv_fp32=geo.dtype == torch.float32)
            ws["merge"] = torch_ops.merge_attention_buffers(lambda n, sh, t: wsp.take("merge." + n, sh, t), B, Hq, d)
        step.ws = ws
        plan.selection = step
        plan.retrieved = wsp.take("ret.kv", (2, B, H, kmax, d), geo.dtype).zero_()
        if self.prefetch and kmax:
            ws["prefetch"] = self._prefetch_workspace(step, wsp.prefixed("prefetch."))
        self._prefetched.clear()  # a step abandoned part-way leaves none behind

    def _selection_workspace(self, step: SelectionStep, wsp: Workspace) -> dict:
        """Plan time: the buffers a selection writes at every layer (the selector's), and those of its
        GPU-cache lookup, its fetch and its miss mask (the layer's own selection and the prefetch's)."""
        B, H, k = step.seq_ids.numel(), self.geometry.num_kv_heads, step.kmax
        ws = self.selector.plan_workspace(step, wsp)
        ws["cache"] = self.gpu_cache.plan_workspace(step.seq_ids, k, wsp)
        ws["fetch"] = self.cold.fetch_workspace(step.seq_ids, k, wsp)
        ws["miss"] = wsp.take("ret.miss", (B, H, k), torch.bool)
        return ws

    def plan_ret_pages(self, plan: DecodePlan) -> None:
        """Plan time, after the store took `plan.ret_pages` [B, Hkv, NRP]: where each selected token goes
        (selection column j -> page j // T, slot j % T) and the step's position buffer."""
        step, T, wsp = plan.selection, self.ret_tokens_per_page, self.workspace
        B, H, _ = plan.ret_pages.shape
        j = torch.arange(step.kmax, device=self.device)
        n = B * H * step.kmax
        step.ws["ret"] = {
            "page": wsp.take("ret.page", (n,), torch.int32).copy_(plan.ret_pages[:, :, j // T].reshape(-1)),
            "slot": wsp.take("ret.slot", (n,), torch.int32).copy_((j % T).to(torch.int32).repeat(B * H)),
            "pos": wsp.take("ret.pos", (B, H, step.kmax), torch.int32),
        }

    # ---- decode: per layer ------------------------------------------------------------------
    @torch.no_grad()
    def begin(self, layer: int, plan: DecodePlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
        """Before the hot tier's attention of one layer: the new token's K/V to the host tier's step
        buffer; with a selector, select, look up the GPU cache and start the fetch of the misses
        (it overlaps the hot tier's attention). q [B, Hq, 1, d]; k, v [B, Hkv, 1, d].

        Returns what `finish` takes (None without a selector): positions and validity of the
        selection, their GPU cache slots, and the pending fetch; views of the step's buffers."""
        if self.cold is not None:
            self.cold.write_decode(layer, k[:, :, 0].detach(), v[:, :, 0].detach())
        if self.selector is None:
            return None
        step, buf, q0 = plan.selection, plan.retrieved, q[:, :, 0]
        ws = step.ws
        self.selector.before_decode(layer)  # first step after prefill: this layer's build only
        self._admit_prefetched(layer, step)  # what the layer before predicted for this one, now in its GPU cache
        self.selector.append(layer, step, k[:, :, 0])
        pos, valid = self.selector.select(layer, step, q0, scale)
        slot = self.gpu_cache.lookup(layer, step.seq_ids, pos, valid, ws["cache"])
        miss = self.gpu_cache.miss_mask(slot, valid, ws["cache"], out=ws["miss"])
        # rows only (no dequantization) when they become pages of the hot tier's launch
        pending = self._start_fetch(layer, step.seq_ids, pos, miss, buf, ws["fetch"], plan.ret_pages is None)
        if "prefetch" in ws and layer + 1 < self.geometry.num_layers:  # after this layer's fetch on the stream
            self._start_prefetch(layer + 1, step, q0, scale)
        return pos, valid, slot, pending

    # ---- decode: speculative prefetch (prefetch_next_layer) -----------------------------------
    def _prefetch_workspace(self, step: SelectionStep, wsp: Workspace) -> dict:
        """Plan time: a second set of the selection's, the GPU cache's and the fetch's buffers (the
        prefetch of layer l + 1 runs while layer l's own selection is still in use)."""
        B, H, k, d = step.seq_ids.numel(), self.geometry.num_kv_heads, step.kmax, self.geometry.head_dim
        pstep = dataclasses.replace(step, ws=None)
        pstep.ws = self._selection_workspace(pstep, wsp)
        # a 16-bit cold tier's fetch dequantizes into K/V rows; a quantized one stops at its rows ("raw")
        kv = wsp.take("ret.kv", (2, B, H, k, d), self.geometry.dtype) if self.cold.fmt is None else None
        return {"step": pstep, "kv": kv}

    def _start_prefetch(self, layer: int, step: SelectionStep, q0: torch.Tensor, scale: float) -> None:
        """Predict `layer`'s selection with the layer before's query, look it up in `layer`'s GPU cache
        and start fetching the misses (on the fetch stream, after the layer before's own fetch)."""
        pf = step.ws["prefetch"]
        ws = pf["step"].ws
        self.selector.before_decode(layer)  # its index (a no-op after the first step)
        pos, valid = self.selector.select(layer, pf["step"], q0, scale)
        slot = self.gpu_cache.lookup(layer, step.seq_ids, pos, valid, ws["cache"], count=False)
        miss = self.gpu_cache.miss_mask(slot, valid, ws["cache"], out=ws["miss"])
        # a quantized tier's rows stay in ws["fetch"]["raw"] (dequantize=False), as the GPU cache admits them
        self._prefetched[layer] = (pos, valid, slot, self._start_fetch(
            layer, step.seq_ids, pos, miss, pf["kv"], ws["fetch"], False, events=self._prefetch_events))

    def _admit_prefetched(self, layer: int, step: SelectionStep) -> None:
        """Wait for the prefetch of `layer` (if any) and admit its rows into the layer's GPU cache
        before the layer's own lookup (no score update: the layer's own selection scores)."""
        started = self._prefetched.pop(layer, None)
        if started is None:
            return
        pos, valid, slot, pending = started
        pf = step.ws["prefetch"]
        ws = pf["step"].ws
        self._wait_fetch(pending)
        self.gpu_cache.admit(layer, step.seq_ids, pos, valid, slot, pf["kv"], ws["cache"],
                             raw=ws["fetch"].get("raw"), touch=False)

    @torch.no_grad()
    def stage(self, layer: int, plan: DecodePlan, started, pool) -> None:
        """retrieval_attention="kernel", before the hot tier's attention of one layer: wait for the fetch,
        gather the hits' rows from the GPU cache beside the fetched ones, and write every selected token
        into the step's pages of `pool` (the hot tier's PagePool) with its position (-1: not a token)."""
        from gpu_kernels import quant

        pos, valid, slot, pending = started
        step = plan.selection
        ws, ret, fmt = step.ws, step.ws["ret"], self.cold.fmt
        self._wait_fetch(pending)
        raw = ws["fetch"]["raw"]
        self.gpu_cache.read_rows(layer, step.seq_ids, slot, raw, ws["cache"])
        # an invalid pick is neither fetched nor a hit: its row holds whatever the buffer held. It is masked,
        # but 0 x (NaN or inf from stale scale bytes) in P @ V is NaN, so its row is zeroed (finite)
        raw.masked_fill_(torch.logical_not(valid, out=ws["invalid"]).view(-1, 1), 0)
        ret["pos"].copy_(torch.where(valid, pos, ws["fetch"]["neg1"], out=ws["fetch"]["p"]))  # the fetch is done
        quant.scatter_rows_to_pages(raw, ret["page"], ret["slot"], ret["pos"].view(-1), pool.data, pool.slot_pos,
                                    fmt.key_bits, fmt.value_bits, fmt.groups, self.ret_tokens_per_page)

    @torch.no_grad()
    def finish(self, layer: int, plan: DecodePlan, q: torch.Tensor, scale: float, out_h: torch.Tensor,
               lse_h: torch.Tensor, started, out: torch.Tensor | None = None) -> torch.Tensor:
        """After the hot tier's attention of one layer (out_h [B, Hq, d], lse_h fp32 [B, Hq]): wait for
        the fetch, read the hits from the GPU cache, attend the retrieved tokens, merge with the hot
        tier's result by LSE, admit the misses. Returns [B, Hq, d]: `out` where given and the merge
        kernel writes it (`kernel_merge`), else fp32, a view of the step's buffers (out_h as it came
        without a selector: `started` is None)."""
        if started is None:
            return out_h
        pos, valid, slot, pending = started
        step, buf, q0 = plan.selection, plan.retrieved, q[:, :, 0]
        ws = step.ws
        if plan.ret_pages is not None:  # attended in the hot tier's launch (`stage`): out_h and its lse are final
            self._admit(layer, plan, pos, valid, slot, buf, ws)
            return out_h
        self._wait_fetch(pending)
        self.gpu_cache.read(layer, step.seq_ids, slot, buf, ws["cache"])
        hws = plan.hot_ws
        # LeanKV's score update reads exp(logit - lse_all): with the merged lse, a hot token's
        # probability is its share of the softmax over hot + retrieved tokens (kvstore/hot/policies.py)
        lse_all = hws["lse_all"][layer] if hws is not None and hws.get("lse_all") is not None else None
        if self.kernel_merge:
            from gpu_kernels.retrieved_attention import retrieved_attention_merge

            out, _ = retrieved_attention_merge(q0, buf[0], buf[1], valid, scale, out_h, lse_h, ws["fused"], out=out,
                                               lse=lse_all)
        else:
            invalid = torch.logical_not(valid, out=ws["invalid"])
            out_r, lse_r = torch_ops.decode_attention_out(q0, buf[0], buf[1], invalid, scale, ws["attn"])
            out, lse = torch_ops.merge_attention_out(out_h, lse_h, out_r, lse_r, ws["merge"])
            if lse_all is not None:
                lse_all.copy_(lse)
        self._admit(layer, plan, pos, valid, slot, buf, ws)
        return out

    def _admit(self, layer, plan, pos, valid, slot, buf, ws) -> None:
        """The misses into the GPU cache; the cache's step count after the last layer."""
        self.gpu_cache.admit(layer, plan.selection.seq_ids, pos, valid, slot, buf, ws["cache"], raw=ws["fetch"].get("raw"))
        if layer == self.geometry.num_layers - 1:
            self.gpu_cache.end_step()

    def _start_fetch(self, layer, seq_ids, pos, miss, buf, ws=None, dequantize=True, events=None):
        if not self.async_fetch:
            self.cold.fetch(layer, seq_ids, pos, miss, buf, ws, dequantize)
            return None
        if self._fetch_stream is not None:  # CUDA: side stream, ordered after what produced pos/miss
            self._fetch_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._fetch_stream):
                self.cold.fetch(layer, seq_ids, pos, miss, buf, ws, dequantize)
                ev = (events if events is not None else self._fetch_events)[layer]
                ev.record(self._fetch_stream)
            return ev
        # CPU: a host thread
        return self._fetch_pool.submit(self.cold.fetch, layer, seq_ids, pos, miss, buf, ws, dequantize)

    def _wait_fetch(self, pending) -> None:
        if pending is None:
            return
        if isinstance(pending, torch.cuda.Event):
            torch.cuda.current_stream(self.device).wait_event(pending)
        else:
            pending.result()

    # ---- accounting -------------------------------------------------------------------------
    def gpu_bytes(self, num_seqs: int) -> int:
        """Device bytes of retrieval state of `num_seqs` sequences (0 without a selector)."""
        return num_seqs * self._retrieval_bytes_per_seq() if self.selector is not None else 0

    def stats(self, num_seqs: int) -> dict:
        """The cold path's entries of `KVStore.stats` (none without a host tier)."""
        return self._retrieval_stats(num_seqs) if self.cold is not None else {}

    def _retrieval_bytes_per_seq(self) -> int:
        """Device bytes of retrieval state per sequence slot: index, GPU cache, residency map."""
        per_seq = self.selector.device_bytes_per_seq() + (self.gpu_cache.bytes_per_seq if self.gpu_cache else 0)
        if self.resident is not None:
            per_seq += self.resident[:, 0].numel() * self.resident.element_size()
        return per_seq

    def _retrieval_stats(self, num_seqs: int) -> dict:
        out = {"host_reserved_bytes": self.cold.reserved_bytes}
        if self.selector is not None:
            out["retrieval_gpu_bytes"] = num_seqs * self._retrieval_bytes_per_seq()
            out["gpu_cache_hit_rate"] = self.gpu_cache.hit_rate() if self.gpu_cache else float("nan")
            out["gpu_cache_slots"] = self.gpu_cache.slots if self.gpu_cache else 0
            out["pq_build_seconds"] = getattr(self.selector, "build_seconds", 0.0)
            out["pq_wait_seconds"] = getattr(self.selector, "wait_seconds", 0.0)
        return out
