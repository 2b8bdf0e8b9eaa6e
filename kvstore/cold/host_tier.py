"""The cold tier: every token's K/V, per layer, in pinned host memory allocated in large slabs.

Layout. Host memory is a list of *slabs*, each one pinned tensor (one allocation; many small
pinned allocations fail and waste the link, one huge one fails too: LMCache, vLLM). A slab
holds `n` *chunks*; a chunk holds `chunk_tokens` consecutive positions of one sequence for
every layer, K and V, every KV head::

    slab[s]: [L, n, 2, Hkv, C, d]   (model dtype)      row view: [L * n * 2 * Hkv * C, d]
              |  |  |   |    '-- position p % C within the chunk
              |  |  |   '------- KV head
              |  |  '----------- 0 = K, 1 = V
              |  '-------------- chunk within the slab
              '----------------- layer: slab[s][l, a:b] is contiguous, so one layer's prefill of a
                                 sequence is ONE device-to-host copy (its chunks are one run)

Quantized (`cold_key_bits=8`, `cold_value_bits` 8 or 4: the default of the PQ presets) a chunk
holds one *row* per (layer, KV head, position): the token's K and V quantized per token and KV
head as in the hot tier, a one-token page of its format (kvstore/hot/quantization.py)::

    slab[s]: [L, n, Hkv, C, row_bytes]  uint8           row view: [L * n * Hkv * C, row_bytes]
             row = [ K codes d*kb/8 | V codes d*vb/8 | fp16 k_scale, k_zero, v_scale, v_zero ]

    K8V4 at d = 128: 200 B a token and KV head against 512 B at bf16 (0.39x the host memory and
    the PCIe bytes of a fetch). The fetch copies the wanted rows as they are into a device staging
    buffer (gpu_kernels/fetch.py, `gather_rows`) and dequantizes them from there
    (`gather_dequantize_rows`); the GPU cache admits the staged rows byte for byte (it stores the
    same rows, kvstore/cold/gpu_cache.py). `read_keys` / `read_sequence` dequantize.

A sequence's chunk table (`table[seq, p // C]`) gives the global chunk id; `chunk_slab` and
`chunk_local` place it. With C = 256 tokens a chunk's per-layer block is 2*Hkv*C*d*2 B = 1 MiB
at Llama-3-8B's shape (vLLM measured 0.5-2 MB blocks 4-5x faster than 8-72 KB ones).

Writes. Prefill: the layer's K/V of the batch is scattered on the GPU into a staging tensor in
chunk layout and copied to the slab on a copy stream; the staging tensor (the only tensor the
copy reads) is kept alive with `record_stream`, and the copy's event is kept per layer for the
codebook builder, which reads the keys from the slab. Decode: each layer's new K/V goes into a
step staging buffer on the GPU (no host sync, no allocation); the next step's plan
(`ColdPath.plan`) flushes it to the slabs with one copy (tokens become search candidates only
once they leave the window, at least one step later, so nothing reads them before the flush).

Reads. `rows(...)` maps (layer, sequence, KV head, position) to slab rows on the GPU;
`fetch(...)` gathers them (gpu_kernels/fetch.py, a UVA kernel, on CUDA; indexing elsewhere).

Bytes. `used_bytes` counts the chunks the live sequences hold, `reserved_bytes` the slabs.
On CUDA a slab is pageable memory registered with the CUDA runtime: pinned at exactly its size
(torch's pinned allocator rounds up to a power of two). A slab holds what the request needs (a
prompt's run of chunks) or, when that is less, 1/32 of the chunks the tier already has (at least
4, at most 1 GiB): the chunks decode adds come in slabs that keep the reserved bytes within ~3%
of the used ones (H200, 32K x 4 at K8V4: a 1 GiB decode slab made them 1.15x), and no more than
`host_tier_bytes` leaves (when the request fits in that). A
slab that does not fit `host_tier_bytes` or the host's available memory raises
`ColdTierMemoryError` saying how much was asked, how much is left, and what to change. A
`host_tier_bytes` below one chunk is refused (ValueError) when the tier is built.
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref

import numpy as np
import torch

from gpu_kernels import reference
from kvstore.config import KVStoreConfig
from kvstore.geometry import ModelGeometry, use_triton
from kvstore.hot.quantization import QuantFormat
from kvstore.plan import Workspace

logger = logging.getLogger(__name__)


class ColdTierMemoryError(MemoryError):
    """Host memory for the cold tier is short; the message says how much and what to change."""


def _pinned_empty(shape: tuple[int, ...], dtype: torch.dtype, registered: list[torch.Tensor]) -> torch.Tensor:
    """Page-locked host tensor of exactly its size: allocated pageable, then registered with the CUDA
    runtime. (`torch.empty(pin_memory=True)` goes through PyTorch's caching host allocator, which
    rounds a request up to a power of two: a 96 GiB slab would take 128 GiB.) Registered portable
    and mapped: the fetch kernel reads it at its host address (unified addressing). Unregistered by
    `_unregister` (it is appended to `registered`) before the memory is freed.
    KVSTORE_HOST_REGISTER=0 goes back to torch's allocator."""
    if os.environ.get("KVSTORE_HOST_REGISTER", "1") == "0":
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    if nbytes:
        rc = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, 3))  # portable | mapped
        if rc != 0:
            raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed (cudaError {rc})")
        registered.append(t)
    return t


