"""Selectors: which cold-tier tokens each (sequence, KV head) attends at a decode step.

The interface every selector implements (PQ, the exact oracle, and the benchmark baselines):

    class MySelector(Selector):
        name = "mine"
        def prefill(self, layer, seq_ids, k, positions, valid, prompt_lens): ...   # index the prompt
        def append(self, layer, step, k_new): ...                                  # index the new token
        def scores(self, layer, step, q, scale) -> fp32 [B, Hkv, step.num_tokens]  # higher = better, -1 = never

`select()` (shared) turns the scores into a fixed-size top-k: positions int64 [B, Hkv, kmax] and
a validity mask. A selector only scores tokens in the step's candidate range [lo_b, hi_b)
(PQCache: sinks [0, S) and the window [n_now - W, n_now) are attended anyway and are never
candidates); `scores` must return -1 outside it. `prefill` runs per layer during prefill, the
other calls per layer during decode and must not sync the host or allocate store memory.
Per-step metadata (`SelectionStep`) is built once per step by `make_step` in the store's plan.

Selectors register in `SELECTORS` and in kvstore/capabilities.py.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from gpu_kernels import reference
from kvstore.hot_tier import use_triton

if TYPE_CHECKING:
    from kvstore.cold_tier import ColdTier
    from kvstore.config import KVStoreConfig
    from kvstore.hot_tier import ModelGeometry

logger = logging.getLogger(__name__)


@dataclass
class SelectionStep:
    """One decode step's selection metadata (built once in plan, read by every layer).

    seq_ids:    int64 [B] sequence slots.
    positions:  int64 [B] position of the token being decoded.
    lo, hi:     int64 [B] candidate range [lo, hi) per sequence.
    k:          int64 [B] tokens to select per (sequence, KV head) (fixed at prefill).
    num_tokens: host int, max(hi): the width scored this step.
    kmax:       host int, min(max(k), num_tokens - lo), and under `exclude` at most the most
                candidates any (layer, sequence, KV head) has: the fixed width of the selection.
    uniform_k:  every sequence selects the same k (then top-k need not be sorted).
    exclude:    bool [L, S, Hkv, cap + 1] or None: True where a (layer, sequence slot, KV head,
                position) is resident in the hot tier and so never selected (the LeanKV hot
                policy of `tiered`: the candidates are the tokens it pruned). The store's own
                tensor, updated in plan; column cap is a trash column.
    """

    seq_ids: torch.Tensor
    positions: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    k: torch.Tensor
    num_tokens: int
    kmax: int
    uniform_k: bool
    exclude: torch.Tensor | None = None


class Selector:
    """Base class; see the module docstring for the contract."""

    name = "base"

    def __init__(self, config: "KVStoreConfig", geometry: "ModelGeometry", cold: "ColdTier"):
        self.config, self.geometry, self.cold = config, geometry, cold
        self.device = geometry.device
        self.use_triton = use_triton(config, self.device)

    def ensure(self, max_seqs: int, cap: int) -> None:
        """Grow per-sequence state to `max_seqs` slots and `cap` positions (between steps)."""

    def prefill(self, layer: int, seq_ids: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                valid: torch.Tensor, prompt_lens: torch.Tensor, hi: torch.Tensor) -> None:
        """Index one layer's prompt. k [B, Hkv, T, d]; positions int [B, T]; valid bool [B, T];
        prompt_lens int64 [B]; hi int64 [B] end of the prompt's candidates."""

    def prefill_queries(self, layer: int, seq_ids: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                        positions: torch.Tensor, valid: torch.Tensor, scale: float) -> None:
        """Optional, after `prefill`: the prompt's queries too (H2O, SnapKV score with them).
        q [B, Hq, T, d], k [B, Hkv, T, d] post-RoPE; positions int [B, T]; valid bool [B, T]."""

    def before_decode(self, layer: int) -> None:
        """Called at the start of each decode layer; may wait for this layer's index (first step only)."""

    def append(self, layer: int, step: SelectionStep, k_new: torch.Tensor) -> None:
        """Index the step's new token. k_new [B, Hkv, d]."""

    def scores(self, layer: int, step: SelectionStep, q: torch.Tensor, scale: float) -> torch.Tensor:
        raise NotImplementedError

    def select(self, layer: int, step: SelectionStep, q: torch.Tensor, scale: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k positions int64 [B, Hkv, kmax] and valid bool [B, Hkv, kmax]. q [B, Hq, d]."""
        B, H = step.seq_ids.shape[0], self.geometry.num_kv_heads
        if step.kmax == 0:
            z = torch.zeros(B, H, 0, dtype=torch.int64, device=self.device)
            return z, z.bool()
        s = self.scores(layer, step, q, scale)
        if step.exclude is not None:
            # Hot tokens are attended anyway: never selected. They stay in the scores' softmax
            # denominators (their mass is real attention mass), only the top-k skips them.
            s = s.masked_fill(step.exclude[layer, step.seq_ids, :, : s.shape[-1]], -1.0)
        vals, idx = torch.topk(s, step.kmax, dim=-1, sorted=not step.uniform_k)
        valid = vals >= 0
        if not step.uniform_k:
            valid &= torch.arange(step.kmax, device=self.device).view(1, 1, -1) < step.k.view(-1, 1, 1)
        return idx, valid

    def release(self, seq_ids: torch.Tensor) -> None:
        """Forget ended sequences."""

    def device_bytes_per_seq(self) -> int:
        return 0

    def close(self) -> None:
        """Stop background work."""


class ExactSelector(Selector):
    """The oracle: exact q.k over full keys (kept on the device), PQCache's GQA aggregation."""

    name = "exact"

    def __init__(self, config, geometry, cold):
        super().__init__(config, geometry, cold)
        self.keys = torch.zeros(geometry.num_layers, 0, geometry.num_kv_heads, 0, geometry.head_dim,
                                dtype=geometry.dtype, device=self.device)

    def ensure(self, max_seqs, cap):
        L, S, H, C, d = self.keys.shape
        if max_seqs <= S and cap <= C:
            return
        keys = torch.zeros(L, max(S, max_seqs), H, max(C, cap), d, dtype=self.keys.dtype, device=self.device)
        keys[:, :S, :, :C] = self.keys
        self.keys = keys

    def prefill(self, layer, seq_ids, k, positions, valid, prompt_lens, hi):
        b, t = valid.nonzero(as_tuple=True)
        self.keys[layer, seq_ids[b], :, positions[b, t].long()] = k[b, :, t].to(self.keys.dtype)

    def append(self, layer, step, k_new):
        self.keys[layer, step.seq_ids, :, step.positions] = k_new.to(self.keys.dtype)

    def scores(self, layer, step, q, scale):
        N = step.num_tokens
        keys = self.keys[layer, step.seq_ids, :, :N]  # [B, H, N, d]
        B, Hq, d = q.shape
        H = keys.shape[1]
        logits = torch.einsum("bhgd,bhnd->bhgn", q.float().view(B, H, Hq // H, d), keys.float()) * scale
        t = torch.arange(N, device=q.device).view(1, N)
        valid = (t >= step.lo.view(B, 1)) & (t < step.hi.view(B, 1))
        return reference.group_softmax_scores(logits.reshape(B, Hq, N), valid, H)

    def device_bytes_per_seq(self):
        return self.keys[:, 0].numel() * self.keys.element_size()


class PQSelector(Selector):
    """PQCache: codebooks trained on host threads during prefill, codes resident on the device.

    codes:     uint8 [L, S, Hkv, cap, m]      position-indexed; sinks never coded
    centroids: fp16  [L, S, Hkv, m, K, d/m]   (fp16 halves what a short prompt spends on them;
                                              tables and distances are computed in fp32)
    Prefill of layer l hands a build job to one background thread (FAISS k-means uses the
    cores); the job waits for layer l's copy to host memory, trains on the candidates
    [S, n - W) and encodes [S, n). Decode of layer l waits only for layer l's jobs
    (`before_decode`), on the first step after the prefill. New tokens are coded on the device
    by nearest centroid with the frozen codebook.
    """

    name = "pq"

    def __init__(self, config, geometry, cold):
        super().__init__(config, geometry, cold)
        from retrieval.codebook import KMeansBudget

        m, d = config.pq_subspaces, geometry.head_dim
        if d % m:
            raise ValueError(f"KVStoreConfig.pq_subspaces={m} must divide the head dim {d}")
        self.m, self.K, self.dsub = m, config.pq_centroids, d // m
        L, H = geometry.num_layers, geometry.num_kv_heads
        self.codes = torch.zeros(L, 0, H, 0, m, dtype=torch.uint8, device=self.device)
        self.centroids = torch.zeros(L, 0, H, m, self.K, self.dsub, dtype=torch.float16, device=self.device)
        self.budget = KMeansBudget(config.kmeans_min_iters, config.kmeans_max_iters)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="kvstore-pq-build")
        self.pending: dict[int, list[tuple[Future, torch.Tensor]]] = {}
        self._last_prefill: float | None = None
        self.build_seconds = 0.0
        self.wait_seconds = 0.0
        self.hold = None  # tests: a threading.Event per layer the build job waits on, or None

    def ensure(self, max_seqs, cap):
        L, S, H, C, m = self.codes.shape
        if max_seqs <= S and cap <= C:
            return
        S2, C2 = max(S, max_seqs), max(C, cap)
        codes = torch.zeros(L, S2, H, C2, m, dtype=torch.uint8, device=self.device)
        codes[:, :S, :, :C] = self.codes
        cen = torch.zeros(L, S2, H, m, self.K, self.dsub, dtype=torch.float16, device=self.device)
        cen[:, :S] = self.centroids
        self.codes, self.centroids = codes, cen

    def prefill(self, layer, seq_ids, k, positions, valid, prompt_lens, hi):
        now = time.perf_counter()
        if layer > 0 and self._last_prefill is not None:
            self.budget.observe_prefill(now - self._last_prefill)
        self._last_prefill = now
        S = self.config.sink_tokens
        ids = seq_ids.cpu().numpy().tolist()
        lens = prompt_lens.cpu().numpy().tolist()
        his = hi.cpu().numpy().tolist()
        fut = self.pool.submit(self._build, layer, ids, lens, his, S)
        self.pending.setdefault(layer, []).append((fut, seq_ids.clone()))

    def _build(self, layer: int, ids: list[int], lens: list[int], his: list[int], S: int):
        """Host thread: train and encode every sequence of the batch for one layer."""
        from retrieval.codebook import train_codebook

        if self.hold is not None:
            self.hold[layer].wait()
        t0 = time.perf_counter()
        self.cold.wait_prefill(layer)
        out = []
        for sid, n, hi in zip(ids, lens, his):
            keys = self.cold.read_keys(sid, layer, S, max(n, S)).float().numpy()
            nc = max(hi - S, 0)
            iters = self.budget.iters(nc * self.geometry.num_kv_heads * self.m)
            cb = train_codebook(keys, nc, self.m, self.config.pq_bits, iters, seed=layer, start=S)
            self.budget.observe_build(nc * self.geometry.num_kv_heads * self.m, cb.iters, cb.seconds)
            out.append(cb)
        self.build_seconds += time.perf_counter() - t0
        return out

    def before_decode(self, layer):
        jobs = self.pending.pop(layer, None)
        if not jobs:
            return
        t0 = time.perf_counter()
        for fut, seq_ids in jobs:
            books = fut.result()
            B, H = len(books), self.geometry.num_kv_heads
            n = max(cb.codes.shape[1] for cb in books)
            codes = np.zeros((B, H, n, self.m), dtype=np.uint8)
            for b, cb in enumerate(books):  # host packing, once per sequence at the first decode step
                codes[b, :, : cb.codes.shape[1]] = cb.codes
            start = books[0].start
            cen = torch.from_numpy(np.stack([cb.centroids for cb in books])).to(self.device, torch.float16)
            self.centroids[layer, seq_ids] = cen
            if n:
                self.codes[layer, seq_ids, :, start: start + n] = torch.from_numpy(codes).to(self.device)
        self.wait_seconds += time.perf_counter() - t0

    def append(self, layer, step, k_new):
        B, H, d = k_new.shape
        x = k_new.float().view(B, H, self.m, 1, self.dsub)
        cen = self.centroids[layer, step.seq_ids].float()  # [B, H, m, K, dsub]
        code = ((x - cen) ** 2).sum(-1).argmin(-1)  # [B, H, m]
        self.codes[layer, step.seq_ids, :, step.positions] = code.to(torch.uint8)

    def scores(self, layer, step, q, scale):
        table = reference.pq_tables(q, self.centroids[layer, step.seq_ids], scale).contiguous()
        if self.use_triton:
            from gpu_kernels.pq_score import pq_scores

            return pq_scores(table, self.codes[layer], step.seq_ids, step.lo, step.hi, step.num_tokens)
        return reference.pq_scores(table, self.codes[layer], step.seq_ids, step.lo, step.hi, step.num_tokens)

    def release(self, seq_ids):
        for layer in list(self.pending):
            self.before_decode(layer)  # let running builds finish before their chunks are reused

    def device_bytes_per_seq(self):
        return (self.codes[:, 0].numel() * self.codes.element_size()
                + self.centroids[:, 0].numel() * self.centroids.element_size())

    def close(self):
        self.pool.shutdown(wait=True)


SELECTORS: dict[str, type[Selector]] = {"pq": PQSelector, "exact": ExactSelector}


def make_selector(config: "KVStoreConfig", geometry: "ModelGeometry", cold: "ColdTier") -> Selector:
    cls = SELECTORS.get(config.selector)
    if cls is None:
        raise NotImplementedError(f"selector={config.selector!r} is not implemented; known: {sorted(SELECTORS)}")
    return cls(config, geometry, cold)


def window_sizes(config: "KVStoreConfig", prompt_lens: torch.Tensor) -> torch.Tensor:
    """`config.window_for` for int64 [B] prompt lengths (same arithmetic as the window policy)."""
    if config.window_tokens is not None:
        return torch.full_like(prompt_lens, config.window_tokens)
    w = ((prompt_lens - config.sink_tokens).double() * config.budget_fraction * config.window_share).trunc().long()
    return w.clamp(min=1)


def budgets(config: "KVStoreConfig", prompt_lens: torch.Tensor) -> torch.Tensor:
    """`config.topk_for` for int64 [B] prompt lengths: tokens selected per (sequence, layer, KV head)."""
    if config.token_budget is not None:
        return torch.full_like(prompt_lens, config.token_budget)
    k = ((prompt_lens - config.sink_tokens).double() * config.budget_fraction * (1 - config.window_share)).trunc().long()
    return k.clamp(min=1)


# The benchmark baselines (StreamingLLM, H2O, SnapKV, Quest) add themselves to SELECTORS.
from kvstore import baseline_selectors  # noqa: E402,F401
