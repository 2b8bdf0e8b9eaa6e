"""The engine's decode step captured in a CUDA graph and replayed.

A decode step through a Hugging Face model launches every op of every layer from Python: at
32 layers the host work (4-6 ms a layer, `results/h200_throughput/README.md`) sets the step's
time, not the bytes it reads. Captured once, a step is one graph launch.

What makes a step replayable: `KVStore.plan` runs on the host before each replay and writes the
step's metadata into buffers of the store's `Workspace`, which keep their addresses while the
shapes repeat; every layer's `KVStore.decode` then allocates nothing and never syncs the host
(tests/test_decode_allocations.py). Three things are pinned for a graph's life:

* the batch size B (one graph per B: the graphs share one memory pool);
* the width the attention buffers are sized for (`plan(pages_hint=...)`: the widest page table
  the running requests will reach, so the kernel's split count and pages per split stay fixed);
* the addresses of everything the graph reads: the static inputs (token ids, positions, sequence
  slots of the rows), the page pool, the page tables, the slot positions, the plan's buffers.

`signature()` lists those; when one differs from the captured graph's (the pool grew, a longer
request joined, the rows changed count), the step is captured again. Replaying the same plan
twice is harmless (a layer writes its new token, then attends: the same inputs write the same
bytes), which is what lets the warm-up and the capture run on the step's real plan.

Eligible: a CUDA store whose decode attention is the Triton kernel over one tier (quant and
K8V4-like presets). Not yet: 16-bit pages (full: the torch reference path), LeanKV (its plan
reads the last step's logits and moves pages), the retrieval presets (host fetches). The engine
logs which path runs.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)


def graph_support(store: Any) -> str | None:
    """None if the store's decode step can be captured; else why not (one line)."""
    if store.geometry.device.type != "cuda":
        return "the store is not on CUDA"
    if not store.hot.kernel_decode:
        return "decode attention is not the Triton kernel (16-bit pages or Triton disabled)"
    if store.hot.low is not None or store.config.hot_policy == "leankv":
        return "the LeanKV policy moves pages between steps"
    if store.cold_path is not None:
        return "the retrieval path fetches from the host"
    return None


def _tensors(obj: Any, prefix: str = ""):
    """(name, tensor) of every tensor in nested dicts/lists/tuples; (name, value) of ints."""
    if isinstance(obj, torch.Tensor):
        yield prefix, (obj.data_ptr(), tuple(obj.shape), obj.dtype)
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _tensors(obj[k], f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}[{i}]")
    elif isinstance(obj, (int, bool)):
        yield prefix, obj


def signature(store: Any, plan: Any, inputs: tuple[torch.Tensor, ...]) -> tuple:
    """What a captured step reads, by address and shape (and the launch's ints)."""
    hot = store.hot
    parts = [("inputs", tuple(_tensors(list(inputs))))]
    parts.append(("store", tuple(_tensors([hot.pool.data, hot.pool.slot_pos, hot.table.pages, hot.table.num_tokens]))))
    parts.append(("plan", tuple(_tensors([plan.seq_ids, plan.out]))))
    parts.append(("ws", tuple(_tensors({k: v for k, v in plan.hot_ws.items() if k != "kernel"}))))
    return tuple(parts)


class DecodeGraphs:
    """Captured decode steps, one per batch size; `run` replays (capturing first when needed).

    forward(plan) must run one decode step of the model reading only the static inputs and the
    plan's buffers, and return the logits [B, V] (a tensor the graph then owns).
    """

    def __init__(self, store: Any, max_graphs: int = 8):
        self.store = store
        self.max_graphs = max_graphs
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, tuple[tuple, torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.captures = 0
        self.replays = 0

    def run(self, plan: Any, inputs: tuple[torch.Tensor, ...], forward: Callable[[Any], torch.Tensor]) -> torch.Tensor:
        """Logits of the step `plan` (already made by store.plan on the static inputs)."""
        B = plan.seq_ids.numel()
        sig = signature(self.store, plan, inputs)
        held = self.graphs.get(B)
        if held is None or held[0] != sig:
            self.graphs.pop(B, None)
            if len(self.graphs) >= self.max_graphs:
                self.graphs.pop(next(iter(self.graphs)))
            self.graphs[B] = (sig, *self._capture(plan, forward))
            self.captures += 1
            logger.info("engine: decode step captured in a CUDA graph (B=%d, capture %d)", B, self.captures)
        _, graph, logits = self.graphs[B]
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
