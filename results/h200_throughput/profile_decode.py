"""Where a decode step's time goes: Llama-3-8B shape (few layers), one batch at one length, through
`model.generate()` as the throughput table runs it. Per method: the median time per output token,
and a torch.profiler table of five decode steps (steps 4-8; the streamer steps the profiler), with
the GPU-busy share of the step and the kernels launched per step. GPU machine.

    python results/h200_throughput/profile_decode.py --layers 4 --batch 4 --length 32768 \
        --methods hf,full,quant,pqcache,tiered
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch

from benchmarks.perf.throughput import build_model, resolve_model
from kvstore import KVStoreClient, KVStoreConfig

ACTIVE = 5


class Stepper:
    """A streamer: stamps each token and steps the profiler (None outside the profiled run)."""

    def __init__(self, prof=None):
        self.prof, self.times = prof, []

    def put(self, value):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        if self.prof is not None:
            self.prof.step()

    def end(self):
        pass


def generate(model, ids, method, new_tokens, streamer):
    client = None if method == "hf" else KVStoreClient(KVStoreConfig.preset(method))
    ctx = client.attach(model) if client is not None else None
    if ctx is not None:
        ctx.__enter__()
    try:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, streamer=streamer, pad_token_id=0)
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--methods", default="hf,full,quant,pqcache,tiered")
    p.add_argument("--rows", type=int, default=18)
    a = p.parse_args()
    src = resolve_model(SimpleNamespace(model="llama3-8b", layers=a.layers, device="cuda", dtype="auto",
                                        lengths=[a.length], new_tokens=16))
    model = build_model(src)
    ids = torch.randint(10, 120000, (a.batch, a.length), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    print(f"B={a.batch} T={a.length} layers={a.layers}")
    for method in a.methods.split(","):
        generate(model, ids[:, :2048], method, 4, Stepper())  # warm-up
        s = Stepper()
        generate(model, ids, method, 16, s)
        gaps = [b - x for x, b in zip(s.times[2:], s.times[3:])]
        tpot = statistics.median(gaps)
        sched = torch.profiler.schedule(wait=3, warmup=1, active=ACTIVE, repeat=1)
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts, schedule=sched) as prof:
            generate(model, ids, method, 12, Stepper(prof))
        ka = prof.key_averages()
        evts = [e for e in ka if e.device_type == torch.autograd.DeviceType.CUDA]
        gpu_us = sum(getattr(e, "self_device_time_total", None) or e.self_cuda_time_total for e in evts) / ACTIVE
        launches = sum(e.count for e in evts) / ACTIVE
        print(f"\n===== {method}: TPOT {tpot * 1e3:.2f} ms (median of {len(gaps)}); GPU busy {gpu_us / 1e3:.2f} ms "
              f"a step ({gpu_us / 1e3 / (tpot * 1e3):.0%}); {launches:.0f} kernels a step "
              f"({launches / a.layers:.0f} a layer)")
        print(ka.table(sort_by="self_cuda_time_total", row_limit=a.rows))
        print(ka.table(sort_by="self_cpu_time_total", row_limit=a.rows))


if __name__ == "__main__":
    main()
