"""The engine's decode step captured in a CUDA graph and replayed.

A decode step through a Hugging Face model launches every op of every layer from Python: at
32 layers the host work (4-6 ms a layer, `results/h200_throughput/README.md`) sets the step's
time, not the bytes it reads. Captured once, a step is one graph launch.

What makes a step replayable: `KVStore.plan` runs on the host before each replay and writes the
step's metadata into buffers of the store's `Workspace`, which keep their addresses while the
shapes repeat; every layer's `KVStore.decode` then allocates nothing and never syncs the host
(tests/test_decode_allocations.py). Three things are pinned for a graph's life:

* the batch size B (the graphs, up to the engine's max_batch of them, share one memory pool);
* the width the attention buffers are sized for: where the hot tier keeps every token, the widest
  page table the running requests will reach (`plan(pages_hint=...)`); where it drops tokens (a
  window, LeanKV), the pages in use rounded up in 1/8 steps (the dense width would leave most of
  the kernel's splits idle). The split count and pages per split stay fixed between those steps;
* the addresses of everything the graph reads: the static inputs (token ids, positions, sequence
  slots of the rows), the page pool, the page tables, the slot positions, the plan's buffers.

`signature()` lists those: the static inputs, the plan's buffers with the launch's ints (split
sizes, the selection's width), and every tensor the store's parts hold (the hot tier's pool and
tables, the policy, the host tier's staging and chunk maps, the selector's codes, the GPU cache);
when one differs from the captured graph's (the pool grew, a longer request joined, the rows
changed count, the host tier added a slab), the step is captured again. Replaying the same plan
twice is harmless (a layer writes its new token, then attends: the same inputs write the same
bytes), which is what lets the warm-up and the capture run on the step's real plan. (With
retrieval, the warm-up runs also count as GPU-cache lookups: a second run of a step finds the
first run's misses cached. A hit reads the bytes the fetch would have brought, so the outputs
are the same; the cache's scores and hit counts are not those of an eager run.)

What a step of each part reads between replays, refreshed at plan time in place:

* the hot tier: the page tables and the pool (LeanKV's page moves are plan-time work, done
  before the replay; its per-token logits are written by the graph and read by the next plan);
* retrieval (`kvstore/cold/path.py`): the selection's per-sequence tensors (positions, candidate
  range, k) and the retrieved-token pages are copies in workspace buffers; the scored width is the
  retrieval buffers' position capacity, which grows by 1/8 at a time, not max(hi), which grows
  every step; the host tier's chunk maps are refreshed in place; the fetch's side stream and its
  event join the capture as a fork and a join of the capture stream.

Eligible: a CUDA store whose decode attention is the Triton kernel, with any hot policy and any
selector whose index is built on the device (PQ codebooks trained on the host with
pq_trainer='faiss' are loaded at a decode step: refused). The engine logs which path runs.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)


def graph_support(store: Any) -> str | None:
    """None if the store's decode step can be captured; else why not (one line)."""
    if store.geometry.device.type != "cuda":
        return "the store is not on CUDA"
    if not store.hot.kernel_decode:
        return "decode attention is not the Triton kernel (Triton disabled or an unsupported head dim)"
    cold = store.cold_path
    selector = cold.selector if cold is not None else None
    if selector is not None and getattr(selector, "trains_on_device", True) is False:
        return "the PQ codebooks are trained on host threads (pq_trainer='faiss') and loaded at a decode step"
    return None


def _tensors(obj: Any, prefix: str = "", depth: int = 8):
    """(name, (address, shape, dtype)) of every tensor in nested dicts/lists/tuples/dataclasses;
    (name, value) of ints and bools."""
    if isinstance(obj, torch.Tensor):
        yield prefix, (obj.data_ptr(), tuple(obj.shape), obj.dtype)
    elif isinstance(obj, bool | int):
        yield prefix, obj
    elif depth <= 0:
        return
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _tensors(obj[k], f"{prefix}.{k}", depth - 1)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}[{i}]", depth - 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, f.name), f"{prefix}.{f.name}", depth - 1)


