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
other calls per layer during decode and must not sync the host or allocate: what they write
goes into the step's buffers, taken at plan time by `plan_workspace` (a selector that scores
with its own tensors extends it; `select` copies scores returned elsewhere into the buffer).
Per-step metadata (`SelectionStep`, kvstore/plan.py) is built once per step in the store's plan.

A selector is registered by name in kvstore/cold/selectors.py (`SELECTORS`, `make_selector`).
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import torch

from gpu_kernels import reference, torch_ops
from kvstore.geometry import pow2, use_triton
from kvstore.plan import SelectionStep, Workspace

if TYPE_CHECKING:
    from kvstore.cold.host_tier import ColdTier
    from kvstore.config import KVStoreConfig
    from kvstore.geometry import ModelGeometry

logger = logging.getLogger(__name__)


def per_seq_bytes(t: torch.Tensor) -> int:
    """Bytes of one sequence slot of a per-sequence state tensor [L, S, ...], also before it has
    any slot (S = 0: a prefill that failed before the state grew still has its sequences released)."""
    return math.prod(t.shape[:1] + t.shape[2:]) * t.element_size()


class Selector:
    """Base class; see the module docstring for the contract."""

    name = "base"

    def __init__(self, config: "KVStoreConfig", geometry: "ModelGeometry", cold: "ColdTier"):
        self.config, self.geometry, self.cold = config, geometry, cold
        self.device = geometry.device
        self.use_triton = use_triton(config, self.device)
        #: `scores` itself scores a step's excluded tokens -1 (tiered's PQ kernel), so `select` does not
        self.folds_exclude = False

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

    def plan_workspace(self, step: SelectionStep, wsp: Workspace) -> dict:
        """Plan time: the buffers `select` writes at every layer (subclasses add their scoring's).

        scores fp32 [B, Hkv, N]; cand_invalid bool [B, 1, N] (outside each sequence's candidates
        [lo, hi)); vals fp32 / idx int64 / valid bool [B, Hkv, kmax]; kmask bool [B, 1, kmax] (which
        of the kmax columns each sequence's k keeps, when k differs); exclude bool [B, Hkv, N] (a
        layer's residency rows, tiered).
        """
        B, H, N, k = step.seq_ids.numel(), self.geometry.num_kv_heads, step.num_tokens, step.kmax
        t = wsp.arange("sel.t", N).view(1, 1, N)
        inv = wsp.take("sel.cand_invalid", (B, 1, N), torch.bool)
        torch.ge(t, step.hi.view(B, 1, 1), out=inv).logical_or_(torch.lt(t, step.lo.view(B, 1, 1)))
        ws = dict(
            cand_invalid=inv,
            scores=wsp.take("sel.scores", (B, H, N), torch.float32),
            vals=wsp.take("sel.vals", (B, H, k), torch.float32),
            idx=wsp.take("sel.idx", (B, H, k), torch.int64),
            valid=wsp.take("sel.valid", (B, H, k), torch.bool),
        )
        if k and not step.uniform_k:
            cols = wsp.arange("sel.cols", k).view(1, 1, k)
            ws["kmask"] = torch.lt(cols, step.k.view(-1, 1, 1), out=wsp.take("sel.kmask", (B, 1, k), torch.bool))
        if step.exclude is not None and not self.folds_exclude:
            ws["exclude"] = wsp.take("sel.exclude", (B, H, N), torch.bool)
        return ws

    def _ws(self, step: SelectionStep) -> dict:
        """The step's buffers, or fresh ones outside a store's plan."""
        return step.ws if step.ws is not None else self.plan_workspace(step, Workspace(self.device))

    def select(self, layer: int, step: SelectionStep, q: torch.Tensor, scale: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k positions int64 [B, Hkv, kmax] and valid bool [B, Hkv, kmax]. q [B, Hq, d].

        They are views of the step's buffers (overwritten by the next layer's select).
        """
        ws = self._ws(step)
        if step.kmax == 0:
            return ws["idx"], ws["valid"]
        s = self.scores(layer, step, q, scale)
        if s.data_ptr() != ws["scores"].data_ptr():  # a selector that scored into its own tensor
            s = ws["scores"].copy_(s)
        if step.exclude is not None and not self.folds_exclude:
            # Hot tokens are attended anyway: never selected. They stay in the scores' softmax
            # denominators (their mass is real attention mass), only the top-k skips them.
            excl = step.exclude[layer][:, :, : s.shape[-1]]
            s.masked_fill_(torch.index_select(excl, 0, step.seq_ids, out=ws["exclude"]), -1.0)
        vals, idx = torch.topk(s, step.kmax, dim=-1, sorted=not step.uniform_k, out=(ws["vals"], ws["idx"]))
        valid = torch.ge(vals, 0, out=ws["valid"])
        if not step.uniform_k:
            valid.bitwise_and_(ws["kmask"])
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

    def plan_workspace(self, step, wsp):
        """Adds the gathered keys and the fp32 q / keys / logits of the exact scores."""
        ws = super().plan_workspace(step, wsp)
        B, N = step.seq_ids.numel(), step.num_tokens
        g = self.geometry
        H, Hq, d, f32 = g.num_kv_heads, g.num_q_heads, g.head_dim, torch.float32
        ws.update(
            keys=wsp.take("exact.keys", (B, H, N, d), self.keys.dtype),
            qf=wsp.take("exact.qf", (B, Hq, d), f32),
            logits=wsp.take("exact.logits", (B, Hq, N), f32),
            lse=wsp.take("exact.lse", (B, Hq, 1), f32),
        )
        if self.keys.dtype != f32:
            ws["kf"] = wsp.take("exact.kf", (B, H, N, d), f32)
        return ws

    def scores(self, layer, step, q, scale):
        """Softmax per query head over the candidates of exact logits, summed per group (no
        allocation: the same ops as `reference.decode_attention`'s logits and
        `reference.group_softmax_scores`, into the step's buffers)."""
        ws = self._ws(step)
        N = step.num_tokens
        B, Hq, d = q.shape
        H = self.keys.shape[2]
        G = Hq // H
        keys = torch.index_select(self.keys[layer][:, :, :N], 0, step.seq_ids, out=ws["keys"])  # [B, H, N, d]
        kf = ws["kf"].copy_(keys) if "kf" in ws else keys
        qf = ws["qf"].copy_(q)
        logits = ws["logits"]
        torch.bmm(qf.view(B * H, G, d), kf.view(B * H, N, d).transpose(1, 2), out=logits.view(B * H, G, N))
        logits.mul_(scale)
        return torch_ops.group_softmax_scores_out(logits, ws["cand_invalid"], H, ws["lse"], ws["scores"])

    def device_bytes_per_seq(self):
        return per_seq_bytes(self.keys)


#: device codebook training: fp32 keys of one group of sequences trained together (bounds the
#: trainer's temporaries at a few times this)
_TRAIN_GROUP_BYTES = 1 << 30


class PQSelector(Selector):
    """PQCache: codebooks trained during prefill, codes resident on the device.

    codes:     uint8 [L, S, Hkv, cap, m]      position-indexed; sinks never coded
    centroids: fp16  [L, S, Hkv, m, K, d/m]   (fp16 halves what a short prompt spends on them;
                                              tables and distances are computed in fp32)
    A store on CUDA trains them on the device right after each layer's prefill, on the keys
    already there (`kvstore.cold.kmeans`, `pq_trainer="auto"`): seeded, stopped by a convergence
    rule, no host copy and no wait at the first decode step. A CPU store (or
    `pq_trainer="faiss"`) trains them with FAISS on host threads: prefill of layer l hands a
    build job to one background thread (FAISS k-means uses the cores); the job waits for layer l's copy to host memory, trains on the candidates
    [S, n - W) and encodes [S, n). Decode of layer l waits only for layer l's jobs
    (`before_decode`), on the first step after the prefill. New tokens are coded on the device
    by nearest centroid with the frozen codebook.
    """

    name = "pq"

    def __init__(self, config, geometry, cold):
        super().__init__(config, geometry, cold)
        m, d = config.pq_subspaces, geometry.head_dim
        if d % m:
            raise ValueError(f"KVStoreConfig.pq_subspaces={m} must divide the head dim {d}")
        self.m, self.K, self.dsub = m, config.pq_centroids, d // m
        #: the new token's coding and the ADC tables as one kernel each (gpu_kernels/pq_encode.py, pq_score.py):
        #: Triton on, K and d/m powers of two
        self._pq_kernels = self.use_triton and pow2(self.K) and pow2(self.dsub)
        self.folds_exclude = self.use_triton  # the scoring kernel's second pass skips the hot tokens
        L, H = geometry.num_layers, geometry.num_kv_heads
        self.codes = torch.zeros(L, 0, H, 0, m, dtype=torch.uint8, device=self.device)
        self.centroids = torch.zeros(L, 0, H, m, self.K, self.dsub, dtype=torch.float16, device=self.device)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="kvstore-pq-build")
        self.pending: dict[int, list[tuple[Future, torch.Tensor]]] = {}
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

    @property
    def trains_on_device(self) -> bool:
        t = self.config.pq_trainer
        return t == "device" or (t == "auto" and self.device.type == "cuda")

    def prefill(self, layer, seq_ids, k, positions, valid, prompt_lens, hi):
        if self.trains_on_device:
            return self._train_on_device(layer, seq_ids, k, valid, prompt_lens, hi)
        S = self.config.sink_tokens
        ids = seq_ids.cpu().numpy().tolist()
        lens = prompt_lens.cpu().numpy().tolist()
        his = hi.cpu().numpy().tolist()
        fut = self.pool.submit(self._build, layer, ids, lens, his, S)
        self.pending.setdefault(layer, []).append((fut, seq_ids.clone()))

    @torch.no_grad()
    def _train_on_device(self, layer, seq_ids, k, valid, prompt_lens, hi):
        """Codebooks of one layer trained on the keys in device memory (`kvstore.cold.kmeans`), codes and
        centroids written in place. Sequences of one length (a dense batch) train together, in
        groups of about `_TRAIN_GROUP_BYTES` of fp32 keys; others one at a time."""
        from kvstore.cold.kmeans import train_codebooks

        # `build_seconds` counts the trainer's own time: the layer's prefill kernels still queued are waited
        # for first (the trainer's first host read would wait for them anyway), its last writes at the end
        self._sync()
        t0 = time.perf_counter()
        S, c = self.config.sink_tokens, self.config
        ids, lens, his = seq_ids.tolist(), prompt_lens.tolist(), hi.tolist()
        B, H, T, d = k.shape
        dense = bool(valid.all().item()) and len(set(lens)) == 1 and len(set(his)) == 1
        group = max(1, _TRAIN_GROUP_BYTES // max(1, H * T * d * 4)) if dense else 1
        for s in range(0, B, group):
            e = min(B, s + group)
            n, h = lens[s], his[s]
            if n <= S:
                continue
            # [G, Hkv, n - S, d], positions S..n-1
            keys = k[s:e, :, S:n] if dense else k[s][:, valid[s]][:, S:n].unsqueeze(0)
            # seeded by layer only: a sequence's codebook does not depend on its batchmates
            cb = train_codebooks(keys, max(h - S, 0), self.m, c.pq_bits, seed=layer, min_iters=c.kmeans_min_iters,
                                 max_iters=c.kmeans_max_iters, tol=c.kmeans_tol,
                                 max_points_per_centroid=c.kmeans_points_per_centroid)
            sids = seq_ids[s:e]
            self.centroids[layer, sids] = cb.centroids.to(torch.float16)
            self.codes[layer, sids, :, S:n] = cb.codes
        self._sync()
        self.build_seconds += time.perf_counter() - t0

    def _sync(self) -> None:
        if torch.device(self.device).type == "cuda":
            torch.cuda.synchronize(self.device)

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
            cb = train_codebook(keys, nc, self.m, self.config.pq_bits, self.config.kmeans_iters, seed=layer, start=S,
                                max_points_per_centroid=self.config.kmeans_points_per_centroid)
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

    def plan_workspace(self, step, wsp):
        """Adds the nearest-centroid coding of the new token, the ADC tables and the scorer's partials."""
        ws = super().plan_workspace(step, wsp)
        g = self.geometry
        B, H, Hq, d = step.seq_ids.numel(), g.num_kv_heads, g.num_q_heads, g.head_dim
        m, K, ds = self.m, self.K, self.dsub
        f32 = torch.float32
        ws["table"] = wsp.take("pq.table", (B, Hq, m, K), f32)
        if not self._pq_kernels:  # the torch path's coding of the new token, centroids of the batch, ADC tables
            ws.update(
                x=wsp.take("pq.x", (B, H, d), f32), diff=wsp.take("pq.diff", (B, H, m, K, ds), f32),
                dist=wsp.take("pq.dist", (B, H, m, K), f32), code=wsp.take("pq.code", (B, H, m), torch.int64),
                code8=wsp.take("pq.code8", (B, H, m), torch.uint8),
                cen16=wsp.take("pq.cen16", (B, H, m, K, ds), torch.float16),
                cen=wsp.take("pq.cen", (B, H, m, K, ds), f32),
                qperm=wsp.take("pq.qperm", (B, H, m, Hq // H, ds), f32),
                prod=wsp.take("pq.prod", (B * H * m, Hq // H, K), f32),
            )
        if self.use_triton:
            from gpu_kernels.pq_score import score_blocks

            _, nb = score_blocks(step.num_tokens)
            ws["part"] = (wsp.take("pq.part_max", (B, Hq, nb), f32), wsp.take("pq.part_sum", (B, Hq, nb), f32))
        return ws

    def _centroids(self, layer: int, seq_ids: torch.Tensor, ws: dict) -> torch.Tensor:
        """fp32 [B, Hkv, m, K, d/m] centroids of the batch (gathered per layer: the first decode
        step of a layer loads them in `before_decode`, after the plan)."""
        torch.index_select(self.centroids[layer], 0, seq_ids, out=ws["cen16"])
        return ws["cen"].copy_(ws["cen16"])

    def append(self, layer, step, k_new):
        if self._pq_kernels:  # one launch (gpu_kernels/pq_encode.py) where the torch path below is nine
            from gpu_kernels.pq_encode import pq_encode

            pq_encode(k_new, self.centroids[layer], step.seq_ids, step.positions, self.codes[layer])
            return
        B, H, d = k_new.shape
        ws = self._ws(step)
        x = ws["x"].copy_(k_new).view(B, H, self.m, 1, self.dsub)
        cen = self._centroids(layer, step.seq_ids, ws)  # [B, H, m, K, dsub]
        dist = torch.sum(torch.sub(x, cen, out=ws["diff"]).pow_(2), -1, out=ws["dist"])
        code = torch.argmin(dist, -1, out=ws["code"])  # [B, H, m]
        self.codes[layer, step.seq_ids, :, step.positions] = ws["code8"].copy_(code)

    def scores(self, layer, step, q, scale):
        ws = self._ws(step)
        if self._pq_kernels:  # one launch for the tables where the torch path below is five
            from gpu_kernels.pq_score import pq_tables

            table = pq_tables(q, self.centroids[layer], step.seq_ids, scale, out=ws["table"])
        else:
            cen = self._centroids(layer, step.seq_ids, ws)
            table = torch_ops.pq_tables_out(q, cen, scale, ws["qperm"], ws["prod"], ws["table"])
        if self.use_triton:
            from gpu_kernels.pq_score import pq_scores

            return pq_scores(table, self.codes[layer], step.seq_ids, step.lo, step.hi, step.num_tokens,
                             out=ws["scores"], part=ws["part"],
                             exclude=step.exclude[layer] if step.exclude is not None else None)
        return reference.pq_scores(table, self.codes[layer], step.seq_ids, step.lo, step.hi, step.num_tokens)

    def release(self, seq_ids):
        for layer in list(self.pending):
            self.before_decode(layer)  # let running builds finish before their chunks are reused

    def device_bytes_per_seq(self):
        return per_seq_bytes(self.codes) + per_seq_bytes(self.centroids)

    def close(self):
        self.pool.shutdown(wait=True)


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
