"""Node memory: the cluster's cold tier of a node, host memory in shared memory that outlives the
workers of its node. (Not `kvstore.cold.host_tier.ColdTier`, a store's own host tier inside a worker.)

One `NodeMemory` per node (run as a Ray actor by the controller) owns one shared-memory segment
per batch of sequences. The worker serving the batch maps the segment by name
(`BatchArena.attach`) and writes each step's state into it straight from its own process: the
K/V never travel through Ray RPC. When a worker dies, the segment survives in the cold tier,
and the worker that takes the batch over maps it again and goes on decoding without prefill.
When the cold tier dies, its segments go with it (the OS frees memory whose owner died) and
the controller re-prefills the affected batches.

Segment layout (one batch of B sequences, padded timeline of up to `max_tokens` columns, the
layout of kvstore.adapters.transfer.BatchKV)::

    header   int64 [8]             MAGIC, committed columns t, generated tokens, B, prompt columns,
                                   prefill columns, softmax scale (float64 bits); t and generated last
    ids      int64 [B, max_tokens + 1]   ids[:, :t] tokens fed so far, ids[:, t] the next one to feed
    valid    uint8 [B, max_tokens]       which columns of each row are real tokens (left padding)
    kv       [max_tokens, 2, L, B, Hkv, d]  post-RoPE keys (0) and values (1) at the model's dtype
    q        [max_tokens, L, B, Hq, d]      post-RoPE queries, only when num_q_heads > 0: presets whose
                                            store state depends on queries are rebuilt by replay
                                            (kvstore.adapters.transfer.replay_batch), which needs them

Column-major K/V: one decode step's K/V of the whole batch, every layer, is one contiguous
block `kv[t]`, so a GPU worker publishes a step with a single device-to-host copy into the
(registered, pinned) segment.

A step writes its K/V column and next ids first and advances `t` last, so a reader that finds
`t` sees complete columns 0 .. t-1. Everything here works without Ray.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from dataclasses import asdict, dataclass
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

MAGIC = 0x6B7673746F7265  # "kvstore"
_ALIGN = 64
_HEADER = 8
_SEGMENT = re.compile(r"kvs([0-9a-f]+)_[0-9a-f]+_[0-9]+")  # kvs<owner pid>_<tier>_<n>


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class ArenaSpec:
    """What a worker needs to map a batch's segment (plain data: travels through Ray as is)."""

    name: str
    batch: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_tokens: int
    dtype: str  # torch dtype name, e.g. "float32", "bfloat16"
    num_q_heads: int = 0  # > 0: queries are recorded too

    def __post_init__(self) -> None:
        for f in ("batch", "num_layers", "num_kv_heads", "head_dim", "max_tokens"):
            if getattr(self, f) < 1:
                raise ValueError(f"ArenaSpec.{f}={getattr(self, f)!r} must be >= 1")
        if self.num_q_heads < 0:
            raise ValueError(f"ArenaSpec.num_q_heads={self.num_q_heads!r} must be >= 0")
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"ArenaSpec.dtype={self.dtype!r} is not a torch dtype name")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def _offsets(self) -> tuple[list[int], int]:
        elem = torch.empty((), dtype=self.torch_dtype).element_size()
        B, T = self.batch, self.max_tokens
        kv = 2 * B * self.num_layers * self.num_kv_heads * T * self.head_dim * elem
        q = B * self.num_layers * self.num_q_heads * T * self.head_dim * elem
        sizes = [_HEADER * 8, B * (T + 1) * 8, B * T, kv, q]
        offsets, at = [], 0
        for s in sizes:
            offsets.append(at)
            at += (s + _ALIGN - 1) // _ALIGN * _ALIGN
        return offsets, at

    @property
    def nbytes(self) -> int:
        return self._offsets()[1]


