"""The decode workspace: device buffers of a step, carved at plan time and reused step after step.

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

import math

import torch


class Workspace:
    """Named, capacity-grown device buffers (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._flat: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...] | list[int], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous view [shape] of `name`'s buffer (plan time only; contents are stale)."""
        n = math.prod(shape)
        buf = self._flat.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < n:
            grow = 2 * buf.numel() if buf is not None and buf.dtype == dtype else 0
            buf = torch.empty(max(n, grow, 1), dtype=dtype, device=self.device)
            self._flat[name] = buf
        return buf[:n].view(tuple(shape))

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
