"""Kernels one layer's decode step launches, per preset, counted on the CPU.

    TRITON_INTERPRET=1 python -m benchmarks.perf.decode_ops [--presets quant,pqcache,tiered] [--out FILE.json]

A CUDA graph removes the host's launch cost but not the GPU's: every kernel of a captured step
still starts and drains in turn (a few microseconds each on an H200), so a layer's kernel count
times the layers is a floor under a step's time, beside its bytes. Issue 17 asks to cut the
retrieval path's small ops where the profile says so; this is the count the profile will see,
taken where no GPU is: the store's decode runs through the path the GPU takes (use_triton="always":
the Triton kernels run in the interpreter), and each aten op that would launch a kernel (views and
the host's reads of a value are left out) and each Triton launch is counted, per layer, over
decode steps after the first (the first loads the PQ index).

Geometry: 2 layers of 8 query heads over 2 KV heads, head dim 64, fp16, two sequences of 384 and 250
tokens, 16-token pages: the interpreter is slow, and the count does not depend on the sizes.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

PRESETS = ("full", "quant", "leankv", "pqcache", "tiered")
#: overrides that make each preset select, prune and fetch within a short prompt
SMALL = {
    "leankv": dict(immune_tokens=16, score_queries=16),
    "pqcache": dict(sink_tokens=4, window_tokens=32, budget_fraction=0.2, gpu_cache_tokens=64),
    # alpha_prune 3 (the preset: 0.02): random weights spread attention evenly, and LeanKV would prune
    # nothing of a short random prompt, leaving tiered no candidate to select (no selection, no fetch)
    "tiered": dict(sink_tokens=4, immune_tokens=16, window_tokens=16, score_queries=16, budget_fraction=0.2,
                   alpha_prune=3.0),
}


#: ops whose CUDA kernels make the host wait: a value read, or an output whose size depends on the data
#: (and the indexing ops below with a boolean mask)
_SYNCS = frozenset({"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique_consecutive",
                    "aten._unique2", "aten.repeat_interleave"})
_INDEXING = frozenset({"aten.index", "aten.index_put_", "aten.index_put", "aten._index_put_impl_"})


class _Counter(TorchDispatchMode):
    """aten ops that launch a kernel (not views, not host reads) and the host syncs among them (`_SYNCS`),
    outside Triton's interpreter."""

    def __init__(self, state: dict):
        super().__init__()
        self.state, self.ops, self.syncs = state, Counter(), 0

    def __enter__(self):  # Tensor.tolist and .cpu read the data without an op here (a device-to-host copy,
        # which waits for the device, on a GPU: .cpu() is only called on the store's device tensors)
        self._saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "cpu")}

        def counting(fn):
            def counted(t, *args, **kwargs):
                self.syncs += not self.state["in_triton"]
                return fn(t, *args, **kwargs)
            return counted

        for name, fn in self._saved.items():
            setattr(torch.Tensor, name, counting(fn))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(torch.Tensor, name, fn)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.state["in_triton"]:
            return out
        name = str(func.overloadpacket)
        if name in _SYNCS or (name in _INDEXING and any(  # a boolean mask: a nonzero inside the op on CUDA
                t is not None and t.dtype == torch.bool for t in args[1])):
            self.syncs += 1
        if name != "aten._local_scalar_dense" and not name.startswith("profiler.") and not any(
                r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns):
            self.ops[name] += 1
        return out


@contextmanager
def _count_triton(state: dict):
    """Counts launches of interpreted Triton kernels and marks the ops they run as theirs."""
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run

    def counted(self, *args, **kwargs):
        state["launches"][getattr(self, "__name__", None) or getattr(self.fn, "__name__", "kernel")] += 1
        state["in_triton"] = True
        try:
            return run(self, *args, **kwargs)
        finally:
            state["in_triton"] = False

    InterpretedFunction.run = counted
    try:
        yield
    finally:
        InterpretedFunction.run = run