def _unregister(slabs: list[torch.Tensor]) -> None:
    """Finalizer of a pinned ColdTier: unpin the slabs it registered, then let them go."""
    for t in slabs:
        torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
    slabs.clear()


def host_available_bytes() -> int | None:
    """MemAvailable of this host (Linux), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class ColdTier:
    #: state no decode step reads (kvstore/cuda_graph.py's signature skips it): the prefill's, and the
    #: tokens of `flush(wait=False)` on their way to the host (a new host buffer every step)
    graph_ignores = ("_prefill_starts", "_pending")

    def __init__(self, config: KVStoreConfig, geometry: ModelGeometry, max_seqs: int,
                 chunk_tokens: int = 256, slab_bytes: int = 1 << 30):
        self.config = config
        self.geometry = geometry
        self.device = geometry.device
        self.L, self.H, self.d = geometry.num_layers, geometry.num_kv_heads, geometry.head_dim
        self.dtype = geometry.dtype
        self.C = chunk_tokens
        self.elem = torch.empty((), dtype=self.dtype).element_size()
        self.use_triton = use_triton(config, self.device)
        #: the row format of a quantized tier (a one-token page of the hot tier's format), None at 16 bits
        self.fmt: QuantFormat | None = None
        if config.cold_key_bits != 16:
            if self.d % 8:
                raise ValueError(f"cold_key_bits={config.cold_key_bits}: a quantized cold tier needs a head_dim that "
                                 f"is a multiple of 8, this model's is {self.d}; set cold_key_bits=cold_value_bits=16")
            self.fmt = QuantFormat(config.cold_key_bits, config.cold_value_bits, self.d, self.dtype)
            # the Triton quantize / fetch kernels take a power-of-two head dim; others run the torch ops
            self.fmt.use_triton = self.use_triton and self.d & (self.d - 1) == 0
        #: bytes of one row of the slabs' row view: a K or V vector (16 bits), a quantized token (K and V)
        self.row_bytes = self.d * self.elem if self.fmt is None else self.fmt.bytes_per_token
        per_token = 2 * self.d * self.elem if self.fmt is None else self.fmt.bytes_per_token
        self.chunk_bytes = self.L * self.H * self.C * per_token  # all layers
        cap = config.host_tier_bytes
        if cap is not None and cap < self.chunk_bytes:  # before anything is allocated
            raise ValueError(
                f"KVStoreConfig.host_tier_bytes={cap} is below this model's minimum of {self.chunk_bytes} bytes: one "
                f"cold-tier chunk ({self.C} tokens x {self.L} layers x {self.H} KV heads x {per_token} B of K and V "
                f"at K{config.cold_key_bits}V{config.cold_value_bits}); raise it or set None (no cap)"
            )
        self.max_slab_chunks = max(1, slab_bytes // self.chunk_bytes)
        self.pinned = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.pinned else None
        self.slabs: list[torch.Tensor] = []
        self._registered: list[torch.Tensor] = []  # slabs pinned by cudaHostRegister
        # unpinned when this tier goes away, before their memory is freed
        weakref.finalize(self, _unregister, self._registered)
        self.slab_rows: list[torch.Tensor] = []  # row views [L * n * 2 * H * C, d] / [L * n * H * C, row_bytes]
        self.slab_free: list[np.ndarray] = []
        self.slab_first: list[int] = []  # global id of each slab's chunk 0
        self.chunk_slab = np.zeros(0, dtype=np.int64)
        self.chunk_local = np.zeros(0, dtype=np.int64)
        self.table = np.full((max_seqs, 0), -1, dtype=np.int64)  # [seq, p // C] -> global chunk id
        self.num_tokens = np.zeros(max_seqs, dtype=np.int64)  # positions stored per sequence
        self._dirty = True
        self._dev: dict[str, torch.Tensor] = {}
        self.prefill_events: dict[int, object] = {}  # layer -> event of its last prefill copy
        self._step: torch.Tensor | None = None  # [L, B, 2, H, d] decode staging: a view of _step_buf
        self._step_buf: torch.Tensor | None = None  # [L, B' >= B, 2, H, d], doubled when a step has more rows
        self._step_meta: tuple[np.ndarray, np.ndarray] | None = None
        #: a step's tokens on their way to the host (`flush(wait=False)`): (ids, positions, pinned rows, event)
        self._pending: tuple | None = None

    # ---- allocation ----------------------------------------------------------------------------
    def ensure_seqs(self, max_seqs: int) -> None:
        if max_seqs > self.table.shape[0]:
            t = np.full((max_seqs, self.table.shape[1]), -1, dtype=np.int64)
            t[: self.table.shape[0]] = self.table
            self.table = t
            n = np.zeros(max_seqs, dtype=np.int64)
            n[: self.num_tokens.shape[0]] = self.num_tokens
            self.num_tokens = n
            self._dirty = True

    @property
    def reserved_bytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.slabs)

    @property
    def used_bytes(self) -> int:
        return int(sum(int((~f).sum()) for f in self.slab_free)) * self.chunk_bytes

    def _new_slab(self, min_chunks: int) -> int:
        total = int(self.chunk_slab.shape[0])
        n = max(min_chunks, min(self.max_slab_chunks, max(4, total // 32)))
        cap = self.config.host_tier_bytes
        if cap is not None:  # never more chunks than the cap leaves, when fewer hold the request
            n = max(min_chunks, min(n, (cap - self.reserved_bytes) // self.chunk_bytes))
        need = n * self.chunk_bytes
        if cap is not None and self.reserved_bytes + need > cap:
            raise ColdTierMemoryError(
                f"the cold tier needs {need} more bytes of host memory ({n} chunks of {self.C} tokens) but "
                f"KVStoreConfig.host_tier_bytes={cap} allows {cap - self.reserved_bytes} more; raise host_tier_bytes "
                "or serve fewer/shorter sequences"
            )
        avail = host_available_bytes()
        if avail is not None and need > avail:
            raise ColdTierMemoryError(
                f"the cold tier needs {need} bytes of host memory ({n} chunks of {self.C} tokens, "
                f"{self.chunk_bytes} B each) but the host has {avail} available; serve fewer/shorter sequences, "
                "set KVStoreConfig.host_tier_bytes, or free host memory"
            )
        try:
            shape, dtype = self._slab_shape(n)
            slab = _pinned_empty(shape, dtype, self._registered) if self.pinned else torch.empty(shape, dtype=dtype)
        except RuntimeError as e:
            raise ColdTierMemoryError(
                f"allocating {need} bytes of {'pinned ' if self.pinned else ''}host memory for the cold tier failed "
                f"({e}); lower the batch or context, or set KVStoreConfig.host_tier_bytes"
            ) from e
        self.slabs.append(slab)
        self.slab_rows.append(slab.view(-1, slab.shape[-1]))
        self.slab_free.append(np.ones(n, dtype=bool))
        self.slab_first.append(total)
        s = len(self.slabs) - 1
        self.chunk_slab = np.concatenate([self.chunk_slab, np.full(n, s, dtype=np.int64)])
        self.chunk_local = np.concatenate([self.chunk_local, np.arange(n, dtype=np.int64)])
        self._dirty = True
        logger.debug("cold tier slab %d: %d chunks, %d bytes%s", s, n, need, " pinned" if self.pinned else "")
        return s

    def _slab_shape(self, n: int) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of a slab of n chunks (the layouts of the module docstring)."""
        if self.fmt is None:
            return (self.L, n, 2, self.H, self.C, self.d), self.dtype
        return (self.L, n, self.H, self.C, self.row_bytes), torch.uint8

    def _alloc_run(self, n: int) -> tuple[int, int]:
        """n consecutive free chunks of one slab -> (slab, first local index)."""
        for s, free in enumerate(self.slab_free):
            if free.shape[0] < n:
                continue
            run = np.convolve(free.astype(np.int64), np.ones(n, dtype=np.int64), mode="valid")
            hit = np.flatnonzero(run == n)
            if hit.size:
                a = int(hit[0])
                free[a: a + n] = False
                return s, a
        s = self._new_slab(n)
        self.slab_free[s][:n] = False
        return s, 0

    def _ensure_cols(self, cols: int) -> None:
        if cols > self.table.shape[1]:
            t = np.full((self.table.shape[0], max(cols, 2 * self.table.shape[1])), -1, dtype=np.int64)
            t[:, : self.table.shape[1]] = self.table
            self.table = t

    def device_maps(self) -> dict[str, torch.Tensor]:
        """Device mirrors of the chunk table and chunk placement (refreshed between steps).

        Refreshed in place while their shapes hold (a new chunk every C steps of a sequence changes
        values only), so a decode step captured in a CUDA graph reads them at the same addresses;
        they are new tensors only when the table widens or a slab is added (kvstore/cuda_graph.py
        then captures the step again)."""
        if self._dirty:
            host = {
                "table": torch.from_numpy(self.table),
                "slab": torch.from_numpy(self.chunk_slab),
                "local": torch.from_numpy(self.chunk_local),
                "slab_n": torch.tensor([f.shape[0] for f in self.slab_free] or [0], dtype=torch.int64),
                # each slab's first byte: the fused fetch reads a row by address (a pinned slab is a device
                # pointer on CUDA: unified virtual addressing), one launch for every slab
                "addr": torch.tensor([r.data_ptr() for r in self.slab_rows] or [0], dtype=torch.int64),
            }
            # (non_blocking from pageable memory: the driver stages the bytes before it returns, and the
            # copy waits for nothing queued on the device, as a blocking one would)
            for name, src in host.items():
                dst = self._dev.get(name)
                if dst is None or dst.shape != src.shape:
                    self._dev[name] = src.to(self.device, copy=True, non_blocking=True)
                else:
                    dst.copy_(src, non_blocking=True)
            self._dirty = False
        return self._dev

    # ---- prefill ---------------------------------------------------------------------------------
    def allocate_prefill(self, seq_ids: torch.Tensor, lengths: torch.Tensor) -> None:
        """Chunks for the prompts of a batch: one run of consecutive chunks per sequence (a slab holds
        at least one sequence, so no slab is bigger than the longest prompt or 1 GiB). Host work; at
        layer 0. Host memory short for any of them: nothing stays allocated, ColdTierMemoryError."""
        ids = seq_ids.cpu().numpy()
        n = lengths.cpu().numpy().astype(np.int64)
        if (self.num_tokens[ids] > 0).any():
            raise NotImplementedError("the cold tier takes a whole prompt in one prefill chunk (no chunked prefill)")
        per = (n + self.C - 1) // self.C
        self._ensure_cols(int(per.max(initial=0)) + 1)
        offsets = np.concatenate([[0], np.cumsum(per)[:-1]]).astype(np.int64) if len(per) else np.zeros(0, np.int64)
        runs = []  # (slab, first local chunk, first staging chunk, chunks) per sequence
        try:
            for b, sid in enumerate(ids):
                if per[b]:
                    s, a = self._alloc_run(int(per[b]))
                    runs.append((s, a, int(offsets[b]), int(per[b])))
                    first = self.slab_first[s] + a
                    self.table[sid, : per[b]] = np.arange(first, first + per[b])  # host bookkeeping
        except ColdTierMemoryError:
            for s, a, _, c in runs:
                self.slab_free[s][a: a + c] = True
            self.table[ids] = -1
            raise
        self._prefill_runs = runs
        self._prefill_starts = torch.from_numpy(offsets).to(self.device)
        self.num_tokens[ids] = n
        self._dirty = True

    def write_prefill(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                      valid: torch.Tensor) -> None:
        """Copy one layer's prompt K/V of the batch (allocated by `allocate_prefill`) to host memory.

        k, v: [B, Hkv, T, d]; positions int [B, T]; valid bool [B, T]. Asynchronous on CUDA.
        """
        total = sum(c for *_, c in self._prefill_runs)
        if total == 0:
            return
        B, H, T, d = k.shape
        b, t = valid.nonzero(as_tuple=True)
        p = positions[b, t].long()
        ci = self._prefill_starts[b] + p // self.C
        off = p % self.C
        if self.fmt is None:
            stage = torch.zeros(total, 2, H, self.C, d, dtype=self.dtype, device=k.device)
            stage[ci, 0, :, off] = k[b, :, t].to(self.dtype)
            stage[ci, 1, :, off] = v[b, :, t].to(self.dtype)
        else:  # one quantized row per (token, head): row (ci, h, off) of the staging chunks
            stage = torch.zeros(total, H, self.C, self.row_bytes, dtype=torch.uint8, device=k.device)
            h = torch.arange(H, device=k.device)
            row = ((ci.view(-1, 1) * H + h) * self.C + off.view(-1, 1)).view(-1)
            self._quantize_rows(stage.view(-1, self.row_bytes), row, k[b, :, t].reshape(-1, d),
                                v[b, :, t].reshape(-1, d))
        if self.copy_stream is not None:
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream) if self.copy_stream is not None else contextlib.nullcontext():
            for s, a, o, c in self._prefill_runs:  # one copy per sequence's run of chunks
                self.slabs[s][layer, a: a + c].copy_(stage[o: o + c], non_blocking=self.pinned)
        self.prefill_events[layer] = None
        if self.copy_stream is not None:
            stage.record_stream(self.copy_stream)  # the allocator must not reuse it before the copy ran
            self.prefill_events[layer] = torch.cuda.Event()
            self.prefill_events[layer].record(self.copy_stream)

    def _quantize_rows(self, rows: torch.Tensor, ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize k, v [N, d] into rows[ids] (uint8 [R, row_bytes]: one-token pages)."""
        self.fmt.write(rows, ids, torch.zeros_like(ids), k.contiguous(), v.contiguous())

    def _dequantize_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [..., d] (model dtype) of quantized rows uint8 [..., row_bytes] on the host (torch ops)."""
        shape = rows.shape[:-1]
        flat = rows.reshape(-1, self.row_bytes)
        k, v = reference.dequantize_pages(flat, torch.arange(flat.shape[0]), self.fmt.key_bits, self.fmt.value_bits,
                                          self.fmt.groups, 1, self.d)
        return k.view(*shape, self.d).to(self.dtype), v.view(*shape, self.d).to(self.dtype)

    def wait_prefill(self, layer: int) -> None:
        """Block the calling (host) thread until layer's last prefill copy is in host memory."""
        ev = self.prefill_events.get(layer)
        if ev is not None:
            ev.synchronize()

    def read_keys(self, seq_id: int, layer: int, lo: int, hi: int, values: bool = False) -> torch.Tensor:
        """Host copy of keys (or values) [Hkv, hi - lo, d] of positions [lo, hi) of one sequence (host threads;
        the model's dtype, dequantized from a quantized tier)."""
        if hi <= lo:
            return torch.zeros(self.H, 0, self.d, dtype=self.dtype)
        c0, c1 = lo // self.C, (hi - 1) // self.C + 1
        chunks = self.table[seq_id, c0:c1]
        if self.fmt is None:
            parts = [self.slabs[self.chunk_slab[c]][layer, self.chunk_local[c], int(values)] for c in chunks]
            x = torch.stack(parts, 1).reshape(self.H, -1, self.d)  # [H, (c1 - c0) * C, d]
            return x[:, lo - c0 * self.C: hi - c0 * self.C]
        parts = [self.slabs[self.chunk_slab[c]][layer, self.chunk_local[c]] for c in chunks]  # [H, C, row_bytes]
        rows = torch.stack(parts, 1).reshape(self.H, -1, self.row_bytes)[:, lo - c0 * self.C: hi - c0 * self.C]
        return self._dequantize_rows(rows)[int(values)]

    def read_sequence(self, seq_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored token of one sequence, keys and values [L, Hkv, n, d] (host copies, position
        order, the model's dtype): what an export of the sequence needs (kvstore/adapters/transfer.py).
        Flushes the last decode step first (a host sync: not a decode-path call)."""
        self.flush()
        n = int(self.num_tokens[seq_id])
        keys = torch.stack([self.read_keys(seq_id, layer, 0, n) for layer in range(self.L)])
        values = torch.stack([self.read_keys(seq_id, layer, 0, n, values=True) for layer in range(self.L)])
        return keys, values

    # ---- decode ----------------------------------------------------------------------------------
    def plan_step(self, seq_ids: torch.Tensor, positions: torch.Tensor,
                  host: tuple[np.ndarray, np.ndarray] | None = None, lag: bool = False) -> None:
        """Once per decode step (host): flush the last step's tokens, make room for this step's.
        host: the same slots and positions as host arrays, where the caller has them (else read
        from the device: a host sync). lag: the last step's tokens may reach the slabs a step late
        (`flush(wait=False)`: no host read), where no reader wants a step's newest tokens then."""
        self.flush(wait=not lag)
        if host is not None:
            ids, pos = host
        else:
            ids = seq_ids.cpu().numpy()
            pos = positions.cpu().numpy().astype(np.int64)
        self._ensure_cols(int((pos // self.C).max(initial=0)) + 2)
        col = pos // self.C
        need = self.table[ids, col] < 0
        for b in np.flatnonzero(need):  # host bookkeeping, one chunk per sequence every C steps
            s, a = self._alloc_run(1)
            self.table[ids[b], col[b]] = self.slab_first[s] + a
            self._dirty = True
        self.num_tokens[ids] = pos + 1
        B = len(ids)
        # one buffer for every batch size (a CUDA graph of each size keeps writing where it was captured)
        if self._step_buf is None or self._step_buf.shape[1] < B:
            rows = max(B, 2 * self._step_buf.shape[1]) if self._step_buf is not None else B
            self._step_buf = torch.zeros(self.L, rows, 2, self.H, self.d, dtype=self.dtype, device=self.device)
        self._step = self._step_buf[:, :B]
        self._step_meta = (ids.copy(), pos)

    def write_decode(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stage one layer's new K/V [B, Hkv, d]; no host sync, no allocation."""
        self._step[layer, :, 0].copy_(k)
        self._step[layer, :, 1].copy_(v)

    def flush(self, wait: bool = True) -> None:
        """Write the staged decode tokens of the last step into the slabs (host; syncs).

        wait=False: they are written into the slabs at the next flush, a step later (on CUDA their
        copy to pinned host memory is started now, behind the step that wrote them: nothing waits for
        the device; on a CPU a copy is kept, the same order of writes); the tokens of the flush before
        are written first. Every other caller (an export, a release) flushes with wait: the slabs then
        hold every token."""
        self._write_pending()
        if self._step_meta is None:
            return
        ids, pos = self._step_meta
        self._step_meta = None
        rows = self._step_rows()  # [L, B, 2, H, d] / [L, B, H, row_bytes]
        if wait:
            self._scatter(ids, pos, rows if rows.device.type == "cpu" else rows.cpu())
            return
        event = None
        if rows.device.type == "cuda":
            host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
            host.copy_(rows, non_blocking=True)  # in stream order: after the step, before the next one rewrites
            event = torch.cuda.Event()
            event.record()
        else:
            host = rows.to("cpu", copy=True)  # the staging buffer is rewritten by the next step
        self._pending = (ids, pos, host, event)

    def _write_pending(self) -> None:
        """The tokens of a `flush(wait=False)` into the slabs (their copy has long ended by then)."""
        if self._pending is None:
            return
        ids, pos, host, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        self._scatter(ids, pos, host)

    def _scatter(self, ids: np.ndarray, pos: np.ndarray, host: torch.Tensor) -> None:
        """Rows of one step's tokens (host [L, B, ...], row b: sequence ids[b] at pos[b]) into the slabs."""
        chunk = self.table[ids, pos // self.C]
        off = torch.from_numpy(pos % self.C)
        slab, local = self.chunk_slab[chunk], self.chunk_local[chunk]
        for s in np.unique(slab):  # a handful of slabs
            sel = np.flatnonzero(slab == s)
            lc = torch.from_numpy(local[sel])
            sl = torch.from_numpy(sel)
            if self.fmt is None:  # slab [L, n, 2, H, C, d] at (chunk, offset) per sequence: view [b, L, 2, H, d]
                self.slabs[s][:, lc, :, :, off[sl]] = host[:, sl].permute(1, 0, 2, 3, 4)
            else:  # slab [L, n, H, C, row_bytes] at (chunk, offset): view [b, L, H, row_bytes]
                self.slabs[s][:, lc, :, off[sl]] = host[:, sl].permute(1, 0, 2, 3)

    def _step_rows(self) -> torch.Tensor:
        """The staged decode tokens as the slabs store them: [L, B, 2, H, d], or quantized rows
        [L, B, H, row_bytes] (quantized on the store's device, at plan time)."""
        if self.fmt is None:
            return self._step
        L, B, _, H, d = self._step.shape
        rows = torch.zeros(L * B * H, self.row_bytes, dtype=torch.uint8, device=self._step.device)
        self._quantize_rows(rows, torch.arange(L * B * H, device=rows.device), self._step[:, :, 0].reshape(-1, d),
                            self._step[:, :, 1].reshape(-1, d))
        return rows.view(L, B, H, self.row_bytes)

    def fetch_workspace(self, seq_ids: torch.Tensor, k: int, wsp: Workspace) -> dict:
        """Plan time, after `device_maps`: the buffers `rows` and `fetch` write for a step of width k."""
        B, H = seq_ids.numel(), self.H
        i64 = torch.int64
        cols = self.device_maps()["table"].shape[1]
        ws = {name: wsp.take("fetch." + name, (B, H, k), i64)
              for name in ("p", "ci", "flat", "chunk", "slab", "local", "n", "row", "rem", "rows_k")}
        ws.update(sel=wsp.take("fetch.sel", (B, H, k), torch.bool), ge=wsp.take("fetch.ge", (B * H * k,), torch.bool))
        ws["r"] = wsp.take("fetch.r", (2, B * H * k), i64)
        ws["h"] = wsp.arange("fetch.h", H).view(1, H, 1)
        ws["neg1"] = wsp.full("fetch.neg1", (), i64, -1)
        ws["tbase"] = torch.mul(seq_ids.view(B, 1, 1), cols, out=wsp.take("fetch.tbase", (B, 1, 1), i64))
        if self.fmt is not None:  # the fetched misses' rows as stored: the GPU cache admits these bytes
            ws["raw"] = wsp.take("fetch.raw", (B * H * k, self.row_bytes), torch.uint8)
            ws["own"] = wsp.arange("fetch.own", B * H * k).view(B, H, k)
        return ws

    def rows(self, layer: int, seq_ids: torch.Tensor, pos: torch.Tensor, ws: dict | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Slab and K row of (layer, sequence, KV head, position). pos int64 [B, H, k] (>= 0) ->
        (slab int64, row int64) [B, H, k]; the V row is row + H * C (a quantized row holds both). Device ops only; with ws
        (`fetch_workspace`) no allocation (the results are views of ws)."""
        m = self.device_maps()
        B, H, k = pos.shape
        ws = ws if ws is not None else self.fetch_workspace(seq_ids, k, Workspace(pos.device))
        ci = torch.div(pos, self.C, rounding_mode="floor", out=ws["ci"])
        flat = torch.add(ci, ws["tbase"], out=ws["flat"]).view(-1)
        # chunk -1 (none: a position past a shorter sequence's end, never wanted) reads chunk 0
        chunk = torch.index_select(m["table"].view(-1), 0, flat, out=ws["chunk"].view(-1)).clamp_(min=0)
        slab = torch.index_select(m["slab"], 0, chunk, out=ws["slab"].view(-1))
        local = torch.index_select(m["local"], 0, chunk, out=ws["local"].view(-1))
        n = torch.index_select(m["slab_n"], 0, slab, out=ws["n"].view(-1))
        row = torch.mul(n, layer, out=ws["row"].view(-1)).view(B, H, k)
        row.add_(local.view(B, H, k)).mul_(H if self.fmt is not None else 2 * H).add_(ws["h"]).mul_(self.C)
        row.add_(torch.remainder(pos, self.C, out=ws["rem"]))
        return ws["slab"], row

    def fetch(self, layer: int, seq_ids: torch.Tensor, pos: torch.Tensor, want: torch.Tensor,
              out: torch.Tensor, ws: dict | None = None, dequantize: bool = True) -> torch.Tensor:
        """Gather K and V of the wanted positions into out [2, B, H, k, d] (rows not wanted untouched).

        pos int64 [B, H, k]; want bool [B, H, k]. No host sync; with ws (`fetch_workspace`) no
        allocation on the kernel path (the reference gather allocates). On CUDA a UVA kernel
        reads the pinned slabs directly (one launch per slab, a handful); with
        use_triton="always" on a CPU store the same kernel runs in the interpreter.

        Quantized: the wanted rows cross the link once, as stored, into ws["raw"] (uint8
        [B * H * k, row_bytes], row i the i-th (b, h, j); rows not wanted hold stale bytes), and are
        dequantized from there into out. The GPU cache admits the misses' rows from ws["raw"] as
        they are (`GPUCache.admit`), so a later hit dequantizes the same bytes to the same values.
        dequantize=False stops at ws["raw"] (out untouched): the rows become pages of the hot tier's
        kernel launch (`ColdPath.stage`).
        """
        B, H, k = pos.shape
        ws = ws if ws is not None else self.fetch_workspace(seq_ids, k, Workspace(pos.device))
        if self._fused_fetch(pos, want, out):  # one launch: rows mapped and read on the device
            from gpu_kernels.fetch import fetch_positions

            fmt = (self.fmt.key_bits, self.fmt.value_bits, self.fmt.groups) if self.fmt is not None else None
            rows_only = self.fmt is not None and not dequantize  # a quantized fetch that stops at ws["raw"]
            fetch_positions(pos, want, seq_ids, self.device_maps(), layer, self.C, self.d, None if rows_only else out,
                            ws.get("raw"), fmt, dequantize)
            return out
        slab, row = self.rows(layer, seq_ids, torch.clamp(pos, min=0, out=ws["p"]), ws)
        rows_k = torch.where(want, row, ws["neg1"], out=ws["rows_k"])
        if self.fmt is not None:
            return self._fetch_quantized(slab, rows_k, out, ws, dequantize)
        dst = out.view(-1, self.d)
        r = ws["r"]  # [2, M]: K rows, then V rows (-1: skip)
        for s, src in enumerate(self.slab_rows):
            torch.where(torch.eq(slab, s, out=ws["sel"]), rows_k, ws["neg1"], out=r[0].view(B, H, k))
            torch.add(r[0], self.H * self.C, out=r[1])
            torch.where(torch.ge(r[0], 0, out=ws["ge"]), r[1], r[0], out=r[1])
            if self.use_triton:
                from gpu_kernels.fetch import gather_rows

                gather_rows(src, r.view(-1), dst)
            else:
                reference.gather_rows(src, r.view(-1), dst)
        return out

    def _fused_fetch(self, pos: torch.Tensor, want: torch.Tensor, out: torch.Tensor | None) -> bool:
        """Whether `fetch` runs `gpu_kernels.fetch.fetch_positions` (Triton on, a power-of-two head dim,
        the layouts it reads); else the torch path: `rows`, then a gather per slab (its reference)."""
        if not self.use_triton or self.d & (self.d - 1) or not self.slab_rows:
            return False
        if not (pos.dtype == torch.int64 and pos.is_contiguous() and want.is_contiguous()):
            return False
        if out is None:  # a quantized fetch that stops at its rows (a speculative prefetch's)
            return self.fmt is not None
        return out.is_contiguous() and (self.fmt is not None or out.dtype == self.dtype)

    def _fetch_quantized(self, slab: torch.Tensor, rows: torch.Tensor, out: torch.Tensor, ws: dict,
                         dequantize: bool = True) -> torch.Tensor:
        """`fetch` from a quantized tier: each slab's wanted rows copied into ws["raw"] (one pass over
        the link), then dequantized from there into out[0] (K), out[1] (V) in one pass."""
        B, H, k = rows.shape
        r, raw = ws["r"][0], ws["raw"]
        for s, src in enumerate(self.slab_rows):
            torch.where(torch.eq(slab, s, out=ws["sel"]), rows, ws["neg1"], out=r.view(B, H, k))
            self.fmt.copy_rows(src, r, raw)
        if not dequantize:
            return out
        own = torch.where(torch.ge(rows, 0, out=ws["sel"]), ws["own"], ws["neg1"], out=r.view(B, H, k))
        self.fmt.gather_rows(raw, own.view(-1), out)
        return out

    # ---- release ---------------------------------------------------------------------------------
    def release(self, seq_ids: torch.Tensor) -> None:
        self.flush()
        for sid in seq_ids.cpu().numpy().tolist():
            chunks = self.table[sid][self.table[sid] >= 0]
            for c in chunks:
                self.slab_free[self.chunk_slab[c]][self.chunk_local[c]] = True
            self.table[sid] = -1
            self.num_tokens[sid] = 0
        self._dirty = True