def _state(obj: Any, prefix: str):
    """The tensors an object holds (attributes, and lists/dicts of tensors), by address and shape.
    A component that grows a buffer replaces the tensor, which changes this; ints (counters that
    move every step) are left out, and so are the attributes a class names in `graph_ignores`
    (prefill-time state no decode step reads: a new request's prefill must not capture again)."""
    if obj is None:
        return
    ignores = getattr(type(obj), "graph_ignores", ())
    for name, value in sorted(vars(obj).items()):
        if name in ignores:
            continue
        for key, val in _tensors(value, f"{prefix}.{name}", depth=3):
            if isinstance(val, tuple):
                yield key, val


#: the plan's fields a layer's decode reads (the others are plan-time only: page, slot, positions ...)
_PLAN_READS = ("seq_ids", "out", "hot_ws", "selection", "retrieved", "ret_pages")


def signature(store: Any, plan: Any, inputs: tuple[torch.Tensor, ...]) -> tuple:
    """What a captured step reads: the static inputs, the plan's buffers (and the launch's ints:
    split sizes, the selection's width), and every tensor the store's parts hold, by address and
    shape. A step whose signature equals the captured one's replays; any difference captures again."""
    parts = [("inputs", tuple(_tensors(list(inputs))))]
    parts.append(("plan", tuple(_tensors({f: getattr(plan, f) for f in _PLAN_READS}))))
    hot, cold = store.hot, store.cold_path
    objects = {"hot": hot, "pool": hot.pool, "table": hot.table, "policy": store.policy, "cold": store.cold}
    if cold is not None:
        objects.update(cold_path=cold, selector=cold.selector, gpu_cache=cold.gpu_cache)
    for name, obj in objects.items():
        parts.append((name, tuple(_state(obj, name))))
    return tuple(parts)


def _changed(old: tuple, new: tuple) -> str:
    """The first entry of two signatures that differs (what made a step capture again), by name."""
    for (part, a), (_, b) in zip(old, new):
        if a != b:
            da, db = dict(a), dict(b)
            names = [k for k in dict.fromkeys([*da, *db]) if da.get(k) != db.get(k)]
            return names[0] if names else part
    return "nothing"


class DecodeGraphs:
    """Captured decode steps, one per signature; `run` replays (capturing first when needed).

    forward(plan) must run one decode step of the model reading only the static inputs and the
    plan's buffers, and return the logits [B, V] (a tensor the graph then owns).

    max_graphs: graphs kept (least recently replayed dropped first). The engine keeps as many as
    its max_batch: under continuous batching the batch size moves every time a request joins or
    leaves, and the step's widths with the requests' lengths (a PQ preset's selection is as wide
    as the batch's largest budget), so a step seen before, at any size, must replay rather than
    capture again. A graph's own memory is its output logits [B, V] and its intermediates, which
    the captures share (one pool).
    """

    def __init__(self, store: Any, max_graphs: int = 8):
        self.store = store
        self.max_graphs = max_graphs
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # by signature
        self.captures = 0
        self.replays = 0

    @property
    def batch_sizes(self) -> list[int]:
        """The batch sizes a kept graph replays (its logits' rows)."""
        return sorted({logits.shape[0] for _, logits in self.graphs.values()})

    def run(self, plan: Any, inputs: tuple[torch.Tensor, ...], forward: Callable[[Any], torch.Tensor]) -> torch.Tensor:
        """Logits of the step `plan` (already made by store.plan on the static inputs)."""
        B = plan.seq_ids.numel()
        sig = signature(self.store, plan, inputs)
        held = self.graphs.pop(sig, None)  # re-inserted last: the dict's order is least recently used first
        if held is None:
            same_b = [s for s in self.graphs if s[0] == sig[0]]  # the static inputs: the batch size's
            why = f"{_changed(same_b[-1], sig)} changed" if same_b else "new batch size"
            if len(self.graphs) >= self.max_graphs:
                self.graphs.pop(next(iter(self.graphs)))
            held = self._capture(plan, forward)
            self.captures += 1
            logger.info("engine: decode step captured in a CUDA graph (B=%d, capture %d: %s)", B, self.captures, why)
        self.graphs[sig] = held
        graph, logits = held
        with torch.profiler.record_function("kvstore.graph_replay"):
            graph.replay()
        self.replays += 1
        plan.written = [True] * len(plan.written)  # every layer wrote its token (inside the graph)
        return logits

    def _capture(self, plan: Any, forward: Callable[[Any], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream (cuBLAS workspaces, autotuning)
            for _ in range(2):
                forward(plan)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = forward(plan)
        return graph, logits