def count(preset: str, steps: int = 3, seed: int = 0, lens: tuple[int, ...] = (384, 250)) -> dict:
    """Per-layer kernel counts of `preset`'s decode step (steps 2 .. steps, averaged), over sequences
    of `lens` tokens."""
    from kvstore import KVStoreConfig
    from kvstore.geometry import ModelGeometry
    from kvstore.store import KVStore

    L, Hq, Hkv, d, dtype = 2, 8, 2, 64, torch.float16
    config = KVStoreConfig.preset(preset, use_triton="always", page_size=16, kmeans_iters=4, **SMALL.get(preset, {}))
    store = KVStore(config, ModelGeometry(L, Hq, Hkv, d, dtype, torch.device("cpu")))
    if store.cold_path is not None:
        store.cold_path.async_fetch = False  # the fetch's ops on this thread, as a GPU stream runs them
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    B, T = len(lens), max(lens)
    valid = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lens):
        valid[b, T - n:] = True
    ids = store.add_sequences(B)
    with torch.no_grad():
        for layer in range(L):
            store.prefill(layer, ids, r(B, Hq, T, d), r(B, Hkv, T, d), r(B, Hkv, T, d), valid, d ** -0.5)
        state = {"in_triton": False, "launches": Counter()}
        probe, plan_probe = _Counter(state), _Counter(state)
        measured, widths, plan_launches = 0, [], Counter()
        with _count_triton(state):
            for step in range(steps):
                # as the engine plans: the step's slots and positions handed over from the host
                host = dict(host_positions=store.seq_len[ids].tolist(), host_seq_ids=ids.tolist())
                if step == 0:
                    plan = store.plan(ids, **host)
                else:  # the plan's launches counted apart from the layers'
                    before = Counter(state["launches"])
                    with plan_probe:
                        plan = store.plan(ids, **host)
                    plan_launches.update(state["launches"] - before)
                    state["launches"] = before
                widths.append(plan.selection.kmax if plan.selection is not None else 0)
                for layer in range(L):
                    qkv = r(B, Hq, 1, d), r(B, Hkv, 1, d), r(B, Hkv, 1, d)
                    if step == 0:
                        state["launches"].clear()
                        store.decode(layer, plan, *qkv, d ** -0.5)
                        state["launches"].clear()
                        continue
                    with probe:
                        store.decode(layer, plan, *qkv, d ** -0.5)
                    measured += 1
        store.release(ids)
    aten = sum(probe.ops.values()) / measured
    triton = sum(state["launches"].values()) / measured
    planned = steps - 1
    return {
        "preset": preset,
        "aten_kernels_per_layer": aten,
        "triton_launches_per_layer": triton,
        "kernels_per_layer": aten + triton,
        "host_reads_per_layer": probe.syncs / measured,
        "selected_per_head": sum(widths[1:]) / max(1, len(widths) - 1),  # the selection's width (0: none ran)
        "top_aten_ops": {k: v / measured for k, v in probe.ops.most_common(12)},
        "triton_kernels": {k: v / measured for k, v in state["launches"].most_common()},
        # the plan, once a step for every layer: its kernels and the host waits they cost on a GPU
        "plan_kernels_per_step": (sum(plan_probe.ops.values()) + sum(plan_launches.values())) / planned,
        "plan_syncs_per_step": plan_probe.syncs / planned,
        "plan_top_aten_ops": {k: v / planned for k, v in plan_probe.ops.most_common(12)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf.decode_ops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default=",".join(PRESETS), help=f"comma-separated, from {', '.join(PRESETS)}")
    parser.add_argument("--steps", type=int, default=3, help="decode steps (the first is not counted); >= 2")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    presets = [p for p in args.presets.split(",") if p]
    bad = [p for p in presets if p not in PRESETS]
    if bad or args.steps < 2:
        parser.error(f"unknown preset {bad[0]!r}" if bad else "--steps must be >= 2")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        parser.error("set TRITON_INTERPRET=1: the count runs the Triton kernels in the interpreter on a CPU")
    rows = [count(p, args.steps) for p in presets]
    print("| preset | kernels / layer | aten | Triton | host reads / layer | selected / head "
          "| plan: kernels / step | plan: host syncs / step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['preset']} | {row['kernels_per_layer']:.1f} | {row['aten_kernels_per_layer']:.1f} | "
              f"{row['triton_launches_per_layer']:.1f} | {row['host_reads_per_layer']:.1f} | "
              f"{row['selected_per_head']:.0f} | {row['plan_kernels_per_step']:.0f} | {row['plan_syncs_per_step']:.0f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