class BatchArena:
    """Numpy/torch views of one batch's segment. Create with `create` (owner) or `attach`."""

    def __init__(self, spec: ArenaSpec, shm: shared_memory.SharedMemory, owner: bool):
        self.spec, self.shm, self.owner = spec, shm, owner
        (o_h, o_ids, o_valid, o_kv, o_q), _ = spec._offsets()
        B, T, L, H, d = spec.batch, spec.max_tokens, spec.num_layers, spec.num_kv_heads, spec.head_dim
        buf = shm.buf
        self.header = np.ndarray((_HEADER,), dtype=np.int64, buffer=buf, offset=o_h)
        self.ids = torch.from_numpy(np.ndarray((B, T + 1), dtype=np.int64, buffer=buf, offset=o_ids))
        self.valid = torch.from_numpy(np.ndarray((B, T), dtype=np.uint8, buffer=buf, offset=o_valid))
        elem = torch.empty((), dtype=spec.torch_dtype).element_size()
        n = T * 2 * L * B * H * d * elem
        raw = torch.from_numpy(np.ndarray((n,), dtype=np.uint8, buffer=buf, offset=o_kv))
        self.kv = raw.view(spec.torch_dtype).view(T, 2, L, B, H, d)
        self.q = None
        if spec.num_q_heads:
            nq = T * L * B * spec.num_q_heads * d * elem
            raw = torch.from_numpy(np.ndarray((nq,), dtype=np.uint8, buffer=buf, offset=o_q))
            self.q = raw.view(spec.torch_dtype).view(T, L, B, spec.num_q_heads, d)
        self._pinned = False

    # ---- lifetime -------------------------------------------------------------------------
    @classmethod
    def create(cls, spec: ArenaSpec) -> "BatchArena":
        shm = shared_memory.SharedMemory(name=spec.name, create=True, size=spec.nbytes)
        arena = cls(spec, shm, owner=True)
        arena.header[:] = 0
        arena.header[0] = MAGIC
        arena.header[3] = spec.batch
        return arena

    @classmethod
    def attach(cls, spec: ArenaSpec) -> "BatchArena":
        """Map an existing segment by name. Raises FileNotFoundError when its owner is gone."""
        shm = shared_memory.SharedMemory(name=spec.name, create=False)
        # Python < 3.13 registers attached segments with this process's resource tracker, which
        # would unlink them when this process exits: only the owner (the cold tier) may do that.
        try:
            resource_tracker.unregister(shm._name, "shared_memory")  # noqa: SLF001
        except Exception:  # pragma: no cover - tracker absent
            pass
        if shm.size < spec.nbytes:
            shm.close()
            raise ValueError(f"segment {spec.name} has {shm.size} bytes, the spec needs {spec.nbytes}")
        arena = cls(spec, shm, owner=False)
        if int(arena.header[0]) != MAGIC:
            arena.close()
            raise ValueError(f"segment {spec.name} is not a kvstore batch arena")
        return arena

    def pin(self) -> None:
        """Register the segment as pinned memory with CUDA so device copies into it are DMA."""
        if self._pinned or not torch.cuda.is_available():
            return
        ptr = self.kv.data_ptr() - (self.kv.data_ptr() % 4096)
        end = self.q if self.q is not None else self.kv
        size = end.data_ptr() + end.nbytes - ptr
        try:
            err = torch.cuda.cudart().cudaHostRegister(ptr, size, 0)
            ok = int(err) == 0
        except Exception as e:  # pragma: no cover - depends on the CUDA build
            err, ok = e, False
        if ok:
            self._pinned = True
        else:  # still correct, just a staged copy
            logger.warning("cudaHostRegister of arena %s failed (%s); copies will be pageable", self.spec.name, err)

    def close(self) -> None:
        if self._pinned:
            ptr = self.kv.data_ptr() - (self.kv.data_ptr() % 4096)
            torch.cuda.cudart().cudaHostUnregister(ptr)
            self._pinned = False
        self.header = self.ids = self.valid = self.kv = self.q = None  # drop views first
        try:
            self.shm.close()
        except BufferError:  # a view is still alive somewhere; the mapping goes with the process
            pass
        if self.owner:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass

    # ---- progress -------------------------------------------------------------------------
    @property
    def committed(self) -> int:
        """Columns whose K/V are complete (tokens fed so far)."""
        return int(self.header[1])

    @property
    def generated(self) -> int:
        return int(self.header[2])

    @property
    def prompt_columns(self) -> int:
        return int(self.header[4])

    @property
    def prefill_columns(self) -> int:
        return int(self.header[5])

    @property
    def scale(self) -> float:
        return float(self.header[6:7].view(np.float64)[0])

    def set_layout(self, prompt_columns: int, prefill_columns: int, scale: float) -> None:
        self.header[4] = prompt_columns
        self.header[5] = prefill_columns
        self.header[6:7].view(np.float64)[0] = scale

    def commit(self, committed: int, generated: int) -> None:
        self.header[2] = generated
        self.header[1] = committed  # last: a reader that sees t sees columns < t complete


