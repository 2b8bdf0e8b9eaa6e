"""Where a chunked prefill's time goes: Llama-3-8B shape (few layers), one batch at one length,
through `model.generate(max_new_tokens=1)`: hf one-shot, a preset one-shot and chunked, then a
torch.profiler table of the chunked run (CUDA kernels and CPU ops). GPU machine.

    python results/h200_throughput/profile_prefill.py --layers 4 --batch 8 --length 32768 --preset quant
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from types import SimpleNamespace

import torch

from benchmarks.perf.throughput import build_model, resolve_model
from kvstore import KVStoreClient, KVStoreConfig


def timed(model, ids, config=None):
    client = KVStoreClient(config) if config is not None else None
    ctx = client.attach(model) if client is not None else None
    if ctx is not None:
        ctx.__enter__()
    try:
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--preset", default="quant")
    p.add_argument("--chunk", type=int, default=8192)
    a = p.parse_args()
    src = resolve_model(SimpleNamespace(model="llama3-8b", layers=a.layers, device="cuda", dtype="auto",
                                        lengths=[a.length], new_tokens=1))
    model = build_model(src)
    ids = torch.randint(10, 120000, (a.batch, a.length), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    one = KVStoreConfig.preset(a.preset, prefill_chunk_tokens=None)
    chunked = KVStoreConfig.preset(a.preset, prefill_chunk_tokens=a.chunk)
    timed(model, ids[:, :4096], chunked)  # warm-up: compilation, first calls
    print(f"B={a.batch} T={a.length} layers={a.layers}")
    for name, cfg in (("hf", None), (f"{a.preset} one-shot", one), (f"{a.preset} chunked {a.chunk}", chunked)):
        print(f"{name:>28}: {timed(model, ids, cfg):.3f} s")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        timed(model, ids, chunked)
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cuda_time_total", row_limit=25))
    print(ka.table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
