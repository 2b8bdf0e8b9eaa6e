"""One layer's hot-tier attention as each preset leaves it after a prefill: time, bytes, launch shape.

    python -m benchmarks.perf.hot_attend --length 32k --batch 4 --presets quant,leankv,tiered --out FILE.json

Why: on the H200 (results/h200_graphs/call2) tiered's decode kernel took 9.2 ms a 32-layer step at
32K x 4 against quant's 1.9 ms, for fewer GPU bytes. This isolates it. Per preset, one layer of the
Llama-3-8B shape (32 query heads over 8 KV heads, d = 128, bf16) is prefilled with `--batch` random
sequences of `--length` tokens through `KVStore.prefill` (LeanKV's prefill pruning and demotion run
as in the engine), one decode step is planned, and `HotTier.attend` is timed as the step runs it,
then with the policy's per-token logits off (LeanKV's policy reads them; the kernel writes them),
then as a plain K8V4 store holding the same tokens in the high tier would (quant). Reported: the
ms of a launch, the hot tier's bytes (pages in use), GB/s, the heads' high and low pages (mean,
max), the width the launch walks, its splits and pages per split.

Times: CUDA events over `--reps` launches after a warm-up (a CPU run times the reference path:
a smoke test, not a figure).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from benchmarks.args import csv as _csv, lengths as _lengths

HQ, HKV, D = 32, 8, 128


def _store(preset: str, length: int, batch: int, device: torch.device, seed: int):
    from kvstore import KVStoreConfig
    from kvstore.geometry import ModelGeometry
    from kvstore.store import KVStore

    config = KVStoreConfig.preset(preset)  # a cold path too (tiered): only the hot tier's pass is timed
    store = KVStore(config, ModelGeometry(1, HQ, HKV, D, torch.bfloat16, device))
    g = torch.Generator(device=device).manual_seed(seed)
    ids = store.add_sequences(batch)
    valid = torch.ones(batch, length, dtype=torch.bool, device=device)
    q = torch.randn(batch, HQ, length, D, device=device, dtype=torch.bfloat16, generator=g)
    k = torch.randn(batch, HKV, length, D, device=device, dtype=torch.bfloat16, generator=g)
    v = torch.randn(batch, HKV, length, D, device=device, dtype=torch.bfloat16, generator=g)
    store.prefill(0, ids, q, k, v, valid, D ** -0.5)
    del q, k, v
    return store, ids


def _time(fn, reps: int, device: torch.device) -> float:
    for _ in range(3):
        fn()
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps * 1e3
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def measure(preset: str, length: int, batch: int, reps: int, device: torch.device, seed: int = 0) -> list[dict]:
    store, ids = _store(preset, length, batch, device, seed)
    hot = store.hot
    plan = store.plan(ids)
    ws = plan.hot_ws
    q = torch.randn(batch, HQ, D, device=device, dtype=torch.bfloat16)
    t = hot.table
    n_hp = -(-t.num_tokens[ids, 0].float() // hot.tokens_per_page)
    n_lp = t.num_low_pages[ids, 0].float()
    shape = dict(preset=preset, length=length, batch=batch, kernel=bool(ws["kernel"]),
                 hot_bytes=hot.used_bytes, high_pages_mean=n_hp.mean().item(), high_pages_max=n_hp.max().item(),
                 low_pages_mean=n_lp.mean().item(), low_pages_max=n_lp.max().item(), width=ws.get("width"),
                 pages_per_split=ws.get("pages_per_split"),
                 splits=ws["part_lse"].shape[-1] if "part_lse" in ws else None)
    rows = []
    variants = [("as the step runs it", ws)]
    if ws.get("logits_all") is not None:
        variants.append(("without the policy's logits", {**ws, "logits_all": None}))
    for name, w in variants:
        ms = _time(lambda: hot.attend(0, ids, q, D ** -0.5, plan.num_pages, w), reps, device)
        rows.append(dict(shape, variant=name, ms=ms, gbs=hot.used_bytes / ms / 1e6))
    store.release(ids)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf.hot_attend", description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=_lengths, default=[32768], help="prompt tokens, e.g. 32k")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--presets", type=_csv, default=["quant", "leankv", "tiered"])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    from kvstore import KVStoreConfig

    bad = [m for m in args.presets if m not in KVStoreConfig.preset_names()]
    if bad or args.batch < 1 or args.reps < 1:
        p.error(f"unknown preset {bad[0]!r}" if bad else "--batch and --reps must be >= 1")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    rows = [r for m in args.presets for r in measure(m, args.length[0], args.batch, args.reps, device)]
    print("| preset | variant | ms | hot MB | GB/s | high pages mean/max | low pages mean/max | width | splits x pages |")
    print("|---|---|---:|---:|---:|---|---|---:|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['variant']} | {r['ms']:.3f} | {r['hot_bytes'] / 1e6:.1f} | {r['gbs']:.0f} | "
              f"{r['high_pages_mean']:.0f}/{r['high_pages_max']:.0f} | {r['low_pages_mean']:.0f}/{r['low_pages_max']:.0f} | "
              f"{r['width']} | {r['splits']} x {r['pages_per_split']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