class NodeMemory:
    """A node's cold tier: owns the batch segments of the workers on its node, and serves the
    CPU retrieval service (retrieval/service.py) for sequences whose codes are parked off the GPU.

    `capacity_bytes` caps the host memory it hands out (MemoryError past it);
    `retrieval_threads` sizes the retrieval thread pool (started on the first search).
    """

    def __init__(self, capacity_bytes: int = 1 << 30, prefix: str = "kvs", retrieval_threads: int | None = None):
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes={capacity_bytes} must be positive")
        self.capacity_bytes = capacity_bytes
        self.retrieval_threads = retrieval_threads
        self._service = None
        self.prefix = f"{prefix}{os.getpid():x}_{secrets.token_hex(3)}"
        self.arenas: dict[str, BatchArena] = {}
        self._count = 0
        self.reap_orphans()

    def reap_orphans(self, names: list[str] | None = None) -> int:
        """Unlink segments a dead cold tier of this machine left behind; returns how many.

        A cold tier killed outright (SIGKILL) cannot unlink its segments. `names` unlinks those
        (the controller knows them); without it, every `kvs<pid>_*` segment of /dev/shm whose
        owner process is gone is unlinked.
        """
        shm_dir = Path("/dev/shm")
        if names is None:
            names = []
            if shm_dir.is_dir():
                for path in shm_dir.iterdir():
                    m = _SEGMENT.fullmatch(path.name)
                    if m and not _alive(int(m.group(1), 16)):
                        names.append(path.name)
        count = 0
        for name in names:
            if name.startswith(self.prefix + "_"):
                continue  # ours
            try:
                seg = shared_memory.SharedMemory(name=name, create=False)
            except FileNotFoundError:
                continue
            seg.close()
            seg.unlink()  # also unregisters it from this process's resource tracker
            count += 1
        if count:
            logger.warning("unlinked %d segments left by a dead cold tier", count)
        return count

    def ping(self) -> bool:
        return True

    def node_id(self) -> str | None:
        try:
            import ray

            return ray.get_runtime_context().get_node_id()
        except Exception:
            return None

    @property
    def used_bytes(self) -> int:
        return sum(a.spec.nbytes for a in self.arenas.values())

    def create_arena(self, batch_id: str, batch: int, num_layers: int, num_kv_heads: int, head_dim: int,
                     max_tokens: int, dtype: str, num_q_heads: int = 0) -> ArenaSpec:
        """Allocate a zeroed segment for one batch and return the spec a worker maps."""
        if batch_id in self.arenas:
            raise ValueError(f"batch {batch_id!r} already has an arena")
        self._count += 1
        spec = ArenaSpec(f"{self.prefix}_{self._count}", batch, num_layers, num_kv_heads, head_dim, max_tokens, dtype,
                         num_q_heads)
        if self.used_bytes + spec.nbytes > self.capacity_bytes:
            raise MemoryError(
                f"cold tier full: {self.used_bytes} of {self.capacity_bytes} bytes used, batch {batch_id!r} needs "
                f"{spec.nbytes}; raise the cold tier's capacity_bytes or lower the batch size"
            )
        self.arenas[batch_id] = BatchArena.create(spec)
        return spec

    def progress(self, batch_id: str) -> tuple[int, int] | None:
        """(committed columns, generated tokens) of a batch, or None if it has no arena."""
        arena = self.arenas.get(batch_id)
        return None if arena is None else (arena.committed, arena.generated)

    def release(self, batch_id: str) -> None:
        arena = self.arenas.pop(batch_id, None)
        if arena is not None:
            arena.close()

    def stats(self) -> dict:
        return {"arenas": len(self.arenas), "host_bytes": self.used_bytes, "capacity_bytes": self.capacity_bytes}

    def search(self, requests: list) -> np.ndarray:
        """PQ top-k on this node's CPUs for sequences parked off the GPU.

        `requests`: retrieval.service.SearchRequest, one per sequence. Returns int64
        [len(requests), Hkv, k] absolute token positions (-1 where a head has fewer candidates).
        """
        if self._service is None:
            from retrieval.service import RetrievalService

            self._service = RetrievalService(self.retrieval_threads)
        return self._service.submit(requests).result()

    def shutdown(self) -> None:
        for batch_id in list(self.arenas):
            self.release(batch_id)
        if self._service is not None:
            self._service.close()
            self._service = None

    def __del__(self):  # pragma: no cover - best effort at interpreter exit
        try:
            self.shutdown()
        except Exception:
            pass


def spec_dict(spec: ArenaSpec) -> dict:
    return asdict(spec)
