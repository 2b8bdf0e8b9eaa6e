"""What a decode step is planned into: `DecodePlan` (built once per step by `KVStore.plan`, read
by every layer), its retrieval part `SelectionStep`, and the `Workspace` every buffer of the
step comes from.

The decode workspace: device buffers of a step, carved at plan time and reused step after step.
`KVStore.plan` runs once per step and may allocate; a layer's decode run may not (DESIGN.md:
no allocation, no host sync inside a layer's run). So every tensor a layer writes (scores,
top-k, indices, masks, gathered K/V, attention partials, the layer's output) is a view that
plan took from the store's `Workspace`::

    plan:    ws.take("sel.scores", (B, Hkv, N), torch.float32)   # a view, allocated only on growth
    layer:   pq_scores(..., out=scores); torch.topk(scores, k, out=(vals, idx)); ...

Each name keeps one flat buffer that grows (doubling) when a step needs more, so after the
first steps plan allocates nothing either and every view keeps its address while the shapes
repeat. Views of different names never overlap; the views of one name are overwritten by the
next step (what a layer returns from the workspace is valid until the next `plan`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch


def host_ints(*values: torch.Tensor) -> list[int]:
    """Several device scalars (integer or bool, 0-dim or one element) read to the host in one sync: a plan's
    reads of its sizes, batched (each `.item()` on a GPU waits for the queue to drain)."""
    if not values:
        return []
    return [int(x) for x in torch.stack([v.reshape(()).to(torch.int64) for v in values]).tolist()]


def fill_at(t: torch.Tensor, index: tuple, value: float | int | bool) -> torch.Tensor:
    """`t[index] = value` for a Python scalar at index tensors (None: the whole dimension), in place.

    The same as the indexed assignment but for the scalar: torch makes it a host tensor and copies it
    to t's device, and on a GPU that copy waits for the device's queue to drain. Here the scalar is
    filled on the device (one kernel), so a plan made while earlier steps still run waits for none of
    them (`Engine(overlap=...)`; tests/test_overlap.py holds it on a GPU)."""
    at = [i for i, x in enumerate(index) if x is not None]
    view = t.permute(*at, *(i for i in range(t.dim()) if i not in at))  # the indexed dimensions first
    view.index_put_(tuple(index[i] for i in at), torch.full((), value, dtype=t.dtype, device=t.device))
    return t


class Workspace:
    """Named, capacity-grown device buffers (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._flat: dict[str, torch.Tensor] = {}
        #: the views handed out, by (name, shape, dtype): a step asks for the same ones as the last, and a view
        #: made once costs the plan no slice and no view op (~100 a step); dropped when their buffer grows
        self._views: dict[tuple, torch.Tensor] = {}
        self._prefix = ""

    def take(self, name: str, shape: tuple[int, ...] | list[int], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous view [shape] of `name`'s buffer (plan time only; contents are stale)."""
        name = self._prefix + name
        shape = tuple(shape)
        key = (name, shape, dtype)
        view = self._views.get(key)
        if view is not None:  # the same view as a step before: same buffer, same address
            return view
        n = math.prod(shape)
        buf = self._flat.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < n:
            grow = 2 * buf.numel() if buf is not None and buf.dtype == dtype else 0
            buf = torch.empty(max(n, grow, 1), dtype=dtype, device=self.device)
            self._flat[name] = buf
            for k in [k for k in self._views if k[0] == name]:  # views of the old buffer: not handed out again
                del self._views[k]
        if len(self._views) >= 4096:  # shapes that came and went (batch sizes, widths): start over
            self._views.clear()
        view = self._views[key] = buf[:n].view(shape)
        return view

    def full(self, name: str, shape, dtype: torch.dtype, value) -> torch.Tensor:
        """`take`, filled with `value` (plan time)."""
        return self.take(name, shape, dtype).fill_(value)

    def arange(self, name: str, n: int) -> torch.Tensor:
        """int64 [n] = 0 .. n-1 (plan time)."""
        t = self.take(name, (n,), torch.int64)
        return torch.arange(n, out=t) if n else t

    @property
    def nbytes(self) -> int:
        """Device bytes the buffers hold."""
        return sum(b.numel() * b.element_size() for b in self._flat.values())

    def prefixed(self, prefix: str) -> "Workspace":
        """This workspace under other names: a second set of the same buffers (e.g. the speculative
        prefetch's selection beside the layer's own), sharing the storage dictionary."""
        view = copy.copy(self)  # the same storage dictionary
        view._prefix = self._prefix + prefix
        return view


@dataclass
class SelectionStep:
    """One decode step's selection metadata (built once in plan, read by every layer).

    seq_ids:    int64 [B] sequence slots.
    positions:  int64 [B] position of the token being decoded.
    lo, hi:     int64 [B] candidate range [lo, hi) per sequence.
    k:          int64 [B] tokens to select per (sequence, KV head) (fixed at prefill).
    num_tokens: host int, the width scored this step: the retrieval buffers' position capacity
                (>= max(hi); it grows by 1/8 at a time, so the step's shapes repeat step after step).
    kmax:       host int, the fixed width of the selection: max(k), or fewer while the candidates
                (max(hi) - lo, and under `exclude` the most any (layer, sequence, KV head) has) are
                fewer: then their count rounded up to a power of two.
    uniform_k:  every sequence selects the same k (then top-k need not be sorted).
    exclude:    bool [L, S, Hkv, cap + 1] or None: True where a (layer, sequence slot, KV head,
                position) is resident in the hot tier and so never selected (the LeanKV hot
                policy of `tiered`: the candidates are the tokens it pruned). The cold path's own
                tensor (`ColdPath.resident`), updated in plan; column cap is a trash column.
    ws:         the step's buffers (`Selector.plan_workspace`, plus the cold path's for the GPU cache,
                the fetch and the attention over the selection), or None outside a store's plan:
                then each call builds its buffers itself (the same ops, allocating).
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
    ws: dict | None = None


@dataclass
class DecodePlan:
    """Metadata of one decode step, built once by `KVStore.plan` and read by every layer.

    seq_ids:   int64 [B] sequence slots
    positions: int64 [B] position of the token being decoded
    page:      int32 [B, L, Hkv] page that receives each head's new token
    slot:      int32 [B, L, Hkv] slot within that page
    num_pages: widest page table among the batch (the gather limit for the reference path)
    evicted_pos: int64 [B, L, Hkv] position of the token that leaves the hot tier this step
               (its slot is the one the new token reuses), -1 where none leaves
    low_evicted: int64 [B, L, Hkv] position pruned from the low tier this step (-1: none); None
               without a low tier
    hot_ws:    buffers of the hot tier's decode writes and attention (HotTier.plan_workspace); its
               "width": the pages the attention is sized for (the kernel's splits)
    selection: retrieval metadata of the step (`SelectionStep`), None without a selector;
               its `ws` holds the buffers of the selection, GPU cache, fetch and merge
    retrieved: [2, B, Hkv, kmax, d] buffer of the selected tokens' K/V (hits + fetched misses)
    ret_pages: int32 [B, Hkv, NRP] pool pages the selected tokens are written into, attended in the
               hot tier's kernel launch (retrieval_attention="kernel"); None otherwise
    out:       [L, B, Hq, 1, d] model dtype: layer l's decode output is out[l]
    step_id:   the store's plan counter when this plan was built (a later plan makes it stale)
    fresh:     bool [B, L, Hkv] heads whose new token takes a fresh high-tier slot (index n, the next one)
    new_page:  int64 [B, L, Hkv] 1 for heads whose fresh slot opened a new page (the plan's allocation counts)
    written:   per layer, whether `decode` wrote the layer's new tokens (an abandoned step is undone, see
               `KVStore._undo_unwritten_slots`)
    Every tensor of a plan that a layer writes is a view of the store's `Workspace`.
    """

    seq_ids: torch.Tensor
    positions: torch.Tensor
    page: torch.Tensor
    slot: torch.Tensor
    num_pages: int
    evicted_pos: torch.Tensor | None = None
    low_evicted: torch.Tensor | None = None
    hot_ws: dict | None = None
    selection: SelectionStep | None = None
    retrieved: torch.Tensor | None = None
    ret_pages: torch.Tensor | None = None
    out: torch.Tensor | None = None
    step_id: int = 0
    fresh: torch.Tensor | None = None
    new_page: torch.Tensor | None = None
    written: list[bool] = field(default_factory=list)
