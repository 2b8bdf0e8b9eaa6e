"""Count the aten ops that allocate memory, or sync the host, inside a piece of code.

    with AllocProbe() as probe:
        store.decode(layer, plan, q, k, v, scale)
    probe.allocations   # [Record(op, shape, dtype, where)], one per output tensor with a new storage

An op *allocates* when one of its output tensors owns a storage that none of its tensor inputs
owns: views, in-place ops and `out=` ops (the out tensor is an input) produce no new storage;
factory ops (empty, zeros, arange) and functional ops (add, index, topk without out) do. Each
output's storage is compared by identity (the StorageImpl), not by data pointer, so a
zero-element storage (data pointer 0) still counts as new.

A *host sync* is an op that copies a device value to the host (`_local_scalar_dense`: `.item()`,
`int(t)`, `bool(t)`, `.tolist()`) or whose output size depends on data (`nonzero`,
`masked_select`, `unique`...); on a CPU store they are no sync, but they are one on the GPU.

A *host value* is a Python number that becomes a 0-dim host tensor (`aten.lift_fresh`: `torch.tensor(x)`,
`t[index] = 1.0`) and then reaches an op other than `fill_`: on CUDA, `t[index_tensor] = 1.0` makes a
0-dim host tensor that `index_put_` copies to the device, a pageable host-to-device copy, which CUDA
graph capture refuses. (Slice assignment, `t[..., 3] = 1.0`, ends in `fill_` and is fine.)

Ops run by the Triton interpreter itself (TRITON_INTERPRET=1 copies a kernel's arguments to host
tensors and back) are ignored: on the GPU a kernel launch runs no aten op. The mode is
thread-local: ops of other threads (the CPU store's fetch thread) are not seen, so probe a store
with `async_fetch = False` to see its fetch.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

#: ops whose result is read on the host, or whose output shape depends on the data
SYNC_OPS = {
    "aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique2",
    "aten.unique_consecutive", "aten.is_nonzero", "aten.equal", "aten.repeat_interleave.Tensor",
}

_TRITON_DIR = None


def _triton_dir() -> str:
    global _TRITON_DIR
    if _TRITON_DIR is None:
        import triton

        _TRITON_DIR = os.path.dirname(triton.__file__) + os.sep
    return _TRITON_DIR


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_SKIP = tuple(os.path.join(_REPO, d) + os.sep for d in ("tests", ".venv"))


@dataclass(frozen=True)
class Record:
    op: str
    shape: tuple
    dtype: torch.dtype | None
    where: str  # innermost repository frame (file:line function) that issued the op

    def __str__(self) -> str:
        return f"{self.op} {list(self.shape)} {self.dtype} at {self.where}"


def _caller() -> tuple[bool, str]:
    """(inside the Triton package, innermost frame of this repository outside tests/)."""
    tdir = _triton_dir()
    where = "?"
    f = sys._getframe(2)
    found = False
    while f is not None:
        fn = f.f_code.co_filename
        if fn.startswith(tdir):
            return True, where
        if not found and fn.startswith(_REPO) and not fn.startswith(_SKIP):
            where = f"{os.path.relpath(fn, _REPO)}:{f.f_lineno} {f.f_code.co_name}"
            found = True
        f = f.f_back
    return False, where


def _storage_id(t: torch.Tensor):
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return None


class AllocProbe(TorchDispatchMode):
    """Records allocating ops and host syncs (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.allocations: list[Record] = []
        self.syncs: list[Record] = []
        self.host_values: list[Record] = []
        self._lifted: set = set()  # storages of lift_fresh outputs (Python numbers made tensors)
        self._keep: list[torch.Tensor] = []  # those outputs, alive so that no storage id is reused

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func.overloadpacket) if func.overloadpacket is not None else str(func)
        inside_triton, where = _caller()
        if inside_triton:
            return out
        flat_in, _ = tree_flatten((args, kwargs))
        owned = {_storage_id(t) for t in flat_in if isinstance(t, torch.Tensor)}
        flat_out, _ = tree_flatten(out)
        for t in flat_out:
            if isinstance(t, torch.Tensor) and _storage_id(t) not in owned:
                self.allocations.append(Record(name, tuple(t.shape), t.dtype, where))
        op = str(func)  # with the overload, e.g. aten.repeat_interleave.Tensor
        if name == "aten.lift_fresh":
            if out.dim() == 0:  # a Python number (`torch.tensor(list)` is data the caller copies itself)
                self._lifted.add(_storage_id(out))
                self._keep.append(out)
        elif name != "aten.fill_" and owned & self._lifted:
            self.host_values.append(Record(name, (), None, where))
        if name in SYNC_OPS or op in SYNC_OPS:
            self.syncs.append(Record(name, (), None, where))
        return out

    def summary(self) -> str:
        lines = [f"{len(self.allocations)} allocating ops, {len(self.syncs)} host syncs, "
                 f"{len(self.host_values)} host values"]
        for rec, n in Counter(str(r) for r in self.allocations).most_common():
            lines.append(f"  alloc x{n}: {rec}")
        for rec, n in Counter(str(r) for r in self.syncs).most_common():
            lines.append(f"  sync  x{n}: {rec}")
        for rec, n in Counter(str(r) for r in self.host_values).most_common():
            lines.append(f"  value x{n}: {rec}")
        return "\n".join(lines)
