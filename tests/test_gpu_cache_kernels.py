"""The GPU cache's lookup and admission kernels (gpu_kernels/gpu_cache.py) against the torch path of
`GPUCache.lookup` / `GPUCache.admit` (the CPU's), bit for bit on the lookups' slots, the hit counters and the
cache's whole state after each of several steps: LFU and LRU, a quantized
and a 16-bit cache, the speculative prefetch's admission (touch=False), more misses than slots, invalid
picks, hits, and selections wider than one of the kernel's chunks. CPU tensors on the interpreter (CI);
CUDA tensors through the compiled kernel on a GPU machine."""

from __future__ import annotations

import os

import pytest
import torch

from kvstore.cold.gpu_cache import GPUCache
from kvstore.geometry import ModelGeometry
from kvstore.hot.quantization import QuantFormat
from kvstore.plan import Workspace


def _device() -> str:
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available() else "cuda"


def _state(cache: GPUCache) -> dict:
    """Everything the cache holds but the trash slot's row (the torch path writes every row it does not
    admit there, in no defined order; nothing reads it)."""
    t = cache.slots
    out = {"score": cache.score, "pos": cache.pos, "slot_of": cache.slot_of}
    for i, data in enumerate(cache._data()):
        out[f"data{i}"] = data[..., :t, :]
    return {k: v.clone() for k, v in out.items()}


@pytest.mark.parametrize("policy,quantized,slots,k", [
    ("lfu", True, 8, 6), ("lru", True, 5, 12), ("lfu", False, 5, 12), ("lru", False, 8, 6),  # picks fewer and more than the slots
    ("lfu", True, 16, 300), ("lru", False, 16, 300),  # a selection over several of the kernel's loop steps
])
def test_the_kernel_equals_the_torch_path_bit_for_bit(policy, quantized, slots, k):
    dev = _device()
    L, H, d, cap, S = 2, 2, 16, 400, 4
    geo = ModelGeometry(L, 2 * H, H, d, torch.float16, torch.device(dev))
    fmt = QuantFormat(8, 4, d, torch.float16) if quantized else None
    caches = {}
    for kernel in (False, True):
        caches[kernel] = GPUCache(geo, max_seqs=S, slots=slots, cap=cap, policy=policy, row_format=fmt,
                                  use_triton=kernel)
    g = torch.Generator().manual_seed(slots * 7 + k)
    seq_ids = torch.tensor([3, 0, 2], device=dev)
    B = seq_ids.numel()
    row_bytes = fmt.bytes_per_token if quantized else 0
    for step in range(5):
        # distinct positions per (sequence, head), with repeats across steps (hits)
        pos = torch.stack([torch.randperm(min(cap, 3 * k), generator=g)[:k] for _ in range(B * H)]).view(B, H, k)
        valid = torch.rand(B, H, k, generator=g) < 0.85
        kv = torch.randn(2, B, H, k, d, generator=g).to(torch.float16)
        raw = torch.randint(0, 256, (B * H * k, row_bytes), generator=g, dtype=torch.uint8) if quantized else None
        pos, valid, kv = pos.to(dev), valid.to(dev), kv.to(dev)
        raw = raw.to(dev) if raw is not None else None
        touch = step != 2  # step 2: a prefetch's admission, no score update
        slots_seen = {}
        for kernel, c in caches.items():
            ws = c.plan_workspace(seq_ids, k, Workspace(torch.device(dev)))
            for layer in range(L):
                slot = c.lookup(layer, seq_ids, pos, valid, ws, count=touch).clone()
                slots_seen[kernel, layer] = slot
                # the kernel's other outputs: the misses the fetch takes, the hits' rows the read takes
                miss = c.miss_mask(slot, valid, ws, out=torch.empty_like(valid)).clone()
                slots_seen[kernel, layer, "miss"] = miss
                slots_seen[kernel, layer, "rows"] = c._hit_rows(slot, ws).clone()
                c.admit(layer, seq_ids, pos, valid, slot, kv, ws, raw=raw, touch=touch)
            c.end_step()
        want, got = _state(caches[False]), _state(caches[True])
        for name in want:
            assert torch.equal(got[name], want[name]), (step, name)
        for key in [k_ for k_ in slots_seen if k_[0]]:
            assert torch.equal(slots_seen[key], slots_seen[(False, *key[1:])]), (step, key)
        assert int(caches[True].hits) == int(caches[False].hits)
        assert int(caches[True].lookups) == int(caches[False].lookups)
    assert (caches[True].pos[:, :, :, :slots] >= 0).any()  # something was admitted
    assert caches[True].hit_rate() > 0  # and hit in a later step
